"""The two MIS topologies the feed and reconciliation scenarios run on
(issue 10): one database ("single"), or a front database that is also
branch 01's plus branch databases 02 and 03 ("branches3"), all on one back
end. A scenario written against a `Topology` runs unchanged on both: it
issues bills or seeds accounts over `codes`, and reads money back summed
over `engines`."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from tests.support.databases import fresh_database

SINGLE, BRANCHES3 = "single", "branches3"
BRANCH_CODES = ("01", "02", "03")


@dataclass(frozen=True)
class Topology:
    name: str
    db: str                                  # --db: the primary (and front) database
    branch_db: list[str] = field(default_factory=list)  # --branch-db CODE=URL

    @property
    def codes(self) -> tuple[str, ...]:
        """The branch codes a scenario spreads its accounts over."""
        return BRANCH_CODES if self.branch_db else BRANCH_CODES[:1]

    @property
    def split(self) -> bool:
        return bool(self.branch_db)

    def cli_flags(self) -> list[str]:
        return ["--db", self.db, *[f for spec in self.branch_db for f in ("--branch-db", spec)]]


@contextmanager
def topology_databases(backend: str, name: str, tmp_path: Path, *, schema: str | None = None) -> Iterator[Topology]:
    if name == SINGLE:
        with fresh_database(backend, tmp_path, schema=schema) as url:
            yield Topology(SINGLE, url)
        return
    with ExitStack() as stack:
        main, b02, b03 = (stack.enter_context(fresh_database(backend, tmp_path, label, schema=schema))
                          for label in ("main", "b02", "b03"))
        yield Topology(BRANCHES3, main, [f"02={b02}", f"03={b03}"])


def split_evenly(n: int, parts: int) -> list[int]:
    """n as `parts` counts differing by at most one, the larger first."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def total(engines: Sequence[sa.Engine], q: sa.Select) -> int:  # type: ignore[type-arg]
    """A scalar query's value summed over the databases (NULL counts as 0)."""
    out = 0
    for e in engines:
        with e.connect().execution_options(read_only=True) as conn:
            out += int(conn.execute(q).scalar() or 0)
    return out
