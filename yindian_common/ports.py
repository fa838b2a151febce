"""A loopback port for a server that must come back on the same port after it is killed.

A port picked by binding to port 0 comes from the kernel's ephemeral range, which every outgoing
connection on the machine also draws from: between a kill -9 and the restart, a client socket of
any other process may take it, and the restart fails with "address already in use" (seen in CI:
tests/e2e/test_crash_points.py restarting mis_adapter). A port below the ephemeral range is never
given to an outgoing connection; only an explicit bind can take it, so the restart finds it free."""
from __future__ import annotations

import random
import socket
from collections.abc import Collection
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
EPHEMERAL_LOW_DEFAULT = 32768  # Linux's default when the file cannot be read
STABLE_LOW = 20000  # below the ephemeral range, above the usual fixed service ports
ATTEMPTS_MAX = 200


def ephemeral_low() -> int:
    try:
        return int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return EPHEMERAL_LOW_DEFAULT


def stable_port(host: str = "127.0.0.1", *, rng: random.Random | None = None, exclude: Collection[int] = ()) -> int:
    """A port on `host` that nothing listens on now, outside the kernel's ephemeral range (random, so
    that concurrent callers rarely pick the same one; each pick is checked by binding it), and none of
    `exclude` (ports picked for servers not started yet: their bind check cannot see them).
    Raises OSError after ATTEMPTS_MAX ports that were all taken."""
    low, high = STABLE_LOW, ephemeral_low()
    if high - low < 1000:  # a machine whose ephemeral range starts low: fall back to the range below it
        low = max(1024, high - 10000)
    pick = rng or random.SystemRandom()
    for _ in range(ATTEMPTS_MAX):
        port = pick.randrange(low, high)
        if port in exclude:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port on {host} in {low}-{high - 1} after {ATTEMPTS_MAX} attempts")
