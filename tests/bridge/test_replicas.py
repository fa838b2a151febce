"""bridge.replicas: which mis_adapter replica a call goes to. Unary calls take
the healthy replicas in turn (both processes serve); streams stay on the
current one; a replica taken out gets no calls until a check puts it back."""
from __future__ import annotations

import grpc
import pytest

from bridge.replicas import ReplicaSet

pytestmark = pytest.mark.timeout(30)

ADDRESSES = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]


def _replicas() -> ReplicaSet:
    # Channels connect lazily: nothing is dialled unless a call is made.
    return ReplicaSet(ADDRESSES, grpc.insecure_channel, health_interval_s=1.0, health_timeout_s=1.0)


def test_unary_calls_take_the_healthy_replicas_in_turn_and_streams_stay_on_one() -> None:
    rs = _replicas()
    try:
        assert [rs.pick().address for _ in range(6)] == ADDRESSES * 2
        assert {rs.current().address for _ in range(3)} == {ADDRESSES[0]}
        rs.mark_down(rs.replicas[1], "test")
        assert [rs.pick().address for _ in range(4)] == [ADDRESSES[0], ADDRESSES[2]] * 2
        rs.mark_down(rs.replicas[0], "test")
        assert {rs.pick().address for _ in range(3)} == {ADDRESSES[2]}
        assert rs.current().address == ADDRESSES[2]  # the stream moves to the survivor
    finally:
        rs.close()


def test_with_no_healthy_replica_calls_go_to_the_current_one() -> None:
    rs = _replicas()
    try:
        for r in rs.replicas:
            rs.mark_down(r, "test")
        assert {rs.pick().address for _ in range(3)} == {rs.current().address} == {ADDRESSES[0]}
    finally:
        rs.close()
