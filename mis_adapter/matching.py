"""The reconcile matcher (对账规则, DESIGN.md Money semantics 8) as ONE decision
table. Pure: data and code, no database, no wire.

Both things that decide an outcome are generated from `TABLE`:
  * `classify` (Python, one serial at a time: tests, tools), and
  * `sql_case` (the SQL CASE expressions that production runs set-based over
    a whole day, mis_adapter/recon_outcomes.py).
tests/mis_adapter/test_matching.py runs the generated SQL on SQLite,
PostgreSQL and MariaDB against `classify` over every combination of facts.

The rule, per bank_serial, with pay/cancel pairs netted: a bank record
CANCELLED, like a MIS payment REVERSED or refused (TOMBSTONE), means
"no money moved".

    bank \\ MIS      absent      POSTED (same day)          REVERSED / TOMBSTONE
    POSTED          BANK_ONLY   MATCHED, or MISMATCH when   MISMATCH
                                account or amount differ
    CANCELLED       MATCHED     UTILITY_ONLY (MISMATCH when MATCHED
                                account or amount differ)
    absent          -           UTILITY_ONLY                MATCHED

A MIS payment with that serial settled on another day is a MISMATCH unless
neither side moved money.

The facts a rule looks at (`Facts`): the bank record's status (or ABSENT),
the MIS payment's state (or ABSENT), whether the MIS payment settled on the
reconciled day, and whether account and amount agree. The table is read top
down; the first rule whose conditions all hold decides."""
from __future__ import annotations

import datetime as dt
import itertools
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass

MATCHED, BANK_ONLY, UTILITY_ONLY, MISMATCH = "MATCHED", "BANK_ONLY", "UTILITY_ONLY", "MISMATCH"
OUTCOMES = (MATCHED, BANK_ONLY, UTILITY_ONLY, MISMATCH)
BANK_POSTED, BANK_CANCELLED = "POSTED", "CANCELLED"
BANK_STATUSES = frozenset((BANK_POSTED, BANK_CANCELLED))
POSTED, REVERSED, TOMBSTONE = "POSTED", "REVERSED", "TOMBSTONE"
MIS_STATES = (POSTED, REVERSED, TOMBSTONE)
ABSENT = ""  # the side has no record of the serial (also how recon_lines stores it)

DETAIL_OTHER_DAY = "settled on another day in the MIS"
DETAIL_ACCOUNT = "account differs"
DETAIL_AMOUNT = "amount differs"
DETAIL_REVERSED = "reversed in the MIS, posted at the bank"
DETAIL_REFUSED = "refused in the MIS (its cancel arrived first), posted at the bank"
DETAIL_POSTED_NOW = "posted in the MIS by reconciliation"
DETAIL_REVERSED_NOW = "reversed in the MIS by reconciliation"

# A staged bank record: (line_no, bank_serial, account_no, amount_fen, status).
StagedRecord = tuple[int, str, str, int, str]

# ---- the facts ----
BANK, MIS, SAME_DAY, SAME_ACCOUNT, SAME_AMOUNT = "bank", "mis", "same_day", "same_account", "same_amount"
# Every value each fact can take; `classify` never sees anything else (a MIS state
# outside MIS_STATES falls to the table's last rule in Python and SQL alike).
DOMAIN: Mapping[str, tuple[str | bool, ...]] = {
    BANK: (BANK_POSTED, BANK_CANCELLED, ABSENT),
    MIS: (POSTED, REVERSED, TOMBSTONE, ABSENT),
    SAME_DAY: (True, False),
    SAME_ACCOUNT: (True, False),
    SAME_AMOUNT: (True, False),
}


@dataclass(frozen=True)
class MisPayment:
    bank_serial: str
    account_no: str
    amount_fen: int
    state: str
    settlement_date: dt.date


@dataclass(frozen=True)
class Facts:
    bank: str
    mis: str
    same_day: bool
    same_account: bool
    same_amount: bool

    def value(self, fact: str) -> str | bool:
        return getattr(self, fact)  # type: ignore[no-any-return]


def facts_of(bank: StagedRecord | None, mis: MisPayment | None, day: dt.date) -> Facts:
    """What the table looks at, for one serial. A comparison with an absent side is False."""
    both = bank is not None and mis is not None
    return Facts(
        bank=bank[4] if bank is not None else ABSENT,
        mis=mis.state if mis is not None else ABSENT,
        same_day=mis is not None and mis.settlement_date == day,
        same_account=both and mis.account_no == bank[2],  # type: ignore[union-attr,index]
        same_amount=both and mis.amount_fen == bank[3],  # type: ignore[union-attr,index]
    )


# ---- the table ----
@dataclass(frozen=True)
class Rule:
    when: Mapping[str, frozenset[str | bool]]  # fact -> the values it may take; a fact not named: any
    outcome: str
    detail: str

    def holds(self, facts: Facts) -> bool:
        return all(facts.value(f) in allowed for f, allowed in self.when.items())


def _rule(outcome: str, detail: str = "", **when: str | bool | tuple[str | bool, ...]) -> Rule:
    return Rule({f: frozenset(v if isinstance(v, tuple) else (v,)) for f, v in when.items()}, outcome, detail)


TABLE: tuple[Rule, ...] = (
    # Both have it and agree in every respect: first, as nearly every record of a day is this one.
    _rule(MATCHED, same_day=True, mis=POSTED, bank=BANK_POSTED, same_amount=True, same_account=True),
    # Only the MIS has it (a payment of the day the bank did not send).
    _rule(UTILITY_ONLY, DETAIL_REVERSED_NOW, bank=ABSENT, mis=POSTED),
    _rule(MATCHED, bank=ABSENT),
    # Only the bank has it.
    _rule(BANK_ONLY, DETAIL_POSTED_NOW, bank=BANK_POSTED, mis=ABSENT),
    _rule(MATCHED, mis=ABSENT),
    # Both have it, the MIS on another day: fine only if neither side moved money.
    _rule(MISMATCH, DETAIL_OTHER_DAY, same_day=False, bank=BANK_POSTED),
    _rule(MISMATCH, DETAIL_OTHER_DAY, same_day=False, mis=POSTED),
    _rule(MATCHED, same_day=False),
    # Both have it, the MIS posted it that day.
    _rule(MISMATCH, DETAIL_ACCOUNT, mis=POSTED, same_account=False),
    _rule(MISMATCH, DETAIL_AMOUNT, mis=POSTED, same_amount=False),
    _rule(UTILITY_ONLY, DETAIL_REVERSED_NOW, mis=POSTED),  # the bank cancelled it
    # Both have it, the MIS moved no money.
    _rule(MATCHED, bank=BANK_CANCELLED),
    _rule(MISMATCH, DETAIL_REVERSED, mis=REVERSED),
    _rule(MISMATCH, DETAIL_REFUSED),  # TOMBSTONE (or any other state): refused in the MIS
)


def decide(facts: Facts, table: tuple[Rule, ...] = TABLE) -> tuple[str, str]:
    """(outcome, detail): the first rule that holds."""
    for rule in table:
        if rule.holds(facts):
            return rule.outcome, rule.detail
    raise ValueError(f"no rule decides {facts}")


def classify(bank: StagedRecord | None, mis: MisPayment | None, day: dt.date) -> tuple[str, str]:
    """(outcome, detail) of one serial (`TABLE`, first rule that holds)."""
    if bank is None and mis is None:
        raise ValueError("classify needs at least one side")
    return decide(facts_of(bank, mis, day))


def every_facts() -> Iterator[Facts]:
    """Every combination of the facts' values, except 'neither side has it'."""
    names = list(DOMAIN)
    for values in itertools.product(*(DOMAIN[n] for n in names)):
        facts = Facts(**dict(zip(names, values, strict=True)))  # type: ignore[arg-type]
        if not (facts.bank == ABSENT and facts.mis == ABSENT):
            yield facts


# ---- the same table as SQL ----
_LITERAL_OK = re.compile(r"[A-Za-z0-9 ,()_-]*")


def _literal(value: str) -> str:
    if not _LITERAL_OK.fullmatch(value):
        raise ValueError(f"not a safe SQL literal: {value!r}")
    return f"'{value}'"


def _condition(fact: str, allowed: frozenset[str | bool], sql: Mapping[str, str]) -> str:
    expr = sql[fact]
    if all(isinstance(v, bool) for v in allowed):
        if len(allowed) == 2:
            return ""
        return f"({expr})" if True in allowed else f"NOT ({expr})"
    values = sorted(str(v) for v in allowed if v != ABSENT)
    present = (f"{expr} = {_literal(values[0])}" if len(values) == 1
               else f"{expr} IN ({', '.join(_literal(v) for v in values)})" if values else "")
    if ABSENT not in allowed:
        return present  # NULL (absent) is not in the set: WHEN does not hold, as in Python
    return f"({expr} IS NULL OR {present})" if present else f"{expr} IS NULL"


def specialise(known: Mapping[str, Collection[str | bool]], table: tuple[Rule, ...] = TABLE) -> tuple[Rule, ...]:
    """The table where some facts are known to take only some values (e.g. bank
    ABSENT for the MIS's own payments, bank POSTED or CANCELLED for a staged
    record): rules that cannot hold are dropped, conditions that always hold
    removed, and nothing after a rule that always holds kept."""
    out: list[Rule] = []
    for rule in table:
        if any(f in rule.when and not set(values) & rule.when[f] for f, values in known.items()):
            continue
        rest = {f: allowed for f, allowed in rule.when.items() if not (f in known and set(known[f]) <= allowed)}
        out.append(Rule(rest, rule.outcome, rule.detail))
        if not rest:
            break
    return tuple(out)


def sql_case(sql: Mapping[str, str], *, column: str, known: Mapping[str, Collection[str | bool]] | None = None,
             table: tuple[Rule, ...] = TABLE) -> str:
    """A SQL CASE giving the table's `column` ('outcome' or 'detail').

    `known` restricts facts to the values they can take where the CASE runs
    (see `specialise`); `sql` maps every fact still tested to SQL: the bank
    status and MIS state as text, NULL when that side is absent (never ''); the
    three comparisons as NULL-free conditions, false when a side is absent (as
    `facts_of`). Conditions are tested in the order the rule names them."""
    rules = specialise(known or {}, table)
    if not rules or rules[-1].when:
        raise ValueError("the table leaves some facts undecided")
    whens = []
    for rule in rules[:-1]:
        conds = [c for f, allowed in rule.when.items() if (c := _condition(f, allowed, sql))]
        whens.append(f"WHEN {' AND '.join(conds) or '1 = 1'} THEN {_literal(getattr(rule, column))}")
    otherwise = _literal(getattr(rules[-1], column))
    if not whens:
        return otherwise
    return "CASE " + " ".join(whens) + f" ELSE {otherwise} END"


def sql_decides(sql: Mapping[str, str], outcomes: Collection[str], *,
                known: Mapping[str, Collection[str | bool]] | None = None, table: tuple[Rule, ...] = TABLE) -> str:
    """A SQL condition: the table decides one of `outcomes` (rule i holds and no
    earlier one does). Unlike `sql_case` it negates conditions, so every
    expression in `sql` must be NULL-free here. As a WHERE clause it keeps the
    planner's estimates of plain column conditions (e.g. p.state = 'POSTED')."""
    rules = specialise(known or {}, table)
    if not rules or rules[-1].when:
        raise ValueError("the table leaves some facts undecided")
    terms: list[str] = []
    earlier: list[str] = []
    for rule in rules:
        cond = " AND ".join(c for f, allowed in rule.when.items() if (c := _condition(f, allowed, sql)))
        if rule.outcome in outcomes:
            terms.append(" AND ".join([*(f"NOT ({e})" for e in earlier), *([f"({cond})"] if cond else [])])
                         or "1 = 1")
        earlier.append(cond or "1 = 1")
    return "(" + " OR ".join(f"({t})" for t in terms) + ")" if terms else "(1 = 0)"
