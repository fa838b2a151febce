"""Matching a staged bank day against the MIS and applying the outcomes, inside
the day-closing transaction (mis_adapter/recon.py).

Matching is set-based: the CASE expressions below are generated from the one
decision table in mis_adapter/matching.py (never written by hand here), and
only discrepancies are written to `recon_lines` (MATCHED is counted by
difference). Applying: BANK_ONLY is posted in the MIS (same allocation as a
Pay, settlement date = the reconciled day); UTILITY_ONLY is reversed the way
Cancel does (reversed_on = the reconciled day); MISMATCH is flagged only. A
BANK_ONLY that cannot be posted (account unknown or closed, serial taken
meanwhile) or a UTILITY_ONLY that cannot be restored becomes a MISMATCH."""
from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from mis_adapter import matching as m
from mis_adapter import recon_bank_only
from mis_adapter.db.base import table_of
from mis_adapter.db.core import Customer, JournalEntry, Payment
from mis_adapter.db.recon import ReconLine
from mis_adapter.late_fee import LateFeeRates
from mis_adapter.payments import PayCommand, post_payment_in_tx, reverse_payment_in_tx
from mis_adapter.recon_bulk import post_bank_only, reverse_utility_only
from yindian_common.errors import Precondition, YinDianError

APPLY_PAGE_ROWS = 5_000               # one-sided lines read per page while applying
DETAIL_MAX = 128
RECON_CHANNEL = "RECONCILE"           # channel of a payment posted by reconciliation (BANK_ONLY)

T_PAY = table_of(Payment)
T_CUST = table_of(Customer)
T_JOURNAL = table_of(JournalEntry)
T_LINE = table_of(ReconLine)
_b = sa.bindparam
_DAY = _b("day", type_=sa.Date)

# ---- matching, generated from the decision table ----
# The facts of matching.Facts as SQL over the bank side's join `j` (m_* are NULL when
# the MIS has no payment with the serial; same_day when it is not the day's): the MIS
# state NULL when absent, the comparisons NULL-free (false when the MIS has none).
_BANK_SIDE_FACTS = {
    m.BANK: "j.status",
    m.MIS: "j.m_state",
    m.SAME_DAY: "j.same_day IS NOT NULL",
    m.SAME_ACCOUNT: "COALESCE(j.m_account, '') = j.account_no",
    m.SAME_AMOUNT: "COALESCE(j.m_amount, 0) = j.amount_fen",
}
_BANK_SIDE_KNOWN: dict[str, tuple[str | bool, ...]] = {m.BANK: tuple(m.BANK_STATUSES)}  # staged: validated
# The day's payments the bank did not send: the bank side is absent, the day is the day.
_MIS_ONLY_KNOWN: dict[str, tuple[str | bool, ...]] = {m.BANK: (m.ABSENT,), m.SAME_DAY: (True,),
                                                      m.SAME_ACCOUNT: (False,), m.SAME_AMOUNT: (False,)}
_MIS_ONLY_FACTS = {m.MIS: "p.state"}
BANK_SIDE_OUTCOME = m.sql_case(_BANK_SIDE_FACTS, column="outcome", known=_BANK_SIDE_KNOWN)
BANK_SIDE_DETAIL = m.sql_case(_BANK_SIDE_FACTS, column="detail", known=_BANK_SIDE_KNOWN)
MIS_ONLY_OUTCOME = m.sql_case(_MIS_ONLY_FACTS, column="outcome", known=_MIS_ONLY_KNOWN)
MIS_ONLY_DETAIL = m.sql_case(_MIS_ONLY_FACTS, column="detail", known=_MIS_ONLY_KNOWN)
# Which of those the table reports (a line) and which it calls MATCHED (p.state is never NULL).
MIS_ONLY_REPORTED = m.sql_decides(_MIS_ONLY_FACTS, [o for o in m.OUTCOMES if o != m.MATCHED], known=_MIS_ONLY_KNOWN)
MIS_ONLY_MATCHED = m.sql_decides(_MIS_ONLY_FACTS, [m.MATCHED], known=_MIS_ONLY_KNOWN)

# The bank side: every staged record against the MIS payment with its serial,
# joined on the day's payments (a hash join over one day, never over the bank's
# whole history); a serial not found that day is looked up on any day by the
# unique (bank, serial) index.
_BANK_SIDE_SQL = """
INSERT INTO recon_lines (bank_id, settlement_date, bank_serial, outcome, bank_line_no, bank_account_no,
                         mis_account_no, bank_amount_fen, mis_amount_fen, bank_status, mis_state, detail)
SELECT :bank_id, :day, c.bank_serial, c.outcome, c.line_no, c.account_no, c.mis_account_no, c.amount_fen,
       c.mis_amount_fen, c.status, c.mis_state, c.detail
FROM (
  SELECT j.line_no, j.bank_serial, j.account_no, j.amount_fen, j.status,
         COALESCE(j.m_account, '') AS mis_account_no, COALESCE(j.m_amount, 0) AS mis_amount_fen,
         COALESCE(j.m_state, '') AS mis_state,
         {outcome} AS outcome,
         {detail} AS detail
  FROM (
    SELECT s.line_no, s.bank_serial, s.account_no, s.amount_fen, s.status, p.payment_id AS same_day,
           CASE WHEN p.payment_id IS NULL THEN (SELECT q.state FROM payments q
                WHERE q.bank_id = :bank_id AND q.bank_serial = s.bank_serial) ELSE p.state END AS m_state,
           CASE WHEN p.payment_id IS NULL THEN (SELECT q.account_no FROM payments q
                WHERE q.bank_id = :bank_id AND q.bank_serial = s.bank_serial) ELSE p.account_no END AS m_account,
           CASE WHEN p.payment_id IS NULL THEN (SELECT q.amount_fen FROM payments q
                WHERE q.bank_id = :bank_id AND q.bank_serial = s.bank_serial) ELSE p.amount_fen END AS m_amount
    FROM recon_staging s
    LEFT JOIN {day_payments} p ON {day_join} p.bank_serial = s.bank_serial
  ) j
) c
WHERE c.outcome <> 'MATCHED'
ORDER BY c.line_no
"""

# The MIS side: the day's payments the bank did not send.
_MIS_ONLY_SQL = """
INSERT INTO recon_lines (bank_id, settlement_date, bank_serial, outcome, bank_line_no, bank_account_no,
                         mis_account_no, bank_amount_fen, mis_amount_fen, bank_status, mis_state, detail)
SELECT :bank_id, :day, p.bank_serial, {outcome}, 0, '', p.account_no, 0, p.amount_fen,
       '', p.state, {detail}
FROM {day_payments} p
WHERE {day_where} {reported}
  AND NOT EXISTS (SELECT 1 FROM recon_staging s WHERE s.bank_serial = p.bank_serial)
ORDER BY p.payment_id
"""

# The day's payments the bank did not send that the table calls MATCHED (they moved no money).
_MIS_ONLY_SETTLED_SQL = """
SELECT COUNT(*), COALESCE(SUM(p.amount_fen), 0)
FROM {day_payments} p
WHERE {day_where} {matched}
  AND NOT EXISTS (SELECT 1 FROM recon_staging s WHERE s.bank_serial = p.bank_serial)
"""

# SQLite, MariaDB: the day's payments read in place through the (bank, day) index.
_IN_PLACE = {"day_payments": "payments", "day_join": "p.bank_id = :bank_id AND p.settlement_date = :day AND",
             "day_where": "p.bank_id = :bank_id AND p.settlement_date = :day AND"}

# PostgreSQL: both sides in ONE pass, a hash FULL JOIN of the staged records with the
# day's payments read in place (by the (bank, day) index): a row with no record is a
# payment the bank did not send (its facts as _MIS_ONLY_FACTS), any other row is the bank
# side. Only discrepancies, the payments the bank did not send and the records with no
# payment that day are kept (a small set); from them the lines are written in the order
# the two statements above write them (records by line, then payments by id) and the
# settled ones counted.
#
# The same pass also answers whether a serial repeats in the records (no separate
# GROUP BY over the staged records, which cost as much as a third of the join): the
# day's payments have distinct serials, so each record joins at most one of them and
# the join has exactly `records` rows with a record. A serial repeated among records
# with no payment that day shows in the kept set (its rows > its distinct serials); one
# repeated among records that match a payment of the day makes that payment appear
# twice, so the rows with a payment (records - unmatched records + payments not sent)
# exceed the day's payments. Either way DayMatch.duplicates is true.
_PG_MIS_ONLY_FACTS = {m.MIS: "j.m_state"}
_ONE_PASS_SQL = """
WITH kept AS (
  SELECT c.* FROM (
    SELECT j.*,
           CASE WHEN j.line_no IS NULL THEN {mis_outcome} ELSE {bank_outcome} END AS outcome,
           CASE WHEN j.line_no IS NULL THEN {mis_detail} ELSE {bank_detail} END AS detail
    FROM (
      SELECT s.line_no, COALESCE(s.bank_serial, p.bank_serial) AS bank_serial, s.account_no, s.amount_fen,
             s.status, p.payment_id AS same_day,
             CASE WHEN p.payment_id IS NULL THEN q.state ELSE p.state END AS m_state,
             CASE WHEN p.payment_id IS NULL THEN q.account_no ELSE p.account_no END AS m_account,
             CASE WHEN p.payment_id IS NULL THEN q.amount_fen ELSE p.amount_fen END AS m_amount
      FROM recon_staging s
      FULL JOIN (SELECT payment_id, bank_serial, state, account_no, amount_fen FROM payments
                 WHERE bank_id = :bank_id AND settlement_date = :day) p ON p.bank_serial = s.bank_serial
      -- a record not found that day: looked up on any day, once, by the unique (bank, serial) index.
      -- OFFSET 0 keeps it a per-record lookup: pulled up into the join, the planner hashed every
      -- payment the bank ever made (a second pass over payments, 2-3 s of a 1M-record close).
      LEFT JOIN LATERAL (SELECT q.state, q.account_no, q.amount_fen FROM payments q
                         WHERE p.payment_id IS NULL AND q.bank_id = :bank_id AND q.bank_serial = s.bank_serial
                         OFFSET 0) q
             ON true
    ) j
  ) c
  WHERE c.outcome <> 'MATCHED' OR c.line_no IS NULL OR c.same_day IS NULL
), written AS (
  INSERT INTO recon_lines (bank_id, settlement_date, bank_serial, outcome, bank_line_no, bank_account_no,
                           mis_account_no, bank_amount_fen, mis_amount_fen, bank_status, mis_state, detail)
  SELECT :bank_id, :day, k.bank_serial, k.outcome, COALESCE(k.line_no, 0), COALESCE(k.account_no, ''),
         COALESCE(k.m_account, ''), COALESCE(k.amount_fen, 0), COALESCE(k.m_amount, 0), COALESCE(k.status, ''),
         COALESCE(k.m_state, ''), k.detail
  FROM kept k WHERE k.outcome <> 'MATCHED'
  ORDER BY k.line_no IS NULL, k.line_no, k.same_day
)
SELECT COUNT(*) FILTER (WHERE k.line_no IS NULL AND k.outcome = 'MATCHED'),
       COALESCE(SUM(k.m_amount) FILTER (WHERE k.line_no IS NULL AND k.outcome = 'MATCHED'), 0),
       COUNT(*) FILTER (WHERE k.line_no IS NULL),
       COUNT(*) FILTER (WHERE k.line_no IS NOT NULL AND k.same_day IS NULL),
       COUNT(DISTINCT k.bank_serial) FILTER (WHERE k.line_no IS NOT NULL AND k.same_day IS NULL),
       (SELECT COUNT(*) FROM payments WHERE bank_id = :bank_id AND settlement_date = :day)
FROM kept k
"""
ONE_PASS_MIS_ONLY_OUTCOME = m.sql_case(_PG_MIS_ONLY_FACTS, column="outcome", known=_MIS_ONLY_KNOWN)
ONE_PASS_MIS_ONLY_DETAIL = m.sql_case(_PG_MIS_ONLY_FACTS, column="detail", known=_MIS_ONLY_KNOWN)
_ONE_PASS = sa.text(_ONE_PASS_SQL.format(mis_outcome=ONE_PASS_MIS_ONLY_OUTCOME, mis_detail=ONE_PASS_MIS_ONLY_DETAIL,
                                         bank_outcome=BANK_SIDE_OUTCOME, bank_detail=BANK_SIDE_DETAIL)
                    ).bindparams(_DAY)


def _matching(where: dict[str, str]) -> tuple[sa.TextClause, sa.TextClause, sa.TextClause]:
    def text(template: str, outcome: str, detail: str) -> sa.TextClause:
        sql = template.format(outcome=outcome, detail=detail, reported=MIS_ONLY_REPORTED,
                              matched=MIS_ONLY_MATCHED, **where)
        return sa.text(sql).bindparams(_DAY) if ":day" in sql else sa.text(sql)

    return (text(_BANK_SIDE_SQL, BANK_SIDE_OUTCOME, BANK_SIDE_DETAIL),
            text(_MIS_ONLY_SQL, MIS_ONLY_OUTCOME, MIS_ONLY_DETAIL),
            text(_MIS_ONLY_SETTLED_SQL, MIS_ONLY_OUTCOME, MIS_ONLY_DETAIL))


_MATCHING_IN_PLACE = _matching(_IN_PLACE)


class DayMatch(NamedTuple):
    settled_n: int        # the day's payments the bank did not send that are MATCHED (moved no money)
    settled_fen: int
    duplicates: bool      # some serial repeats in the staged records (only PostgreSQL's one pass tells;
                          # elsewhere the staging refused them before): the lines written must not stand


def match_day(conn: Connection, bank_id: str, day: dt.date, records: int) -> DayMatch:
    """Writes the day's discrepancy lines (the staging table, holding `records`
    records, against the day's payments). The caller holds the bank-day lock
    exclusive (banks.lock_bank_day): no payment or reversal of the day can
    commit meanwhile, so the day's payments need no row locks."""
    key = {"bank_id": bank_id, "day": day}
    if conn.dialect.name == "postgresql":
        settled_n, settled_fen, mis_only, unmatched, unmatched_serials, day_payments = conn.execute(_ONE_PASS,
                                                                                                   key).one()
        repeated = unmatched != unmatched_serials or records - unmatched + mis_only != day_payments
        return DayMatch(int(settled_n), int(settled_fen), repeated)
    bank_side, mis_only_lines, mis_only_settled = _MATCHING_IN_PLACE
    conn.execute(bank_side, key)
    conn.execute(mis_only_lines, key)
    settled_n, settled_fen = conn.execute(mis_only_settled, key).one()
    return DayMatch(int(settled_n), int(settled_fen), False)


# ---- applying ----
_LINES_TO_APPLY = (sa.select(T_LINE).where(T_LINE.c.bank_id == _b("bank_id"), T_LINE.c.settlement_date == _DAY,
                                           T_LINE.c.outcome.in_([m.BANK_ONLY, m.UTILITY_ONLY]),
                                           T_LINE.c.line_id > _b("after"))
                   .order_by(T_LINE.c.line_id).limit(_b("page")))
# the same, without the lines recon_bank_only posted already
_FAST = sa.table(recon_bank_only.FAST_LINES, sa.column("line_id", sa.BigInteger))
_OTHER_LINES_TO_APPLY = _LINES_TO_APPLY.where(~sa.exists().where(_FAST.c.line_id == T_LINE.c.line_id))
_DEMOTE_LINE = (T_LINE.update().where(T_LINE.c.line_id == _b("l_id"))
                .values(outcome=m.MISMATCH, detail=_b("why")))
_PAYMENT_BY_SERIAL = sa.select(T_PAY).where(T_PAY.c.bank_id == _b("bank_id"), T_PAY.c.bank_serial == _b("serial"))
_LOCK_CUSTOMER = (sa.select(T_CUST.c.branch_code, T_CUST.c.tariff_class, T_CUST.c.status, T_CUST.c.prepaid_fen)
                  .where(T_CUST.c.account_no == _b("account_no")).with_for_update())


class OutcomeApplier:
    """Applies one day's BANK_ONLY and UTILITY_ONLY lines, on the closing transaction's connection."""

    # BANK_ONLY and UTILITY_ONLY applied a page at a time (recon_bulk); False: each on its own (the reference).
    set_based = True

    def __init__(self, conn: Connection, bank_id: str, day: dt.date, *, rates: LateFeeRates,
                 now: dt.datetime) -> None:
        self.conn = conn
        self.bank_id = bank_id
        self.day = day
        self.rates = rates
        self.now = now

    def apply(self) -> None:
        """BANK_ONLY lines are posted, UTILITY_ONLY ones reversed, in the order found;
        one that cannot be applied is demoted to MISMATCH, saying why. Set-based, the
        common BANK_ONLY lines go first, all at once in SQL (recon_bank_only), then the
        rest a page at a time."""
        if not self.set_based:
            self._apply_pages(_LINES_TO_APPLY)
            return
        conn = self.conn
        recon_bank_only.create_work_tables(conn)
        try:
            with conn.begin_nested():
                recon_bank_only.post_common_bank_only(conn, bank_id=self.bank_id, day=self.day, rates=self.rates,
                                                      now=self.now, channel=RECON_CHANNEL)
        except IntegrityError:  # a serial taken meanwhile: nothing of it stays, every line goes the paged way
            recon_bank_only.forget_fast_lines(conn)
        self._apply_pages(_OTHER_LINES_TO_APPLY)
        recon_bank_only.drop_work_tables(conn)

    def _apply_pages(self, lines_to_apply: sa.Select) -> None:  # type: ignore[type-arg]
        conn = self.conn
        after = 0
        while True:
            page = conn.execute(lines_to_apply, {"bank_id": self.bank_id, "day": self.day, "after": after,
                                                 "page": APPLY_PAGE_ROWS}).all()
            if not page:
                return
            done = self._apply_set_based(page) if self.set_based else set()
            for line in page:
                if line.line_id in done:
                    continue
                try:
                    with conn.begin_nested():
                        if line.outcome == m.BANK_ONLY:
                            self._post(line)
                        else:
                            self._reverse(line)
                except (YinDianError, IntegrityError) as exc:
                    why = exc.message if isinstance(exc, YinDianError) else "serial taken meanwhile"
                    conn.execute(_DEMOTE_LINE, {"l_id": line.line_id,
                                                "why": f"not applied: {why}"[:DETAIL_MAX]})
            after = page[-1].line_id

    def _apply_set_based(self, page: Sequence[Any]) -> set[int]:
        """Posts the page's BANK_ONLY lines and reverses its UTILITY_ONLY ones a set at
        a time, except on accounts the page does both on (those keep their order, one
        by one); returns the line ids done. Should a serial be taken meanwhile,
        nothing of it stays and every line goes one by one."""
        posted = {ln.bank_account_no for ln in page if ln.outcome == m.BANK_ONLY}
        reversed_ = {ln.mis_account_no for ln in page if ln.outcome == m.UTILITY_ONLY}
        both = posted & reversed_
        to_post = [ln for ln in page if ln.outcome == m.BANK_ONLY and ln.bank_account_no not in both]
        to_reverse = [ln for ln in page if ln.outcome == m.UTILITY_ONLY and ln.mis_account_no not in both]
        try:
            with self.conn.begin_nested():
                post_bank_only(self.conn, to_post, bank_id=self.bank_id, day=self.day, rates=self.rates,
                               now=self.now, channel=RECON_CHANNEL)
                reverse_utility_only(self.conn, to_reverse, bank_id=self.bank_id, day=self.day, now=self.now,
                                     cancel_serial=f"RECON-{self.day:%Y%m%d}")
        except IntegrityError:
            return set()
        return {ln.line_id for ln in to_post + to_reverse}

    def _journal(self, serial: str, account_no: str, amount_fen: int, outcome: str, payment_id: int) -> None:
        self.conn.execute(T_JOURNAL.insert(), {
            "at": self.now, "bank_id": self.bank_id, "rpc": "RECONCILE", "serial": serial, "original_serial": "",
            "account_no": account_no, "amount_fen": amount_fen, "outcome": outcome, "payment_id": payment_id})

    def _reverse(self, line: sa.Row) -> None:  # type: ignore[type-arg]
        conn = self.conn
        p = conn.execute(_PAYMENT_BY_SERIAL, {"bank_id": self.bank_id, "serial": line.bank_serial}).one()
        conn.execute(_LOCK_CUSTOMER, {"account_no": p.account_no}).first()
        # reversed_on is the reconciled day: the payment never happened at the bank that day.
        reverse_payment_in_tx(conn, p, self.now, self.day, f"RECON-{self.day:%Y%m%d}")
        self._journal(line.bank_serial, p.account_no or "", p.amount_fen, "UTILITY_ONLY_REVERSED", p.payment_id)

    def _post(self, line: sa.Row) -> None:  # type: ignore[type-arg]
        """A Pay of the reconciled day, inside this transaction: same allocation rules
        (allocation.allocate_payment over late fees as of the settlement day)."""
        conn = self.conn
        account_no, amount_fen, day = line.bank_account_no, line.bank_amount_fen, self.day
        cust = conn.execute(_LOCK_CUSTOMER, {"account_no": account_no}).first()
        if cust is None:
            raise Precondition(f"account {account_no} not found", reason="ACCOUNT_NOT_FOUND")
        if cust.status != "OPEN":
            raise Precondition(f"account {account_no} is closed", reason="ACCOUNT_CLOSED")
        cmd = PayCommand(self.bank_id, line.bank_serial, account_no, amount_fen, channel=RECON_CHANNEL)
        pk = post_payment_in_tx(conn, self.rates, cmd, cust, fee_day=day, settlement=day, now=self.now).payment_pk
        self._journal(line.bank_serial, account_no, amount_fen, "BANK_ONLY_POSTED", pk)
