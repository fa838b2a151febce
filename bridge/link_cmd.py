"""`python -m bridge sign-on|sign-off|echo --target BRIDGE`: the bank core's
day-end sign-off (日终签退), a sign-on, or an echo, sent to its bridge, which
relays it to the utility with the bank's identity (see bridge.link_relay).
Prints the link state the utility answered; exit 0 when it answered, 1 when
it refused or could not be reached.

After a sign-off, pays made that day settle on the next day; sign on again
(or start the bridge, which signs on) for same-day settlement."""
from __future__ import annotations

import argparse

import grpc

from yindian.v1 import billing_pb2 as pb
from yindian.v1 import billing_pb2_grpc
from yindian_common.server import TlsFiles, open_channel

STATES = {pb.LINK_STATE_SIGNED_ON: "SIGNED_ON", pb.LINK_STATE_SIGNED_OFF: "SIGNED_OFF", pb.LINK_STATE_OPEN: "OPEN"}


def _print(link: pb.LinkStatus, extra: str = "") -> None:
    print(f"link state={STATES.get(link.state, 'UNSPECIFIED')} business_date={link.business_date} "
          f"settlement_date={link.settlement_date or '-'} suspended={str(link.suspended).lower()}{extra}")


def run(action: str, target: str, *, insecure: bool, tls: TlsFiles | None, timeout_s: float) -> int:
    channel = open_channel(target, tls=tls, insecure=insecure, force_insecure=False)
    try:
        stub = billing_pb2_grpc.BillingServiceStub(channel)
        if action == "sign-on":
            _print(stub.SignOn(pb.SignOnRequest(), timeout=timeout_s).link)
        elif action == "sign-off":
            _print(stub.SignOff(pb.SignOffRequest(), timeout=timeout_s).link)
        else:
            r = stub.Echo(pb.EchoRequest(nonce="cli"), timeout=timeout_s)
            _print(r.link, f" round_trip_us={r.link_round_trip_us}")
        return 0
    except grpc.RpcError as exc:
        print(f"{action} failed: {exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]
        return 1
    finally:
        channel.close()


def main(argv: list[str], action: str) -> int:
    p = argparse.ArgumentParser(prog=f"python -m bridge {action}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="127.0.0.1:50052", help="the bridge's address HOST:PORT")
    p.add_argument("--insecure", action="store_true", help="plain text (loopback only)")
    p.add_argument("--tls-cert", default="", help="the bank core's client certificate (PEM)")
    p.add_argument("--tls-key", default="", help="its key (PEM)")
    p.add_argument("--tls-ca", default="", help="CA of the bridge's certificate (PEM)")
    p.add_argument("--timeout-s", type=float, default=10.0, help="deadline of the call")
    args = p.parse_args(argv)
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None
    if tls is None and not args.insecure:
        p.error("--insecure or --tls-cert/--tls-key/--tls-ca is required")
    return run(action, args.target, insecure=args.insecure, tls=tls, timeout_s=args.timeout_s)
