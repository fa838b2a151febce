"""Subcommand dispatch: `python -m <package> <command> ...` imports the
module that owns the command lazily and calls its `main(argv) -> int`."""
from __future__ import annotations

import importlib
import sys


def dispatch(prog: str, commands: dict[str, tuple[str, str]], argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(f"usage: python -m {prog} <command> [options]\n\ncommands:")
        for name, (_mod, doc) in commands.items():
            print(f"  {name:<16} {doc}")
        print(f"\n`python -m {prog} <command> --help` documents each command's options.")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(commands[argv[0]][0])
    return int(module.main(argv[1:]) or 0)
