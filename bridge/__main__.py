import sys

from yindian_common.cli import dispatch

COMMANDS = {
    "serve": ("bridge.serve", "serve BillingService to the bank core and forward to mis_adapter"),
}

sys.exit(dispatch("bridge", COMMANDS))
