"""Who is calling: the bank id from the peer's client certificate (mTLS,
subject CN or SAN), or, in plain-text loopback mode only, from the
`x-yindian-bank-id` call metadata the bridge sets."""
from __future__ import annotations

import grpc

from yindian_common import fields
from yindian_common.errors import Unauthenticated

BANK_ID_METADATA = "x-yindian-bank-id"


def bank_of(context: grpc.ServicerContext, *, tls: bool) -> str:
    if tls:
        # The subject's CN names the bank; failing that, the first SAN (DNS names
        # are case-insensitive and bank ids are upper case).
        auth = context.auth_context()
        for key, normalise in (("x509_common_name", str), ("x509_subject_alternative_name", str.upper)):
            values = auth.get(key)
            if values:
                bank = normalise(values[0].decode("ascii", "replace"))
                if 0 < len(bank) <= fields.CODE_MAX:
                    return bank
        raise Unauthenticated("no bank identity in the client certificate")
    for k, v in context.invocation_metadata():
        if k == BANK_ID_METADATA:
            bank = v if isinstance(v, str) else v.decode("ascii", "replace")
            if not bank or len(bank) > fields.CODE_MAX:
                raise Unauthenticated("malformed bank id")
            return bank
    raise Unauthenticated(f"no bank identity: plain-text mode needs {BANK_ID_METADATA} metadata")
