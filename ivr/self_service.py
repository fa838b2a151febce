"""One telephone self-service call (电话查询): the caller keys in the account
number, hears arrears, late fee and due date in Mandarin, and may press 1 to
hear it again or 2 for the last payment.

    ANSWER
    GET DATA <enter account>            up to account_attempts_max tries
      bad check digit / unknown  → GET DATA <re-enter ...>
      too many tries             → STREAM FILE <too many>, HANGUP
    STREAM FILE <summary> "120"         a key interrupts the playback
    STREAM FILE <menu> "120"
    WAIT FOR DIGIT <menu timeout>       1 repeat, 2 last payment, 0/none: goodbye
    STREAM FILE <goodbye> ""
    HANGUP

The caller may hang up anywhere (AgiHangup ends the call quietly). The call
never outlives call_duration_max_s. Never logs a full account number."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ivr import phrases
from ivr.accounts import Overview
from ivr.agi import AgiHangup, AgiSession
from ivr.customer_client import AccountRejected, AccountUnknown, CustomerError
from ivr.prompts import PromptRenderer, wav_duration_s
from yindian_common import fields
from yindian_common.errors import InvalidField

log = logging.getLogger("yindian.ivr.call")

ACCOUNT_DIGITS = fields.ACCOUNT_NO_LEN
MENU_KEYS = "120"

LookUp = Callable[[str], Awaitable[Overview]]


@dataclass(frozen=True)
class CallLimits:
    account_attempts_max: int = 3
    digit_timeout_ms: int = 6000
    menu_timeout_ms: int = 6000
    menu_rounds_max: int = 5


class SelfServiceCall:
    def __init__(self, agi: AgiSession, prompts: PromptRenderer, look_up: LookUp, limits: CallLimits,
                 call_id: str) -> None:
        self.agi = agi
        self.prompts = prompts
        self.look_up = look_up
        self.limits = limits
        self.call_id = call_id
        self.outcome = "STARTED"

    async def _play(self, text: str, escape: str = "") -> str | None:
        stem = await self.prompts.render(text)
        return await self.agi.stream_file(str(stem), wav_duration_s(stem.with_suffix(".wav")), escape)

    async def _ask(self, text: str, max_digits: int) -> str:
        stem = await self.prompts.render(text)
        digits, _timed_out = await self.agi.get_data(str(stem), wav_duration_s(stem.with_suffix(".wav")),
                                                     self.limits.digit_timeout_ms, max_digits)
        return digits

    async def run(self) -> str:
        """Plays the whole call; returns how it ended (for logs and metrics)."""
        await self.agi.answer()
        overview = await self._identify()
        if overview is None:
            await self.agi.hangup()
            return self.outcome
        await self._menu(overview)
        await self._play(phrases.GOODBYE)
        await self.agi.hangup()
        return self.outcome

    async def _identify(self) -> Overview | None:
        prompt = phrases.ENTER_ACCOUNT
        for attempt in range(1, self.limits.account_attempts_max + 1):
            digits = (await self._ask(prompt, ACCOUNT_DIGITS)).rstrip("#")
            try:
                account_no = fields.account_no(digits)
            except InvalidField:
                log.info("event=account_rejected call=%s attempt=%d digits=%d", self.call_id, attempt, len(digits))
                prompt = phrases.REENTER_BAD_NUMBER
                continue
            try:
                return await self.look_up(account_no)
            except (AccountUnknown, AccountRejected):
                log.info("event=account_unknown call=%s attempt=%d tail=%s", self.call_id, attempt,
                         account_no[-4:])
                prompt = phrases.REENTER_UNKNOWN
            except CustomerError as exc:
                log.warning("event=lookup_failed call=%s error=%r", self.call_id, str(exc))
                self.outcome = "UPSTREAM_FAILED"
                await self._play(phrases.SERVICE_UNAVAILABLE)
                return None
        self.outcome = "TOO_MANY_ATTEMPTS"
        await self._play(phrases.TOO_MANY_ATTEMPTS)
        return None

    async def _menu(self, overview: Overview) -> None:
        self.outcome = "HEARD_SUMMARY"
        current = phrases.summary(overview)
        for _ in range(self.limits.menu_rounds_max):
            key = await self._play(current, MENU_KEYS)
            if key is None:
                key = await self._play(phrases.MENU, MENU_KEYS)
            if key is None:
                key = await self.agi.wait_for_digit(self.limits.menu_timeout_ms)
            if key == "1":
                current = phrases.summary(overview)
            elif key == "2":
                self.outcome = "HEARD_LAST_PAYMENT"
                current = phrases.last_payment(overview)
            elif key is None or key == "0":
                return
            else:
                current = phrases.MENU


async def run_call(agi: AgiSession, prompts: PromptRenderer, look_up: LookUp, limits: CallLimits,
                   call_id: str, duration_max_s: float) -> str:
    """One call, bounded in time; a hang-up or an over-long call ends it quietly."""
    call = SelfServiceCall(agi, prompts, look_up, limits, call_id)
    try:
        async with asyncio.timeout(duration_max_s):
            return await call.run()
    except AgiHangup:
        return f"HUNG_UP_{call.outcome}"
    except TimeoutError:
        log.info("event=call_too_long call=%s max_s=%s", call_id, duration_max_s)
        return "TOO_LONG"
