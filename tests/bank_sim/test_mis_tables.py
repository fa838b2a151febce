"""bank_sim declares the MIS columns its checks read (it imports nothing of
mis_adapter); every one must be a column of the MIS's own schema, of the same kind."""
from __future__ import annotations

import pytest
import sqlalchemy as sa

from bank_sim import mis_tables
from mis_adapter.db import metadata


@pytest.mark.parametrize("table", mis_tables.ALL, ids=lambda t: t.name)
def test_each_declared_column_is_the_mis_column(table: sa.TableClause) -> None:
    mis = metadata.tables[table.name]
    for col in table.c:
        assert col.name in mis.c, f"{table.name}.{col.name} is not in the MIS schema"
        assert col.type._type_affinity is mis.c[col.name].type._type_affinity, f"{table.name}.{col.name}"
