"""The bridge's audit lines are hash-chained: `bridge audit verify` exits 0 on
an intact chain and 1 naming an edited or deleted line; bridge_audit refuses
UPDATE and DELETE (triggers)."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from tests.bridge.conftest import BankCore, Utility, new_serial
from tests.support.procs import REPO
from yindian_common.audit_chain import drop_append_only_ddl
from yindian_common.db import make_engine

pytestmark = pytest.mark.timeout(120)


def verify(db: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", "audit", "verify", "--db", db], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_audit_chain_verifies_and_names_tampered_lines(make_bridge: Callable[..., BankCore], utility: Utility,
                                                       tmp_path: object) -> None:
    db = f"sqlite:///{tmp_path}/bridge-audit.db"
    core = make_bridge(utility.address, db=db)
    for i in range(4):
        core.pay(new_serial(f"AU{i}"), next(utility.accounts), 100 + i)
    core.bridge.stop()  # drains: the writer flushes, the sealer seals what is left
    ok = verify(db)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert " 0 problems, 0 not yet sealed" in ok.stdout
    eng = make_engine(db, pool_size=1)
    try:
        with pytest.raises(sa.exc.DBAPIError), eng.begin() as conn:
            conn.execute(sa.text("DELETE FROM bridge_audit"))
        with eng.begin() as conn:
            ids = [r[0] for r in conn.execute(sa.text("SELECT audit_id FROM bridge_audit ORDER BY audit_id"))]
            for stmt in drop_append_only_ddl("sqlite", "bridge_audit"):
                conn.execute(sa.text(stmt))
            conn.execute(sa.text("UPDATE bridge_audit SET amount_fen = 1 WHERE audit_id = :i"), {"i": ids[0]})
            conn.execute(sa.text("DELETE FROM bridge_audit WHERE audit_id = :i"), {"i": ids[-1]})
    finally:
        eng.dispose()
    bad = verify(db)
    assert bad.returncode == 1
    assert f"entry {ids[0]} edited" in bad.stdout and f"entry {ids[-1]} deleted" in bad.stdout
