import sys

from yindian_common.cli import dispatch

COMMANDS = {
    "serve": ("ivr.serve", "serve telephone self-service to Asterisk over FastAGI"),
    "dunning": ("ivr.dunning_cmd", "run one pass of a voice dunning campaign (催费)"),
}


def main() -> int:
    """`python -m ivr`."""
    return dispatch("ivr", COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
