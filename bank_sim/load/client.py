"""The load's one aio channel: calls with deadlines, same-serial retries of in-doubt answers."""
from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import grpc

from bank_sim.load.profile import IN_DOUBT_CODES, LoadProfile, check_target_allowed
from yindian.v1 import billing_pb2_grpc
from yindian_common.identity import BANK_ID_METADATA
from yindian_common.server import channel_options, check_plaintext_allowed

# ---- the client ----

class LoadClient:
    """One aio channel; calls with deadlines and same-serial retries of in-doubt answers."""

    def __init__(self, profile: LoadProfile) -> None:
        check_target_allowed(profile.target, profile.allow_host)
        opts = channel_options()
        if profile.tls_cert and profile.tls_key and profile.tls_ca:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(profile.tls_ca).read_bytes(),
                                                 private_key=Path(profile.tls_key).read_bytes(),
                                                 certificate_chain=Path(profile.tls_cert).read_bytes())
            self.channel = grpc.aio.secure_channel(profile.target, creds, options=opts)
            self.metadata: tuple[tuple[str, str], ...] = ()
        elif profile.insecure:
            check_plaintext_allowed(profile.target, profile.force_insecure)
            self.channel = grpc.aio.insecure_channel(profile.target, options=opts)
            self.metadata = ((BANK_ID_METADATA, profile.bank_id),)
        else:
            raise SystemExit("no TLS files given: pass --tls-cert/--tls-key/--tls-ca, or --insecure on loopback")
        self.stub = billing_pb2_grpc.BillingServiceStub(self.channel)
        self.deadline_s = profile.rpc_deadline_s
        self.attempts_max = profile.retry_max_attempts
        self.backoff_base_s = profile.retry_backoff_base_s
        self.backoff_cap_s = profile.retry_backoff_cap_s
        self.jitter = random.Random(profile.seed ^ 0x5EED)
        self.retries = 0

    async def call(self, method: Any, req: Any) -> tuple[str, Any]:
        try:
            return "OK", await method(req, timeout=self.deadline_s, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, None

    async def call_until_definite(self, method: Any, req: Any, retry_until: float | None) -> tuple[str, Any]:
        """Resends the same request while the answer is in doubt, within the attempt and time bounds."""
        loop = asyncio.get_running_loop()
        code, resp = await self.call(method, req)
        attempt = 1
        while is_in_doubt(code):
            if attempt >= self.attempts_max:
                break
            backoff_s = self._backoff_s(attempt)
            if retry_until is not None and loop.time() + backoff_s >= retry_until:
                break
            await asyncio.sleep(backoff_s)
            self.retries += 1
            attempt += 1
            code, resp = await self.call(method, req)
        return code, resp

    def _backoff_s(self, attempt: int) -> float:
        cap = min(self.backoff_cap_s, self.backoff_base_s * 2 ** (attempt - 1))
        return cap / 2 + self.jitter.uniform(0, cap / 2)

    async def close(self) -> None:
        await self.channel.close()


def is_in_doubt(code: str) -> bool:
    return code != "OK" and grpc.StatusCode[code] in IN_DOUBT_CODES
