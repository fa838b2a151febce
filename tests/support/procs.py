"""Real processes for end-to-end tests. Every YinDian server prints one line
`READY <name> grpc=<host:port> metrics=<port>` on stdout once it serves;
tests start servers on 127.0.0.1:0 and read the ports from that line."""
from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

READY_RE = re.compile(r"READY (\S+) (?:grpc|agi|http)=(\S+) metrics=(\d+)")
# Every process a test started, so that none outlives the test session even
# when a test fails before its own clean-up.
_STARTED: list[subprocess.Popen[str]] = []


@atexit.register
def _kill_leftovers() -> None:
    for popen in _STARTED:
        if popen.poll() is None:
            popen.kill()
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[str]
    grpc_addr: str = ""
    metrics_port: int = 0
    output: list[str] = field(default_factory=list)

    def kill9(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=30)

    def terminate(self, timeout_s: float = 30) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=timeout_s)


def start(name: str, args: Sequence[str], *, env: dict[str, str] | None = None, ready_timeout_s: float = 60,
          log_dir: Path | None = None) -> Proc:
    """Starts `python -m <args>` and waits for its READY line (or its death)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    popen = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, bufsize=1)
    _STARTED.append(popen)
    proc = Proc(name, popen)
    ready = threading.Event()
    log_file = open(log_dir / f"{name}.log", "a") if log_dir else None  # noqa: SIM115

    def pump() -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            if len(proc.output) < 20_000:
                proc.output.append(line)
            if log_file:
                log_file.write(line)
                log_file.flush()
            m = READY_RE.search(line)
            if m and not ready.is_set():
                proc.grpc_addr, proc.metrics_port = m.group(2), int(m.group(3))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(ready_timeout_s) or not proc.grpc_addr:
        popen.kill()
        raise RuntimeError(f"{name} did not become ready:\n" + "".join(proc.output[-50:]))
    return proc
