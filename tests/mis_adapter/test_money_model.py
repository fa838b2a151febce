"""A model test of the money rules: a hypothesis RuleBasedStateMachine drives
the real mis_adapter (in process, over gRPC, on SQLite, PostgreSQL and
MariaDB) with pay / replay / conflicting replay / cancel / cancel before pay
/ late pay / auto-debit result / reconcile, and after every step compares
what the MIS answers (QueryAccount, GetPayment) with a small reference model:

- a pay is allocated to the oldest bill first (no late fees: the bills fall
  due after the test's day), the rest to prepaid credit;
- a replay with the same parameters returns the same receipt and changes
  nothing; other parameters get ALREADY_EXISTS;
- a cancel restores exactly what its payment allocated; its amount must
  match; a cancel whose original is unknown leaves a tombstone, and the late
  pay is refused (FAILED_PRECONDITION); a reversed serial cannot be paid again;
- reconciling the day with the bank's own records matches everything, nets
  to the posted fen, posts a record only the bank had (BANK_ONLY), closes the
  day (a cancel of it is refused), and later pays settle the next day.

"debit result" is the AUTO_DEBIT channel of Pay (the feed's own result path
is covered by tests/mis_adapter/test_feed.py). Each example gets its own bank
and accounts on the one database, so examples never see each other."""
from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from tests.support.mis_data import TODAY, BillSpec, RunningAdapter, add_account, add_bank, running_adapter
from yindian.v1 import billing_pb2 as pb

pytestmark = [pytest.mark.timeout(600), pytest.mark.migrated("mis")]  # running_adapter needs the MIS schema

EXAMPLES = {"sqlite": 25, "postgresql": 10, "mariadb": 10}
STEPS = 30
ACCOUNTS_PER_EXAMPLE = 3
TOMORROW = TODAY + dt.timedelta(days=1)
_counter = itertools.count(1)


@dataclass
class ModelPay:
    account: str
    amount_fen: int
    channel: int
    state: str                              # POSTED | REVERSED
    settlement: dt.date
    to_bills: list[tuple[int, int]]         # (bill index, principal fen)
    to_prepaid_fen: int
    payment_id: str
    by_reconcile: bool = False              # posted by a BANK_ONLY record: channel RECONCILE


@dataclass
class ModelAccount:
    bills_unpaid_fen: list[int]             # oldest first
    prepaid_fen: int = 0


@dataclass
class Model:
    accounts: dict[str, ModelAccount] = field(default_factory=dict)
    pays: dict[str, ModelPay] = field(default_factory=dict)
    tombstones: set[str] = field(default_factory=set)
    cancels: dict[str, tuple[str, int, str]] = field(default_factory=dict)  # serial -> (original, fen, outcome)
    reconciled: set[dt.date] = field(default_factory=set)

    def allocate(self, account: str, amount_fen: int) -> tuple[list[tuple[int, int]], int]:
        acct = self.accounts[account]
        left, out = amount_fen, []
        for i, unpaid in enumerate(acct.bills_unpaid_fen):
            take = min(left, unpaid)
            if take:
                out.append((i, take))
                acct.bills_unpaid_fen[i] -= take
                left -= take
        acct.prepaid_fen += left
        return out, left

    def undo(self, p: ModelPay) -> None:
        acct = self.accounts[p.account]
        for i, fen in p.to_bills:
            acct.bills_unpaid_fen[i] += fen
        acct.prepaid_fen -= p.to_prepaid_fen
        p.state = "REVERSED"


def make_machine(adapter: RunningAdapter) -> type[RuleBasedStateMachine]:
    stub = adapter.stub

    class MoneyMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.model = Model()
            self.bank = ""
            self.serials = itertools.count(1)

        # ---- helpers ----
        def md(self) -> list[tuple[str, str]]:
            return [("x-yindian-bank-id", self.bank)]

        def fresh(self, tag: str) -> str:
            return f"{tag}-{next(self.serials)}"

        def expect_error(self, fn: object, request: object, code: grpc.StatusCode) -> None:
            with pytest.raises(grpc.RpcError) as exc:
                fn(request, metadata=self.md(), timeout=10)  # type: ignore[operator]
            assert exc.value.code() == code, exc.value.details()

        def pay_request(self, serial: str, account: str, amount_fen: int, channel: int) -> pb.PayRequest:
            return pb.PayRequest(bank_serial=serial, account_no=account, amount_fen=amount_fen,
                                 outlet_code="O1", teller_id="T1", channel=channel)

        def settlement_day(self) -> dt.date:
            return TOMORROW if TODAY in self.model.reconciled else TODAY

        # ---- setup: a new bank and new accounts per example ----
        @initialize(bills=st.lists(st.lists(st.integers(1, 20_000), min_size=1, max_size=3),
                                   min_size=ACCOUNTS_PER_EXAMPLE, max_size=ACCOUNTS_PER_EXAMPLE))
        def setup(self, bills: list[list[int]]) -> None:
            n = next(_counter)
            self.bank = f"MB{n}"
            add_bank(adapter.engine, self.bank)
            for k, amounts in enumerate(bills):
                specs = [BillSpec(f"2026{i + 1:02d}", fen, dt.date(2026, 12, 20)) for i, fen in enumerate(amounts)]
                acct = add_account(adapter.engine, "05", n * 10 + k, specs)
                self.model.accounts[acct] = ModelAccount(list(amounts))

        def account(self, i: int) -> str:
            return sorted(self.model.accounts)[i % len(self.model.accounts)]

        def posted(self) -> list[str]:
            return sorted(s for s, p in self.model.pays.items() if p.state == "POSTED")

        # ---- rules ----
        @rule(i=st.integers(0, 9), amount_fen=st.integers(1, 30_000),
              channel=st.sampled_from([pb.CHANNEL_COUNTER, pb.CHANNEL_AUTO_DEBIT, pb.CHANNEL_ONLINE]))
        def pay(self, i: int, amount_fen: int, channel: int) -> None:
            acct, serial = self.account(i), self.fresh("P")
            resp = stub.Pay(self.pay_request(serial, acct, amount_fen, channel), metadata=self.md(), timeout=10)
            day = self.settlement_day()
            to_bills, to_prepaid = self.model.allocate(acct, amount_fen)
            self.model.pays[serial] = ModelPay(acct, amount_fen, channel, "POSTED", day, to_bills, to_prepaid,
                                               resp.payment_id)
            assert resp.settlement_date == day.isoformat()
            assert sum(a.principal_fen + a.late_fee_fen for a in resp.allocations) == amount_fen - to_prepaid
            assert resp.prepaid_after_fen == self.model.accounts[acct].prepaid_fen
            assert resp.arrears_after_fen == sum(self.model.accounts[acct].bills_unpaid_fen)

        @rule(k=st.integers(0, 99))
        def replay(self, k: int) -> None:
            if not self.model.pays:
                return
            serial = sorted(self.model.pays)[k % len(self.model.pays)]
            p = self.model.pays[serial]
            req = self.pay_request(serial, p.account, p.amount_fen, p.channel)
            if p.by_reconcile:  # stored with channel RECONCILE: the teller's parameters differ
                self.expect_error(stub.Pay, req, grpc.StatusCode.ALREADY_EXISTS)
                return
            if p.state == "REVERSED":
                self.expect_error(stub.Pay, req, grpc.StatusCode.FAILED_PRECONDITION)
                return
            resp = stub.Pay(req, metadata=self.md(), timeout=10)
            assert resp.payment_id == p.payment_id and resp.amount_fen == p.amount_fen

        @rule(k=st.integers(0, 99), delta_fen=st.integers(1, 500))
        def conflicting_replay(self, k: int, delta_fen: int) -> None:
            if not self.model.pays:
                return
            serial = sorted(self.model.pays)[k % len(self.model.pays)]
            p = self.model.pays[serial]
            req = self.pay_request(serial, p.account, p.amount_fen + delta_fen, p.channel)
            self.expect_error(stub.Pay, req, grpc.StatusCode.ALREADY_EXISTS)

        @rule(k=st.integers(0, 99), wrong_amount=st.booleans())
        def cancel(self, k: int, wrong_amount: bool) -> None:
            if not self.model.pays:
                return
            original = sorted(self.model.pays)[k % len(self.model.pays)]
            p = self.model.pays[original]
            serial = self.fresh("C")
            amount = p.amount_fen + (1 if wrong_amount else 0)
            req = pb.CancelRequest(cancel_serial=serial, original_serial=original, amount_fen=amount, reason="r")
            if wrong_amount:
                self.expect_error(stub.Cancel, req, grpc.StatusCode.FAILED_PRECONDITION)
                return
            if p.state == "POSTED" and p.settlement in self.model.reconciled:
                self.expect_error(stub.Cancel, req, grpc.StatusCode.FAILED_PRECONDITION)  # DAY_RECONCILED
                return
            resp = stub.Cancel(req, metadata=self.md(), timeout=10)
            assert resp.outcome == pb.CANCEL_OUTCOME_REVERSED
            if p.state == "POSTED":
                self.model.undo(p)
            self.model.cancels[serial] = (original, amount, "REVERSED")

        @rule(amount_fen=st.integers(1, 30_000))
        def cancel_before_pay(self, amount_fen: int) -> None:
            original, serial = self.fresh("P"), self.fresh("C")
            resp = stub.Cancel(pb.CancelRequest(cancel_serial=serial, original_serial=original,
                                                amount_fen=amount_fen, reason="r"), metadata=self.md(), timeout=10)
            assert resp.outcome == pb.CANCEL_OUTCOME_ORIGINAL_NOT_FOUND
            self.model.tombstones.add(original)
            self.model.cancels[serial] = (original, amount_fen, "ORIGINAL_NOT_FOUND")

        @rule(k=st.integers(0, 99), i=st.integers(0, 9), amount_fen=st.integers(1, 30_000))
        def late_pay(self, k: int, i: int, amount_fen: int) -> None:
            if not self.model.tombstones:
                return
            serial = sorted(self.model.tombstones)[k % len(self.model.tombstones)]
            req = self.pay_request(serial, self.account(i), amount_fen, pb.CHANNEL_COUNTER)
            self.expect_error(stub.Pay, req, grpc.StatusCode.FAILED_PRECONDITION)

        @rule(k=st.integers(0, 99), conflicting=st.booleans())
        def cancel_replay(self, k: int, conflicting: bool) -> None:
            if not self.model.cancels:
                return
            serial = sorted(self.model.cancels)[k % len(self.model.cancels)]
            original, amount, outcome = self.model.cancels[serial]
            req = pb.CancelRequest(cancel_serial=serial, original_serial=original,
                                   amount_fen=amount + (7 if conflicting else 0), reason="r")
            if conflicting:
                self.expect_error(stub.Cancel, req, grpc.StatusCode.ALREADY_EXISTS)
                return
            resp = stub.Cancel(req, metadata=self.md(), timeout=10)
            assert pb.CancelOutcome.Name(resp.outcome) == f"CANCEL_OUTCOME_{outcome}"

        @rule(bank_only=st.booleans(), i=st.integers(0, 9), amount_fen=st.integers(1, 30_000))
        def reconcile(self, bank_only: bool, i: int, amount_fen: int) -> None:
            if TODAY in self.model.reconciled:
                summary = self._reconcile(self._records(TODAY))[1]
                assert summary.replayed
                return
            records = self._records(TODAY)
            extra = ""
            if bank_only:  # the bank has a pay the MIS never saw: posted by the reconciliation
                extra = self.fresh("P")
                records.append(pb.BankRecord(bank_serial=extra, account_no=self.account(i), amount_fen=amount_fen,
                                             status=pb.BANK_RECORD_STATUS_POSTED))
            lines, summary = self._reconcile(records)
            outcomes = [pb.ReconcileOutcome.Name(d.outcome) for d in lines]
            assert outcomes == (["RECONCILE_OUTCOME_BANK_ONLY"] if bank_only else []), [str(d) for d in lines]
            if bank_only:
                acct = self.account(i)
                to_bills, to_prepaid = self.model.allocate(acct, amount_fen)
                got = stub.GetPayment(pb.GetPaymentRequest(bank_serial=extra), metadata=self.md(), timeout=10)
                self.model.pays[extra] = ModelPay(acct, amount_fen, pb.CHANNEL_COUNTER, "POSTED", TODAY, to_bills,
                                                  to_prepaid, got.payment.payment_id, by_reconcile=True)
            self.model.reconciled.add(TODAY)
            assert summary.net_settlement_fen == sum(p.amount_fen for p in self.model.pays.values()
                                                     if p.state == "POSTED" and p.settlement == TODAY)

        def _records(self, day: dt.date) -> list[pb.BankRecord]:
            return [pb.BankRecord(bank_serial=s, account_no=p.account, amount_fen=p.amount_fen,
                                  status=pb.BANK_RECORD_STATUS_POSTED if p.state == "POSTED"
                                  else pb.BANK_RECORD_STATUS_CANCELLED)
                    for s, p in sorted(self.model.pays.items()) if p.settlement == day]

        def _reconcile(self, records: list[pb.BankRecord]) -> tuple[list[pb.Discrepancy], pb.ReconcileSummary]:
            msgs = [pb.ReconcileRequest(header=pb.ReconcileHeader(settlement_date=TODAY.isoformat())),
                    pb.ReconcileRequest(batch=pb.BankRecordBatch(records=records)),
                    pb.ReconcileRequest(trailer=pb.ReconcileTrailer(
                        record_count=len(records), total_fen=sum(r.amount_fen for r in records)))]
            lines: list[pb.Discrepancy] = []
            summary = None
            for resp in stub.Reconcile(iter(msgs), metadata=self.md(), timeout=30):
                if resp.WhichOneof("body") == "discrepancies":
                    lines.extend(resp.discrepancies.discrepancies)
                else:
                    summary = resp.summary
            assert summary is not None
            return lines, summary

        # ---- what the MIS must show after every step ----
        @invariant()
        def accounts_agree(self) -> None:
            for acct, m in self.model.accounts.items():
                q = stub.QueryAccount(pb.QueryAccountRequest(account_no=acct), metadata=self.md(), timeout=10)
                assert (q.arrears_fen, q.late_fee_fen, q.prepaid_fen) == (sum(m.bills_unpaid_fen), 0, m.prepaid_fen)

        @invariant()
        def payments_agree(self) -> None:
            for serial, p in list(self.model.pays.items())[-3:]:  # the latest ones: the full set is checked at the end
                got = stub.GetPayment(pb.GetPaymentRequest(bank_serial=serial), metadata=self.md(), timeout=10)
                assert pb.PaymentState.Name(got.state) == f"PAYMENT_STATE_{p.state}", serial

        def teardown(self) -> None:
            for serial, p in self.model.pays.items():
                got = stub.GetPayment(pb.GetPaymentRequest(bank_serial=serial), metadata=self.md(), timeout=10)
                assert pb.PaymentState.Name(got.state) == f"PAYMENT_STATE_{p.state}", serial
            for serial in self.model.tombstones:
                got = stub.GetPayment(pb.GetPaymentRequest(bank_serial=serial), metadata=self.md(), timeout=10)
                assert got.state in (pb.PAYMENT_STATE_REFUSED, pb.PAYMENT_STATE_NOT_FOUND), serial

    return MoneyMachine


@pytest.fixture
def adapter(db_url: str) -> Iterator[RunningAdapter]:
    with running_adapter(db_url) as a:
        yield a


def test_money_rules_hold_against_the_model(adapter: RunningAdapter, db_url: str) -> None:
    backend = db_url.split(":", 1)[0].split("+", 1)[0]
    examples = EXAMPLES.get("postgresql" if backend.startswith("postgres") else
                            "mariadb" if backend.startswith("mysql") or backend.startswith("mariadb") else "sqlite")
    run_state_machine_as_test(make_machine(adapter), settings=settings(
        max_examples=examples, stateful_step_count=STEPS, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(HealthCheck)))
