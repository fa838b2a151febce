"""`python -m bank_sim load`: an open-loop load generator for BillingService,
with a correctness check of the money at the end.

Open loop: arrival i is due at start + i/rate whatever happened to earlier
calls, and its latency runs from that intended instant, so queueing delay in
the servers or in this generator is measured, not hidden (no coordinated
omission). An arrival that finds all `concurrency` slots busy is dropped and
counted, never delayed. Warm-up arrivals run but are not measured. The run
ends by itself: arrivals stop after warm-up + duration, in-flight calls get at
most `drain_s`, and every call has a deadline.

Operations: `query` (QueryAccount), `pay` (a COUNTER Pay), `autodebit` (a Pay
on the AUTO_DEBIT channel, as the bank's auto-debit consumer posts it; the
feed stream itself is not driven) and `cancel` (a Cancel of an earlier
accepted pay of the same run; a query when there is none yet). Pays carry
fresh serials unique to the run (one prefix), and an in-doubt answer is
retried with the same serial. At the end every pay or cancel still in doubt is resent with its
serial, then the run's ledger is checked against the MIS database(s)
(`--mis-db`, read only) or, without one, against GetPayment through the
target: every accepted pay present exactly once, POSTED (REVERSED if the run
cancelled it), no refused pay POSTED, and accepted fen minus cancelled fen
equal to the MIS's POSTED fen for the run's serials.

One grpc.aio channel on one event loop: measured on this box against a
trivial server, open loop, the aio client cost 1,260 / 695 / 438 CPU µs per
call at 100 / 500 / 1,500 calls/s against 1,770 / 821 / 430 for sync stubs
with futures, and needs no thread per call (the generator shares the box
with the servers). It never targets a host that is neither loopback nor
named by `--allow-host`.

Library use (bench, bench-core): `run_load(profile)` or `await
run_load_async(profile)` return a `LoadResult`; `check_ledger` re-checks a
saved ledger.

Modules by job: `profile` (operations, bounds, LoadProfile, the target rule),
`client` (the aio channel and its retries), `check` (the run's ledger and the
check against the MIS), `run` (the open-loop scheduler and statistics),
`report` (tables), `cli` (the command line)."""
from __future__ import annotations

# The library surface (__all__), and the names the tests and saved-ledger tooling use (`X as X`: re-exported).
from bank_sim.load.check import CheckResult, Discrepancy, RunLedger
from bank_sim.load.check import MisRow as MisRow
from bank_sim.load.check import PayRecord as PayRecord
from bank_sim.load.check import compare as compare
from bank_sim.load.check import read_mis as read_mis
from bank_sim.load.check import read_via_get_payment as read_via_get_payment
from bank_sim.load.cli import main
from bank_sim.load.profile import ACCEPTED as ACCEPTED
from bank_sim.load.profile import CANCEL_IN_DOUBT as CANCEL_IN_DOUBT
from bank_sim.load.profile import CANCEL_NONE as CANCEL_NONE
from bank_sim.load.profile import CANCEL_NOT_FOUND as CANCEL_NOT_FOUND
from bank_sim.load.profile import CANCEL_REFUSED as CANCEL_REFUSED
from bank_sim.load.profile import CANCEL_REVERSED as CANCEL_REVERSED
from bank_sim.load.profile import IN_DOUBT as IN_DOUBT
from bank_sim.load.profile import MIS_POSTED as MIS_POSTED
from bank_sim.load.profile import MIS_REVERSED as MIS_REVERSED
from bank_sim.load.profile import MIS_TOMBSTONE as MIS_TOMBSTONE
from bank_sim.load.profile import PENDING as PENDING
from bank_sim.load.profile import REFUSED as REFUSED
from bank_sim.load.profile import LoadProfile, parse_mix
from bank_sim.load.profile import check_target_allowed as check_target_allowed
from bank_sim.load.run import LoadResult, check_ledger, run_load, run_load_async

__all__ = ["CheckResult", "Discrepancy", "LoadProfile", "LoadResult", "RunLedger", "check_ledger", "main",
           "parse_mix", "run_load", "run_load_async"]
