"""Structured logs: one event per line, key=value. Never a full name, phone or address."""
from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO", process: str = "yindian") -> None:
    fmt = f"ts=%(asctime)s level=%(levelname)s proc={process} logger=%(name)s %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt, stream=sys.stderr,
                        force=True)
