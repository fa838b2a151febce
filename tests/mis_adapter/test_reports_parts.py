"""MariaDB adds an arrears report up on several connections at once, each over a range of accounts
(reports._parts): the report must not depend on how many parts there are, and a part that fails must
leave no connection behind. On PostgreSQL and SQLite there is one part (the same tests, unchanged)."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from mis_adapter import bench_recon, reports
from mis_adapter.late_fee import LateFeeRates

pytestmark = pytest.mark.timeout(240)
TZ = ZoneInfo("Asia/Shanghai")
RATES = LateFeeRates()
ACCOUNTS = 300
TODAY = dt.date(2026, 11, 28)


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    """300 accounts in two branches, 10 bills each, a fifth unpaid; 1,000 paid bills paid after the
    past-date reports' as-of date (so that those bills are replayed)."""
    from yindian_common.db import make_engine

    e = make_engine(db_url)
    accounts = [bench_recon.make_account_no("01", i + 1) for i in range(ACCOUNTS)]
    bench_recon.create_base(e, accounts)
    bench_recon.create_bills(e, bench_recon.Plan(accounts, 0), 10 * ACCOUNTS)
    bench_recon.create_later_payments(e, 1_000, bench_recon.LATER_DAY)
    with e.begin() as conn:  # a second branch: every third account
        conn.execute(sa.text("INSERT INTO branches (code, name) VALUES ('02', 'second')"))
        conn.execute(sa.text("UPDATE customers SET branch_code = '02' WHERE account_no IN "
                             "(SELECT account_no FROM bench_accounts WHERE i % 3 = 0)"))
    try:
        yield e
    finally:
        e.dispose()


def _reports(e: sa.Engine, as_of: dt.date, branch: str) -> tuple[Any, list[reports.ArrearsAccount]]:
    return (reports.arrears_summary([e], as_of, RATES, TZ),
            [a for page in reports.arrears_detail([e], as_of, RATES, TZ, branch, page_accounts=37) for a in page])


@pytest.mark.parametrize("as_of", [TODAY, bench_recon.PAST_AS_OF])
def test_the_report_is_the_same_in_any_number_of_parts(engine: sa.Engine, as_of: dt.date,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """1, 2, 3 and 7 parts give the same summary and the same accounts in the
    same order as the reconstruction over every bill, for every branch and one."""
    for branch in ("", "02"):
        rebuilt = (reports.arrears_summary([engine], as_of, RATES, TZ, indexed=False),
                   [a for page in reports.arrears_detail([engine], as_of, RATES, TZ, branch, indexed=False)
                    for a in page])
        assert rebuilt[0].total.households == ACCOUNTS and rebuilt[0].total.late_fee_fen > 0
        assert len(rebuilt[1]) == (ACCOUNTS if not branch else ACCOUNTS // 3)
        for parts in (1, 2, 3, 7):
            monkeypatch.setattr(reports, "REPORT_PARTS_MARIADB", parts)
            assert _reports(engine, as_of, branch) == rebuilt, (parts, branch)


def test_a_part_that_fails_fails_the_report_and_leaves_no_connection(engine: sa.Engine,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The last part's statement fails: the report raises that error, and every connection, the parts that
    had started included, is back in the pool; the next report answers."""
    expected = _reports(engine, bench_recon.PAST_AS_OF, "")
    real = reports._summed_statements

    def failing(rates: LateFeeRates, branch: bool, dialect: str, part: tuple[bool, bool] = (False, False),
                snap: bool = False) -> Any:
        if part == (True, False) or dialect != "mysql":  # the last part of several (MariaDB), or the only one
            raise RuntimeError("the last part failed")
        return real(rates, branch, dialect, part, snap)

    monkeypatch.setattr(reports, "_summed_statements", failing)
    with pytest.raises(RuntimeError, match="the last part failed"):
        reports.arrears_summary([engine], bench_recon.PAST_AS_OF, RATES, TZ)
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="the last part failed"):
        list(reports.arrears_detail([engine], bench_recon.PAST_AS_OF, RATES, TZ))
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    monkeypatch.setattr(reports, "_summed_statements", real)
    assert _reports(engine, bench_recon.PAST_AS_OF, "") == expected


def test_a_detail_left_unread_returns_its_connections(engine: sa.Engine) -> None:
    """A reader that stops after the first page (a cancelled ArrearsDetail stream) leaves no connection
    checked out once the pages are closed."""
    pages = reports.arrears_detail([engine], bench_recon.PAST_AS_OF, RATES, TZ, page_accounts=10)
    assert len(next(pages)) == 10
    pages.close()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
