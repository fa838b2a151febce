"""Who is calling, and in which role: the one place every server asks.

Under mutual TLS the identity comes only from the peer's client certificate
(subject CN, else the first SAN); call metadata is ignored. In plain-text
loopback mode (development only) it comes from call metadata: a bank is
named by `x-yindian-bank-id` (the bridge sets it), a utility operator by
`x-yindian-operator`.

Roles (DESIGN.md, ReportService):
    OPERATOR  a name listed in the server's `operators` setting: the utility's
              back office (every bank's collections, arrears, household detail)
    BANK      any other identity: a bank, seeing only its own data (whether it
              is a bank the utility knows is checked against the bank registry)

A caller without any identity is refused with PERMISSION_DENIED on
ReportService (`require_caller`) and UNAUTHENTICATED on BillingService
(`bank_of`). This module never reads the database or the settings: the
operator names are passed in."""
from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import Counter

from yindian_common import fields
from yindian_common.errors import Forbidden, Unauthenticated, YinDianError
from yindian_common.rpc_pools import same_pool
from yindian_common.status import abort

BANK_ID_METADATA = "x-yindian-bank-id"
OPERATOR_METADATA = "x-yindian-operator"

BANK = "BANK"
OPERATOR = "OPERATOR"
FROM_CERTIFICATE = "certificate"
FROM_METADATA = "metadata"

audit_log = logging.getLogger("yindian.audit")
# Wrapped handlers remembered per method (the methods a server registered).
METHODS_MAX = 256
# Health checks carry no data: a prober needs no bank identity (revocation still applies).
HEALTH_PREFIX = "/grpc.health.v1.Health/"

ACCESS_DENIED = Counter("yindian_access_denied", "Calls refused for the caller's identity or role (audited)",
                        ["rpc", "reason"])


@dataclass(frozen=True)
class Caller:
    name: str
    role: str  # BANK or OPERATOR
    source: str  # certificate or metadata

    @property
    def is_operator(self) -> bool:
        return self.role == OPERATOR


def _decoded(value: bytes | str) -> str:
    return value if isinstance(value, str) else value.decode("ascii", "replace")


def certificate_names(context: grpc.ServicerContext) -> tuple[str, str]:
    """(subject CN, first SAN) of the peer certificate, as written ('' when absent)."""
    auth = context.auth_context()
    cn = auth.get("x509_common_name") or [b""]
    san = auth.get("x509_subject_alternative_name") or [b""]
    return _decoded(cn[0]), _decoded(san[0])


def _metadata(context: grpc.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata():
        if k == key:
            return _decoded(v)
    return None


def bank_of(context: grpc.ServicerContext, *, tls: bool) -> str:
    """The calling bank's id: the certificate's CN, else its first SAN upper-cased
    (DNS names are case-insensitive and bank ids are upper case); in plain-text
    mode the `x-yindian-bank-id` metadata."""
    if tls:
        cn, san = certificate_names(context)
        for bank in (cn, san.upper()):
            if 0 < len(bank) <= fields.CODE_MAX:
                return bank
        raise Unauthenticated("no bank identity in the client certificate")
    named = _metadata(context, BANK_ID_METADATA)
    if named is None:
        raise Unauthenticated(f"no bank identity: plain-text mode needs {BANK_ID_METADATA} metadata")
    if not named or len(named) > fields.CODE_MAX:
        raise Unauthenticated("malformed bank id")
    return named


def caller_of(context: grpc.ServicerContext, *, tls: bool, operators: Collection[str]) -> Caller | None:
    """The caller and its role, or None when the call names nobody usable."""
    if tls:
        cn, san = certificate_names(context)
        # An operator is named exactly as configured (CN, else SAN as written).
        name = cn or san
        if name and name in operators:
            return Caller(name, OPERATOR, FROM_CERTIFICATE)
        try:
            return Caller(bank_of(context, tls=True), BANK, FROM_CERTIFICATE)
        except Unauthenticated:
            return None
    operator = _metadata(context, OPERATOR_METADATA)
    if operator is not None:
        # Naming an operator that is not configured is not a fallback to the bank id.
        return Caller(operator, OPERATOR, FROM_METADATA) if operator in operators else None
    try:
        return Caller(bank_of(context, tls=False), BANK, FROM_METADATA)
    except Unauthenticated:
        return None


def shown(name: str) -> str:
    """A caller-supplied name safe to log: printable ASCII, bounded."""
    clean = "".join(c if 33 <= ord(c) < 127 else "?" for c in name[:fields.CODE_MAX * 2])
    return clean or "-"


def deny(rpc: str, reason: str, message: str, caller: Caller | None) -> Forbidden:
    """Audits a refusal (one structured log event and the counter) and returns
    the PERMISSION_DENIED error to raise."""
    ACCESS_DENIED.labels(rpc, reason).inc()
    who = "-" if caller is None else shown(caller.name)
    role = "-" if caller is None else caller.role
    source = "-" if caller is None else caller.source
    audit_log.warning("event=access_denied rpc=%s reason=%s caller=%s role=%s source=%s", rpc, reason, who, role,
                      source)
    return Forbidden(message, reason=reason)


def require_caller(context: grpc.ServicerContext, rpc: str, *, tls: bool, operators: Collection[str]) -> Caller:
    caller = caller_of(context, tls=tls, operators=operators)
    if caller is None:
        how = ("a client certificate naming a bank or an operator" if tls else
               f"{BANK_ID_METADATA} or {OPERATOR_METADATA} (a configured operator) metadata")
        raise deny(rpc, "NO_IDENTITY", f"{rpc} needs a bank or operator identity: {how}", None)
    return caller


def admit_client(context: grpc.ServicerContext, rpc: str, *, tls: bool, allowed: Collection[str],
                 default: str) -> Caller:
    """A bridge's gate: the caller must be one of `allowed` (its own bank and the
    clients its configuration names). Under mTLS the certificate names it; in
    plain-text loopback mode `x-yindian-bank-id` if sent, else `default`."""
    if tls:
        caller = Caller(bank_of(context, tls=True), BANK, FROM_CERTIFICATE)  # UNAUTHENTICATED if it names nobody
    else:
        named = _metadata(context, BANK_ID_METADATA)
        caller = Caller(default if named is None else named, BANK, FROM_METADATA)
    if caller.name not in allowed:
        raise deny(rpc, "CLIENT_NOT_ALLOWED", f"client {shown(caller.name)} is not allowed on this bridge", caller)
    return caller


Check = Callable[[grpc.ServicerContext, str], object]


def _guarded(check: Check, rpc: str, behavior: Callable[..., Any], streaming_response: bool) -> Callable[..., Any]:
    def run_check(context: grpc.ServicerContext) -> None:
        try:
            check(context, rpc)
        except YinDianError as err:
            abort(context, err)

    if streaming_response:
        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            run_check(context)
            yield from behavior(request, context)
        return same_pool(stream, behavior)

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        run_check(context)
        return behavior(request, context)
    return same_pool(unary, behavior)


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Runs `check(context, rpc)` before every call's handler; a YinDianError it
    raises ends the call with that status (nothing else runs, nothing is written)."""

    def __init__(self, check: Check, *, exempt_prefixes: tuple[str, ...] = ()) -> None:
        self._check = check
        self._exempt = exempt_prefixes
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self._exempt):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method.rsplit("/", 1)[-1])
        if len(self._wrapped) < METHODS_MAX:
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, h: grpc.RpcMethodHandler, rpc: str) -> grpc.RpcMethodHandler:
        de, ser, c = h.request_deserializer, h.response_serializer, self._check
        if h.request_streaming and h.response_streaming:
            return grpc.stream_stream_rpc_method_handler(_guarded(c, rpc, h.stream_stream, True), de, ser)
        if h.request_streaming:
            return grpc.stream_unary_rpc_method_handler(_guarded(c, rpc, h.stream_unary, False), de, ser)
        if h.response_streaming:
            return grpc.unary_stream_rpc_method_handler(_guarded(c, rpc, h.unary_stream, True), de, ser)
        return grpc.unary_unary_rpc_method_handler(_guarded(c, rpc, h.unary_unary, False), de, ser)
