"""bank_sim: a bank core. Savings accounts (passbooks), outlets and tellers,
the auto-debit consumer of the bill feed, end-of-day reconciliation, and
load and benchmark drivers."""
