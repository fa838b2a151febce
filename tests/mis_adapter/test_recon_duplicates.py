"""Repeated serials in a bank's day are refused whole, naming their lines, on
every back end and whatever else the serial is: a payment of the day, one of
another day, one the MIS never saw (BANK_ONLY), a cancelled record. On
PostgreSQL the refusal comes from the day's one matching pass itself
(recon_outcomes.match_day: its row counts), not from a separate GROUP BY, so
the property below holds that pass to the plain rule "refused if and only if
a serial repeats", and, when nothing repeats, its outcome counts and fen to
matching.classify over the same records."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mis_adapter import recon
from mis_adapter.matching import MisPayment, StagedRecord, classify
from tests.mis_adapter.test_recon import (
    BANK,
    DAY_START,
    World,
    build_world,
    cancel,
    pay,
    run,
    snapshot,
    stored_summary,
)
from tests.support.topology import BRANCHES3, SINGLE, topology_databases
from yindian_common.clock import business_date
from yindian_common.errors import InvalidField

pytestmark = [pytest.mark.timeout(300), pytest.mark.migrated("mis")]  # running_adapter needs the MIS schema


def _day_of_payments(w: World) -> dict[str, MisPayment]:
    """Yesterday's Y-0; today's D-0..D-3 (D-3 reversed); U-0 today, which the bank never sends
    in the scenario test. Returns the MIS side of each serial."""
    a = w.accounts
    today = business_date(w.clock)
    yesterday = today - dt.timedelta(days=1)
    w.clock.set(DAY_START - dt.timedelta(days=1))
    pay(w, "Y-0", a[0], 500)
    w.clock.set(DAY_START)
    mis = {"Y-0": MisPayment("Y-0", a[0], 500, "POSTED", yesterday)}
    for i in range(4):
        pay(w, f"D-{i}", a[i], 100 * (i + 1))
        mis[f"D-{i}"] = MisPayment(f"D-{i}", a[i], 100 * (i + 1), "POSTED", today)
    cancel(w, "C-D-3", "D-3", 400)
    mis["D-3"] = MisPayment("D-3", a[3], 400, "REVERSED", today)
    pay(w, "U-0", a[4], 700)
    mis["U-0"] = MisPayment("U-0", a[4], 700, "POSTED", today)
    return mis


@pytest.fixture(params=[pytest.param((b, t), id=f"{b}-{t}") for t in (SINGLE, BRANCHES3)
                        for b in ("sqlite", "postgresql", "mariadb")])
def world_all(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    """One database and three branch databases, on SQLite, PostgreSQL and MariaDB."""
    with topology_databases(*request.param, tmp_path, schema="mis") as topo:
        w = build_world(topo, tmp_path)
        yield w
        w.ctx.router.dispose()


def test_every_kind_of_repeated_serial_is_refused_naming_its_lines_and_nothing_changes(world_all: World) -> None:
    w = world_all
    a = w.accounts
    _day_of_payments(w)
    good = [("D-0", a[0], 100, "POSTED"), ("D-1", a[1], 200, "POSTED"), ("D-2", a[2], 300, "POSTED")]
    repeated = {
        "a payment of the day": [("D-1", a[1], 200, "POSTED")],
        "a payment of the day, once cancelled": [("D-2", a[2], 300, "CANCELLED")],
        "a reversed payment of the day": [("D-3", a[3], 400, "POSTED"), ("D-3", a[3], 400, "CANCELLED")],
        "another day's payment": [("Y-0", a[0], 500, "POSTED"), ("Y-0", a[0], 500, "POSTED")],
        "a serial the MIS never saw": [("N-0", a[5], 50, "POSTED"), ("N-0", a[5], 50, "POSTED")],
        "a cancelled serial the MIS never saw": [("N-1", a[5], 60, "CANCELLED"), ("N-1", a[5], 60, "CANCELLED")],
    }
    snap = snapshot(w)
    for kind, extra in repeated.items():
        records = good + extra
        serial = extra[0][0]
        lines = [i + 1 for i, r in enumerate(records) if r[0] == serial]
        with pytest.raises(InvalidField) as err:
            run(w, records)
        assert err.value.field == "records.bank_serial", kind
        assert f"{serial} at records[{lines[0]}] and records[{lines[-1]}]" in err.value.message, kind
    assert snapshot(w) == snap
    assert stored_summary(w) is None
    # the same day without a repeat closes
    summary = run(w, good)
    assert summary.total(recon.UTILITY_ONLY).count == 1  # U-0, which the bank never sent
    if not w.split:  # one database: a resend with a repeat is still refused, as before the one pass
        with pytest.raises(InvalidField):
            run(w, good + repeated["a serial the MIS never saw"])


# ---- the property: the one pass refuses exactly what repeats, and classifies the rest as the table does ----
@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def world_single(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    with topology_databases(request.param, SINGLE, tmp_path, schema="mis") as topo:
        w = build_world(topo, tmp_path)
        yield w
        w.ctx.router.dispose()


_SERIALS = ["D-0", "D-1", "D-2", "D-3", "Y-0", "U-0", "N-0", "N-1", "N-2"]
_record = st.tuples(st.sampled_from(_SERIALS), st.booleans(), st.booleans(), st.sampled_from(["POSTED", "CANCELLED"]))


@given(data=st.data())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_refused_exactly_when_a_serial_repeats_else_counted_as_the_table_says(world_single: World,
                                                                            data: st.DataObject) -> None:
    w = world_single
    if not hasattr(w, "mis"):
        w.mis = _day_of_payments(w)  # type: ignore[attr-defined]
    mis: dict[str, MisPayment] = w.mis  # type: ignore[attr-defined]
    picks = data.draw(st.lists(_record, min_size=1, max_size=12))
    records: list[StagedRecord] = []
    for i, (serial, other_account, other_amount, status) in enumerate(picks):
        known = mis.get(serial)
        account = w.accounts[6] if other_account or known is None else known.account_no
        amount = (known.amount_fen if known else 10) + (1 if other_amount else 0)
        records.append((i + 1, serial, account, amount, status))
    day = business_date(w.clock)
    serials = [r[1] for r in records]
    with recon.Reconciliation(w.engine, BANK, day, rates=w.ctx.rates, now=w.clock.now()) as r:
        r.load(records)
        if len(set(serials)) < len(serials):
            with pytest.raises(InvalidField) as err:
                r.prepare_close()
            first = min((s for s in set(serials) if serials.count(s) > 1), key=serials.index)
            lines = [i + 1 for i, s in enumerate(serials) if s == first]
            assert f"{first} at records[{lines[0]}] and records[{lines[-1]}]" in err.value.message
            return
        summary = r.prepare_close()  # not committed: the with-block rolls it back
    want = {o: [0, 0] for o in recon.OUTCOMES}
    for rec in records:
        outcome, _ = classify(rec, mis.get(rec[1]), day)
        want[outcome][0] += 1
        want[outcome][1] += rec[3]
    for serial, p in mis.items():
        if p.settlement_date == day and serial not in serials:
            outcome, _ = classify(None, p, day)
            want[outcome][0] += 1
            want[outcome][1] += p.amount_fen
    assert {t.outcome: [t.count, t.amount_fen] for t in summary.totals} == want
