import sys

from yindian_common.cli import dispatch

COMMANDS = {
    "serve": ("portal.serve", "serve the customer web portal (fees and consumption look-up)"),
}


def main() -> int:
    """`python -m portal` and the `yindian-portal` console script."""
    return dispatch("portal", COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
