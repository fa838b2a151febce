"""Dialer back ends of voice dunning: how a call is placed and how its
outcome comes back.

- CallFileDialer (production): an Asterisk call file per call, written
  atomically: into <spool>/tmp (same file system), fsynced, its mtime set to
  the moment the call may start (Asterisk dials a file whose mtime is not in
  the future), then renamed into <spool>/outgoing, so Asterisk never reads a
  half-written file. The outcome arrives later: with `Archive: yes` Asterisk
  moves the file to <spool>/outgoing_done with `Status: Completed|Expired|
  Failed`, which harvest() turns into ANSWERED / NO_ANSWER / FAILED.
- RecordingDialer (tests, demos): writes each call as a JSON line (phone
  masked) and answers with the outcome scripted for the household.

A phone number is written only into the call file (the dialer must dial it);
it is never logged unmasked."""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from yindian_common.fields import mask_phone

log = logging.getLogger("yindian.ivr.dialer")

_PHONE_RE = re.compile(r"\+?[0-9]{3,20}")
_SAFE_RE = re.compile(r"[^\r\n]*")
# Asterisk's archived Status: → our outcome.
ARCHIVE_STATUS = {"Completed": "ANSWERED", "Expired": "NO_ANSWER", "Failed": "FAILED"}
CALL_FILE_BYTES_MAX = 8192
HARVEST_FILES_MAX = 10_000


@dataclass(frozen=True)
class CallRequest:
    campaign_id: str
    account_no: str
    attempt_no: int
    phone: str = field(repr=False)
    prompt_stem: Path
    at: dt.datetime

    @property
    def name(self) -> str:
        return f"yindian-{self.campaign_id}-{self.account_no}-{self.attempt_no}"


@dataclass(frozen=True)
class HarvestedOutcome:
    campaign_id: str
    account_no: str
    attempt_no: int
    outcome: str
    detail: str


class Dialer(Protocol):
    def place(self, call: CallRequest) -> str:
        """Places one call; returns PLACED (outcome to follow) or the final outcome."""
        ...

    def harvest(self) -> list[HarvestedOutcome]:
        """Final outcomes of calls placed earlier (consumed: each reported once)."""
        ...

    def done(self, outcome: HarvestedOutcome) -> None:
        """The outcome is recorded in the MIS: forget it."""
        ...


@dataclass(frozen=True)
class CallFileOptions:
    channel_template: str = "Local/{phone}@yindian-dunning-out"
    caller_id: str = '"95598" <95598>'
    context: str = "yindian-dunning"
    extension: str = "s"
    priority: int = 1
    wait_time_s: int = 45
    max_retries: int = 0
    retry_time_s: int = 300


def check_phone(phone: str) -> str:
    if not _PHONE_RE.fullmatch(phone):
        raise ValueError(f"not a dialable phone number: {mask_phone(phone)!r}")
    return phone


def call_file_text(call: CallRequest, opts: CallFileOptions) -> str:
    lines = [
        ("Channel", opts.channel_template.format(phone=check_phone(call.phone))),
        ("CallerID", opts.caller_id),
        ("MaxRetries", str(opts.max_retries)),
        ("RetryTime", str(opts.retry_time_s)),
        ("WaitTime", str(opts.wait_time_s)),
        ("Context", opts.context),
        ("Extension", opts.extension),
        ("Priority", str(opts.priority)),
        ("Archive", "yes"),
        ("Set", f"YINDIAN_PROMPT={call.prompt_stem}"),
        ("Set", f"YINDIAN_CAMPAIGN={call.campaign_id}"),
        ("Set", f"YINDIAN_ACCOUNT={call.account_no}"),
        ("Set", f"YINDIAN_ATTEMPT={call.attempt_no}"),
    ]
    for key, value in lines:
        if not _SAFE_RE.fullmatch(value) or not value:
            raise ValueError(f"call file {key}: must be one non-empty line")
    return "".join(f"{k}: {v}\n" for k, v in lines)


def parse_call_file(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """(headers, Set: variables) of a call file; a repeated header keeps its last value."""
    headers: dict[str, str] = {}
    variables: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key.lower() == "set" and "=" in value:
            name, _, v = value.partition("=")
            variables[name.strip()] = v.strip()
        else:
            headers[key] = value
    return headers, variables


class CallFileDialer:
    def __init__(self, spool_dir: Path, opts: CallFileOptions) -> None:
        self.opts = opts
        self.outgoing = spool_dir / "outgoing"
        self.tmp = spool_dir / "tmp"
        self.archive = spool_dir / "outgoing_done"
        self.harvested = spool_dir / "yindian_harvested"
        for d in (self.outgoing, self.tmp, self.archive, self.harvested):
            d.mkdir(parents=True, exist_ok=True)

    def place(self, call: CallRequest) -> str:
        body = call_file_text(call, self.opts).encode("utf-8")
        tmp = self.tmp / f"{call.name}.call"
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        stamp = call.at.timestamp()
        os.utime(tmp, (stamp, stamp))
        os.rename(tmp, self.outgoing / f"{call.name}.call")  # atomic: same file system
        dir_fd = os.open(self.outgoing, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        log.info("event=call_file_written file=%s phone=%s", f"{call.name}.call", mask_phone(call.phone))
        return "PLACED"

    def harvest(self) -> list[HarvestedOutcome]:
        found: list[HarvestedOutcome] = []
        for path in sorted(self.archive.glob("yindian-*.call"))[:HARVEST_FILES_MAX]:
            if path.stat().st_size > CALL_FILE_BYTES_MAX:
                log.warning("event=archived_call_file_too_big file=%s", path.name)
                continue
            headers, variables = parse_call_file(path.read_text("utf-8", "replace"))
            status = headers.get("Status", "")
            outcome = ARCHIVE_STATUS.get(status)
            try:
                attempt_no = int(variables.get("YINDIAN_ATTEMPT", ""))
            except ValueError:
                attempt_no = 0
            if outcome is None or attempt_no < 1:
                log.warning("event=archived_call_file_unreadable file=%s status=%s", path.name, status)
                continue
            found.append(HarvestedOutcome(variables.get("YINDIAN_CAMPAIGN", ""),
                                          variables.get("YINDIAN_ACCOUNT", ""), attempt_no, outcome,
                                          f"asterisk status {status}"))
        return found

    def done(self, outcome: HarvestedOutcome) -> None:
        name = f"yindian-{outcome.campaign_id}-{outcome.account_no}-{outcome.attempt_no}.call"
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.archive / name, self.harvested / name)


class RecordingDialer:
    """Records the calls it is asked to place; each household answers as scripted."""

    def __init__(self, path: Path, script: Mapping[str, Sequence[str]]) -> None:
        self.path = path
        self.script = script
        path.parent.mkdir(parents=True, exist_ok=True)

    def _calls_so_far(self, account_no: str) -> int:
        if not self.path.exists():
            return 0
        with open(self.path, encoding="utf-8") as f:
            return sum(1 for line in f if json.loads(line)["account_no"] == account_no)

    def place(self, call: CallRequest) -> str:
        check_phone(call.phone)
        answers = self.script.get(call.account_no, ())
        n = self._calls_so_far(call.account_no)
        outcome = answers[n] if n < len(answers) else "ANSWERED"
        record = {"campaign_id": call.campaign_id, "account_no": call.account_no, "attempt_no": call.attempt_no,
                  "phone": mask_phone(call.phone), "prompt": str(call.prompt_stem),
                  "at": call.at.isoformat(), "outcome": outcome}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return outcome

    def harvest(self) -> list[HarvestedOutcome]:
        return []

    def done(self, outcome: HarvestedOutcome) -> None:
        return None
