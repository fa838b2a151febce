"""Call files: Asterisk syntax, atomic placement, archived outcomes read back."""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from ivr.dialer import CallFileDialer, CallFileOptions, CallRequest, RecordingDialer, call_file_text, parse_call_file

pytestmark = pytest.mark.timeout(30)
AT = dt.datetime(2026, 11, 28, 2, 0, tzinfo=dt.UTC)


def call(phone: str = "13912345678", attempt_no: int = 2) -> CallRequest:
    return CallRequest("DUN-202611", "0100000017", attempt_no, phone, Path("/var/prompts/abc"), AT)


def test_call_file_is_asterisk_syntax() -> None:
    text = call_file_text(call(), CallFileOptions(channel_template="PJSIP/{phone}@carrier"))
    assert text == ("Channel: PJSIP/13912345678@carrier\nCallerID: \"95598\" <95598>\nMaxRetries: 0\n"
                    "RetryTime: 300\nWaitTime: 45\nContext: yindian-dunning\nExtension: s\nPriority: 1\n"
                    "Archive: yes\nSet: YINDIAN_PROMPT=/var/prompts/abc\nSet: YINDIAN_CAMPAIGN=DUN-202611\n"
                    "Set: YINDIAN_ACCOUNT=0100000017\nSet: YINDIAN_ATTEMPT=2\n")
    headers, variables = parse_call_file(text + "Status: Expired\n")
    assert headers["Status"] == "Expired" and variables["YINDIAN_ATTEMPT"] == "2"
    assert "13912345678" not in repr(call())  # a phone never shows up in a repr (logs)


@pytest.mark.parametrize("phone", ["", "12", "139 1234 5678", "139\nChannel: x", "13912345678@evil"])
def test_a_phone_that_is_not_a_number_writes_nothing(tmp_path: Path, phone: str) -> None:
    dialer = CallFileDialer(tmp_path, CallFileOptions())
    with pytest.raises(ValueError):
        dialer.place(call(phone))
    assert list((tmp_path / "outgoing").iterdir()) == [] and list((tmp_path / "tmp").iterdir()) == []


def test_placed_file_appears_whole_with_its_dial_time(tmp_path: Path) -> None:
    dialer = CallFileDialer(tmp_path, CallFileOptions())
    assert dialer.place(call()) == "PLACED"
    placed = tmp_path / "outgoing" / "yindian-DUN-202611-0100000017-2.call"
    assert placed.read_text() == call_file_text(call(), CallFileOptions())
    assert placed.stat().st_mtime == AT.timestamp()
    assert os.stat(tmp_path / "tmp").st_dev == os.stat(tmp_path / "outgoing").st_dev  # rename is atomic
    assert list((tmp_path / "tmp").iterdir()) == []


def test_archived_outcomes_are_harvested_once(tmp_path: Path) -> None:
    dialer = CallFileDialer(tmp_path, CallFileOptions())
    dialer.place(call())
    placed = tmp_path / "outgoing" / "yindian-DUN-202611-0100000017-2.call"
    (tmp_path / "outgoing_done" / placed.name).write_text(placed.read_text() + "Status: Completed\n")
    (tmp_path / "outgoing_done" / "yindian-garbled.call").write_text("Status: Whatever\n")
    (found,) = dialer.harvest()
    assert (found.account_no, found.attempt_no, found.outcome) == ("0100000017", 2, "ANSWERED")
    dialer.done(found)
    assert dialer.harvest() == []


def test_recording_dialer_follows_its_script_and_masks_phones(tmp_path: Path) -> None:
    dialer = RecordingDialer(tmp_path / "calls.jsonl", {"0100000017": ["BUSY", "NO_ANSWER"]})
    assert [dialer.place(call(attempt_no=n)) for n in (1, 2, 3)] == ["BUSY", "NO_ANSWER", "ANSWERED"]
    text = (tmp_path / "calls.jsonl").read_text()
    assert "13912345678" not in text and "139****5678" in text
