"""pg_array: lists of ints or strings become PostgreSQL array text in one join, and
PostgreSQL reads that text back as exactly the list; a list it cannot write safely
that way stays a list (psycopg dumps it element by element)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.databases import fresh_database
from yindian_common.bulk_sql import pg_array


def test_plain_strings_and_ints_are_joined_and_quotes_or_backslashes_are_not() -> None:
    assert pg_array(["a", "b", "NULL", ""]) == '{"a","b","NULL",""}'
    assert pg_array([1, 2, 3]) == "{1,2,3}"
    assert pg_array(['a"b', "c"]) == ['a"b', "c"]
    assert pg_array(["a", "b\\"]) == ["a", "b\\"]
    assert pg_array(['"']) == ['"']
    assert pg_array([]) == []


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sa.Engine]:
    with fresh_database("postgresql", tmp_path_factory.mktemp("arrays")) as url:
        engine = sa.create_engine(url)
        yield engine
        engine.dispose()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                                max_size=6), max_size=8))
def test_postgresql_reads_back_exactly_the_strings(pg: sa.Engine, values: list[str]) -> None:
    with pg.connect() as conn:
        got = conn.exec_driver_sql("SELECT %(v)s::text[]", {"v": pg_array(values)}).scalar_one()
    assert got == values
