"""Health follows the database (issue 9 item 5): a watcher thread probes
every database with a fresh connection (never a pooled one, which a busy
pool would make wait) every `db_health_interval_s`, and sets every service
NOT_SERVING while one is unreachable, SERVING again once all answer. It
never overrides the drain: after `stop()` it sets nothing."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from mis_adapter.routing import PROCESS_NAME
from yindian_common.db import bound_mysql_links, link_bound_args, role_name
from yindian_common.db_errors import DB_TROUBLE

log = logging.getLogger("mis_adapter.health")

PROBE_CONNECT_TIMEOUT_S = 2


def _probe_engine(engine: Engine) -> Engine:
    args: dict[str, object] = link_bound_args(engine.dialect.name)
    if engine.dialect.name in ("postgresql", "mysql"):
        args["connect_timeout"] = PROBE_CONNECT_TIMEOUT_S
    if engine.dialect.name == "postgresql":
        args["application_name"] = role_name(PROCESS_NAME, "health")
    probe = sa.create_engine(engine.url, poolclass=sa.pool.NullPool, connect_args=args)
    if engine.dialect.name == "mysql":
        bound_mysql_links(probe)
    return probe


class DatabaseWatch:
    def __init__(self, engines: Sequence[Engine], set_serving: Callable[[bool], None], interval_s: float) -> None:
        self._probes = [_probe_engine(e) for e in engines]
        self._set_serving = set_serving
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._serving = True
        self._thread = threading.Thread(target=self._run, name="db-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval_s + PROBE_CONNECT_TIMEOUT_S + 1)
        for p in self._probes:
            p.dispose()

    def reachable(self) -> bool:
        for probe in self._probes:
            try:
                with probe.connect() as conn:
                    conn.exec_driver_sql("SELECT 1")
            except DB_TROUBLE:
                return False
        return True

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            ok = self.reachable()
            if self._stop.is_set():
                return
            if ok != self._serving:
                log.warning("event=database_%s", "reachable" if ok else "unreachable")
            if ok != self._serving or not ok:  # re-asserted while down: a server start sets SERVING
                self._serving = ok
                self._set_serving(ok)
