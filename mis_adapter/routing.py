"""Branch routing: an account's branch code (its first two digits) selects
that branch's database. One URL serves all branches by default; branches
may be given their own (`--branch-db CODE=URL`). Engines are shared per URL.

With several branch databases a front database (`--front-db URL`, default:
the primary `--db`) holds each bank's serial registry (mis_adapter.registry),
so that a serial is one payment across branches. With one database there is
no front (`front is None`): its own unique keys already make serials unique."""
from __future__ import annotations

from sqlalchemy.engine import Engine

from yindian_common.db import make_engine, role_name

# PostgreSQL application_name of the serving pool's connections; background roles add "/<role>".
PROCESS_NAME = "mis_adapter"
# Connections of a background role's own pool (one thread each; role_engines).
ROLE_POOL_SIZE = 2


class BranchRouter:
    def __init__(self, default_url: str, branch_urls: dict[str, str], *, pool_size: int = 16,
                 pool_timeout_s: float = 5.0, sqlite_synchronous: str = "FULL", front_url: str = "",
                 wait_max_s: float | None = None) -> None:
        by_url: dict[str, Engine] = {}
        self._pool_timeout_s, self._sqlite_synchronous, self._wait_max_s = pool_timeout_s, sqlite_synchronous, wait_max_s
        self._role_engines: list[Engine] = []

        def engine(url: str) -> Engine:
            if url not in by_url:
                by_url[url] = make_engine(url, pool_size=pool_size, pool_timeout_s=pool_timeout_s,
                                          sqlite_synchronous=sqlite_synchronous, wait_max_s=wait_max_s,
                                          application_name=PROCESS_NAME)
                self._urls[by_url[url]] = url
            return by_url[url]

        self._urls: dict[Engine, str] = {}

        self.primary = engine(default_url)
        # Engines in branch-code order, whatever the order of the flags: every transaction that spans
        # databases (the day close, refund acknowledgements) locks them in engines() order, and two
        # replicas given the flags in different orders would otherwise lock in different orders and
        # deadlock across databases, which no one database can detect.
        self._by_branch = {code: engine(url) for code, url in sorted(branch_urls.items())}
        self._engines = list(by_url.values())
        self.front: Engine | None = None
        if front_url:
            self.front = engine(front_url)
        elif len(self._engines) > 1:
            self.front = self.primary
        self._all = list(by_url.values())

    @classmethod
    def from_specs(cls, default_url: str, specs: list[str], **kw: object) -> BranchRouter:
        urls: dict[str, str] = {}
        for spec in specs:
            code, sep, url = spec.partition("=")
            if not sep or len(code) != 2 or not code.isdigit() or not url:
                raise SystemExit(f"--branch-db expects CODE=URL with a 2-digit code, got {spec!r}")
            urls[code] = url
        return cls(default_url, urls, **kw)  # type: ignore[arg-type]

    def engine_for(self, account_no: str) -> Engine:
        return self._by_branch.get(account_no[:2], self.primary)

    def engine_for_branch(self, branch_code: str) -> Engine:
        """The database of a branch ('' or a branch without its own: the primary)."""
        return self._by_branch.get(branch_code, self.primary)

    def engines(self) -> list[Engine]:
        """Each distinct MIS (branch) database once: the primary first, then by lowest branch code."""
        return list(self._engines)

    def database_keys(self) -> list[tuple[str, Engine]]:
        """Each MIS database with a stable key: '' for the primary, else the lowest branch code it serves."""
        out: dict[Engine, str] = {self.primary: ""}
        for code in sorted(self._by_branch):
            out.setdefault(self._by_branch[code], code)
        return [(key, engine) for engine, key in out.items()]

    def all_engines(self) -> list[Engine]:
        """Every database to migrate: the MIS databases and a separate front database."""
        return list(self._all)

    @property
    def split(self) -> bool:
        """True when serials must go through the front registry (several databases, or a front database)."""
        return self.front is not None

    def role_engines(self, engines: list[Engine], role: str) -> list[Engine]:
        """A background role's own small pool on each of `engines` (PostgreSQL; same bounds,
        application_name 'mis_adapter/<role>'), so that its connections show apart from the
        pays' in pg_stat_activity (bench-ratio's CPU by role). SQLite and MariaDB: the same engines."""
        out = []
        for e in engines:
            if e.dialect.name != "postgresql":
                out.append(e)
                continue
            own = make_engine(self._urls[e], pool_size=ROLE_POOL_SIZE, pool_timeout_s=self._pool_timeout_s,
                              wait_max_s=self._wait_max_s, application_name=role_name(PROCESS_NAME, role))
            self._role_engines.append(own)
            out.append(own)
        return out

    def dispose(self) -> None:
        for e in self._all + self._role_engines:
            e.dispose()
