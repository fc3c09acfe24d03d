"""Handlers by table and kind, validated when they are registered; no I/O.

Words used throughout the package: an *op* is what happened to a row
(``"insert"``, ``"update"``, ``"delete"``) or to a whole table
(``"truncate"``), as in ``Event.op``; a *kind* is an
op with its delivery, ``"insert"`` for queued handlers or ``"broadcast_insert"``
for broadcast ones. Each table has one trigger per kind in use.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any, Callable, Dict, FrozenSet, Iterable, Optional, Sequence, Tuple, Union

import sqlalchemy as sa

from .errors import (
    IdentifierTooLongError,
    InvalidFilterError,
    InvalidHandlerError,
    UnknownColumnError,
    UnknownEventError,
    UnknownHandlerError,
    UnmappedTargetError,
)
from .filters import Where, compile_filter, filter_id

#: Public event names mapped to the op stored for them.
EVENT_OPS = {
    "after_insert": "insert",
    "after_update": "update",
    "after_delete": "delete",
    "after_truncate": "truncate",
}
OPS = tuple(EVENT_OPS.values())
#: Broadcast handlers are kept apart under "broadcast_<op>": they have
#: triggers and a table of their own.
BROADCAST_PREFIX = "broadcast_"


def broadcast_kind(op: str) -> str:
    """``"broadcast_insert"`` for ``"insert"``: the kind of broadcast handlers of an op."""
    return BROADCAST_PREFIX + op


#: Every kind: queued delivery per op, and broadcast of row changes. There
#: is no broadcast TRUNCATE: its trigger name would be the longest and cut
#: two bytes off the longest schema name PGEVENTS_SCHEMA accepts.
ROW_OPS = ("insert", "update", "delete")
TRIGGER_KINDS = OPS + tuple(broadcast_kind(op) for op in ROW_OPS)
#: PostgreSQL cuts longer identifiers (NAMEDATALEN - 1).
MAX_IDENTIFIER_BYTES = 63


def op_of(kind: str) -> str:
    """``"insert"`` for both ``"insert"`` and ``"broadcast_insert"``."""
    return kind[len(BROADCAST_PREFIX):] if kind.startswith(BROADCAST_PREFIX) else kind


def is_broadcast(kind: str) -> bool:
    return kind.startswith(BROADCAST_PREFIX)


Handler = Callable[..., Any]
Target = Union[type, sa.Table, str]


@dataclasses.dataclass(frozen=True)
class TableKey:
    """A table named by schema and name, exactly as PostgreSQL spells them."""

    schema: str
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


#: A trigger: one table and one kind.
TriggerKey = Tuple[TableKey, str]


@dataclasses.dataclass(frozen=True)
class TriggerSpec:
    """What one trigger captures.

    :param columns: for updates, the columns whose change it captures
        (``None``: every column).
    :param filters: the compiled ``where=`` conditions of its handlers. Each
        event carries the ids of those its row matched (see
        :func:`~flask_pgevents.filters.filter_id`).
    :param every_row: some handler has no ``where=``, so every row is
        captured; otherwise only rows that match one of ``filters``.
    """

    columns: Optional[FrozenSet[str]] = None
    filters: FrozenSet[str] = frozenset()
    every_row: bool = True

    @property
    def filtered(self) -> bool:
        """The trigger computes filters, so it needs a function of its own."""
        return bool(self.filters)


#: The triggers the handlers need, and what each captures.
TriggerSet = Dict[TriggerKey, TriggerSpec]


def trigger_order(key: TriggerKey) -> tuple[str, str]:
    """Sort key of triggers: by table, then kind."""
    return (str(key[0]), key[1])


@dataclasses.dataclass(frozen=True)
class Subscription:
    """One handler registered for one kind on one table."""

    table: TableKey
    kind: str
    handler: Handler
    columns: Optional[frozenset[str]]
    #: Stable name of the handler, recorded in the event row once it succeeded.
    name: str
    model: Optional[type]
    sa_table: Optional[sa.Table]
    #: The compiled ``where=`` condition, or ``None``: every row.
    filter: Optional[str] = None

    @property
    def filter_id(self) -> Optional[str]:
        """The id events carry when their row matched this handler's filter."""
        return None if self.filter is None else filter_id(self.filter)


def handler_name(fn: Handler) -> str:
    """The name under which a handler's success or failure is recorded.

    Built from module and qualified name, never from a memory address, so
    that every process gives a handler the same name.
    """
    if isinstance(fn, functools.partial):
        return f"{handler_name(fn.func)}(partial)"
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(qualname, str):  # a callable instance: name its class
        qualname = type(fn).__qualname__
    module = getattr(fn, "__module__", None) or type(fn).__module__ or "?"
    return f"{module}.{qualname}"


def _describe(target: Any) -> str:
    if isinstance(target, type):
        return target.__name__
    if isinstance(target, sa.Table):
        return target.fullname
    return str(target)


def _event_names(identifier: Any) -> str:
    names = [identifier] if isinstance(identifier, str) else list(identifier)
    return ", ".join(repr(name) for name in names)


def resolve_target(target: Target) -> tuple[TableKey, Optional[type], Optional[sa.Table]]:
    """Resolve a mapped class, a Table or ``"schema.table"`` into the table it names.

    :raises UnmappedTargetError: for anything else.
    :raises IdentifierTooLongError: for a name PostgreSQL would cut.
    """
    resolved = _resolve_target(target)
    table = resolved[0]
    for what, name in (("schema", table.schema), ("table", table.name)):
        if len(name.encode()) > MAX_IDENTIFIER_BYTES:
            raise IdentifierTooLongError(
                f"The {what} name {name!r} of {_describe(target)!r} is"
                f" {len(name.encode())} bytes long, but PostgreSQL cuts names at"
                f" {MAX_IDENTIFIER_BYTES} bytes, so its triggers would report another"
                f" name and no event would reach the handler. Rename the {what} to at"
                f" most {MAX_IDENTIFIER_BYTES} bytes."
            )
    return resolved


def _resolve_target(target: Target) -> tuple[TableKey, Optional[type], Optional[sa.Table]]:
    if isinstance(target, str):
        schema, dot, name = target.rpartition(".")
        if not name or (dot and not schema):
            raise UnmappedTargetError(
                f"Table name {target!r} is incomplete. Pass 'table' or 'schema.table'."
            )
        return TableKey(schema if dot else "public", name), None, None
    if isinstance(target, sa.Table):
        return TableKey(target.schema or "public", target.name), None, target
    if isinstance(target, type):
        mapper: Any = sa.inspect(target, raiseerr=False)
        if mapper is not None and isinstance(getattr(mapper, "local_table", None), sa.Table):
            table = mapper.local_table
            return TableKey(table.schema or "public", table.name), target, table
        raise UnmappedTargetError(
            f"Cannot listen to {target.__name__!r}: it is not a mapped class. Pass a"
            " Flask-SQLAlchemy model or other mapped class, a sqlalchemy.Table, or a"
            " table name such as 'public.user'."
        )
    if sa.inspect(type(target), raiseerr=False) is not None:
        model = type(target).__name__
        raise UnmappedTargetError(
            f"Cannot listen to an instance of {model!r}: events are per table. Pass"
            f" the class {model} itself."
        )
    raise UnmappedTargetError(
        f"Cannot listen to {target!r}: a target must be a mapped class, a"
        " sqlalchemy.Table, or a table name such as 'public.user'. Pass one of those."
    )


def resolve_ops(identifier: Union[str, Sequence[str]], target: Any) -> list[str]:
    """Turn ``"after_insert"`` or a list of such names into ops.

    :raises UnknownEventError: for a name that is not an event.
    """
    expected = "Expected one of 'after_insert', 'after_update', 'after_delete', 'after_truncate'."
    if isinstance(identifier, str):
        names: list[Any] = [identifier]
    elif isinstance(identifier, (list, tuple, set, frozenset)):
        names = list(identifier)
    elif callable(identifier):
        raise UnknownEventError(
            f"Expected an event name for {_describe(target)!r}, got the function"
            f" {handler_name(identifier)!r}. The event name comes before the handler:"
            " listen(target, 'after_insert', fn)."
        )
    else:
        raise UnknownEventError(f"No such event {identifier!r} for {_describe(target)!r}. {expected}")
    if not names:
        raise UnknownEventError(f"No event given for {_describe(target)!r}. {expected}")
    ops = []
    for name in names:
        if not isinstance(name, str) or name not in EVENT_OPS:
            raise UnknownEventError(
                f"No such event {name!r} for {_describe(target)!r}. {expected}"
            )
        if EVENT_OPS[name] not in ops:
            ops.append(EVENT_OPS[name])
    return ops


def _column_names(sa_table: sa.Table, model: Optional[type]) -> dict[str, str]:
    """Every name a column may be given by (database name, Column key, mapped
    attribute) mapped to its database name."""
    names = {c.name: c.name for c in sa_table.columns}
    names.update((c.key, c.name) for c in sa_table.columns)
    if model is not None:
        mapper: Any = sa.inspect(model)
        for prop in mapper.column_attrs:
            column = prop.columns[0]
            if isinstance(column, sa.Column) and column.table is sa_table:
                names.setdefault(prop.key, column.name)
    return names


def _check_columns(
    columns: Optional[Iterable[str]],
    ops: list[str],
    target: Any,
    sa_table: Optional[sa.Table],
    model: Optional[type] = None,
) -> Optional[frozenset[str]]:
    if columns is None:
        return None
    if isinstance(columns, str):
        columns = [columns]
    if "update" not in ops or len(ops) > 1:
        others = ", ".join(repr("after_" + op) for op in ops if op != "update")
        fix = (
            "Register the 'after_update' handler with columns= in its own call."
            if "update" in ops
            else "Remove columns=, or listen to 'after_update'."
        )
        raise UnknownColumnError(
            f"'columns' applies to 'after_update' only, but the handler for"
            f" {_describe(target)!r} {'also ' if 'update' in ops else ''}listens"
            f" to {others}. {fix}"
        )
    columns = list(columns)
    for column in columns:
        if not isinstance(column, str):
            # Most likely a mapped attribute such as User.email: suggest its name.
            key = getattr(column, "key", None)
            shown, fix = (column, f"Pass {key!r} instead.") if isinstance(key, str) else (
                repr(column), "Pass column names."
            )
            raise UnknownColumnError(
                f"'columns' for {_describe(target)!r} must be column names (strings),"
                f" got {shown}. {fix}"
            )
    wanted = frozenset(columns)
    if not wanted:
        raise UnknownColumnError(
            f"'columns' for {_describe(target)!r} is empty. Pass at least one column"
            " name, or None to fire on any change."
        )
    if sa_table is not None:
        database_names = _column_names(sa_table, model)
        unknown = sorted(wanted - database_names.keys())
        if unknown:
            of_model = f" of model {target.__name__!r}" if isinstance(target, type) else ""
            raise UnknownColumnError(
                f"No column{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
                f" in table {sa_table.fullname!r}{of_model}. Pass one or more of"
                f" {', '.join(repr(c.name) for c in sa_table.columns)}."
            )
        # The trigger compares database columns: store their names.
        wanted = frozenset(database_names[c] for c in wanted)
    return wanted


class Registry:
    """Thread-safe store of subscriptions, looked up by table and kind."""

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
        broadcast: bool = False,
        where: Optional[Where] = None,
    ) -> list[Subscription]:
        """Validate and store a handler; return the subscriptions it made.

        :raises UnmappedTargetError, UnknownEventError, UnknownColumnError,
            InvalidHandlerError: for bad input, before anything is stored.
        """
        table_key, model, sa_table = resolve_target(target)
        ops = resolve_ops(identifier, target)
        if not callable(fn):
            raise InvalidHandlerError(
                f"The handler for {_event_names(identifier)} on {_describe(target)!r} is"
                f" not callable: got {fn!r}. Pass a function that takes one Event."
            )
        wanted = _check_columns(columns, ops, target, sa_table, model)
        if broadcast and "truncate" in ops:
            raise UnknownEventError(
                f"'after_truncate' of {_describe(target)!r} cannot be broadcast. Register a queued"
                " handler for it (it runs once, in one process), and reset shared state there."
            )
        filters = self._filters(where, ops, target, sa_table, model, broadcast)
        added = []
        with self._lock:
            for op in ops:
                kind = broadcast_kind(op) if broadcast else op
                sub = Subscription(
                    table_key, kind, fn, wanted, self._name_for(table_key, kind, fn), model, sa_table,
                    filters.get(op),
                )
                # Registering a handler again for the same table and kind
                # replaces its columns: it runs once per event, never twice.
                same = [i for i, old in enumerate(self._subscriptions) if self._same(sub, old)]
                if same:
                    self._subscriptions[same[0]] = sub
                else:
                    self._subscriptions.append(sub)
                added.append(sub)
            self._reindex()
        return added

    @staticmethod
    def _filters(
        where: Optional[Where],
        ops: list[str],
        target: Any,
        sa_table: Optional[sa.Table],
        model: Optional[type],
        broadcast: bool,
    ) -> dict[str, str]:
        """``where=`` compiled for each op."""
        if where is None:
            return {}
        if broadcast:
            raise InvalidFilterError(
                f"where= is not supported on broadcast handlers (for {_describe(target)!r}). Test"
                " the row in the handler, or register a queued handler."
            )
        names = _column_names(sa_table, model) if sa_table is not None else {}
        return {op: compile_filter(where, op, sa_table, names, _describe(target)) for op in ops}

    def _name_for(self, table: TableKey, kind: str, fn: Handler) -> str:
        # Handlers made by one factory, or bound methods of two instances,
        # share a qualified name; number them so that each one's success is
        # recorded apart. Registration order is the same in every process.
        taken = set()
        for sub in self._subscriptions:
            if (sub.table, sub.kind) == (table, kind):
                if sub.handler == fn:
                    return sub.name
                taken.add(sub.name)
        base = name = handler_name(fn)
        number = 2
        while name in taken:
            name = f"{base}#{number}"
            number += 1
        return name

    def remove(self, target: Target, identifier: Union[str, Sequence[str]], fn: Handler) -> None:
        """Remove a handler from every event named; nothing is removed on error.

        :raises UnknownHandlerError: if it is not registered for one of them.
        """
        table_key, _, _ = resolve_target(target)
        ops = resolve_ops(identifier, target)
        with self._lock:
            doomed = []
            for op in ops:
                # == and not "is": each access to obj.method makes a new bound method.
                matches = [
                    s for s in self._subscriptions
                    if s.table == table_key and op_of(s.kind) == op and s.handler == fn
                ]
                if not matches:
                    raise UnknownHandlerError(
                        f"Handler {handler_name(fn)!r} is not registered for 'after_{op}'"
                        f" on table {str(table_key)!r}. Pass the same target, event name"
                        " and function that were given to listen() or listens_for()."
                    )
                doomed.extend(matches)
            for sub in doomed:
                self._subscriptions.remove(sub)
            self._reindex()

    @staticmethod
    def _same(a: Subscription, b: Subscription) -> bool:
        return (a.table, a.kind, a.handler) == (
            b.table, b.kind, b.handler
        )

    def _reindex(self) -> None:
        by_key: dict[tuple[TableKey, str], list[Subscription]] = {}
        for sub in self._subscriptions:
            by_key.setdefault((sub.table, sub.kind), []).append(sub)
        self._by_key = {key: tuple(subs) for key, subs in by_key.items()}

    def subscribed(self) -> list[TriggerKey]:
        """Every (table, op) that has at least one queued (not broadcast) handler."""
        return [key for key in self._by_key if not is_broadcast(key[1])]

    def has_broadcast(self) -> bool:
        return any(is_broadcast(kind) for _, kind in self._by_key)

    def handlers_for(self, table: TableKey, kind: str) -> tuple[Subscription, ...]:
        """The subscriptions for one table and kind, in registration order."""
        return self._by_key.get((table, kind), ())

    def needed_triggers(self) -> TriggerSet:
        """Which triggers the handlers need, with the update columns to watch
        and the handlers' filters.

        ``None`` as the column set means every column. A trigger captures
        every row unless each of its handlers has a filter; then it captures
        the rows that match at least one.
        """
        needed: TriggerSet = {}
        for (table, kind), subs in self._by_key.items():
            columns: Optional[frozenset[str]] = None
            if op_of(kind) == "update" and all(s.columns is not None for s in subs):
                columns = frozenset().union(*(s.columns or () for s in subs))
            needed[(table, kind)] = TriggerSpec(
                columns,
                frozenset(s.filter for s in subs if s.filter is not None),
                any(s.filter is None for s in subs),
            )
        return needed

    def model_for(self, table: TableKey) -> tuple[Optional[type], Optional[sa.Table]]:
        """The mapped class and Table registered for a table, if any."""
        model, sa_table = None, None
        for sub in self._subscriptions:
            if sub.table == table:
                model = model or sub.model
                sa_table = sa_table if sa_table is not None else sub.sa_table
        return model, sa_table
