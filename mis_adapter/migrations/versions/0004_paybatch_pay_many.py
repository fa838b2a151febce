"""PostgreSQL only: the function yd_pay_many, several counter pays in one call and one commit (issue 11:
mis_adapter.pay_batch groups the pays waiting at the same moment). Other databases: nothing.

Each pay is yd_pay itself (0004_pay_function, 0004_pgpay_lean_pay), called once per element of the
arrays: the rules stay in one place, and each pay sees the rows the pays before it in the batch wrote
(yd_pay reads in a new snapshot per statement, and a transaction sees its own writes), so a batch
answers and writes exactly as the same pays called one after another in its order.

Its order: every bank-day lock of the batch first (shared, in key order), then the pays sorted by
account number, in arrival order within one account: two batches lock accounts in the same order and
cannot deadlock each other; a batch holds no account while it waits for a bank-day lock (the order
everywhere: banks.py).

A refusal (NOT_FOUND, TAKEN, SUSPENDED, CLOSED, DAY_CLOSED) writes nothing and the others still post.
An error in any pay (a bill changed under it: YDP01, a lock or statement timeout, a serial inserted
concurrently, a deadlock) aborts the whole call: nothing of the batch is written, and the caller
retries its pays one by one (pay_batch.py).

yd_pay turns synchronous_commit off for its transaction when it refuses (nothing written: no WAL flush
to wait for). In a batch the transaction is shared: when any pay posted, the session's setting is put
back before the commit, so a posted pay's commit waits for its WAL flush as it would alone.

Answers one row per pay: k (the pay's index in the arrays, from 1) and yd_pay's columns.

Revision ID: 0004_paybatch_pay_many
Revises: 0003
Depends on: 0004_pgpay_lean_pay
"""
from __future__ import annotations

from alembic import op

revision = '0004_paybatch_pay_many'
down_revision = '0003'
branch_labels = None
depends_on = ('0004_pgpay_lean_pay',)

PAY_MANY_FUNCTION = r"""
CREATE OR REPLACE FUNCTION yd_pay_many(p_accounts text[], p_banks text[], p_serials text[], p_days date[],
                       p_day_keys bigint[], p_amounts bigint[], p_channels text[], p_outlets text[],
                       p_tellers text[], p_bank_balances bigint[], p_nows timestamptz[],
                       p_res_ppm bigint, p_cur_ppm bigint, p_late_ppm bigint, p_min_fen bigint)
RETURNS TABLE (k int, code text, payment_id bigint, branch_code text, settlement date, arrears_after bigint,
               prepaid_after bigint, refusal text, allocs text)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
  v_sync text := current_setting('synchronous_commit');
  v_posted boolean := false;
  i int;
  r record;
BEGIN
  -- every bank-day lock before any account lock (the order everywhere: banks.py)
  PERFORM pg_advisory_xact_lock_shared(d.key) FROM (SELECT DISTINCT u.key FROM unnest(p_day_keys) AS u(key)
                                                    ORDER BY u.key) AS d;
  -- accounts in one order for every batch; one account's pays in arrival order
  FOR i IN SELECT o.n::int FROM unnest(p_accounts) WITH ORDINALITY AS o(account_no, n)
           ORDER BY o.account_no COLLATE "C", o.n
  LOOP
    SELECT * INTO r FROM yd_pay(p_accounts[i], p_banks[i], p_serials[i], p_days[i], p_day_keys[i], p_amounts[i],
                                p_channels[i], p_outlets[i], p_tellers[i], p_bank_balances[i], p_nows[i],
                                p_res_ppm, p_cur_ppm, p_late_ppm, p_min_fen);
    k := i; code := r.code; payment_id := r.payment_id; branch_code := r.branch_code;
    settlement := r.settlement; arrears_after := r.arrears_after; prepaid_after := r.prepaid_after;
    refusal := r.refusal; allocs := r.allocs;
    v_posted := v_posted OR r.code = 'POSTED';
    RETURN NEXT;
  END LOOP;
  IF v_posted THEN
    -- a refusal before a post turned it off for the whole transaction
    PERFORM set_config('synchronous_commit', v_sync, true);
  END IF;
END
$fn$
"""

DROP = ("DROP FUNCTION IF EXISTS yd_pay_many(text[], text[], text[], date[], bigint[], bigint[], text[], text[], "
        "text[], bigint[], timestamptz[], bigint, bigint, bigint, bigint)")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PAY_MANY_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(DROP)
