"""Same-run references for the bulk benchmarks: what this machine's
PostgreSQL does with the same rows when nothing but the rows is done, so
that `make bench-feed` and `make bench-recon` can print the project's figure
next to the machine's own limit measured minutes apart (the box is noisy;
a figure from another run compares nothing).

- `bulk_write_bills_per_s`: a month's bills written at 5 durable rows per
  bill (bill, notice, result, payment, allocation) on one connection,
  `INSERT ... SELECT FROM unnest(...)`, 500 bills per transaction, with the
  primary keys and the secondary indexes the project's tables carry.
- `copy_join_records_per_s`: the bank's records COPYed into a table and
  matched against the day's payments by one join.

Plain psycopg, in a scratch database created and dropped here. Never
touches a project database."""
from __future__ import annotations

import datetime as dt
import time
import uuid

import psycopg

__all__ = ["bulk_write_bills_per_s", "copy_join_records_per_s", "REFERENCE_BATCH_BILLS"]

REFERENCE_BATCH_BILLS = 500   # bills per transaction in the bulk-write reference
COPY_CHUNK_ROWS = 50_000      # records per COPY write call

_FEED_SCHEMA = """
CREATE TABLE r_bills (bill_id BIGINT PRIMARY KEY, account_no VARCHAR(10), period VARCHAR(6), amount_fen BIGINT,
  principal_paid_fen BIGINT, status VARCHAR(8), due_date DATE, issued_at TIMESTAMPTZ, UNIQUE (account_no, period));
CREATE INDEX ON r_bills (status, due_date);
CREATE TABLE r_outbox (bank_id VARCHAR(16), seq BIGINT, bill_id BIGINT, account_no VARCHAR(10), amount_fen BIGINT,
  PRIMARY KEY (bank_id, seq));
CREATE INDEX ON r_outbox (bill_id);
CREATE TABLE r_results (bank_id VARCHAR(16), seq BIGINT, outcome VARCHAR(20), bank_serial VARCHAR(32),
  amount_fen BIGINT, PRIMARY KEY (bank_id, seq));
CREATE INDEX ON r_results (bank_id, bank_serial);
CREATE TABLE r_payments (payment_id BIGINT PRIMARY KEY, bank_id VARCHAR(16), bank_serial VARCHAR(32),
  account_no VARCHAR(10), amount_fen BIGINT, settlement_date DATE, posted_at TIMESTAMPTZ,
  UNIQUE (bank_id, bank_serial));
CREATE INDEX ON r_payments (account_no);
CREATE INDEX ON r_payments (bank_id, settlement_date);
CREATE TABLE r_allocations (allocation_id BIGINT PRIMARY KEY, payment_id BIGINT, bill_id BIGINT,
  principal_fen BIGINT);
CREATE INDEX ON r_allocations (payment_id);
CREATE INDEX ON r_allocations (bill_id);
"""

_FEED_BATCH = """
WITH b AS (SELECT * FROM unnest(%(ids)s::bigint[], %(accts)s::varchar[], %(fen)s::bigint[]) AS u(i, a, f)),
  i1 AS (INSERT INTO r_bills SELECT i, a, '202611', f, f, 'PAID', %(day)s, now() FROM b),
  i2 AS (INSERT INTO r_outbox SELECT 'BANK', i, i, a, f FROM b),
  i3 AS (INSERT INTO r_results SELECT 'BANK', i, 'DEBITED', 'AD' || i, f FROM b),
  i4 AS (INSERT INTO r_payments SELECT i, 'BANK', 'AD' || i, a, f, %(day)s, now() FROM b)
INSERT INTO r_allocations SELECT i, i, i, f FROM b
"""


def _scratch(admin_url: str) -> tuple[str, str]:
    name = f"yd_ref_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = _libpq(admin_url).rsplit("/", 1)[0]
    return name, f"{base}/{name}"


def _drop(admin_url: str, name: str) -> None:
    with psycopg.connect(_libpq(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def _libpq(url: str) -> str:
    """An SQLAlchemy URL (postgresql+psycopg://...) as libpq understands it."""
    scheme, rest = url.split("://", 1)
    return "postgresql://" + rest if scheme.startswith("postgresql") else url


def bulk_write_bills_per_s(admin_url: str, bills: int) -> float:
    """Bills per second written at 5 durable rows each, 500 per transaction, one connection."""
    name, url = _scratch(admin_url)
    try:
        with psycopg.connect(url) as conn:
            conn.execute(_FEED_SCHEMA)
            conn.commit()
            day = dt.date(2026, 11, 30)
            started = time.perf_counter()
            for start in range(1, bills + 1, REFERENCE_BATCH_BILLS):
                ids = list(range(start, min(bills + 1, start + REFERENCE_BATCH_BILLS)))
                conn.execute(_FEED_BATCH, {"ids": ids, "accts": [f"{i:010d}" for i in ids],
                                           "fen": [5_000 + i % 20_000 for i in ids], "day": day})
                conn.commit()
            return bills / (time.perf_counter() - started)
    finally:
        _drop(admin_url, name)


def copy_join_records_per_s(admin_url: str, records: int) -> float:
    """Records per second: COPY the bank's records in, match them against the
    day's payments with one full join (both sides' unmatched rows counted)."""
    name, url = _scratch(admin_url)
    try:
        with psycopg.connect(url) as conn:
            conn.execute("CREATE TABLE r_payments (bank_serial VARCHAR(32) PRIMARY KEY, account_no VARCHAR(10), "
                         "amount_fen BIGINT)")
            conn.execute("INSERT INTO r_payments SELECT 'S' || g, lpad((g %% 100000)::text, 10, '0'), 1000 + g %% 5000 "
                         "FROM generate_series(1, %s) g", (records,))
            conn.execute("ANALYZE r_payments")
            conn.commit()
            started = time.perf_counter()
            conn.execute("CREATE TEMP TABLE r_records (bank_serial VARCHAR(32), account_no VARCHAR(10), "
                         "amount_fen BIGINT)")
            with conn.cursor().copy("COPY r_records FROM STDIN") as copy:
                for start in range(1, records + 1, COPY_CHUNK_ROWS):
                    copy.write("".join(f"S{i}\t{i % 100000:010d}\t{1000 + i % 5000}\n"
                                       for i in range(start, min(records + 1, start + COPY_CHUNK_ROWS))))
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE p.bank_serial IS NOT NULL AND r.bank_serial IS NOT NULL "
                "AND p.amount_fen = r.amount_fen AND p.account_no = r.account_no), "
                "count(*) FILTER (WHERE p.bank_serial IS NULL), count(*) FILTER (WHERE r.bank_serial IS NULL) "
                "FROM r_records r FULL JOIN r_payments p ON p.bank_serial = r.bank_serial").fetchone()
            conn.commit()
            seconds = time.perf_counter() - started
            if row is None or row[0] != records:
                raise RuntimeError(f"reference join matched {row} of {records}")
            return records / seconds
    finally:
        _drop(admin_url, name)
