import sys

from yindian_common.cli import dispatch

COMMANDS = {
    "serve": ("ivr.serve", "serve telephone self-service to Asterisk over FastAGI"),
    "dunning": ("ivr.dunning_cmd", "run one pass of a voice dunning campaign (催费)"),
}

sys.exit(dispatch("ivr", COMMANDS))
