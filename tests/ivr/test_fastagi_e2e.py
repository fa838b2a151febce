"""Telephone self-service against a real `ivr serve` and a real mis_adapter:
this test is Asterisk, speaking FastAGI line by line, and asserts every
command the server sends, with the prompts it names rendered as real WAVs."""
from __future__ import annotations

import datetime as dt
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ivr import phrases
from ivr.prompts import PromptRenderer, PromptSettings
from tests.ivr.asterisk_peer import AsteriskPeer
from tests.ivr.stack import IVR_OPERATOR, Mis, make_mis_db, running_mis
from tests.support import procs
from tests.support.mis_data import BillSpec
from yindian_common.fields import luhn_check_digit, make_account_no

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

DIGIT_MS = 3000
MENU_MS = 4000


@dataclass
class Ivr:
    proc: procs.Proc
    mis: Mis
    accounts: dict[int, str]
    prompt_dir: Path

    def stem(self, text: str) -> str:
        """The quoted file argument the server must name for a phrase."""
        return '"' + str(PromptRenderer(PromptSettings(cache_dir=self.prompt_dir)).stem(text)) + '"'

    def peer(self) -> AsteriskPeer:
        p = AsteriskPeer(self.proc.grpc_addr)
        p.send_headers()
        return p


def start_ivr(tmp_path: Path, mis: Mis | str, *extra: str) -> procs.Proc:
    return procs.start("ivr", [
        "ivr", "serve", "--listen", "127.0.0.1:0", "--upstream", mis if isinstance(mis, str) else mis.addr, "--insecure", "--operator", IVR_OPERATOR,
        "--metrics-port", "0", "--prompt-dir", str(tmp_path / "prompts"), "--digit-timeout-ms", str(DIGIT_MS),
        "--menu-timeout-ms", str(MENU_MS), "--header-timeout-s", "2", "--grace-s", "2", *extra], log_dir=tmp_path)


@pytest.fixture(scope="module")
def ivr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ivr]:
    tmp_path = tmp_path_factory.mktemp("ivr")
    url, accounts = make_mis_db(tmp_path, {
        1: ([BillSpec("202610", 12_345, dt.date(2026, 11, 25), kwh=160)], "13900001234"),
        2: ([], "13900005678"),
    })
    with running_mis(tmp_path, url) as mis:
        mis.pay(accounts[1], "IVR-PAY-1", 2_000)  # the last payment the caller asks for
        proc = start_ivr(tmp_path, mis)
        try:
            yield Ivr(proc, mis, accounts, tmp_path / "prompts")
        finally:
            assert proc.terminate() == 0


def bad_check_digit(account_no: str) -> str:
    return account_no[:9] + str((luhn_check_digit(account_no[:9]) + 1) % 10)


def expected_summary(ivr: Ivr, account_no: str) -> str:
    """Built from QueryAccount (BillingService), not from the IVR's own look-up."""
    q = ivr.mis.query(account_no)
    assert (q.arrears_fen, q.late_fee_fen) == (10_445, 0)  # 123.45 + 1.00 late fee, less 20.00 paid late fee first
    return ("户号尾号" + "".join("零一二三四五六七八九"[int(c)] for c in account_no[-4:]) + "。"
            "您目前欠费一百零四元四角五分，违约金零元整，合计一百零四元四角五分。"
            "缴费截止日期是二〇二六年十一月二十五日。")


def test_caller_keys_a_bad_number_then_hears_arrears_and_last_payment(ivr: Ivr) -> None:
    acct = ivr.accounts[1]
    summary = expected_summary(ivr, acct)
    last = "最近一次缴费是二〇二六年十一月二十八日，金额二十元整，缴费方式银行柜台。"
    p = ivr.peer()
    p.expect("ANSWER", "200 result=0")
    p.expect(f"GET DATA {ivr.stem(phrases.ENTER_ACCOUNT)} {DIGIT_MS} 10", f"200 result={bad_check_digit(acct)}")
    p.expect(f"GET DATA {ivr.stem(phrases.REENTER_BAD_NUMBER)} {DIGIT_MS} 10", f"200 result={acct}")
    p.expect(f'STREAM FILE {ivr.stem(summary)} "120"', "200 result=0 endpos=41200")
    p.expect(f'STREAM FILE {ivr.stem(phrases.MENU)} "120"', "200 result=0 endpos=20800")
    p.expect(f"WAIT FOR DIGIT {MENU_MS}", f"200 result={ord('2')}")           # 2: last payment
    p.expect(f'STREAM FILE {ivr.stem(last)} "120"', f"200 result={ord('1')} endpos=8000")  # 1 during playback
    p.expect(f'STREAM FILE {ivr.stem(summary)} "120"', "200 result=0 endpos=41200")  # repeated
    p.expect(f'STREAM FILE {ivr.stem(phrases.MENU)} "120"', f"200 result={ord('0')} endpos=100")  # 0: done
    p.expect(f'STREAM FILE {ivr.stem(phrases.GOODBYE)} ""', "200 result=0 endpos=16000")
    p.expect("HANGUP", "200 result=1")
    p.expect_closed()
    for text in (phrases.ENTER_ACCOUNT, phrases.REENTER_BAD_NUMBER, summary, phrases.MENU, last, phrases.GOODBYE):
        wav = Path(ivr.stem(text).strip('"') + ".wav")
        info = subprocess.run(["soxi", str(wav)], capture_output=True, text=True, check=True).stdout
        assert re.search(r"Channels\s*:\s*1\b", info) and re.search(r"Sample Rate\s*:\s*8000\b", info), info


def test_three_bad_numbers_end_the_call(ivr: Ivr) -> None:
    unknown = make_account_no("01", 999)  # a valid check digit, but no such household
    p = ivr.peer()
    p.expect("ANSWER", "200 result=0")
    p.expect(f"GET DATA {ivr.stem(phrases.ENTER_ACCOUNT)} {DIGIT_MS} 10", "200 result=12345 (timeout)")
    p.expect(f"GET DATA {ivr.stem(phrases.REENTER_BAD_NUMBER)} {DIGIT_MS} 10", f"200 result={unknown}")
    p.expect(f"GET DATA {ivr.stem(phrases.REENTER_UNKNOWN)} {DIGIT_MS} 10", "200 result=")
    p.expect(f'STREAM FILE {ivr.stem(phrases.TOO_MANY_ATTEMPTS)} ""', "200 result=0 endpos=100")
    p.expect("HANGUP", "200 result=1")
    p.expect_closed()


def test_no_arrears_is_said_plainly(ivr: Ivr) -> None:
    acct = ivr.accounts[2]
    tail = "".join("零一二三四五六七八九"[int(c)] for c in acct[-4:])
    p = ivr.peer()
    p.expect("ANSWER", "200 result=0")
    p.expect(f"GET DATA {ivr.stem(phrases.ENTER_ACCOUNT)} {DIGIT_MS} 10", f"200 result={acct}")
    p.expect(f'STREAM FILE {ivr.stem(f"户号尾号{tail}。您目前没有欠费，预存余额零元整。")} "120"', "200 result=0 endpos=1")
    p.expect(f'STREAM FILE {ivr.stem(phrases.MENU)} "120"', "200 result=0 endpos=1")
    p.expect(f"WAIT FOR DIGIT {MENU_MS}", "200 result=0")  # no key: goodbye
    p.expect(f'STREAM FILE {ivr.stem(phrases.GOODBYE)} ""', "200 result=0 endpos=1")
    p.expect("HANGUP", "200 result=1")
    p.expect_closed()


def test_hangup_mid_call_ends_it_and_the_next_call_is_served(ivr: Ivr) -> None:
    acct = ivr.accounts[1]
    summary = expected_summary(ivr, acct)
    p = ivr.peer()
    p.expect("ANSWER", "200 result=0")
    p.expect(f"GET DATA {ivr.stem(phrases.ENTER_ACCOUNT)} {DIGIT_MS} 10", f"200 result={acct}")
    assert p.read_command() == f'STREAM FILE {ivr.stem(summary)} "120"'
    p.send("HANGUP")                          # Asterisk's notice: the caller put the phone down
    p.send("200 result=-1 endpos=3000")
    p.expect_closed()                         # no command to a dead channel; connection closed

    p = ivr.peer()                            # a dead channel answers 511 to the next command
    p.expect("ANSWER", "200 result=0")
    p.expect(f"GET DATA {ivr.stem(phrases.ENTER_ACCOUNT)} {DIGIT_MS} 10",
             "511 Command Not Permitted on a dead channel or intercepted channel")
    p.expect_closed()

    p = ivr.peer()                            # Asterisk drops the socket mid-command
    p.expect("ANSWER", "200 result=0")
    assert p.read_command() is not None
    p.close()

    p = ivr.peer()                            # and the server still serves
    p.expect("ANSWER", "200 result=0")
    p.expect(f"GET DATA {ivr.stem(phrases.ENTER_ACCOUNT)} {DIGIT_MS} 10", f"200 result={acct}")
    p.expect(f'STREAM FILE {ivr.stem(summary)} "120"', "200 result=-1 endpos=0")  # hang-up during playback
    p.expect_closed()


def test_silent_or_garbled_asterisk_is_cut_off(ivr: Ivr) -> None:
    p = AsteriskPeer(ivr.proc.grpc_addr)
    p.send("agi_network: yes")                # header block never finished: --header-timeout-s 2
    p.expect_closed()
    p = AsteriskPeer(ivr.proc.grpc_addr)
    p.send("agi_network: yes\nGET / HTTP/1.1\n")
    p.expect_closed()
    p = ivr.peer()
    p.expect("ANSWER", "200 result=0")
    assert (p.read_command() or "").startswith("GET DATA ")
    p.send("200 result=" + "1" * 5000)        # a reply line over --line-bytes-max
    p.expect_closed()


def test_sessions_beyond_the_bound_are_refused(ivr: Ivr, tmp_path: Path) -> None:
    one = start_ivr(tmp_path, ivr.mis, "--sessions-max", "1")
    try:
        first = AsteriskPeer(one.grpc_addr)
        first.send_headers()
        assert first.read_command() == "ANSWER"     # first call in progress
        second = AsteriskPeer(one.grpc_addr)
        second.send_headers()
        second.expect_closed()                      # refused: closed without a command
        first.send("200 result=0")
        assert (first.read_command() or "").startswith("GET DATA ")
        first.close()
    finally:
        assert one.terminate() == 0


def test_utility_down_and_overlong_calls_end_politely(ivr: Ivr, tmp_path: Path) -> None:
    with socket.socket() as s:                  # a port nobody listens on: mis_adapter is down
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    lonely = start_ivr(tmp_path, dead, "--upstream-timeout-s", "1", "--call-duration-max-s", "3",
                       "--prompt-dir", str(ivr.prompt_dir))  # same cache: same file names
    try:
        p = AsteriskPeer(lonely.grpc_addr)
        p.send_headers()
        p.expect("ANSWER", "200 result=0")
        p.expect(f"GET DATA {ivr.stem(phrases.ENTER_ACCOUNT)} {DIGIT_MS} 10", f"200 result={ivr.accounts[1]}")
        p.expect(f'STREAM FILE {ivr.stem(phrases.SERVICE_UNAVAILABLE)} ""', "200 result=0 endpos=100")
        p.expect("HANGUP", "200 result=1")
        p.expect_closed()

        p = AsteriskPeer(lonely.grpc_addr)      # Asterisk stops answering: the call ends at its bound
        p.send_headers()
        p.expect("ANSWER", "200 result=0")
        assert (p.read_command() or "").startswith("GET DATA ")
        started = time.monotonic()
        p.expect_closed()
        assert time.monotonic() - started < 10
    finally:
        assert lonely.terminate() == 0


def test_sigterm_lets_the_call_in_progress_finish(ivr: Ivr, tmp_path: Path) -> None:
    draining = start_ivr(tmp_path, ivr.mis, "--prompt-dir", str(ivr.prompt_dir), "--grace-s", "20")
    p = AsteriskPeer(draining.grpc_addr)
    p.send_headers()
    p.expect("ANSWER", "200 result=0")
    draining.popen.send_signal(signal.SIGTERM)
    host, port = draining.grpc_addr.rsplit(":", 1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:          # the listener closes at once ...
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
        except ConnectionRefusedError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("still accepting calls after SIGTERM")
    p.expect(f"GET DATA {ivr.stem(phrases.ENTER_ACCOUNT)} {DIGIT_MS} 10", "200 result=")  # ... the call goes on
    p.expect(f"GET DATA {ivr.stem(phrases.REENTER_BAD_NUMBER)} {DIGIT_MS} 10", "200 result=")
    p.expect(f"GET DATA {ivr.stem(phrases.REENTER_BAD_NUMBER)} {DIGIT_MS} 10", "200 result=")
    p.expect(f'STREAM FILE {ivr.stem(phrases.TOO_MANY_ATTEMPTS)} ""', "200 result=0 endpos=1")
    p.expect("HANGUP", "200 result=1")
    p.expect_closed()
    assert draining.popen.wait(timeout=20) == 0
