import sys

from yindian_common.cli import dispatch

COMMANDS = {
    "serve": ("portal.serve", "serve the customer web portal (fees and consumption look-up)"),
}

sys.exit(dispatch("portal", COMMANDS))
