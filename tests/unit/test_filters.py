"""filters.py: where= expressions compiled into conditions on one changed row, without a database.

Registration's use of them is in test_registry.py; what they do to captured
rows runs in tests/integration/test_filters.py."""
from __future__ import annotations

import re

import pytest
import sqlalchemy as sa

from flask_pgevents.errors import InvalidFilterError
from flask_pgevents.filters import ROW_ALIASES, RowColumns, compile_filter, filter_id

metadata = sa.MetaData()
#: A column whose attribute key differs from its database name.
ORDERS = sa.Table(
    "order", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("status", sa.String),
    sa.Column("display_name", sa.String, key="label"),
)
OTHER = sa.Table("other", metadata, sa.Column("id", sa.Integer, primary_key=True))
#: Every name a column may be given by, mapped to its database name.
NAMES = {"id": "id", "status": "status", "label": "display_name", "display_name": "display_name"}


def compile_for(where: object, op: str) -> str:
    return compile_filter(where, op, ORDERS, NAMES, "public.order")


def test_filter_ids_are_stable_across_releases():
    # Events store these ids (event.matched): a new scheme would orphan them.
    assert filter_id("new_row.status = 'paid'") == "95e2cc99"
    assert filter_id("x.email = 'a'") == "f1e3f473"


@pytest.mark.parametrize("op, expected", [
    ("insert", "x.status = 'paid'"),
    ("delete", "x.status = 'paid'"),
    ("update", "new_row.status = 'paid'"),
])
def test_an_expression_tests_the_row_each_op_has(op, expected):
    assert compile_for(ORDERS.c.status == "paid", op) == expected
    assert expected.split(".")[0] in ROW_ALIASES[op].values()


def test_an_update_function_reads_both_rows_by_key_or_database_name():
    condition = compile_for(lambda old, new: (old["display_name"] != new.label) & (new.status == "paid"), "update")
    assert condition == "old_row.display_name != new_row.display_name AND new_row.status = 'paid'"


def test_a_row_names_its_columns_when_one_is_unknown():
    row = RowColumns(sa.table("new_row", sa.column("status")), {"status": "status"}, "new")
    with pytest.raises(InvalidFilterError, match=re.escape("The new row has no column 'nope'. Use one of 'status'.")):
        row.nope  # noqa: B018
    # Private and special names are plain attribute errors: hasattr() and
    # SQLAlchemy's own probing (__clause_element__) must not see columns.
    assert not hasattr(row, "__clause_element__")
    assert not hasattr(row, "_private")


@pytest.mark.parametrize("where, message", [
    (OTHER.c.id == 1, "reads other.id, a column of another table"),
    (ORDERS.c.status == "$pgevents$", "holds '$pgevents', which quotes the capture function's body"),
    (ORDERS.c.status == "nul\x00", "holds a backslash or a NUL character"),
])
def test_what_the_capture_function_cannot_hold_is_refused(where, message):
    with pytest.raises(InvalidFilterError, match=re.escape(message)):
        compile_for(where, "insert")


def test_a_table_name_target_has_no_columns_to_filter_on():
    with pytest.raises(InvalidFilterError, match="is a table name"):
        compile_filter(ORDERS.c.status == "paid", "insert", None, {}, "public.order")
