"""PostgreSQL only: yd_pay (0004_pgpay_lean_pay) with its reads in one SELECT INTO and fewer PL/pgSQL
expressions (issue 11, the MIS pays' backends' CPU per pay). Other databases: nothing.

Each pay is its own transaction, and PL/pgSQL compiles each simple expression it evaluates (an IF
condition, an assignment, a variable's default) once per transaction: every expression a call runs
is initialised and torn down at every call. 0004_pgpay_lean_pay ran about thirty of them on a pay
that settles no bill (the usual pay: prepaid credit), and read the bank's state and the bills through
a cursor (the FOR loop: a portal opened, fetched and closed per call).
- The bank's state, the refusal it decides and the unpaid bills are read by one SELECT INTO (no
  cursor): the serial taken, the suspension, the reconciled days and the sign-off decide the refusal
  code, the settlement day and the refusal's columns in the statement itself, by the same rules in
  the same order; the unpaid bills come as one array of yd_pay_bill (period order), with their unpaid
  total. It is taken after both locks, in a new snapshot, as before.
- A pay with no unpaid bill (nothing to price) writes at once; the allocation loop runs over the array
  only when there are bills, step for step as before.
- No variable has a default: each is assigned where it is first needed.
- The bank's reconciled days among today and tomorrow come as an array (ARRAY of an index-only range
  scan of the key), not a bit_or aggregate: an Agg node costs more to set up at each call.
- The prepaid credit updates the customer's row by the ctid its lock returned (a TID scan, no index
  probe): the row is locked FOR UPDATE by this transaction from the lock to the commit, so no other
  writer can move it, and a later pay of the same account in the same transaction (yd_pay_many) locks
  and reads its newest version again.
The locks (bank-day, then the account row), the guard on the bills written (their xmin), the writes
and the answers are unchanged (tests/mis_adapter/test_pay_function.py holds the answers and rows
equal to the Python path's; yd_pay_many calls this yd_pay).

Revision ID: 0004_pgpay2_lean_read
Revises: 0003
Depends on: 0004_pgpay_lean_pay, 0004_paybatch_pay_many
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from alembic import op

revision = '0004_pgpay2_lean_read'
down_revision = '0003'
branch_labels = None
depends_on = ('0004_pgpay_lean_pay', '0004_paybatch_pay_many')


def _module(name: str) -> ModuleType:
    """Another revision's module, loaded by its path (revision files are not importable by name)."""
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"yd_mis_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_LEAN = _module("0004_pgpay_lean_pay")

# One unpaid bill as yd_pay reads it: the columns it prices with and the version its UPDATE matches.
BILL_TYPE = """CREATE TYPE yd_pay_bill AS (bill_id bigint, period text, amount_fen bigint, prepaid_applied_fen bigint,
                          principal_paid_fen bigint, late_fee_paid_fen bigint, accrual_micro bigint,
                          accrual_date date, version xid)"""

# Each write variant, as 0004_pgpay_lean_pay wrote it (one statement; the guard's ROW_COUNT), but the
# customer's credit by the locked row's ctid.
_CREDIT_BY_KEY = "UPDATE customers c SET prepaid_fen = c.prepaid_fen + remaining WHERE c.account_no = p_account"
_CREDIT_BY_TID = "UPDATE customers c SET prepaid_fen = c.prepaid_fen + remaining WHERE c.ctid = v_ctid"
_WRITE = {(bills, credit): _LEAN._write(bills, credit).replace(_CREDIT_BY_KEY, _CREDIT_BY_TID)
          for bills in (False, True) for credit in (False, True)}
assert all(_CREDIT_BY_KEY not in w for w in _WRITE.values()) and _CREDIT_BY_TID in _WRITE[(False, True)]

PAY_FUNCTION = r"""
CREATE OR REPLACE FUNCTION yd_pay(p_account text, p_bank text, p_serial text, p_day date, p_day_key bigint,
                       p_amount bigint, p_channel text, p_outlet text, p_teller text, p_bank_balance bigint,
                       p_now timestamptz, p_res_ppm bigint, p_cur_ppm bigint, p_late_ppm bigint, p_min_fen bigint,
                       OUT code text, OUT payment_id bigint, OUT branch_code text, OUT settlement date,
                       OUT arrears_after bigint, OUT prepaid_after bigint, OUT refusal text, OUT allocs text)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
  v_ctid tid; v_tariff text; v_status text; v_prepaid bigint; v_bills yd_pay_bill[]; r yd_pay_bill; v_id bigint;
  v_taken bigint; v_reason text; v_closed date[]; v_signed boolean;
  remaining bigint; unpaid bigint; days bigint; cur_days bigint; accrued bigint; micro bigint;
  fee_due bigint; fee bigint; principal bigint; due_total bigint; principal_total bigint;
  new_prin bigint; new_fee bigint; n int; updated int;
  a_ids bigint[]; a_fees bigint[]; a_prin bigint[]; a_micro bigint[];
  a_status text[]; a_versions xid[]; a_dates date[];
BEGIN
  -- the bank-day lock, then the account (the order everywhere: banks.py)
  PERFORM pg_advisory_xact_lock_shared(p_day_key);
  SELECT c.ctid, c.branch_code, c.tariff_class, c.status, c.prepaid_fen
  INTO v_ctid, branch_code, v_tariff, v_status, v_prepaid
  FROM customers c WHERE c.account_no = p_account FOR UPDATE;
  IF NOT FOUND THEN
    code := 'NOT_FOUND';
    RETURN;
  END IF;
  -- a new snapshot, taken with both locks held: the bank's state, the refusal it decides (first match:
  -- the serial taken, the bank suspended, the account closed, the day closed), and the unpaid bills
  SELECT (SELECT p.payment_id FROM payments p WHERE p.bank_id = p_bank AND p.bank_serial = p_serial),
         (SELECT k.suspended_reason FROM banks k WHERE k.bank_id = p_bank AND k.suspended),
         ARRAY(SELECT d.settlement_date FROM reconciled_days d
               WHERE d.bank_id = p_bank AND d.settlement_date BETWEEN p_day AND p_day + 1),
         EXISTS (SELECT 1 FROM bank_links l
                 WHERE l.bank_id = p_bank AND l.state = 'SIGNED_OFF' AND l.business_date >= p_day),
         ARRAY(SELECT ROW(b.bill_id, b.period, b.amount_fen, b.prepaid_applied_fen, b.principal_paid_fen,
                          b.late_fee_paid_fen, b.accrual_micro, b.accrual_date, b.xmin)::yd_pay_bill
               FROM bills b WHERE b.account_no = p_account AND b.status <> 'PAID'
               ORDER BY b.period)
  INTO v_taken, v_reason, v_closed, v_signed, v_bills;
  allocs := '';
  IF v_taken IS NOT NULL THEN
    code := 'TAKEN';
    payment_id := v_taken;
  ELSIF v_reason IS NOT NULL THEN
    code := 'SUSPENDED';
    refusal := v_reason;
  ELSIF v_status <> 'OPEN' THEN
    code := 'CLOSED';
  ELSIF NOT (p_day = ANY(v_closed) OR v_signed) THEN
    settlement := p_day;
  ELSIF p_day + 1 = ANY(v_closed) THEN
    code := 'DAY_CLOSED';
  ELSE
    settlement := p_day + 1;
  END IF;
  IF code IS NOT NULL THEN
    PERFORM set_config('synchronous_commit', 'off', true);  -- nothing written: no WAL flush to wait for
    RETURN;
  END IF;
  v_id := nextval('{seq}'::regclass);
  IF cardinality(v_bills) = 0 THEN
    -- no unpaid bill: the whole amount is prepaid credit
    arrears_after := 0;
    remaining := p_amount;
    prepaid_after := v_prepaid + remaining;
    IF remaining <> 0 THEN
""" + _WRITE[(False, True)] + r"""
    ELSE
""" + _WRITE[(False, False)] + r"""
    END IF;
    payment_id := v_id;
    code := 'POSTED';
    RETURN;
  END IF;
  remaining := p_amount;
  due_total := 0;
  principal_total := 0;
  n := 0;
  FOREACH r IN ARRAY v_bills LOOP
    -- late_fee.py, allocation.py and pay_plan.py, step for step, in integer arithmetic
    unpaid := r.amount_fen - r.prepaid_applied_fen - r.principal_paid_fen;
    due_total := due_total + unpaid;
    CONTINUE WHEN remaining = 0;
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
  IF n > 0 AND remaining <> 0 THEN
""" + _WRITE[(True, True)] + r"""
  ELSIF n > 0 THEN
""" + _WRITE[(True, False)] + r"""
  ELSIF remaining <> 0 THEN
""" + _WRITE[(False, True)] + r"""
  ELSE
""" + _WRITE[(False, False)] + r"""
  END IF;
  IF updated <> n THEN
    RAISE EXCEPTION 'a bill of account % changed while it was priced', p_account USING ERRCODE = 'YDP01';
  END IF;
  payment_id := v_id;
  code := 'POSTED';
END
$fn$
"""


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute(BILL_TYPE)
        seq = bind.exec_driver_sql("SELECT pg_get_serial_sequence('payments', 'payment_id')").scalar_one()
        op.execute(PAY_FUNCTION.replace("{seq}", str(seq).replace("'", "''")))


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        seq = bind.exec_driver_sql("SELECT pg_get_serial_sequence('payments', 'payment_id')").scalar_one()
        op.execute(_LEAN.PAY_FUNCTION.replace("{seq}", str(seq).replace("'", "''")))
        op.execute("DROP TYPE yd_pay_bill")
