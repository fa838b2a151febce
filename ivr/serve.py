"""`python -m ivr serve`: the FastAGI server Asterisk connects to for
telephone self-service (dialplan: `AGI(agi://HOST:4573)`).

One asyncio task per call, at most `sessions_max` at once (a call beyond
that is refused by closing its connection: Asterisk sets AGISTATUS=FAILURE
and the dialplan goes on). Account look-ups go to mis_adapter's
CustomerService in worker threads under a deadline; prompts render in
child processes. SIGTERM stops accepting and lets calls in progress finish
within --grace-s; a second signal exits at once."""
from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import signal

from prometheus_client import Counter, Gauge

from ivr.accounts import Overview
from ivr.agi import AgiError, AgiLimits, AgiProtocolError, AgiSession, AgiTimeout
from ivr.customer_client import CustomerClient
from ivr.prompts import PromptError, PromptRenderer
from ivr.self_service import CallLimits, run_call
from ivr.settings import IvrSettings
from yindian_common.logs import setup_logging
from yindian_common.metrics import start_metrics_http
from yindian_common.server import is_loopback, open_channel
from yindian_common.settings import add_settings_flags, load_settings

log = logging.getLogger("yindian.ivr")

CALLS = Counter("yindian_ivr_calls", "Self-service calls, by how they ended.", ["outcome"])
ACTIVE = Gauge("yindian_ivr_calls_active", "Self-service calls in progress.")


def parse(argv: list[str]) -> IvrSettings:
    parser = argparse.ArgumentParser(prog="python -m ivr serve",
                                     description="Serve telephone self-service to Asterisk over FastAGI.")
    add_settings_flags(parser, IvrSettings)
    args = parser.parse_args(argv)
    return load_settings(IvrSettings, args, args.config_file)


class IvrServer:
    def __init__(self, settings: IvrSettings) -> None:
        self.settings = settings
        channel = open_channel(settings.upstream, tls=settings.tls(), insecure=settings.insecure,
                               force_insecure=settings.force_insecure)
        self.client = CustomerClient(channel, settings.operator, settings.upstream_timeout_s)
        self.prompts = PromptRenderer(settings.prompts())
        self.agi_limits = AgiLimits(line_bytes_max=settings.line_bytes_max,
                                    header_lines_max=settings.header_lines_max,
                                    header_timeout_s=settings.header_timeout_s,
                                    reply_margin_s=settings.reply_margin_s)
        self.call_limits = CallLimits(account_attempts_max=settings.account_attempts_max,
                                      digit_timeout_ms=settings.digit_timeout_ms,
                                      menu_timeout_ms=settings.menu_timeout_ms,
                                      menu_rounds_max=settings.menu_rounds_max)
        self._calls: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)

    async def look_up(self, account_no: str) -> Overview:
        return await asyncio.to_thread(self.client.overview, account_no)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        call_id = f"{os.getpid()}-{next(self._ids)}"
        task = asyncio.current_task()
        if len(self._calls) >= self.settings.sessions_max:
            log.warning("event=call_refused call=%s reason=sessions_max sessions_max=%d", call_id,
                        self.settings.sessions_max)
            CALLS.labels("REFUSED_BUSY").inc()
            writer.close()
            return
        assert task is not None
        self._calls.add(task)
        ACTIVE.inc()
        outcome = "ERROR"
        try:
            agi = AgiSession(reader, writer, self.agi_limits)
            await agi.read_headers()
            log.info("event=call_started call=%s", call_id)
            outcome = await run_call(agi, self.prompts, self.look_up, self.call_limits, call_id,
                                     self.settings.call_duration_max_s)
        except AgiTimeout as exc:
            outcome = "AGI_TIMEOUT"
            log.warning("event=agi_timeout call=%s error=%r", call_id, str(exc))
        except AgiProtocolError as exc:
            outcome = "PROTOCOL_ERROR"
            log.warning("event=agi_protocol_error call=%s error=%r", call_id, str(exc))
        except AgiError as exc:
            outcome = "HUNG_UP"
            log.info("event=agi_closed call=%s error=%r", call_id, str(exc))
        except PromptError as exc:
            outcome = "PROMPT_FAILED"
            log.error("event=prompt_failed call=%s error=%r", call_id, str(exc))
        except asyncio.CancelledError:
            # Only the drain cancels a call (grace period over): end it here, quietly.
            outcome = "CUT_AT_SHUTDOWN"
        finally:
            self._calls.discard(task)
            ACTIVE.dec()
            CALLS.labels(outcome).inc()
            log.info("event=call_ended call=%s outcome=%s", call_id, outcome)
            writer.close()  # the transport flushes and closes on its own; nothing left to await

    async def serve(self) -> int:
        s = self.settings
        host, port = s.listen.rsplit(":", 1)
        if not is_loopback(s.listen) and not s.force_listen:
            raise SystemExit(f"refusing FastAGI (plain text) on non-loopback {s.listen} without --force-listen")
        server = await asyncio.start_server(self.handle, host.strip("[]"), int(port), limit=s.line_bytes_max)
        bound = server.sockets[0].getsockname()
        metrics_port = start_metrics_http(s.metrics_host, s.metrics_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals_seen = 0

        def on_signal() -> None:
            nonlocal signals_seen
            signals_seen += 1
            if signals_seen > 1:
                log.warning("event=second_signal action=exit_now")
                os._exit(1)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        print(f"READY ivr agi={bound[0]}:{bound[1]} metrics={metrics_port}", flush=True)
        await stop.wait()
        log.info("event=draining calls=%d grace_s=%s", len(self._calls), s.grace_s)
        server.close()
        if self._calls:
            _done, pending = await asyncio.wait(set(self._calls), timeout=s.grace_s)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        log.info("event=stopped")
        return 0


def main(argv: list[str]) -> int:
    settings = parse(argv)
    setup_logging(settings.log_level, "ivr")
    return asyncio.run(IvrServer(settings).serve())
