"""Backfill: events for rows that already exist, so that a handler can process history.

A run reads the table in primary-key order, a batch per transaction, and
stores each batch's rows as ``insert`` events marked as backfill together
with the last key it read, in the same transaction. An interrupted run
resumes after that key; a second process running the same backfill waits
for each batch and goes on from the key it stored. So the backfill emits
each row once per run, while writes go on: they get their normal events.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from .errors import MissingTableError, UnknownHandlerError
from .registry import Handler, Subscription, TableKey, Target, resolve_target

if TYPE_CHECKING:
    from .state import AppState

#: Rows per batch by default: one transaction each.
DEFAULT_BATCH_SIZE = 1000


@dataclasses.dataclass(frozen=True)
class BackfillProgress:
    """Where a backfill run is; passed to ``progress`` after each batch, and returned."""

    #: The run's id (``pgevents.backfill`` table): the same when it is resumed.
    run: int
    #: ``"schema.table"``.
    table: str
    #: The one handler the events are for, or ``None`` for every ``after_insert`` handler.
    handler: Optional[str]
    #: Rows emitted as events so far, by every process that ran it.
    emitted: int
    #: How many rows the table holds, as the planner estimates them (the
    #: progress bar's length); a ``where`` condition may select fewer.
    estimate: int
    #: Rows the last batch emitted (0 before the first).
    batch: int = 0
    #: An unfinished run of the same backfill was resumed.
    resumed: bool = False
    #: The run reached the end of the table.
    finished: bool = False


Progress = Callable[[BackfillProgress], Any]


def backfill(
    state: AppState,
    target: Union[Target, str],
    *,
    where: Optional[str] = None,
    handler: Union[Handler, str, None] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Optional[Progress] = None,
) -> BackfillProgress:
    """Emit an ``insert`` event, marked as backfill, for every row of ``target``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}.")
    table = resolve_backfill_target(state, target)
    handler_name = _handler_name(state, table, handler)
    with state.connect() as store:
        if not store.schema_exists():
            raise MissingTableError(
                f"The event schema {state.config.schema!r} is not installed, so there is nowhere"
                " to put backfill events. Run 'flask pgevents install-triggers' first."
            )
        keys = store.primary_key(table)
        if not keys:
            if not store.table_columns(table):
                raise MissingTableError(f"Table {str(table)!r} does not exist, so it cannot be backfilled.")
            raise MissingTableError(
                f"Table {str(table)!r} has no primary key, which a backfill pages through so that"
                " it can resume and never emit a row twice. Add a primary key (or backfill a"
                " view of it by hand: INSERT INTO the event table yourself)."
            )
        run = store.start_backfill(table, handler_name, where)
        current = BackfillProgress(
            run.id, str(table), handler_name, run.emitted, store.row_estimate(table, where), resumed=run.resumed,
        )
        if progress is not None:
            progress(current)
        while not current.finished:
            store.begin()
            try:
                batch = store.backfill_batch(run.id, table, keys, where, handler_name, batch_size)
            except BaseException:
                store.rollback()
                raise
            store.commit()
            current = dataclasses.replace(
                current, emitted=max(batch.emitted, current.emitted), batch=batch.batch, finished=batch.finished,
            )
            if progress is not None:
                progress(current)
    return current


def resolve_backfill_target(state: AppState, target: Union[Target, str]) -> TableKey:
    """The table a model, a Table, a model's class name or ``"schema.table"`` names."""
    if isinstance(target, str) and "." not in target and state.db is not None:
        registry = getattr(getattr(state.db, "Model", None), "registry", None)
        for mapper in getattr(registry, "mappers", ()):
            if mapper.class_.__name__ == target:
                target = mapper.class_
                break
    return resolve_target(target)[0]


def _handler_name(state: AppState, table: TableKey, handler: Union[Handler, str, None]) -> Optional[str]:
    """The recorded name of the one handler to backfill for, checked; ``None`` for all."""
    subscriptions: tuple[Subscription, ...] = state.registry.handlers_for(table, "insert")
    if not subscriptions:
        raise UnknownHandlerError(
            f"No 'after_insert' handler listens to table {str(table)!r}. Backfill events are"
            " inserts, so nothing would handle them: register the handler first."
        )
    if handler is None:
        return None
    if callable(handler):
        found = [sub for sub in subscriptions if sub.handler == handler]
    else:
        found = [sub for sub in subscriptions if sub.name == handler]
        if not found:  # a short name: "welcome" for "app.handlers.welcome"
            found = [sub for sub in subscriptions if sub.name.rsplit(".", 1)[-1] == handler]
    if len(found) != 1:
        names = ", ".join(repr(sub.name) for sub in subscriptions)
        problem = "names several" if found else "is not"
        raise UnknownHandlerError(
            f"{getattr(handler, '__name__', handler)!r} {problem} an 'after_insert' handler of"
            f" table {str(table)!r}. Its handlers are: {names}."
        )
    return found[0].name
