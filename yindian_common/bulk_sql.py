"""Dialect bulk helpers: one statement per batch, whatever its size.

PostgreSQL gets arrays (`= ANY(array)`, `INSERT ... SELECT unnest(...)`),
SQLite a JSON list (`IN (SELECT value FROM json_each(...))`) and driver
executemany, MariaDB `JSON_TABLE` and SQLAlchemy executemany: per-row
SQLAlchemy parameter processing and IN lists of hundreds of placeholders
cost more than the database work (BASELINES.md).

Shared by the utility's feed and bill issuing and by the bank simulator's
own tables; it knows no table of either side."""
from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal

__all__ = ["InList", "list_param", "pg_array", "bulk_insert"]

class InList(ColumnElement[bool]):
    """`col IN <list parameter>`: pass the list through `list_param`."""
    inherit_cache = True
    type = sa.Boolean()
    _is_implicitly_boolean = True  # no "= 1" on SQLite: that would hide the index
    _traverse_internals = [("col", InternalTraversal.dp_clauseelement),  # type: ignore[misc]
                           ("param", InternalTraversal.dp_clauseelement)]

    def __init__(self, col: ColumnElement[Any], name: str) -> None:
        self.col = col
        self.param: sa.BindParameter[Any] = sa.bindparam(name)


@compiles(InList, "postgresql")
def _in_pg(el: InList, compiler: Any, **kw: Any) -> str:
    # The array is cast to the column's type: psycopg sends small ints as smallint[],
    # and `bigint = ANY(smallint[])` is not an index condition (a scan that grows with the table).
    return (f"{compiler.process(el.col, **kw)} = "
            f"ANY(CAST({compiler.process(el.param, **kw)} AS {_pg_type(el.col)}[]))")


@compiles(InList, "sqlite")
def _in_sqlite(el: InList, compiler: Any, **kw: Any) -> str:
    return f"{compiler.process(el.col, **kw)} IN (SELECT value FROM json_each({compiler.process(el.param, **kw)}))"


@compiles(InList)
def _in_other(el: InList, compiler: Any, **kw: Any) -> str:
    return f"{compiler.process(el.col, **kw)} IN (SELECT value FROM JSON_TABLE({compiler.process(el.param, **kw)}, " \
        "'$[*]' COLUMNS (value VARCHAR(64) PATH '$')) AS jt)"


def list_param(conn: Connection, values: Sequence[object]) -> object:
    return pg_array(list(values)) if conn.dialect.name == "postgresql" else json.dumps(list(values))


def pg_array(values: list[Any]) -> Any:
    """A list of ints, or of strings, as PostgreSQL array text (`{1,2}`, `{"a","b"}`) made by one join;
    anything else (None, bools, dates, a string holding a quote or a backslash, an empty list) stays the
    list. psycopg dumps a list element by element: 0.41 µs per element as a text parameter, 0.19 binary,
    against 0.04 (strings) to 0.08 µs (ints) for the join (5,000 elements, measured). Every use casts the
    parameter to the column's array type, which reads the text exactly as the list."""
    if not values:
        return values
    kinds = set(map(type, values))
    if kinds == {int}:
        return "{" + ",".join(map(str, values)) + "}"
    if kinds == {str}:
        joined = '","'.join(values)
        # every element quoted: "NULL", "" and commas or braces inside stay text; only " and \ need escapes
        # (the separators hold 2 quotes each: any other quote is in a value)
        if "\\" not in joined and joined.count('"') == 2 * (len(values) - 1):
            return '{"' + joined + '"}'
    return values


def _pg_type(col: ColumnElement[Any]) -> str:
    t = col.type
    if isinstance(t, sa.Boolean):
        return "boolean"
    if isinstance(t, sa.DateTime):
        return "timestamptz"
    if isinstance(t, sa.Date):
        return "date"
    if isinstance(t, sa.Integer):
        return "bigint"
    return "text"


def _pg_insert(table: sa.Table, rows: Sequence[dict[str, Any]]) -> tuple[str, tuple[Any, ...]]:
    """`INSERT ... SELECT ... FROM unnest(arrays)` and its parameters. A column with one value
    in every row (a batch's bank, instant, state, channel ...) is sent once, not as an array:
    the client then dumps and the server reads one value instead of one per row."""
    cols = list(rows[0])
    exprs: list[str] = []
    consts: list[Any] = []
    arrays: list[list[Any]] = []
    array_types: list[str] = []
    for c in cols:
        values = [r[c] for r in rows]
        first = values[0]
        # identity first (list.count): the batch's shared objects compare at once; bool is never taken for int
        if len(values) > 1 and values.count(first) == len(values) and all(type(v) is type(first) for v in values):
            exprs.append(f"%b::{_pg_type(table.c[c])}")
            consts.append(first)
        else:
            exprs.append(f"u.a{len(arrays)}")
            _add_array(arrays, array_types, values, _pg_type(table.c[c]))
    if not arrays:  # identical rows: unnest needs one array for the row count
        exprs[0] = "u.a0"
        _add_array(arrays, array_types, [r[cols[0]] for r in rows], _pg_type(table.c[cols[0]]))
        consts.pop(0)
    names = ", ".join(f"a{i}" for i in range(len(arrays)))
    sql = (f"INSERT INTO {table.name} ({', '.join(cols)}) SELECT {', '.join(exprs)} "
           f"FROM unnest({', '.join(array_types)}) AS u({names})")
    return sql, (*consts, *arrays)


def _add_array(arrays: list[Any], types: list[str], values: list[Any], pg_type: str) -> None:
    array = pg_array(values)
    arrays.append(array)
    # array text goes as text (`%t`); a list psycopg dumps in binary (`%b`)
    types.append(f"%{'t' if isinstance(array, str) else 'b'}::{pg_type}[]")


def bulk_insert_returning(conn: Connection, table: sa.Table, rows: Sequence[dict[str, Any]],
                          returning: Sequence[str]) -> list[tuple[Any, ...]] | None:
    """bulk_insert; on PostgreSQL also returns the `returning` columns of the new rows
    (INSERT ... RETURNING: generated ids without reading them back). None elsewhere."""
    if conn.dialect.name != "postgresql" or not rows:
        bulk_insert(conn, table, rows)
        return None
    sql, params = _pg_insert(table, rows)
    return [tuple(r) for r in conn.exec_driver_sql(f"{sql} RETURNING {', '.join(returning)}", params)]


def _sqlite_datetime(v: dt.datetime | None) -> str | None:
    # SQLAlchemy's SQLite DateTime storage format, in UTC
    return None if v is None else v.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _sqlite_date(v: dt.date | None) -> str | None:
    return None if v is None else v.isoformat()


def _sqlite_converter(col: sa.Column[Any]) -> Callable[[Any], Any] | None:
    t = col.type
    if isinstance(t, sa.DateTime):
        return _sqlite_datetime
    if isinstance(t, sa.Date):
        return _sqlite_date
    if isinstance(t, sa.Boolean):
        return lambda v: None if v is None else int(v)
    return None


def bulk_insert(conn: Connection, table: sa.Table, rows: Sequence[dict[str, Any]]) -> None:
    """Inserts rows (dicts with the same keys) in one statement per batch."""
    if not rows:
        return
    cols = list(rows[0])
    names = ", ".join(cols)
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(*_pg_insert(table, rows))
    elif conn.dialect.name == "sqlite":
        marks = ", ".join("?" * len(cols))
        convs = [(c, _sqlite_converter(table.c[c])) for c in cols]
        if all(f is None for _, f in convs):
            values = [tuple(r[c] for c in cols) for r in rows]
        else:
            values = [tuple(r[c] if f is None else f(r[c]) for c, f in convs) for r in rows]
        conn.exec_driver_sql(f"INSERT INTO {table.name} ({names}) VALUES ({marks})", values)
    else:
        conn.execute(table.insert(), list(rows))

