import sys

from yindian_common.cli import dispatch

COMMANDS = {
    "serve": ("bridge.serve", "serve BillingService to the bank core and forward to mis_adapter"),
    "audit": ("bridge.audit_cmd", "verify (or seal) the tamper-evident chain over the bridge's audit lines"),
}


def main() -> int:
    """`python -m bridge` and the `yindian-bridge` console script."""
    return dispatch("bridge", COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
