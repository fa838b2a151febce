"""The bank-day lock orders every pay, cancel, feed posting and refund (shared) against the day close
(exclusive) in each MIS database, a branch database too: there the bank has no `banks` row, and on
MariaDB a lock on a missing row locked nothing, so a day close did not wait for a pay in flight."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from mis_adapter.banks import lock_bank_day
from mis_adapter.migrate import upgrade
from tests.support.databases import fresh_database
from yindian_common.db import make_engine

pytestmark = pytest.mark.timeout(60)
BANK = "ICBC"


@pytest.fixture(params=["postgresql", "mariadb"])
def branch_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """A branch database as a split leaves it: the MIS schema, no banks rows."""
    with fresh_database(request.param, tmp_path) as url:
        engine = make_engine(url, pool_size=3, wait_max_s=1.0)
        upgrade(engine)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT COUNT(*) FROM banks")).scalar_one() == 0
        yield engine
        engine.dispose()


def test_a_day_close_waits_for_a_pay_in_flight_in_a_database_without_bank_rows(branch_engine: sa.Engine) -> None:
    with branch_engine.connect() as pay, branch_engine.connect() as close:
        pay_tx = pay.begin()
        lock_bank_day(pay, BANK)  # a pay in flight holds the lock shared
        with pytest.raises(OperationalError), close.begin():  # the close's bounded lock wait runs out
            lock_bank_day(close, BANK, exclusive=True)
        pay_tx.commit()
        with close.begin():  # the pay committed: the close gets the lock at once
            lock_bank_day(close, BANK, exclusive=True)


def test_pays_share_the_lock_and_a_pay_waits_for_a_close(branch_engine: sa.Engine) -> None:
    with branch_engine.connect() as a, branch_engine.connect() as b:
        with a.begin():  # the bank's first pay in this database makes its lock row (others wait for that commit)
            lock_bank_day(a, BANK)
        with a.begin(), b.begin():  # then two pays at once: shared with each other
            lock_bank_day(a, BANK)
            lock_bank_day(b, BANK)
        close_tx = a.begin()
        lock_bank_day(a, BANK, exclusive=True)
        with pytest.raises(OperationalError), b.begin():  # a pay during the close waits (bounded), never slips in
            lock_bank_day(b, BANK)
        close_tx.commit()
