"""Handlers by table and operation, validated when they are registered; no I/O."""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import sqlalchemy as sa

from .errors import UnknownColumnError, UnknownEventError, UnmappedTargetError

#: Public event names mapped to the operation stored for them.
EVENT_OPERATIONS = {
    "after_insert": "insert",
    "after_update": "update",
    "after_delete": "delete",
}
OPERATIONS = tuple(EVENT_OPERATIONS.values())

Handler = Callable[..., Any]
Target = Union[type, sa.Table, str]


@dataclasses.dataclass(frozen=True)
class TableKey:
    """A table named by schema and name, exactly as PostgreSQL spells them."""

    schema: str
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclasses.dataclass(frozen=True)
class Subscription:
    """One handler registered for one operation on one table."""

    table: TableKey
    operation: str
    handler: Handler
    columns: Optional[frozenset[str]]
    #: Stable name of the handler, recorded in the event row once it succeeded.
    name: str
    model: Optional[type]
    sa_table: Optional[sa.Table]


def handler_name(fn: Handler) -> str:
    """The name under which a handler's success or failure is recorded."""
    module = getattr(fn, "__module__", None) or "?"
    qualname = getattr(fn, "__qualname__", None) or repr(fn)
    return f"{module}.{qualname}"


def _describe(target: Any) -> str:
    return getattr(target, "__name__", None) or str(target)


def resolve_target(target: Target) -> tuple[TableKey, Optional[type], Optional[sa.Table]]:
    """Resolve a mapped class, a Table or ``"schema.table"`` into the table it names.

    :raises UnmappedTargetError: for anything else.
    """
    if isinstance(target, str):
        schema, dot, name = target.rpartition(".")
        if not name:
            raise UnmappedTargetError(
                f"Empty table name in target {target!r}. Pass 'table' or 'schema.table'."
            )
        return TableKey(schema if dot else "public", name), None, None
    if isinstance(target, sa.Table):
        return TableKey(target.schema or "public", target.name), None, target
    if isinstance(target, type):
        mapper = sa.inspect(target, raiseerr=False)
        if mapper is not None and isinstance(getattr(mapper, "local_table", None), sa.Table):
            table = mapper.local_table
            return TableKey(table.schema or "public", table.name), target, table
    raise UnmappedTargetError(
        f"Cannot listen to {_describe(target)!r}: it is not a mapped class. Pass a"
        " Flask-SQLAlchemy model or other mapped class, a sqlalchemy.Table, or a"
        " table name such as 'public.user'."
    )


def resolve_operations(identifier: Union[str, Sequence[str]], target: Any) -> list[str]:
    """Turn ``"after_insert"`` or a list of such names into operations.

    :raises UnknownEventError: for a name that is not an event.
    """
    names = [identifier] if isinstance(identifier, str) else list(identifier)
    if not names:
        raise UnknownEventError(
            f"No event given for {_describe(target)!r}. Expected one of"
            " 'after_insert', 'after_update', 'after_delete'."
        )
    operations = []
    for name in names:
        if name not in EVENT_OPERATIONS:
            raise UnknownEventError(
                f"No such event {name!r} for {_describe(target)!r}. Expected one of"
                " 'after_insert', 'after_update', 'after_delete'."
            )
        operations.append(EVENT_OPERATIONS[name])
    return operations


def _check_columns(
    columns: Optional[Iterable[str]],
    operations: list[str],
    target: Any,
    sa_table: Optional[sa.Table],
) -> Optional[frozenset[str]]:
    if columns is None:
        return None
    if isinstance(columns, str):
        columns = [columns]
    wanted = frozenset(columns)
    if operations != ["update"]:
        raise UnknownColumnError(
            f"'columns' applies to 'after_update' only, but the handler for"
            f" {_describe(target)!r} also listens to"
            f" {', '.join(repr('after_' + op) for op in operations if op != 'update')}."
            " Register the update handler separately."
        )
    if not wanted:
        raise UnknownColumnError(
            f"'columns' for {_describe(target)!r} is empty. Pass at least one column"
            " name, or None to fire on any change."
        )
    if sa_table is not None:
        known = set(sa_table.columns.keys()) | {c.name for c in sa_table.columns}
        unknown = sorted(wanted - known)
        if unknown:
            raise UnknownColumnError(
                f"No column {', '.join(map(repr, unknown))} in table"
                f" {sa_table.fullname!r} of {_describe(target)!r}. Expected some of"
                f" {', '.join(repr(c.name) for c in sa_table.columns)}."
            )
        # Keys may differ from database names: store database names.
        wanted = frozenset(
            sa_table.columns[c].name if c in sa_table.columns.keys() else c for c in wanted
        )
    return wanted


class Registry:
    """Thread-safe store of subscriptions, looked up by table and operation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscriptions: list[Subscription] = []
        self._by_key: dict[tuple[TableKey, str], tuple[Subscription, ...]] = {}

    def add(
        self,
        target: Target,
        identifier: Union[str, Sequence[str]],
        fn: Handler,
        *,
        columns: Optional[Iterable[str]] = None,
    ) -> list[Subscription]:
        """Validate and store a handler; return the subscriptions it made."""
        if not callable(fn):
            raise TypeError(f"Handler {fn!r} is not callable.")
        table_key, model, sa_table = resolve_target(target)
        operations = resolve_operations(identifier, target)
        wanted = _check_columns(columns, operations, target, sa_table)
        added = [
            Subscription(table_key, op, fn, wanted, handler_name(fn), model, sa_table)
            for op in operations
        ]
        with self._lock:
            for sub in added:
                if not any(self._same(sub, old) for old in self._subscriptions):
                    self._subscriptions.append(sub)
            self._reindex()
        return added

    def remove(self, target: Target, identifier: Union[str, Sequence[str]], fn: Handler) -> None:
        """Remove a handler; raise ``ValueError`` if it was not registered."""
        table_key, _, _ = resolve_target(target)
        operations = resolve_operations(identifier, target)
        with self._lock:
            for op in operations:
                matches = [
                    s for s in self._subscriptions
                    if s.table == table_key and s.operation == op and s.handler is fn
                ]
                if not matches:
                    raise ValueError(
                        f"Handler {handler_name(fn)!r} is not registered for"
                        f" 'after_{op}' on {str(table_key)!r}."
                    )
                for match in matches:
                    self._subscriptions.remove(match)
            self._reindex()

    @staticmethod
    def _same(a: Subscription, b: Subscription) -> bool:
        return (a.table, a.operation, a.handler, a.columns) == (
            b.table, b.operation, b.handler, b.columns
        )

    def _reindex(self) -> None:
        by_key: dict[tuple[TableKey, str], list[Subscription]] = {}
        for sub in self._subscriptions:
            by_key.setdefault((sub.table, sub.operation), []).append(sub)
        self._by_key = {key: tuple(subs) for key, subs in by_key.items()}

    def handlers_for(self, table: TableKey, operation: str) -> tuple[Subscription, ...]:
        """The subscriptions for one table and operation, in registration order."""
        return self._by_key.get((table, operation), ())

    def __iter__(self) -> Iterator[Subscription]:
        return iter(list(self._subscriptions))

    def needed_triggers(self) -> dict[tuple[TableKey, str], Optional[frozenset[str]]]:
        """Which triggers the handlers need, with the update columns to watch.

        ``None`` as the column set means every column.
        """
        needed: dict[tuple[TableKey, str], Optional[frozenset[str]]] = {}
        for (table, op), subs in self._by_key.items():
            if op != "update" or any(s.columns is None for s in subs):
                needed[(table, op)] = None
            else:
                needed[(table, op)] = frozenset().union(*(s.columns or () for s in subs))
        return needed

    def model_for(self, table: TableKey) -> tuple[Optional[type], Optional[sa.Table]]:
        """The mapped class and Table registered for a table, if any."""
        model, sa_table = None, None
        for sub in self._subscriptions:
            if sub.table == table:
                model = model or sub.model
                sa_table = sa_table if sa_table is not None else sub.sa_table
        return model, sa_table
