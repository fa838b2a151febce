"""`python -m bridge echo`: see bridge.link_cmd."""
from __future__ import annotations

from bridge.link_cmd import main as _main


def main(argv: list[str]) -> int:
    return _main(argv, "echo")
