"""The bridge's own database sessions are bounded as mis_adapter's are (yindian_common.db): on
PostgreSQL and MariaDB every session of its pools — the serving pool's, the sealer's and the
resolver's — ends a lock wait after DB_WAIT_MAX_S and a transaction left idle after
DB_IDLE_IN_TX_MAX_S. Before, the bridge set neither: a journal transaction stranded by a dead
link kept its row locks for as long as the server kept the session (hours), and the writer's
retry of that batch waited on them (tests/common/test_db_link_bound.py shows the stranding)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.bridge.conftest import BankCore, Utility, new_serial
from tests.support.databases import fresh_database
from yindian_common.db import DB_IDLE_IN_TX_MAX_S, DB_WAIT_MAX_S

pytestmark = pytest.mark.timeout(120)

SETTINGS_SQL = {
    "postgresql": "SELECT current_setting('lock_timeout'), current_setting('idle_in_transaction_session_timeout')",
    "mysql": "SELECT @@session.innodb_lock_wait_timeout, @@session.idle_transaction_timeout"}


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_every_session_of_the_bridge_bounds_its_lock_waits_and_idle_transactions(
        backend: str, tmp_path: Path, utility: Utility, make_bridge: Callable[..., BankCore]) -> None:
    with fresh_database(backend, tmp_path, schema="bridge") as url:
        core = make_bridge(utility.address, db=url)
        try:
            assert core.pay(new_serial("BOUND"), next(utility.accounts), 100).amount_fen == 100
            engines = [core.bridge.ctx.engine, *core.bridge._role_engines.values()]
            assert len(engines) == (3 if backend == "postgresql" else 1)
            for engine in engines:
                with engine.connect() as conn:
                    lock, idle = conn.exec_driver_sql(SETTINGS_SQL[engine.dialect.name]).one()
                if engine.dialect.name == "postgresql":  # as SHOW prints milliseconds
                    assert (lock, idle) == (f"{int(DB_WAIT_MAX_S)}s", f"{int(DB_IDLE_IN_TX_MAX_S) // 60}min")
                else:
                    assert (int(lock), int(idle)) == (int(DB_WAIT_MAX_S), int(DB_IDLE_IN_TX_MAX_S))
        finally:
            core.channel.close()
            core.bridge.stop()
