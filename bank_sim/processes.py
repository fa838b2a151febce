"""Real YinDian processes for the demo day and the benchmarks: start
`python -m <package> ...`, wait for its `READY <name> grpc=<host:port>
metrics=<port>` line (or its death) within a bounded time, keep its output
in a log file, and stop it with SIGTERM (its drain) within a bounded time.

Never kills anything it did not start."""
from __future__ import annotations

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
TAIL_LINES_MAX = 200


class ProcessFailed(RuntimeError):
    pass


@dataclass
class ServerProcess:
    name: str
    popen: subprocess.Popen[str]
    log_path: Path
    grpc_addr: str = ""
    metrics_port: int = 0
    tail: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    def stop(self, timeout_s: float) -> int:
        """SIGTERM, then wait for the drain; SIGKILL only if it overstays (and say so)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=timeout_s)
            raise ProcessFailed(f"{self.name} did not stop within {timeout_s} s of SIGTERM; killed") from None

    def last_lines(self) -> str:
        return "".join(self.tail[-40:])


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def start_server(name: str, args: Sequence[str], *, log_dir: Path, ready_timeout_s: float,
                 cwd: Path | None = None) -> ServerProcess:
    """Starts `python -m <args>` and returns once it printed its READY line."""
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed by the pump thread
    popen = subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=_child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, bufsize=1)
    proc = ServerProcess(name, popen, log_path)

    def pump() -> None:
        assert popen.stdout is not None
        with log_file:
            for line in popen.stdout:
                log_file.write(line)
                log_file.flush()
                proc.tail.append(line)
                if len(proc.tail) > TAIL_LINES_MAX:
                    del proc.tail[: len(proc.tail) - TAIL_LINES_MAX]
                m = READY_RE.search(line)
                if m and not proc.ready.is_set():
                    proc.grpc_addr, proc.metrics_port = m.group(2), int(m.group(3))
                    proc.ready.set()
        proc.ready.set()  # it died: wake the waiter

    threading.Thread(target=pump, name=f"pump-{name}", daemon=True).start()
    if not proc.ready.wait(ready_timeout_s) or not proc.grpc_addr:
        if popen.poll() is None:
            popen.kill()
            popen.wait(timeout=ready_timeout_s)
        raise ProcessFailed(f"{name} did not become ready within {ready_timeout_s} s "
                            f"(exit {popen.poll()}); see {log_path}:\n{proc.last_lines()}")
    return proc


def run_command(name: str, args: Sequence[str], *, log_dir: Path, timeout_s: float,
                cwd: Path | None = None) -> None:
    """Runs `python -m <args>` to completion; output goes to its log file."""
    log_path = log_dir / f"{name}.log"
    with open(log_path, "a", encoding="utf-8") as log_file:
        try:
            rc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=_child_env(), stdout=log_file,
                                stderr=subprocess.STDOUT, timeout=timeout_s, check=False).returncode
        except subprocess.TimeoutExpired as exc:
            raise ProcessFailed(f"{name} ran longer than {timeout_s} s; see {log_path}") from exc
    if rc != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        raise ProcessFailed(f"{name} exited {rc}; see {log_path}:\n" + "\n".join(tail))


def seed_and_start_stack(work: Path, *, mis_db: str, bridge_db: str, accounts: int, bank_id: str,
                         ready_timeout_s: float, seed_timeout_s: float, cwd: Path,
                         servers: list[ServerProcess], bridge_args: Sequence[str] = (),
                         mis_args: Sequence[str] = ()) -> tuple[Path, ServerProcess, ServerProcess]:
    """Seeds the utility, starts mis_adapter and the bank's bridge on loopback
    (both appended to `servers` as they start, so the caller stops whatever
    did start); returns the bank's roster file, mis_adapter and the bridge."""
    run_command("seed", ["mis_adapter", "seed", "--db", mis_db, "--accounts", str(accounts),
                         "--roster-dir", str(work / "rosters")], log_dir=work, timeout_s=seed_timeout_s, cwd=cwd)
    mis = start_server("mis_adapter", ["mis_adapter", "serve", "--db", mis_db, "--listen", "127.0.0.1:0",
                                       "--metrics-port", "0", "--insecure", *mis_args],
                       log_dir=work, ready_timeout_s=ready_timeout_s, cwd=cwd)
    servers.append(mis)
    bridge = start_server("bridge", ["bridge", "serve", "--listen", "127.0.0.1:0", "--upstream", mis.grpc_addr,
                                     "--db", bridge_db, "--bank-id", bank_id, "--metrics-port", "0", "--insecure",
                                     *bridge_args],
                          log_dir=work, ready_timeout_s=ready_timeout_s, cwd=cwd)
    servers.append(bridge)
    return work / "rosters" / f"{bank_id}.csv", mis, bridge
