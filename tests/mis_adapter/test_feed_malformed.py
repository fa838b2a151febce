"""A malformed message in the middle of a bill feed ends the stream with INVALID_ARGUMENT naming the
request, at once: before, the receiving thread died on it and the bank waited out its deadline
(DEADLINE_EXCEEDED, nothing named)."""
from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tests.support.mis_data import running_adapter
from yindian.v1 import billing_pb2 as pb
from yindian_common.status import error_info

pytestmark = [pytest.mark.timeout(60), pytest.mark.migrated("mis")]  # running_adapter needs the MIS schema
DEADLINE_S = 20.0


def test_malformed_message_after_subscribe_is_refused_naming_the_request(sqlite_url: str, tmp_path: Path) -> None:
    with running_adapter(sqlite_url) as a:
        call = a.channel.stream_stream("/yindian.v1.BillingService/BillFeed")
        stream = [pb.BillFeedRequest(subscribe=pb.Subscribe()).SerializeToString(), b"\xff\xff\xff"]
        with pytest.raises(grpc.RpcError) as caught:
            list(call(iter(stream), timeout=DEADLINE_S, metadata=[("x-yindian-bank-id", "ICBC")]))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        info = error_info(caught.value)
        assert info is not None and info.metadata["field"] == "request"
