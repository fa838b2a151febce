import sys

from yindian_common.cli import dispatch

COMMANDS = {
    "serve": ("bridge.serve", "serve BillingService to the bank core and forward to mis_adapter"),
    "audit": ("bridge.audit_cmd", "verify (or seal) the tamper-evident chain over the bridge's audit lines"),
    "sign-on": ("bridge.sign_on", "sign the bank on at the utility (签到) through a running bridge"),
    "sign-off": ("bridge.sign_off", "sign the bank off at day end (日终签退): later pays settle the next day"),
    "echo": ("bridge.echo", "echo the utility through a running bridge: link state and round trip"),
    "bench-control-totals": ("bridge.bench_control_totals",
                             "bench: bridge CPU per control-totals exchange, full read vs incremental"),
}


def main() -> int:
    """`python -m bridge` and the `yindian-bridge` console script."""
    return dispatch("bridge", COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
