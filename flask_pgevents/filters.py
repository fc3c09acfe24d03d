"""``where=`` filters: SQLAlchemy expressions compiled into the capture SQL.

A filter is compiled once, at registration, with SQLAlchemy's PostgreSQL
dialect and ``literal_binds``: values become literals escaped by
SQLAlchemy, never formatted by this package. The columns of the handler's
table are rebound to the aliases the capture SQL gives the rows it tests
(:data:`ROW_ALIASES`), so that the compiled text is a condition on one
changed row, ready for a ``WHERE``.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Optional, Union

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql import visitors

from .errors import InvalidFilterError

#: The alias of each row a filter reads, per op. Inserts and deletes read
#: the transition table directly (``x``); updates pair old and new rows
#: first. Not ``old``/``new``: PL/pgSQL would take those for its variables.
ROW_ALIASES = {
    "insert": {"new": "x"},
    "delete": {"old": "x"},
    "update": {"old": "old_row", "new": "new_row"},
}

#: Named parameters: with the drivers' "pyformat", SQLAlchemy would double
#: every "%" of a rendered LIKE pattern.
DIALECT = postgresql.dialect(paramstyle="named")  # type: ignore[no-untyped-call]

#: What ``where=`` takes: an expression over the model's columns (the new row
#: of inserts and updates, the old row of deletes), or, for updates, a
#: function of the old and the new row returning one.
Where = Union["sa.ColumnElement[bool]", Callable[[Any, Any], "sa.ColumnElement[bool]"]]


def filter_id(condition: str) -> str:
    """The short id that events carry when their row matched ``condition``."""
    return hashlib.sha256(condition.encode()).hexdigest()[:8]


class RowColumns:
    """The columns of one row, old or new, for a ``where=`` function.

    ``row.status`` (mapped attribute or column key) or ``row["status"]``
    (column name) is a column expression: ``new.status == "paid"``.
    """

    def __init__(self, alias: Any, names: dict[str, str], side: str) -> None:
        self._alias, self._names, self._side = alias, names, side

    def __getitem__(self, name: str) -> Any:
        column = self._names.get(name)
        if column is None:
            raise InvalidFilterError(
                f"The {self._side} row has no column {name!r}. Use one of"
                f" {', '.join(map(repr, sorted(set(self._names.values()))))}."
            )
        return self._alias.c[column]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]


def compile_filter(
    where: Any, op: str, sa_table: Optional[sa.Table], names: dict[str, str], describe: str
) -> str:
    """Compile ``where`` into a condition on one changed row of ``op``.

    :param names: every name a column of the table may be given by, mapped to
        its database name (see :func:`flask_pgevents.registry._column_names`).
    :param describe: the handler's target, for messages.
    :raises InvalidFilterError: for anything the capture SQL cannot evaluate.
    """
    if op == "truncate":
        raise InvalidFilterError(
            f"'after_truncate' of {describe!r} has no rows for where= to test. Register the"
            " 'after_truncate' handler without where=, in its own call."
        )
    if sa_table is None:
        raise InvalidFilterError(
            f"where= needs the table's columns, but {describe!r} is a table name. Pass the"
            " model or a sqlalchemy.Table as the target."
        )
    aliases = {
        side: sa.table(alias, *(sa.column(c.name, c.type) for c in sa_table.columns))
        for side, alias in ROW_ALIASES[op].items()
    }
    if callable(where) and not isinstance(where, sa.sql.ClauseElement):
        if op != "update":
            raise InvalidFilterError(
                f"A where= function of the old and new rows applies to 'after_update' only, but"
                f" the handler for {describe!r} listens to 'after_{op}'. Pass an expression"
                " such as Model.column == value, or register the handler per event."
            )
        where = where(
            RowColumns(aliases["old"], names, "old"), RowColumns(aliases["new"], names, "new")
        )
    if hasattr(where, "__clause_element__"):  # a mapped attribute, such as Model.active
        where = where.__clause_element__()
    if not isinstance(where, sa.sql.ColumnElement):
        raise InvalidFilterError(
            f"where= for {describe!r} must be a SQLAlchemy expression such as"
            f" Model.status == 'paid', got {where!r}. Raw SQL (sa.text) is not accepted."
        )
    default = aliases.get("new", aliases.get("old"))
    assert default is not None

    def rebind(element: Any, **kw: Any) -> Any:
        if isinstance(element, sa.Column):
            if element.table is not sa_table:
                raise InvalidFilterError(
                    f"where= for {describe!r} reads {element.table}.{element.name}, a column of"
                    " another table. A filter tests the changed row only: use its own columns."
                )
            return default.c[element.name]
        return None

    condition = visitors.replacement_traverse(where, {}, rebind)
    for element in visitors.iterate(condition):
        subquery = isinstance(
            element, (sa.sql.expression.SelectBase, sa.sql.expression.ScalarSelect, sa.sql.expression.Exists)
        )
        other_table = isinstance(element, (sa.sql.expression.TableClause, sa.sql.expression.Alias)) and not any(
            element is alias for alias in aliases.values()
        )
        if subquery or other_table:
            raise InvalidFilterError(
                f"where= for {describe!r} holds a subquery or another table. A filter tests the"
                " changed row only: compare its columns with values."
            )
        if isinstance(element, sa.sql.elements.BindParameter) and element.required:
            raise InvalidFilterError(
                f"where= for {describe!r} has a parameter without a value ({element.key!r})."
                " Give every value in the expression."
            )
    if not isinstance(condition.type, (sa.Boolean, sa.types.NullType)):
        raise InvalidFilterError(
            f"where= for {describe!r} is not a condition: its type is {condition.type}. Compare"
            " a column with a value, as in Model.status == 'paid'."
        )
    try:
        compiled = condition.compile(dialect=DIALECT, compile_kwargs={"literal_binds": True})
    except sa.exc.CompileError as exc:
        raise InvalidFilterError(
            f"where= for {describe!r} cannot be compiled into the capture SQL: {exc}"
        ) from exc
    text = str(compiled)
    if "\\" in text or "\x00" in text:
        # A backslash in a literal reads differently under
        # standard_conforming_strings = off, which a writer may set.
        raise InvalidFilterError(
            f"where= for {describe!r} holds a backslash or a NUL character, whose meaning in a"
            " literal depends on the writer's settings. Use values without them."
        )
    if "$pgevents" in text:
        raise InvalidFilterError(
            f"where= for {describe!r} holds '$pgevents', which quotes the capture function's body."
            " Use other values."
        )
    return text
