"""The one tree of expected errors and the one status guard: every expected
refusal class lives in yindian_common.errors (drawn in its docstring), bugs
are outside the tree, and the guard answers a refusal with its status and
ErrorInfo but never maps a bug (or anything else) to an expected status."""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from yindian_common import errors
from yindian_common.db_errors import db_call
from yindian_common.errors import AllocationInvariantBroken, Bug, FeedBusy, InvalidField, Unavailable, YinDianError
from yindian_common.status import error_info, guard

pytestmark = pytest.mark.timeout(60)

PACKAGES = ("yindian_common", "mis_adapter", "bridge", "bank_sim")


def _import_everything() -> None:
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        for mod in pkgutil.walk_packages(pkg.__path__, package + "."):
            if mod.name.endswith("__main__") or ".migrations" in mod.name:
                continue
            importlib.import_module(mod.name)


def _subclasses(cls: type) -> Iterator[type]:
    sub: type
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_expected_error_class_is_in_the_one_tree() -> None:
    _import_everything()
    found = [c for c in _subclasses(YinDianError) if not c.__name__.startswith("_")]
    assert len(found) >= 15
    outside = [f"{c.__module__}.{c.__qualname__}" for c in found if c.__module__ != errors.__name__]
    assert outside == []
    doc = errors.__doc__ or ""
    assert [c.__name__ for c in found if f"── {c.__name__}" not in doc] == []


def test_bugs_are_outside_the_tree() -> None:
    assert issubclass(AllocationInvariantBroken, Bug)
    assert not issubclass(Bug, YinDianError)
    assert "└── AllocationInvariantBroken" in (errors.__doc__ or "")


def _serve(raising: BaseException) -> tuple[grpc.Server, grpc.Channel]:
    def behaviour(_request: bytes, context: grpc.ServicerContext) -> bytes:
        with guard(context, "Probe"):
            raise raising

    handler = grpc.method_handlers_generic_handler("test.Probe", {
        "Call": grpc.unary_unary_rpc_method_handler(behaviour)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, grpc.insecure_channel(f"127.0.0.1:{port}")


def _call(raising: BaseException) -> grpc.RpcError:
    server, channel = _serve(raising)
    try:
        with pytest.raises(grpc.RpcError) as exc_info:
            channel.unary_unary("/test.Probe/Call")(b"", timeout=10)
        return exc_info.value
    finally:
        channel.close()
        server.stop(None)


@pytest.mark.parametrize("raising,code,reason", [
    (InvalidField("amount_fen", "must be positive"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD"),
    (FeedBusy("bank X already has a stream"), grpc.StatusCode.ABORTED, "FEED_ALREADY_ACTIVE"),
    (OperationalError("SELECT 1", {}, Exception("server closed the connection")), grpc.StatusCode.UNAVAILABLE,
     "DB_UNAVAILABLE"),
    (PoolTimeout("QueuePool limit reached"), grpc.StatusCode.UNAVAILABLE, "DB_POOL_EXHAUSTED"),
])
def test_the_guard_answers_an_expected_refusal_with_its_status(raising: BaseException, code: grpc.StatusCode,
                                                               reason: str) -> None:
    err = _call(raising)
    assert err.code() == code
    info = error_info(err)
    assert info is not None and info.reason == reason
    if isinstance(raising, InvalidField):
        assert info.metadata["field"] == "amount_fen"


def test_the_guard_never_maps_a_bug_to_an_expected_status() -> None:
    err = _call(AllocationInvariantBroken("allocations 90 != payment 100"))
    assert err.code() == grpc.StatusCode.UNKNOWN  # gRPC's answer to an uncaught exception, logged by it
    assert error_info(err) is None


def test_db_call_returns_the_result_and_translates_database_trouble() -> None:
    def add(a: int, *, b: int) -> int:
        return a + b

    assert db_call(add, 2, b=3) == 5

    def down() -> int:
        raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))

    with pytest.raises(Unavailable) as exc_info:
        db_call(down)
    assert (exc_info.value.code, exc_info.value.reason) == ("UNAVAILABLE", "DB_UNAVAILABLE")

    def integrity() -> int:  # not an operating error: a bug or a race the caller handles, passed on
        raise IntegrityError("INSERT", {}, Exception("duplicate key"))

    with pytest.raises(IntegrityError):
        db_call(integrity)
