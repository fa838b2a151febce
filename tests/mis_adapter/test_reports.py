"""Back-office reports on a seeded utility, SQLite and PostgreSQL, against
independent computations: QueryAccount's own figures taken at the end of a
past day (a photograph), and plain Python over the payment rows. History
after that day (payments, same-day and next-day cancels, a reconciliation
that posts and reverses) must not change the figures reported for it."""
from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from mis_adapter import payments, reports
from mis_adapter.payments import CancelCommand, PayCommand
from mis_adapter.recon import Reconciliation
from tests.mis_adapter.test_recon import DAY_START, World, build_world

pytestmark = pytest.mark.timeout(180)
TZ = ZoneInfo("Asia/Shanghai")
D1 = DAY_START.date()
D2 = D1 + dt.timedelta(days=1)
D3 = D1 + dt.timedelta(days=4)


@pytest.fixture
def world(db_url_sqlite_pg: str, tmp_path: Path) -> Iterator[World]:
    w = build_world(db_url_sqlite_pg, tmp_path, accounts=80)
    yield w
    w.ctx.router.dispose()


def at(w: World, day: dt.date, hour: int = 10) -> None:
    w.clock.set(dt.datetime.combine(day, dt.time(hour), TZ))


def pay(w: World, bank: str, serial: str, account: str, amount: int, channel: str = "COUNTER",
        outlet: str = "") -> None:
    payments.pay(w.ctx, PayCommand(bank, serial, account, amount, outlet_code=outlet, channel=channel))


def cancel(w: World, bank: str, serial: str, original: str, amount: int) -> None:
    payments.cancel(w.ctx, CancelCommand(bank, serial, original, amount))


def photo(w: World) -> dict[str, tuple[str, int, int]]:
    """QueryAccount's view of every account in arrears now: (branch, principal, late fee)."""
    with w.engine.connect() as conn:
        accts = [r[0] for r in conn.execute(sa.text("SELECT account_no FROM customers ORDER BY account_no"))]
    out = {}
    for a in accts:
        v = payments.query_account(w.ctx, a)
        if v.arrears_fen > 0:
            out[a] = (v.branch_code, v.arrears_fen, v.late_fee_fen)
    return out


def summary_of(ph: dict[str, tuple[str, int, int]]) -> dict[str, tuple[int, int, int]]:
    by: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for branch, principal, fee in ph.values():
        by[branch][0] += 1
        by[branch][1] += principal
        by[branch][2] += fee
    return {k: (v[0], v[1], v[2]) for k, v in by.items()}


def arrears(w: World, as_of: dt.date) -> dict[str, tuple[int, int, int]]:
    rep = reports.arrears_summary(w.ctx.router.engines(), as_of, w.ctx.rates, TZ)
    assert rep.total.households == sum(r.households for r in rep.rows)
    return {r.branch_code: (r.households, r.principal_fen, r.late_fee_fen) for r in rep.rows}


def detail(w: World, as_of: dt.date) -> dict[str, tuple[str, int, int]]:
    out = {}
    for page in reports.arrears_detail(w.ctx.router.engines(), as_of, w.ctx.rates, TZ, page_accounts=7):
        assert len(page) <= 7
        for acc in page:
            assert "*" in acc.customer_name and "*" in acc.contact_phone
            out[acc.account_no] = (acc.branch_code, acc.principal_fen, acc.late_fee_fen)
    return out


def collections(w: World, frm: dt.date, to: dt.date, group_by: str) -> dict[str, tuple[int, int, int, int]]:
    rep = reports.collection_summary(w.ctx.router.engines(), frm, to, group_by)
    assert (rep.total.count, rep.total.amount_fen) == (sum(r.count for r in rep.rows),
                                                       sum(r.amount_fen for r in rep.rows))
    return {r.key: (r.count, r.amount_fen, r.cancelled_count, r.cancelled_fen) for r in rep.rows}


def collections_by_hand(w: World, frm: dt.date, to: dt.date, group_by: str) -> dict[str, tuple[int, int, int, int]]:
    with w.engine.connect() as conn:
        rows = conn.execute(sa.select(sa.text("*")).select_from(sa.table("payments"))).mappings().all()
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for p in rows:
        day = _date(p["settlement_date"])
        if p["state"] == "TOMBSTONE" or not frm <= day <= to:
            continue
        key = {"bank": p["bank_id"], "outlet": f"{p['bank_id']}/{p['outlet_code']}", "branch": p["branch_code"],
               "day": day.isoformat(), "channel": p["channel"]}[group_by]
        reversed_by_then = p["state"] == "REVERSED" and _date(p["reversed_on"]) <= to
        i = 2 if reversed_by_then else 0
        out[key][i] += 1
        out[key][i + 1] += p["amount_fen"]
    return {k: (v[0], v[1], v[2], v[3]) for k, v in out.items()}


def _date(v: object) -> dt.date:
    return v if isinstance(v, dt.date) else dt.date.fromisoformat(str(v))


def test_reports_agree_with_independent_figures_for_past_and_present(world: World) -> None:
    w = world
    a = w.accounts
    # Day 1: partial and full payments, two banks, channels and outlets, a same-day cancel.
    at(w, D1)
    pay(w, "ICBC", "D1-1", a[0], 1_000, outlet="0101")
    pay(w, "ICBC", "D1-2", a[1], 50_000, channel="ATM", outlet="0102")
    pay(w, "ABC", "D1-3", a[2], 700, channel="ONLINE")
    pay(w, "ABC", "D1-4", a[3], 900)
    cancel(w, "ABC", "C1-4", "D1-4", 900)
    pay(w, "ICBC", "D1-5", a[4], 333, outlet="0101")
    pay(w, "ICBC", "D1-6", a[6], 444, outlet="0101")   # will be cancelled on day 2
    at(w, D1, 23)
    photo_d1 = photo(w)
    assert photo_d1, "the seeded utility has arrears"
    coll_d1 = {g: collections(w, D1, D1, g) for g in reports.GROUP_BYS}

    # Day 2: more payments on the same accounts (moving their accruals), a cancel of a day-1 payment.
    at(w, D2)
    pay(w, "ICBC", "D2-1", a[0], 2_000, outlet="0101")
    pay(w, "ABC", "D2-2", a[2], 100_000)
    pay(w, "ICBC", "D2-3", a[5], 1_234, channel="ATM")
    pay(w, "ICBC", "D2-4", a[7], 555)                   # reversed by reconciliation
    cancel(w, "ICBC", "C2-6", "D1-6", 444)
    # Day 3: ICBC reconciles day 2 (posting one payment the MIS missed, reversing one it should not have).
    at(w, D3)
    with Reconciliation(w.engine, "ICBC", D2, rates=w.ctx.rates, now=w.clock.now()) as r:
        r.load([(1, "D2-1", a[0], 2_000, "POSTED"), (2, "D2-3", a[5], 1_234, "POSTED"),
                (3, "D2-9", a[8], 800, "POSTED")])
        r.close_day()
    pay(w, "ICBC", "D3-1", a[1], 10_000)

    # A report for day 1 run today gives day 1's figures.
    assert arrears(w, D1) == summary_of(photo_d1)
    assert detail(w, D1) == photo_d1
    for g in reports.GROUP_BYS:
        assert collections(w, D1, D1, g) == coll_d1[g], g
        assert coll_d1[g] == collections_by_hand(w, D1, D1, g), g
        assert collections(w, D1, D3, g) == collections_by_hand(w, D1, D3, g), g
    assert coll_d1["bank"]["ABC"][2:] == (1, 900)      # the same-day cancel
    assert coll_d1["bank"]["ICBC"][:2] == (4, 1_000 + 50_000 + 333 + 444)  # D1-6 was cancelled only on day 2
    by_bank_d2 = collections(w, D2, D2, "bank")
    assert by_bank_d2["ICBC"] == (3, 2_000 + 1_234 + 800, 1, 555)
    assert collections(w, D1, D2, "bank")["ICBC"][2:] == (2, 444 + 555)
    assert "ICBC/0101" in collections(w, D1, D1, "outlet")
    assert set(collections(w, D2, D2, "channel")) == {"COUNTER", "ATM", "RECONCILE"}

    # As of today, the reports agree with QueryAccount now.
    at(w, D3, 23)
    photo_now = photo(w)
    assert arrears(w, D3) == summary_of(photo_now)
    assert detail(w, D3) == photo_now
    assert photo_now != photo_d1
    # A branch filter gives that branch's accounts only.
    branch = next(iter(photo_now.values()))[0]
    only = {acc.account_no for page in reports.arrears_detail(w.ctx.router.engines(), D3, w.ctx.rates, TZ, branch)
            for acc in page}
    assert only == {k for k, v in photo_now.items() if v[0] == branch}


def test_report_command_prints_the_same_figures_in_every_format(sqlite_url: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from mis_adapter import report_cmd

    w = build_world(sqlite_url, tmp_path, accounts=40)
    try:
        at(w, D1)
        pay(w, "ICBC", "R-1", w.accounts[0], 1_234, outlet="0101")
        pay(w, "ABC", "R-2", w.accounts[1], 5_000)
        cancel(w, "ABC", "C-2", "R-2", 5_000)
        base = ["--db", sqlite_url, "--clock-start", "2026-11-28T22:00:00+08:00"]

        def run(*args: str) -> str:
            assert report_cmd.main([*args, *base]) == 0
            return capsys.readouterr().out

        lines = run("collections", "--from", D1.isoformat(), "--to", D1.isoformat(), "--by", "bank",
                    "--format", "json").splitlines()
        rows = {r["key"]: r for r in map(json.loads, lines[1:])}
        assert json.loads(lines[0])["columns"] == report_cmd.COLLECTION_COLUMNS
        assert rows["ICBC"]["amount_fen"] == 1_234 and rows["ABC"]["cancelled_fen"] == 5_000
        assert rows["TOTAL"]["count"] == 1
        csv_out = run("collections", "--by", "outlet", "--format", "csv")
        assert csv_out.splitlines()[0] == ",".join(report_cmd.COLLECTION_COLUMNS) and "ICBC/0101,1,1234" in csv_out
        assert "12.34" in run("collections", "--by", "channel")

        want = arrears(w, D1)
        lines = run("arrears", "--as-of", D1.isoformat(), "--format", "json").splitlines()
        got = {r["branch_code"]: (r["households"], r["principal_fen"], r["late_fee_fen"])
               for r in map(json.loads, lines[1:])}
        assert got.pop("TOTAL") == tuple(map(sum, zip(*want.values(), strict=True)))
        assert got == want
        detail_csv = run("arrears-detail", "--as-of", D1.isoformat(), "--format", "csv").splitlines()
        assert len(detail_csv) - 1 == sum(v[0] for v in want.values())
        assert all("*" in line.split(",")[1] and "*" in line.split(",")[2] for line in detail_csv[1:])
        assert report_cmd.main(["collections", "--from", "2026-11-30", "--to", "2026-11-01", *base]) == 2
        assert "to_date" in capsys.readouterr().err
    finally:
        w.ctx.router.dispose()
