"""Alembic and Flask-Migrate: triggers in migrations, and autogenerate.

Loaded by ``init_app`` when Alembic is imported (Flask-Migrate imports it),
or by ``import flask_pgevents.migrations``. It registers:

- the operations ``op.create_pgevents_trigger``, ``op.alter_pgevents_trigger``
  and ``op.drop_pgevents_trigger`` (one trigger each, frozen in the migration
  file, reversible), and ``op.install_pgevents_triggers`` and
  ``op.uninstall_pgevents_triggers`` (whatever the registered handlers need
  when the migration runs);
- an autogenerate comparator that leaves the event schema's own tables out of
  the comparison and writes the trigger operations that bring the installed
  triggers in line with the handlers;
- how autogenerate renders those operations.

Every operation runs on the migration's own connection and transaction
(``op.get_bind()``): a migration that fails leaves no trigger behind. The
DDL is planned by :class:`~flask_pgevents.triggers.TriggerManager` and run
by :class:`~flask_pgevents.store.Store`, as for ``install-triggers``.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

import sqlalchemy as sa
from alembic.autogenerate import comparators, renderers
from alembic.autogenerate.api import AutogenContext
from alembic.operations import MigrateOperation, Operations
from alembic.operations.ops import UpgradeOps
from flask import current_app, has_app_context

from .connection import BorrowedConnection
from .errors import MigrationContextError, UnknownEventError
from .registry import EVENT_OPS, TableKey, TriggerKey, TriggerSet, TriggerSpec, broadcast_kind, is_broadcast, op_of
from .state import AppState
from .store import Store
from .triggers import InstallPlan, TriggerChange

logger = logging.getLogger("flask_pgevents")

C = TypeVar("C", bound=Callable[..., Any])

#: What the rendered migration imports, so that it runs wherever Alembic does.
IMPORT = "import flask_pgevents.migrations  # noqa: F401"


def trigger_key(table_name: str, event: str, schema: Optional[str], broadcast: bool) -> TriggerKey:
    """The trigger an operation names, as the registry keys it.

    :raises UnknownEventError: for an event other than ``after_insert``,
        ``after_update``, ``after_delete`` or ``after_truncate``.
    """
    op = EVENT_OPS.get(event)
    if op is None:
        raise UnknownEventError(
            f"Unknown event {event!r} in a pgevents migration operation. Use one of"
            f" {', '.join(map(repr, EVENT_OPS))}."
        )
    return TableKey(schema or "public", table_name), broadcast_kind(op) if broadcast else op


def _columns(columns: Optional[Iterable[str]]) -> Optional[frozenset[str]]:
    return frozenset(columns) if columns else None


def _filters(filters: Optional[Iterable[str]]) -> frozenset[str]:
    if isinstance(filters, str):
        filters = [filters]
    return frozenset(filters or ())


def _render_call(name: str, *args: Any, **options: Any) -> str:
    """``op.name(args, option=value)``, options at their default left out."""
    shown = [repr(arg) for arg in args] + [
        f"{key}={sorted(value) if isinstance(value, frozenset) else value!r}"
        for key, value in options.items() if value not in (None, False)
    ]
    return f"op.{name}({', '.join(shown)})"


# Operations --------------------------------------------------------------------


class TriggerOperation(MigrateOperation):
    """One capture trigger, named in the migration file as it was when written.

    :param table_name: the table, as PostgreSQL spells it.
    :param event: ``"after_insert"``, ``"after_update"`` or ``"after_delete"``.
    :param schema: the table's schema (default ``"public"``).
    :param columns: for ``after_update``: the columns whose change it captures
        (``None``: every column).
    :param broadcast: the trigger of broadcast handlers.
    :param filters: the handlers' ``where=`` filters, as compiled into the
        capture SQL when the migration was written (frozen: a later change
        of the handlers' filters is a later migration).
    :param every_row: ``False`` when every handler has a filter, so that
        rows matching none are not captured.
    """

    #: The ``op.`` method that renders and runs it.
    method = ""

    def __init__(
        self,
        table_name: str,
        event: str,
        *,
        schema: Optional[str] = None,
        columns: Optional[Iterable[str]] = None,
        broadcast: bool = False,
        filters: Optional[Iterable[str]] = None,
        every_row: bool = True,
    ) -> None:
        self.key = trigger_key(table_name, event, schema, broadcast)
        self.table_name, self.event, self.broadcast = table_name, event, broadcast
        self.schema = self.key[0].schema
        self.columns = _columns(columns)
        self.filters = _filters(filters)
        self.every_row = every_row or not self.filters

    @property
    def spec(self) -> TriggerSpec:
        """What the trigger captures after the operation."""
        return TriggerSpec(self.columns, self.filters, self.every_row)

    @classmethod
    def from_change(cls, change: TriggerChange) -> TriggerOperation:
        names = (change.table.name, f"after_{op_of(change.kind)}")
        options: dict[str, Any] = {
            "schema": change.table.schema, "columns": change.columns, "broadcast": is_broadcast(change.kind),
            "filters": change.filters, "every_row": change.every_row,
        }
        if change.action == "alter":
            return AlterTriggerOp(
                *names, existing_columns=change.existing_columns, existing_filters=change.existing_filters,
                existing_every_row=change.existing_every_row, **options,
            )
        return (CreateTriggerOp if change.action == "create" else DropTriggerOp)(*names, **options)

    def render(self) -> str:
        return _render_call(
            self.method, self.table_name, self.event,
            schema=self.schema, columns=self.columns, broadcast=self.broadcast,
            filters=sorted(self.filters) or None, every_row=None if self.every_row else False,
        )

    def to_diff_tuple(self) -> tuple[Any, ...]:
        diff = (self.method.replace("_pgevents", ""), str(self.key[0]), self.key[1], self.columns)
        return (*diff, self.filters, self.every_row) if self.filters else diff

    def _same(self, operation_class: type[TriggerOperation]) -> TriggerOperation:
        return operation_class(
            self.table_name, self.event, schema=self.schema, columns=self.columns, broadcast=self.broadcast,
            filters=self.filters, every_row=self.every_row,
        )


@Operations.register_operation("create_pgevents_trigger")
class CreateTriggerOp(TriggerOperation):
    """Install one capture trigger (and the event schema, if it is missing or outdated)."""

    method = "create_pgevents_trigger"

    @classmethod
    def create_pgevents_trigger(
        cls,
        operations: Operations,
        table_name: str,
        event: str,
        *,
        schema: Optional[str] = None,
        columns: Optional[Iterable[str]] = None,
        broadcast: bool = False,
        filters: Optional[Iterable[str]] = None,
        every_row: bool = True,
    ) -> None:
        """Install the capture trigger of ``event`` on a table, in the migration's transaction.

        Example::

            op.create_pgevents_trigger("user", "after_update", schema="public", columns=["email"])
            op.create_pgevents_trigger("order", "after_update", filters=["new_row.status = 'paid'"],
                                       every_row=False)
        """
        operations.invoke(cls(
            table_name, event, schema=schema, columns=columns, broadcast=broadcast, filters=filters,
            every_row=every_row,
        ))

    def reverse(self) -> MigrateOperation:
        return self._same(DropTriggerOp)


@Operations.register_operation("alter_pgevents_trigger")
class AlterTriggerOp(TriggerOperation):
    """Replace one capture trigger by one that watches other columns (or enable it)."""

    method = "alter_pgevents_trigger"

    def __init__(
        self,
        table_name: str,
        event: str,
        *,
        schema: Optional[str] = None,
        columns: Optional[Iterable[str]] = None,
        existing_columns: Optional[Iterable[str]] = None,
        broadcast: bool = False,
        filters: Optional[Iterable[str]] = None,
        every_row: bool = True,
        existing_filters: Optional[Iterable[str]] = None,
        existing_every_row: bool = True,
    ) -> None:
        super().__init__(
            table_name, event, schema=schema, columns=columns, broadcast=broadcast, filters=filters,
            every_row=every_row,
        )
        self.existing_columns = _columns(existing_columns)
        self.existing_filters = _filters(existing_filters)
        self.existing_every_row = existing_every_row or not self.existing_filters

    @classmethod
    def alter_pgevents_trigger(
        cls,
        operations: Operations,
        table_name: str,
        event: str,
        *,
        schema: Optional[str] = None,
        columns: Optional[Iterable[str]] = None,
        existing_columns: Optional[Iterable[str]] = None,
        broadcast: bool = False,
        filters: Optional[Iterable[str]] = None,
        every_row: bool = True,
        existing_filters: Optional[Iterable[str]] = None,
        existing_every_row: bool = True,
    ) -> None:
        """Make the capture trigger of ``event`` watch ``columns`` and test
        ``filters``; ``existing_columns`` and ``existing_filters`` are what it
        did, for the downgrade.

        Example::

            op.alter_pgevents_trigger("user", "after_update", columns=["email", "name"],
                                      existing_columns=["email"])
        """
        operations.invoke(cls(
            table_name, event, schema=schema, columns=columns, existing_columns=existing_columns,
            broadcast=broadcast, filters=filters, every_row=every_row, existing_filters=existing_filters,
            existing_every_row=existing_every_row,
        ))

    def render(self) -> str:
        return _render_call(
            self.method, self.table_name, self.event, schema=self.schema, columns=self.columns,
            existing_columns=self.existing_columns, broadcast=self.broadcast,
            filters=sorted(self.filters) or None, every_row=None if self.every_row else False,
            existing_filters=sorted(self.existing_filters) or None,
            existing_every_row=None if self.existing_every_row else False,
        )

    def to_diff_tuple(self) -> tuple[Any, ...]:
        diff = (*super().to_diff_tuple(), self.existing_columns)
        return (*diff, self.existing_filters, self.existing_every_row) if self.existing_filters else diff

    def reverse(self) -> MigrateOperation:
        return AlterTriggerOp(
            self.table_name, self.event, schema=self.schema, columns=self.existing_columns,
            existing_columns=self.columns, broadcast=self.broadcast, filters=self.existing_filters,
            every_row=self.existing_every_row, existing_filters=self.filters, existing_every_row=self.every_row,
        )


@Operations.register_operation("drop_pgevents_trigger")
class DropTriggerOp(TriggerOperation):
    """Drop one capture trigger of this app; ``columns`` serve its downgrade."""

    method = "drop_pgevents_trigger"

    @classmethod
    def drop_pgevents_trigger(
        cls,
        operations: Operations,
        table_name: str,
        event: str,
        *,
        schema: Optional[str] = None,
        columns: Optional[Iterable[str]] = None,
        broadcast: bool = False,
        filters: Optional[Iterable[str]] = None,
        every_row: bool = True,
    ) -> None:
        """Drop the capture trigger of ``event`` on a table, if this app installed it.

        Example::

            op.drop_pgevents_trigger("user", "after_delete", schema="public")
        """
        operations.invoke(cls(
            table_name, event, schema=schema, columns=columns, broadcast=broadcast, filters=filters,
            every_row=every_row,
        ))

    def reverse(self) -> MigrateOperation:
        return self._same(CreateTriggerOp)


@Operations.register_operation("install_pgevents_triggers")
class InstallTriggersOp(MigrateOperation):
    """Install what the handlers registered when the migration runs need."""

    def __init__(self, *, prune: bool = False) -> None:
        self.prune = prune

    @classmethod
    def install_pgevents_triggers(cls, operations: Operations, *, prune: bool = False) -> None:
        """Install the event schema and the triggers the app's handlers need now,
        as ``flask pgevents install-triggers`` does, in the migration's transaction.

        Not frozen: run from an empty database, it installs what today's code
        needs. Autogenerate writes frozen operations instead.

        :param prune: also drop this app's triggers that no handler needs.
        """
        operations.invoke(cls(prune=prune))

    def reverse(self) -> MigrateOperation:
        return UninstallTriggersOp()

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("install_triggers", self.prune)


@Operations.register_operation("uninstall_pgevents_triggers")
class UninstallTriggersOp(MigrateOperation):
    """Drop this app's capture triggers, and the event schema if asked."""

    def __init__(self, *, drop_schema: bool = False) -> None:
        self.drop_schema = drop_schema

    @classmethod
    def uninstall_pgevents_triggers(cls, operations: Operations, *, drop_schema: bool = False) -> None:
        """Drop this app's capture triggers, as ``flask pgevents uninstall-triggers``
        does, in the migration's transaction.

        :param drop_schema: also drop the event schema, with every stored event.
        """
        operations.invoke(cls(drop_schema=drop_schema))

    def reverse(self) -> MigrateOperation:
        return InstallTriggersOp()

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("uninstall_triggers", self.drop_schema)


# Running them ----------------------------------------------------------------------


def app_state() -> Optional[AppState]:
    """The flask-pgevents state of the current app; ``None`` without one."""
    if not has_app_context():
        return None
    state: Optional[AppState] = current_app.extensions.get("pgevents")
    return state


def _required_state() -> AppState:
    state = app_state()
    if state is None:
        raise MigrationContextError(
            "The pgevents migration operations need the Flask app, with flask-pgevents set up,"
            " in context. 'flask db upgrade' provides it; with plain Alembic, run the"
            " migrations of env.py inside 'with app.app_context():'."
        )
    return state


@contextlib.contextmanager
def borrowed_store(bind: sa.Connection, schema: str) -> Iterator[Store]:
    """A store on the DB-API connection of ``bind``, in its transaction, with a
    safe ``search_path`` until the block ends.

    In an autocommit block (``op.get_context().autocommit_block()``) the
    block gets a transaction of its own: each statement would otherwise
    commit alone, a capture function before the ``REVOKE`` that keeps
    others from calling it, and ``SET LOCAL`` would pin nothing.

    :raises MigrationContextError: for a database other than PostgreSQL, or a
        driver other than psycopg or psycopg2.
    """
    dialect = bind.dialect
    if dialect.name != "postgresql" or dialect.driver not in ("psycopg", "psycopg2"):
        raise MigrationContextError(
            f"flask-pgevents migration operations need PostgreSQL with psycopg or psycopg2,"
            f" but the migration's connection uses {dialect.name}+{dialect.driver}. Set"
            " PGEVENTS_ENABLED = False for databases that have no triggers (SQLite in tests)."
        )
    raw: Any = bind.connection.driver_connection
    with Store(BorrowedConnection(raw, dialect.driver), schema) as store:
        if not raw.autocommit:
            with store.safe_search_path():
                yield store
            return
        store.begin()
        try:
            with store.safe_search_path():
                yield store
        except BaseException:
            store.rollback()
            raise
        store.commit()


def run_operation(operations: Operations, plan: Callable[[AppState, Store], InstallPlan]) -> None:
    """Plan and run DDL in the migration's transaction, under the schema's install lock.

    No ``lock_timeout`` is set: the migration's own applies, as it does to
    its other DDL. With ``PGEVENTS_ENABLED = False`` nothing is run.

    :raises MigrationContextError: in offline mode (``--sql``): the plan reads
        the catalog.
    """
    state = _required_state()
    if not state.enabled:
        logger.info("flask-pgevents is disabled (PGEVENTS_ENABLED is False): trigger operation skipped.")
        return
    if operations.migration_context.as_sql:
        raise MigrationContextError(
            "The pgevents migration operations cannot run offline ('--sql'): they compare the"
            " triggers with the database's catalog. Run the migration online, or print the DDL"
            " with 'flask pgevents install-triggers --sql' and 'op.execute' it."
        )
    with borrowed_store(operations.get_bind(), state.config.schema) as store:
        store.run_ddl([state.triggers.lock_sql()])
        current = plan(state, store)
        store.run_ddl(current.statements)
    for step in current.steps:
        if step.action in ("create", "replace", "drop"):
            where = str(step.table) if step.table is not None else state.config.schema
            detail = f" ({step.detail})" if step.detail else ""
            logger.info("pgevents: %s %s %s%s", step.action, step.kind, where, detail)


def install_plan(state: AppState, store: Store, needed: TriggerSet, *, prune: bool = False) -> InstallPlan:
    """The plan that installs ``needed``; fails first for a missing table or column."""
    state.triggers.check_tables(needed, store.table_columns)
    return state.install_plan(store, needed, prune=prune)


@Operations.implementation_for(CreateTriggerOp)
@Operations.implementation_for(AlterTriggerOp)
def _install_trigger(operations: Operations, operation: TriggerOperation) -> None:
    run_operation(operations, lambda state, store: install_plan(state, store, {operation.key: operation.spec}))


@Operations.implementation_for(DropTriggerOp)
def _drop_trigger(operations: Operations, operation: DropTriggerOp) -> None:
    def plan(state: AppState, store: Store) -> InstallPlan:
        installed = state.triggers.installed(store.installed_triggers())
        return state.triggers.uninstall_plan([t for t in installed if (t.table, t.kind) == operation.key])

    run_operation(operations, plan)


@Operations.implementation_for(InstallTriggersOp)
def _install_triggers(operations: Operations, operation: InstallTriggersOp) -> None:
    run_operation(operations, lambda state, store: install_plan(
        state, store, state.registry.needed_triggers(), prune=operation.prune
    ))


@Operations.implementation_for(UninstallTriggersOp)
def _uninstall_triggers(operations: Operations, operation: UninstallTriggersOp) -> None:
    run_operation(operations, lambda state, store: state.triggers.uninstall_plan(
        state.triggers.installed(store.installed_triggers()), drop_schema=operation.drop_schema
    ))


# Autogenerate -----------------------------------------------------------------------


def _schema_comparator(priority: str) -> Callable[[C], C]:
    """Register a comparator of the ``"schema"`` step, early or late among Alembic's own."""
    try:
        from alembic.util import DispatchPriority
    except ImportError:  # pragma: no cover - Alembic before 1.18: they run in order of registration
        return comparators.dispatch_for("schema")
    return comparators.dispatch_for("schema", priority=DispatchPriority[priority])


@_schema_comparator("FIRST")
def _skip_event_schema(autogen_context: AutogenContext, upgrade_ops: UpgradeOps, schemas: set[Optional[str]]) -> None:
    """Leave the event schema out before Alembic reflects it (``include_schemas=True``).

    Its tables are no model's, and reflecting them warns about the ``xid8`` type.
    """
    state = app_state()
    if state is not None:
        schemas.discard(state.config.schema)


@_schema_comparator("LAST")
def _compare_triggers(autogen_context: AutogenContext, upgrade_ops: UpgradeOps, schemas: set[Optional[str]]) -> None:
    """Drop any operation on the event schema, and add those that bring the triggers up to date.

    Drops come first (a table dropped by the same migration takes its
    triggers with it), creates and alters last (after the tables they need).
    """
    state = app_state()
    if state is None:
        return
    upgrade_ops.ops[:] = [op for op in upgrade_ops.ops if getattr(op, "schema", None) != state.config.schema]
    bind = autogen_context.connection
    if not state.enabled or bind is None or bind.dialect.name != "postgresql":
        return
    with borrowed_store(bind, state.config.schema) as store:
        installed = state.triggers.installed(store.installed_triggers())
    operations = [
        TriggerOperation.from_change(change)
        for change in state.triggers.drift(state.registry.needed_triggers(), installed)
    ]
    upgrade_ops.ops[:0] = [op for op in operations if isinstance(op, DropTriggerOp)]
    upgrade_ops.ops.extend(op for op in operations if not isinstance(op, DropTriggerOp))


def _renderer(operation_class: type[MigrateOperation]) -> Callable[[C], C]:
    return renderers.dispatch_for(operation_class)


@_renderer(CreateTriggerOp)
@_renderer(AlterTriggerOp)
@_renderer(DropTriggerOp)
def render_trigger_operation(autogen_context: AutogenContext, operation: TriggerOperation) -> str:
    autogen_context.imports.add(IMPORT)
    return operation.render()


@_renderer(InstallTriggersOp)
def render_install(autogen_context: AutogenContext, operation: InstallTriggersOp) -> str:
    autogen_context.imports.add(IMPORT)
    return _render_call("install_pgevents_triggers", prune=operation.prune)


@_renderer(UninstallTriggersOp)
def render_uninstall(autogen_context: AutogenContext, operation: UninstallTriggersOp) -> str:
    autogen_context.imports.add(IMPORT)
    return _render_call("uninstall_pgevents_triggers", drop_schema=operation.drop_schema)
