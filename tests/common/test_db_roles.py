"""Each process names its PostgreSQL connections by role (application_name), so
that pg_stat_activity and `bench-ratio` tell the pays' backends from the
sealer's, the journal writer's or the collectors'. SQLite and MariaDB have no
such name: a role there shares the process's engine, as before."""
from __future__ import annotations

import sqlalchemy as sa

from bridge.journal import Journal
from bridge.journal.repository import create_schema
from mis_adapter.routing import BranchRouter
from yindian_common.business_metrics import read_only_engine
from yindian_common.db import make_engine


def _name(engine: sa.Engine) -> str:
    with engine.connect() as conn:
        return str(conn.exec_driver_sql("SELECT current_setting('application_name')").scalar_one())


def test_a_background_role_has_its_own_named_pool_on_postgresql(db_url: str) -> None:
    router = BranchRouter(db_url, {}, pool_size=2)
    try:
        (sealer,) = router.role_engines(router.engines(), "sealer")
        if router.primary.dialect.name != "postgresql":
            assert sealer is router.primary
            return
        assert sealer is not router.primary
        assert (_name(router.primary), _name(sealer)) == ("mis_adapter", "mis_adapter/sealer")
        reader = read_only_engine(router.primary, 1.0, "mis_adapter/metrics")
        assert _name(reader) == "mis_adapter/metrics"
        reader.dispose()
    finally:
        router.dispose()


def test_the_journal_writer_names_its_connection_and_gives_the_pool_its_name_back(db_url: str) -> None:
    engine = make_engine(db_url, pool_size=1, application_name="bridge")
    try:
        create_schema(engine)
        journal = Journal(engine)
        conn = journal.open_writer_connection()
        pg = engine.dialect.name == "postgresql"
        name = conn.exec_driver_sql("SELECT current_setting('application_name')").scalar_one() if pg else None
        conn.rollback()
        journal.close_writer_connection(conn)
        if pg:
            assert name == "bridge/journal-writer"
            assert _name(engine) == "bridge"  # the same (only) pooled connection, back under the pool's name
    finally:
        engine.dispose()
