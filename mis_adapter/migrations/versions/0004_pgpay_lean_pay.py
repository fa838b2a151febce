"""A pay writes less and plans less (issue 11, the PostgreSQL server's CPU per pay).

Every back end: the prepaid ledger loses its account_no index. Nothing in the product reads the
ledger by account (it is written by pay, issuance, feed, reconciliation and refunds, and read only
whole, by tests and audits); every pay that adds prepaid credit paid for one more index entry and its
WAL. An operator looking for one account's ledger lines reads them by payment (the ledger's
payment_id) or scans: an audit query, not a path a request waits on.

PostgreSQL: customers get room on each page (fillfactor 90), as bills (0004_bills_hot) and readings
(0004_readings_hot) did: a pay that adds prepaid credit updates its customer's row, no index covers
prepaid_fen, so the update is HOT whenever the new version fits on the row's page. Seeded or bulk-loaded
pages were full, and each customer's first update went to another page with an entry in both of its
indexes. (Under bench-ratio, 32 pays in flight on 736 accounts, 3-48 % of the customer updates
were not HOT before (six runs) and 3-17 % after (three), within the runs' spread: with concurrent readers pinning the
page, PostgreSQL skips the pruning that frees room, which no fillfactor cures.) fillfactor applies
to pages written after it is set (an existing table gets it as it is rewritten or as rows move).

PostgreSQL: yd_pay (0004_pay_function) is replaced by the same rules with leaner statements. Every
SQL statement a PL/pgSQL function runs is initialised and torn down at each call (each plan node,
each table and index a write opens): under callgrind that start-up was a quarter of a call's
instructions, more than its index inserts.
- The bank-day lock is a PERFORM of its own and the account is locked by a plain FOR UPDATE of its
  row, not a row joined to a materialized CTE (same order: bank-day, then account).
- The payment's id is taken from its sequence before the write, so the write's parts need not read
  it from the payment's INSERT: each part is a plain VALUES or UPDATE, with no CTE scan or join
  of `pay`; the statement's own (main) part is the bills' UPDATE, counted by ROW_COUNT (the guard),
  or the journal line when no bill is settled. The customer's credit UPDATE no longer joins `pay`
  (the payment's INSERT yields its one row or fails the whole statement).
The reads, the pricing and allocation, the guard and the answers are unchanged.

Revision ID: 0004_pgpay_lean_pay
Revises: 0003
Depends on: 0004_pay_function
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic import op

revision = '0004_pgpay_lean_pay'
down_revision = '0003'
branch_labels = None
depends_on = ('0004_pay_function',)

CUSTOMERS_FILLFACTOR = 90

# {seq}: the payments key's sequence, as PostgreSQL named it (pg_get_serial_sequence at upgrade).
_PAY = """pay AS (
      INSERT INTO payments (payment_id, bank_id, bank_serial, state, account_no, branch_code, amount_fen, channel,
                            outlet_code, teller_id, bank_balance_fen, settlement_date, posted_at, arrears_after_fen,
                            prepaid_after_fen, prepaid_added_fen, reversed_at, reversed_on, cancel_serial)
      VALUES (v_id, p_bank, p_serial, 'POSTED', p_account, branch_code, p_amount, p_channel, p_outlet, p_teller,
              p_bank_balance, settlement, p_now, arrears_after, prepaid_after, remaining, NULL, NULL, NULL)
    )"""
_ALLOC = """, alloc AS (
      INSERT INTO allocations (payment_id, bill_id, late_fee_fen, principal_fen)
      SELECT v_id, a.bill_id, a.fee, a.principal
      FROM unnest(a_ids, a_fees, a_prin) WITH ORDINALITY AS a(bill_id, fee, principal, k)
      ORDER BY a.k
    )"""
_CREDIT = """, credit AS (
      UPDATE customers c SET prepaid_fen = c.prepaid_fen + remaining WHERE c.account_no = p_account
    ), ledger AS (
      INSERT INTO prepaid_ledger (account_no, reason, delta_fen, balance_after_fen, payment_id, bill_id, at)
      VALUES (p_account, 'PAYMENT', remaining, prepaid_after, v_id, NULL, p_now)
    )"""
_JOURNAL = """INSERT INTO journal (at, bank_id, rpc, serial, original_serial, account_no, amount_fen, outcome, payment_id)
      VALUES (p_now, p_bank, 'PAY', p_serial, '', p_account, p_amount, 'POSTED', v_id)"""
# The one guard left (pay_pg.py): each bill written is the version priced; ROW_COUNT counts them.
_BILLS = """UPDATE bills b SET principal_paid_fen = b.principal_paid_fen + u.principal,
                         late_fee_paid_fen = b.late_fee_paid_fen + u.fee,
                         accrual_micro = u.micro, accrual_date = u.micro_date, status = u.new_status,
                         paid_on = CASE WHEN u.new_status = 'PAID' THEN p_day ELSE NULL END
      FROM unnest(a_ids, a_fees, a_prin, a_micro, a_dates, a_status, a_versions)
           AS u(bill_id, fee, principal, micro, micro_date, new_status, version)
      WHERE b.bill_id = u.bill_id AND b.xmin = u.version"""


def _write(bills: bool, credit: bool) -> str:
    """One statement: with bills settled, its main part is the bills' UPDATE (the journal line a CTE);
    without, the journal line."""
    parts = "    WITH " + _PAY + (_ALLOC if bills else "") + (_CREDIT if credit else "")
    if bills:
        return f"{parts}, journal AS (\n      {_JOURNAL}\n    )\n    {_BILLS};\n    GET DIAGNOSTICS updated = ROW_COUNT;"
    return f"{parts}\n    {_JOURNAL};\n    updated := 0;"


PAY_FUNCTION = r"""
CREATE OR REPLACE FUNCTION yd_pay(p_account text, p_bank text, p_serial text, p_day date, p_day_key bigint,
                       p_amount bigint, p_channel text, p_outlet text, p_teller text, p_bank_balance bigint,
                       p_now timestamptz, p_res_ppm bigint, p_cur_ppm bigint, p_late_ppm bigint, p_min_fen bigint,
                       OUT code text, OUT payment_id bigint, OUT branch_code text, OUT settlement date,
                       OUT arrears_after bigint, OUT prepaid_after bigint, OUT refusal text, OUT allocs text)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
  v_tariff text; v_status text; v_prepaid bigint; r record; is_first boolean := true; v_id bigint;
  remaining bigint; unpaid bigint; days bigint; cur_days bigint; accrued bigint; micro bigint;
  fee_due bigint; fee bigint; principal bigint; due_total bigint := 0; principal_total bigint := 0;
  new_prin bigint; new_fee bigint; n int := 0; updated int;
  a_ids bigint[] := '{}'; a_fees bigint[] := '{}'; a_prin bigint[] := '{}'; a_micro bigint[] := '{}';
  a_status text[] := '{}'; a_versions xid[] := '{}'; a_dates date[] := '{}';
BEGIN
  -- the bank-day lock, then the account (the order everywhere: banks.py)
  PERFORM pg_advisory_xact_lock_shared(p_day_key);
  SELECT c.branch_code, c.tariff_class, c.status, c.prepaid_fen INTO branch_code, v_tariff, v_status, v_prepaid
  FROM customers c WHERE c.account_no = p_account FOR UPDATE;
  IF NOT FOUND THEN
    code := 'NOT_FOUND';
    RETURN;
  END IF;
  remaining := p_amount;
  allocs := '';
  -- a new snapshot, taken with both locks held: the bank's state and the account's unpaid bills
  FOR r IN
    SELECT (SELECT p.payment_id FROM payments p WHERE p.bank_id = p_bank AND p.bank_serial = p_serial) AS taken,
           (SELECT k.suspended_reason FROM banks k WHERE k.bank_id = p_bank AND k.suspended) AS reason,
           (SELECT coalesce(bit_or(1 << (d.settlement_date - p_day)), 0) FROM reconciled_days d
            WHERE d.bank_id = p_bank AND d.settlement_date BETWEEN p_day AND p_day + 1) AS bits,
           EXISTS (SELECT 1 FROM bank_links l
                   WHERE l.bank_id = p_bank AND l.state = 'SIGNED_OFF' AND l.business_date >= p_day) AS signed,
           b.bill_id, b.period, b.amount_fen, b.prepaid_applied_fen, b.principal_paid_fen, b.late_fee_paid_fen,
           b.accrual_micro, b.accrual_date, b.xmin AS version
    FROM (SELECT 1) AS one LEFT JOIN bills b ON b.account_no = p_account AND b.status <> 'PAID'
    ORDER BY b.period, b.bill_id
  LOOP
    IF is_first THEN
      is_first := false;
      IF r.taken IS NOT NULL THEN
        code := 'TAKEN';
        payment_id := r.taken;
      ELSIF r.reason IS NOT NULL THEN
        code := 'SUSPENDED';
        refusal := r.reason;
      ELSIF v_status <> 'OPEN' THEN
        code := 'CLOSED';
      ELSIF r.bits & 1 = 0 AND NOT r.signed THEN
        settlement := p_day;
      ELSIF r.bits & 2 <> 0 THEN
        code := 'DAY_CLOSED';
      ELSE
        settlement := p_day + 1;
      END IF;
      IF code IS NOT NULL THEN
        PERFORM set_config('synchronous_commit', 'off', true);  -- nothing written: no WAL flush to wait for
        RETURN;
      END IF;
    END IF;
    CONTINUE WHEN r.bill_id IS NULL;
    -- late_fee.py, allocation.py and pay_plan.py, step for step, in integer arithmetic
    unpaid := r.amount_fen - r.prepaid_applied_fen - r.principal_paid_fen;
    IF unpaid <= 0 OR p_day <= r.accrual_date THEN
      accrued := 0;
    ELSE
      days := p_day - r.accrual_date;
      IF v_tariff = 'RESIDENTIAL' THEN
        accrued := unpaid * days * p_res_ppm;
      ELSE
        cur_days := greatest(0, least(p_day, make_date(substr(r.period, 1, 4)::int, 12, 31)) - r.accrual_date);
        accrued := unpaid * (cur_days * p_cur_ppm + (days - cur_days) * p_late_ppm);
      END IF;
    END IF;
    micro := r.accrual_micro + accrued;
    IF micro <= 0 THEN
      fee_due := greatest(0, 0 - r.late_fee_paid_fen);
    ELSE
      fee_due := greatest(0, greatest(p_min_fen, (micro + 500000) / 1000000) - r.late_fee_paid_fen);
    END IF;
    due_total := due_total + unpaid;
    CONTINUE WHEN remaining = 0;
    fee := least(remaining, fee_due);
    remaining := remaining - fee;
    principal := least(remaining, unpaid);
    remaining := remaining - principal;
    CONTINUE WHEN fee = 0 AND principal = 0;
    new_prin := r.principal_paid_fen + principal;
    new_fee := r.late_fee_paid_fen + fee;
    principal_total := principal_total + principal;
    n := n + 1;
    a_ids[n] := r.bill_id;
    a_fees[n] := fee;
    a_prin[n] := principal;
    a_micro[n] := micro;
    a_dates[n] := greatest(p_day, r.accrual_date);
    a_versions[n] := r.version;
    a_status[n] := CASE WHEN r.prepaid_applied_fen + new_prin >= r.amount_fen THEN 'PAID'
                        WHEN new_prin <> 0 OR new_fee <> 0 OR r.prepaid_applied_fen <> 0 THEN 'PARTIAL'
                        ELSE 'UNPAID' END;
    allocs := allocs || CASE WHEN n = 1 THEN '' ELSE ',' END || r.bill_id || ':' || fee || ':' || principal;
  END LOOP;
  arrears_after := due_total - principal_total;
  prepaid_after := v_prepaid + remaining;
  v_id := nextval('{seq}'::regclass);
  IF n > 0 AND remaining <> 0 THEN
""" + _write(True, True) + r"""
  ELSIF n > 0 THEN
""" + _write(True, False) + r"""
  ELSIF remaining <> 0 THEN
""" + _write(False, True) + r"""
  ELSE
""" + _write(False, False) + r"""
  END IF;
  IF updated <> n THEN
    RAISE EXCEPTION 'a bill of account % changed while it was priced', p_account USING ERRCODE = 'YDP01';
  END IF;
  payment_id := v_id;
  code := 'POSTED';
END
$fn$
"""


def _previous() -> str:
    """0004_pay_function's yd_pay, as CREATE OR REPLACE (that revision's module, loaded by its path)."""
    path = Path(__file__).with_name("0004_pay_function.py")
    spec = importlib.util.spec_from_file_location("yd_mis_0004_pay_function", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.PAY_FUNCTION).replace("CREATE FUNCTION yd_pay(", "CREATE OR REPLACE FUNCTION yd_pay(", 1)


def upgrade() -> None:
    op.drop_index('ix_prepaid_ledger_account_no', table_name='prepaid_ledger')
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute(f'ALTER TABLE customers SET (fillfactor = {CUSTOMERS_FILLFACTOR})')
        seq = bind.exec_driver_sql("SELECT pg_get_serial_sequence('payments', 'payment_id')").scalar_one()
        op.execute(PAY_FUNCTION.replace("{seq}", str(seq).replace("'", "''")))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_previous())
        op.execute('ALTER TABLE customers RESET (fillfactor)')
    op.create_index('ix_prepaid_ledger_account_no', 'prepaid_ledger', ['account_no'], unique=False)
