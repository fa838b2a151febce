"""A malformed bank-core message in the middle of a bill feed through the bridge ends the stream with
INVALID_ARGUMENT naming the request, with one upstream and with several replicas (before, with replicas
the bridge's reading thread died on it and the bank core waited out its deadline)."""
from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from tests.bridge.conftest import BankCore, Utility
from yindian.v1 import billing_pb2 as pb
from yindian_common.status import error_info

pytestmark = pytest.mark.timeout(90)
DEADLINE_S = 20.0


@pytest.mark.parametrize("replicas", [1, 2])
def test_malformed_feed_message_is_refused_naming_the_request(
        utility: Utility, make_bridge: Callable[..., BankCore], replicas: int) -> None:
    port = utility.address.rsplit(":", 1)[1]
    # two names of the one mis_adapter: the bridge takes them as two replicas (its replica path)
    core = make_bridge([utility.address, f"localhost:{port}"][:replicas])
    call = core.channel.stream_stream("/yindian.v1.BillingService/BillFeed")
    stream = [pb.BillFeedRequest(subscribe=pb.Subscribe()).SerializeToString(), b"\xff\xff\xff"]
    with pytest.raises(grpc.RpcError) as caught:
        list(call(iter(stream), timeout=DEADLINE_S))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    info = error_info(caught.value)
    assert info is not None and info.metadata["field"] == "request"
