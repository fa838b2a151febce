"""The bank core's request stream as the request iterator of an upstream
call. A message of the bank core's stream that is refused while being read
(undecodable bytes: yindian_common.wire_guard raises InvalidField) must not
become grpcio's client-side UNKNOWN "Exception iterating requests!" on the
link: the relay keeps the refusal, cancels the upstream call and lets the
handler answer the bank core with it."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from yindian_common.errors import YinDianError


class RequestRelay:
    def __init__(self) -> None:
        self.refused: YinDianError | None = None
        self.call: grpc.Future | None = None

    def forward(self, requests: Iterator[Any]) -> Iterator[Any]:
        try:
            yield from requests
        except grpc.RpcError:
            return  # the bank core went away; ending our side ends the upstream call
        except YinDianError as exc:
            self.refused = exc
            if self.call is not None:
                self.call.cancel()
