"""The bridge's journal of the link's other transactions: agreements signed
and ended, refund acknowledgements, sign-on and sign-off. Append-only: a
REQUESTED line is written before the request crosses the link, an ANSWERED
line (the utility's status, or IN_DOUBT) after. These requests are
idempotent at the utility by their serial (SignOn/SignOff by nature), so an
in-doubt one is settled by the bank core retrying the same serial; the
journal is the audit of what the bank asked and what it was told.

Must never: update or delete a line, or call the utility."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from bridge.journal.schema import LINK_DETAIL_MAX, link_lines
from bridge.migrate import upgrade

__all__ = ["SIGN_AGREEMENT", "END_AGREEMENT", "REFUND_ACK", "SIGN_ON", "SIGN_OFF", "REQUESTED", "ANSWERED",
           "IN_DOUBT", "LinkLine", "LinkJournal", "create_schema", "DETAIL_MAX"]

SIGN_AGREEMENT, END_AGREEMENT, REFUND_ACK, SIGN_ON, SIGN_OFF = (
    "SIGN_AGREEMENT", "END_AGREEMENT", "REFUND_ACK", "SIGN_ON", "SIGN_OFF")
REQUESTED, ANSWERED = "REQUESTED", "ANSWERED"
IN_DOUBT = "IN_DOUBT"
DETAIL_MAX = LINK_DETAIL_MAX

lines = link_lines


@dataclass(frozen=True)
class LinkLine:
    kind: str
    serial: str = ""
    account_no: str = ""
    amount_fen: int = 0


def create_schema(engine: Engine) -> None:
    """The journal's migrations (bridge/migrations, revision 0003_link_journal) create the table."""
    upgrade(engine)


class LinkJournal:
    def __init__(self, engine: Engine, bank_id: str) -> None:
        self.engine = engine
        self.bank_id = bank_id
        self._insert = lines.insert()

    def write(self, items: list[LinkLine], phase: str, at: dt.datetime, outcome: str = "", detail: str = "") -> None:
        """One line per item, in one transaction, durable before returning."""
        if not items:
            return
        with self.engine.begin() as conn:
            conn.execute(self._insert, [
                {"at": at.astimezone(dt.UTC), "bank_id": self.bank_id, "kind": i.kind, "serial": i.serial,
                 "account_no": i.account_no, "amount_fen": i.amount_fen, "phase": phase, "outcome": outcome,
                 "detail": detail[:DETAIL_MAX]} for i in items])

    def lines_of(self, kind: str, serial: str) -> list[tuple[str, str]]:
        """(phase, outcome) of a serial's lines, oldest first (tests, operators)."""
        with self.engine.connect() as conn:
            return [(r.phase, r.outcome) for r in conn.execute(
                sa.select(lines.c.phase, lines.c.outcome).where(lines.c.kind == kind, lines.c.serial == serial)
                .order_by(lines.c.line_id))]
