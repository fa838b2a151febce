"""ArrearsDetail's rows as the caller receives them, whatever the customers' names and phones hold: on
MariaDB an account's codes and figures travel packed in one text column (reports._summed_statements,
_unpacked) and only the name and phone as columns of their own, so that no character of a name or phone
(the packing's separator, commas, quotes, CJK, empty) can shift a figure. Every back end: the detail added
up in the database equals the reconstruction over every bill, today and at a past date, and each name and
phone is the customer's own, masked."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mis_adapter import bench_recon, reports
from mis_adapter.late_fee import LateFeeRates
from yindian_common.fields import mask_name, mask_phone

pytestmark = pytest.mark.timeout(240)
TZ = ZoneInfo("Asia/Shanghai")
RATES = LateFeeRates()
ACCOUNTS = 12
TODAY = dt.date(2026, 11, 28)

_odd = st.sampled_from(["\x1f", ",", "'", '"', "\\", "|", "张", "\t", " ", "%", "_"])
_char = st.one_of(_odd, st.characters(blacklist_categories=("Cs", "Cc"), max_codepoint=0x2FFFF))
names = st.text(_char, min_size=0, max_size=20)
phones = st.text(st.one_of(_odd, st.sampled_from("0123456789+-")), min_size=0, max_size=20)


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    """12 accounts, 10 bills each, a fifth unpaid; 40 paid bills paid after the past-date as-of date."""
    from yindian_common.db import make_engine

    e = make_engine(db_url)
    accounts = [bench_recon.make_account_no("01", i + 1) for i in range(ACCOUNTS)]
    bench_recon.create_base(e, accounts)
    bench_recon.create_bills(e, bench_recon.Plan(accounts, 0), 10 * ACCOUNTS)
    bench_recon.create_later_payments(e, 40, bench_recon.LATER_DAY)
    try:
        yield e
    finally:
        e.dispose()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(people=st.lists(st.tuples(names, phones), min_size=ACCOUNTS, max_size=ACCOUNTS))
def test_the_detail_carries_every_name_and_phone_and_figure_exactly(engine: sa.Engine,
                                                                    people: list[tuple[str, str]]) -> None:
    accounts = [bench_recon.make_account_no("01", i + 1) for i in range(ACCOUNTS)]
    with engine.begin() as conn:
        for account, (name, phone) in zip(accounts, people, strict=True):
            conn.execute(sa.text("UPDATE customers SET name = :n, phone = :p WHERE account_no = :a"),
                         {"n": name, "p": phone, "a": account})
    person = dict(zip(accounts, people, strict=True))
    for as_of in (TODAY, bench_recon.PAST_AS_OF):
        fast = [a for page in reports.arrears_detail([engine], as_of, RATES, TZ, page_accounts=5) for a in page]
        slow = [a for page in reports.arrears_detail([engine], as_of, RATES, TZ, indexed=False) for a in page]
        assert fast == slow
        assert [a.account_no for a in fast] == accounts  # every household is in arrears, in account order
        assert all(a.late_fee_fen > 0 and a.principal_fen > 0 for a in fast)
        for a in fast:
            name, phone = person[a.account_no]
            assert (a.customer_name, a.contact_phone) == (mask_name(name), mask_phone(phone))


def test_a_packed_row_that_does_not_split_into_its_fields_fails_the_report() -> None:
    """A code holding the separator would shift every figure after it: the row is refused, never misread."""
    good = reports._PACK_SEP.join(["0100000018", "01", "2", "30000", "1500", "202511"])
    assert reports._unpacked(good, "张三", "13800000000") == reports.ArrearsAccount(
        "0100000018", "张*", "138****0000", "01", 2, 30000, 1500, "202511")
    with pytest.raises(ValueError, match="7 fields"):
        reports._unpacked(good.replace("01", "0" + reports._PACK_SEP + "1", 1), "n", "p")
