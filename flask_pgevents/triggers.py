"""Install, uninstall and compare the event schema and the capture triggers.

:class:`TriggerManager` decides and renders the DDL; it runs no query. What
it needs to know of the database (installed triggers, table columns, roles)
comes from :class:`~flask_pgevents.store.Store`, and the statements it
returns are run by the store, in one transaction.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Callable, Optional, Sequence

from .config import trigger_name
from .errors import (
    InvalidFilterError,
    MissingTableError,
    TriggerOwnershipError,
    UnknownColumnError,
    UnknownRoleError,
)
from .filters import ROW_ALIASES, filter_id
from .registry import TRIGGER_KINDS, TableKey, TriggerKey, TriggerSet, TriggerSpec, is_broadcast, op_of, trigger_order
from .sql import dollar_tag, quote_ident, quote_literal, render
from .store import CaptureRoleState, SchemaObjects, TriggerRow

#: The REFERENCING clause each op's trigger declares, on a line of its own
#: (TRUNCATE has no transition tables).
TRANSITION_TABLES = {
    op: "\n" + render(f"transition_tables_{op}") for op in ("insert", "update", "delete")
}
TRANSITION_TABLES["truncate"] = ""


#: The tables install creates in the event schema.
SCHEMA_TABLES = frozenset({"event", "broadcast", "listener", "backfill"})

#: Columns added to the event table after its first release, with the block
#: that adds each to an installed table.
EVENT_TABLE_UPGRADES = {
    "retried_attempts": "add_retried_attempts",
    "txid": "add_txid",
    "context": "add_context",
    "backfill": "add_backfill",
    "matched": "add_matched",
}

#: How a trigger's comment names the app whose handlers need it.
APP_COMMENT_PREFIX = "flask-pgevents app: "

#: The plan's actions. Only these change the database.
CHANGES = ("create", "replace", "drop")


#: The setting that, on in a writer's transaction, makes every capture
#: function skip that transaction's writes (see :mod:`flask_pgevents.suppression`).
SUPPRESS_SETTING = "pgevents.suppress"

#: The setting whose value, JSON text set in a writer's transaction, every
#: event of that transaction carries as ``event.context`` (see
#: :mod:`flask_pgevents.context`).
CONTEXT_SETTING = "pgevents.context"


#: The first line of a filtered trigger's own function: what it captures, as
#: JSON, so that status and migrations can read it back from ``prosrc``.
FILTERS_MARKER = "-- pgevents filters: "

#: Between a kind and the table's hash in a filtered trigger's function name.
FILTERED_FUNCTION_SEPARATOR = "__"


def function_name(kind: str, table: Optional[TableKey] = None) -> str:
    """``capture_<kind>``, shared by every table; with ``table``, the function
    of that table's filtered trigger, ``capture_<kind>__<hash of the table>``.

    Filters are compiled into the function, not passed as arguments: a
    condition passed as a trigger argument would run with ``EXECUTE``,
    planned again by every write, where a function's statements keep their
    plan for the session. The name hashes the table so that it stays
    within PostgreSQL's 63 bytes and one table's filters never replace
    another's.
    """
    if table is None:
        return f"capture_{kind}"
    digest = hashlib.sha256(qualified(table).encode()).hexdigest()[:12]
    return f"capture_{kind}{FILTERED_FUNCTION_SEPARATOR}{digest}"


def filter_fragments(spec: Optional[TriggerSpec], op: str, table: Optional[TableKey]) -> dict[str, str]:
    """The parts of a capture body that test the handlers' filters.

    Each event stores the ids of the filters its row matched, separated by
    spaces (``concat_ws`` skips the NULL of a filter that did not match): a
    few bytes per row, and NULL for triggers without filters. Unless some
    handler has no filter, rows that match none are not stored. A filter
    that is NULL for a row (``status = 'paid'`` with a NULL status) does not
    match, as in a ``WHERE``.
    """
    if spec is None or not spec.filtered or table is None:
        return {"matched": "NULL", "where": "", "row": "", "rows": ""}
    conditions = sorted(spec.filters)
    matched = render("filter_matched", cases=", ".join(
        render("filter_case", condition=condition, id=quote_literal(filter_id(condition))) for condition in conditions
    ))
    tests = " OR ".join(render("filter_test", condition=condition) for condition in conditions)
    if op != "update":
        where = "" if spec.every_row else "\n" + render("filter_rows_where", tests=tests)
        return {"matched": matched, "where": where, "row": "", "rows": ""}
    return {
        "matched": matched,
        "where": "" if spec.every_row else "\n" + render("filter_pair_where", tests=tests),
        "row": render("filter_pair_row", table=qualified(table)),
        "rows": "\n" + render("filter_pair_rows", **ROW_ALIASES["update"]),
    }


def filters_marker(spec: TriggerSpec) -> str:
    """The first line of a filtered trigger's function: its filters as JSON."""
    return FILTERS_MARKER + json.dumps({"filters": sorted(spec.filters), "every_row": spec.every_row})


def read_filters_marker(source: str) -> Optional[tuple[frozenset[str], bool]]:
    """The filters and ``every_row`` a filtered function's source records; ``None`` if it has none."""
    first = source.lstrip("\n").split("\n", 1)[0]
    if not first.startswith(FILTERS_MARKER):
        return None
    try:
        recorded = json.loads(first[len(FILTERS_MARKER):])
        filters = frozenset(str(condition) for condition in recorded["filters"])
        return filters, bool(recorded["every_row"])
    except (ValueError, KeyError, TypeError):
        return None


def function_body(
    schema: str, kind: str, spec: Optional[TriggerSpec] = None, table: Optional[TableKey] = None
) -> str:
    """The exact source PostgreSQL stores for a capture function (``prosrc``).

    :param spec: with filters, and ``table``, the body of that table's own
        function (see :func:`function_name`); otherwise the shared one.
    """
    quoted, op = quote_ident(schema), op_of(kind)
    filtered = spec is not None and spec.filtered and table is not None
    marker = "\n" + filters_marker(spec) if filtered and spec is not None else ""
    fragments = {
        "schema": quoted,
        "target": '"broadcast"' if is_broadcast(kind) else '"event"',
        "suppress": "\n" + render("capture_suppress", setting=quote_literal(SUPPRESS_SETTING)),
        "context": render("capture_context", setting=quote_literal(CONTEXT_SETTING)),
        "guard": "\n" + render("broadcast_guard", schema=quoted) if is_broadcast(kind) else "",
        "wake": render("capture_wake", schema=quoted, channel=quote_literal(schema)),
    }
    if op == "truncate":
        return "\n" + render("capture_truncate", **fragments) + "\n"
    filters = filter_fragments(spec, op, table)
    if op == "update":
        return marker + "\n" + render("capture_update", **fragments, **filters) + "\n"
    side = "new" if op == "insert" else "old"
    filters.pop("row"), filters.pop("rows")
    return marker + "\n" + render(
        "capture_rows", column=side, op=quote_literal(op), rows=f"pgevents_{side}", **fragments, **filters
    ) + "\n"


def describe_filters(spec: TriggerSpec) -> str:
    """``"filters: 1a2b3c4d, 5e6f7a8b"`` (the ids events carry), and whether
    rows that match none are captured too; empty without filters."""
    if not spec.filtered:
        return ""
    ids = ", ".join(sorted(filter_id(condition) for condition in spec.filters))
    return f"filters: {ids}{' (and every row)' if spec.every_row else ''}"


def qualified(table: TableKey) -> str:
    return f"{quote_ident(table.schema)}.{quote_ident(table.name)}"


@dataclasses.dataclass(frozen=True)
class CaptureOwner:
    """Who will own the capture functions, and what install does to make it so.

    :param role: the NOLOGIN capture role, or ``None`` when the installing
        role keeps them (it may not create or act as that role).
    :param create: install creates the role.
    :param join: install makes the installing role a member of it.
    :param warnings: what the installer should be told, as full sentences.
    """

    role: Optional[str]
    create: bool = False
    join: bool = False
    warnings: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class InstalledTrigger:
    table: TableKey
    kind: str
    name: str
    columns: Optional[frozenset[str]]
    current: bool
    enabled: bool
    #: The app that installed it, or ``None`` for triggers of releases before 0.2.
    app: Optional[str] = None
    #: The filters its own function tests (empty: the shared function).
    filters: frozenset[str] = frozenset()
    every_row: bool = True
    #: Its function, when it is the trigger's own (filtered) one: dropped with it.
    own_function: Optional[str] = None

    @property
    def spec(self) -> TriggerSpec:
        """What it captures, to compare with what the handlers need."""
        return TriggerSpec(self.columns, self.filters, self.every_row)


@dataclasses.dataclass(frozen=True)
class PlanStep:
    """One line of an install plan.

    :param action: ``"create"``, ``"replace"``, ``"keep"``, ``"drop"`` or ``"leave"``.
    :param table: the trigger's table; ``None`` for the event schema itself.
    :param kind: the trigger's kind, or what of the schema the step is about.
    :param detail: why, in a few words (``"columns: email (were: name)"``).
    """

    action: str
    table: Optional[TableKey]
    kind: str
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class InstallPlan:
    """What an install creates, replaces, keeps, drops and leaves, and its DDL.

    ``statements`` is empty when there is nothing to change: the database is
    then not altered at all.
    """

    steps: tuple[PlanStep, ...]
    statements: tuple[str, ...] = ()
    #: For each statement, the table it alters (``None``: the event schema).
    tables: tuple[Optional[TableKey], ...] = ()

    @property
    def changes(self) -> int:
        return sum(step.action in CHANGES for step in self.steps)


@dataclasses.dataclass(frozen=True)
class TriggerChange:
    """One trigger to create, alter or drop so that it matches the handlers.

    :param action: ``"create"``, ``"alter"`` or ``"drop"``.
    :param columns: the update columns the trigger watches after the change
        (``None``: every column); for ``"drop"``, those it watched.
    :param existing_columns: for ``"alter"``, those it watched before.
    :param filters: the compiled ``where=`` conditions it tests after the
        change; for ``"drop"``, those it tested.
    :param every_row: it captures every row (some handler has no filter).
    :param existing_filters: for ``"alter"``, the filters it tested before.
    :param existing_every_row: for ``"alter"``, ``every_row`` before.
    """

    action: str
    table: TableKey
    kind: str
    columns: Optional[frozenset[str]] = None
    existing_columns: Optional[frozenset[str]] = None
    filters: frozenset[str] = frozenset()
    every_row: bool = True
    existing_filters: frozenset[str] = frozenset()
    existing_every_row: bool = True


@dataclasses.dataclass(frozen=True)
class TriggerStatus:
    table: TableKey
    kind: str
    #: "installed", "outdated", "missing" or "unneeded".
    state: str


class TriggerManager:
    """Decides and renders the DDL of one event schema.

    :param schema: the schema holding the event table and capture functions
        (checked by :func:`~flask_pgevents.config.check_schema_name`).
    :param capture_role: the NOLOGIN role that owns the capture functions.
    """

    def __init__(self, schema: str, capture_role: str, app_name: str = "") -> None:
        self.schema = schema
        self.capture_role = capture_role
        #: The app whose handlers' triggers this manager installs.
        self.app_name = app_name

    # Install --------------------------------------------------------------------

    def capture_owner(self, state: CaptureRoleState) -> CaptureOwner:
        """Decide who owns the capture functions, from the installing role's powers."""
        role, installer = self.capture_role, state.installer
        if state.superuser:
            return CaptureOwner(role, create=not state.role_exists, warnings=(
                f"install-triggers runs as the superuser {installer!r}. The capture functions"
                f" are given to the NOLOGIN role {role!r}, which may only write events, but the"
                f" event schema and its tables now belong to a superuser. Install as the role"
                " that owns your tables instead (see 'Security' in the README).",
            ))
        if state.role_exists and state.is_member:
            return CaptureOwner(role)
        if not state.role_exists and state.createrole:
            return CaptureOwner(role, create=True, join=True)
        fix = f"GRANT {quote_ident(role)} TO {quote_ident(installer)};"
        if not state.role_exists:
            fix = f"CREATE ROLE {quote_ident(role)} NOLOGIN; {fix}"
        return CaptureOwner(None, warnings=(
            f"The capture functions stay owned by {installer!r}, which may not"
            f" {'act as' if state.role_exists else 'create'} the NOLOGIN role {role!r}: the owner"
            f" of a watched table could run code as {installer!r} through a column type's cast."
            f" To confine them, have a superuser run '{fix}', then install again.",
        ))

    def schema_changes(self, objects: SchemaObjects, owner: CaptureOwner) -> list[str]:
        """What install must change in the event schema; empty when it is current."""
        changes = []
        if not objects.tables:
            changes.append("create")
        elif SCHEMA_TABLES - objects.tables:
            changes.append(f"tables missing: {', '.join(sorted(SCHEMA_TABLES - objects.tables))}")
        elif set(EVENT_TABLE_UPGRADES) - objects.event_columns:
            changes.append("event table from an earlier release")
        if objects.tables:
            functions = [objects.functions.get(function_name(kind)) for kind in TRIGGER_KINDS]
            if any(f is None or f.source != function_body(self.schema, kind)
                   for f, kind in zip(functions, TRIGGER_KINDS)):
                changes.append("capture functions from another release")
            elif any(f is not None and f.public_execute for f in functions):
                changes.append("capture functions callable by PUBLIC")
            elif owner.role and any(f is not None and f.owner != owner.role for f in functions):
                changes.append(f"capture functions to be owned by {owner.role!r}")
        if owner.create:
            changes.append(f"create the capture role {owner.role!r}")
        return changes

    def schema_sql(self, owner: CaptureOwner, objects: Optional[SchemaObjects] = None) -> list[str]:
        """The event schema and the capture functions, callable by their owner only.

        :param objects: what the schema holds now: tables that exist are not
            created again (``CREATE INDEX IF NOT EXISTS`` would lock the event
            table against every writer until the install commits).
        """
        schema = quote_ident(self.schema)
        statements = []
        if objects is None or SCHEMA_TABLES - objects.tables:
            statements.append(render(
                "create_schema",
                schema=schema,
                event_id_sequence=quote_literal(f'{schema}."event_id_seq"'),
            ))
        if objects is not None and "event" in objects.tables:
            # After create_schema, which made the tables an old release lacked.
            statements += [
                render(block, schema=schema)
                for column, block in EVENT_TABLE_UPGRADES.items() if column not in objects.event_columns
            ]
        role = quote_ident(owner.role) if owner.role else ""
        if owner.create:
            statements.append(render("create_capture_role", role=role))
        if owner.join:
            statements.append(render("join_capture_role", role=role))
        if owner.role:
            statements.append(render("grant_capture_role", schema=schema, role=role))
        for kind in TRIGGER_KINDS:
            statements += self.function_sql(function_name(kind), function_body(self.schema, kind), owner)
        if owner.role:
            statements.append(render("end_capture_grants", schema=schema, role=role))
        return statements

    def function_sql(self, function: str, body: str, owner: CaptureOwner) -> list[str]:
        """Create or replace a capture function, callable by its owner only."""
        schema = quote_ident(self.schema)
        statements = [
            render("capture_function_header", schema=schema, function=function) + body + "$pgevents$;",
            render("revoke_function", schema=schema, function=function),
        ]
        if owner.role:
            role = quote_ident(owner.role)
            statements.append(render("own_function", schema=schema, function=function, role=role))
        return statements

    def trigger_sql(
        self, table: TableKey, kind: str, spec: TriggerSpec, owner: CaptureOwner = CaptureOwner(None)
    ) -> str:
        """Create or replace one trigger; with filters, its own function first,
        given to ``owner`` as the shared ones are (see :meth:`schema_sql`)."""
        if not spec.filtered:
            return self._create_trigger_sql(table, kind, spec.columns, function_name(kind))
        function = function_name(kind, table)
        statements = self.function_sql(function, function_body(self.schema, kind, spec, table), owner)
        if owner.role:
            names = {"schema": quote_ident(self.schema), "role": quote_ident(owner.role)}
            # The capture role may take a function only while it may create in the schema.
            statements = [render("grant_capture_create", **names), *statements, render("end_capture_grants", **names)]
        statements.append(self._create_trigger_sql(table, kind, spec.columns, function))
        return "\n".join(statements)

    def _create_trigger_sql(
        self, table: TableKey, kind: str, columns: Optional[frozenset[str]], function: str
    ) -> str:
        return render(
            "create_trigger",
            trigger=quote_ident(trigger_name(self.schema, kind)),
            table=qualified(table),
            op=op_of(kind).upper(),
            transition_tables=TRANSITION_TABLES[op_of(kind)],
            schema=quote_ident(self.schema),
            function=function,
            arguments=", ".join(quote_literal(c) for c in sorted(columns or ())),
            app=quote_literal(APP_COMMENT_PREFIX + self.app_name),
            tag=dollar_tag(qualified(table), self.app_name),
        )

    def drop_trigger_sql(self, trigger: InstalledTrigger) -> str:
        """Drop an installed trigger by the name it has (which may not be the usual
        one), and its own function if it has one."""
        statement = render("drop_trigger", trigger=quote_ident(trigger.name), table=qualified(trigger.table))
        if trigger.own_function is None:
            return statement
        return statement + "\n" + render(
            "drop_own_function", schema=quote_ident(self.schema), function=trigger.own_function
        )

    def lock_sql(self) -> str:
        return render("lock_install", lock=quote_literal(f"pgevents install {self.schema}"))

    def plan(
        self,
        needed: TriggerSet,
        installed: Sequence[InstalledTrigger],
        objects: SchemaObjects,
        owner: CaptureOwner,
        *,
        prune: bool = False,
    ) -> InstallPlan:
        """Compare what the handlers need with what is installed, and say what to do.

        Triggers another app installed in the same schema are left alone; this
        app's unneeded ones are dropped only with ``prune``. Nothing current is
        touched, so an install with nothing to change runs no DDL.

        :raises TriggerOwnershipError: if another app's trigger in this schema
            is one this app needs: apps that share a schema share its events.
        """
        steps: list[PlanStep] = []
        statements: list[str] = []
        tables: list[Optional[TableKey]] = []
        schema_changes = self.schema_changes(objects, owner)
        if schema_changes:
            action = "create" if not objects.tables else "replace"
            detail = "; ".join(change for change in schema_changes if change != "create")
            steps.append(PlanStep(action, None, "event schema", detail))
            schema_statements = self.schema_sql(owner, objects)
            statements += schema_statements
            tables += [None] * len(schema_statements)
        by_key: dict[TriggerKey, InstalledTrigger] = {}
        for copy in installed:
            if copy.name == trigger_name(self.schema, copy.kind):
                by_key[(copy.table, copy.kind)] = copy
            elif (copy.table, copy.kind) in needed:
                # A copy under another name would capture every change twice.
                steps.append(PlanStep("drop", copy.table, copy.kind, f"a copy named {copy.name!r}"))
                statements.append(self.drop_trigger_sql(copy))
                tables.append(copy.table)
        for key in sorted(set(needed) | set(by_key), key=trigger_order):
            table, kind = key
            trig = by_key.get(key)
            foreign = trig is not None and trig.app is not None and trig.app != self.app_name
            if key not in needed:
                assert trig is not None
                if foreign:
                    steps.append(PlanStep("leave", table, kind, f"installed for app {trig.app!r}"))
                elif prune:
                    steps.append(PlanStep("drop", table, kind, "no handler needs it"))
                    statements.append(self.drop_trigger_sql(trig))
                    tables.append(table)
                else:
                    steps.append(PlanStep("leave", table, kind, "no handler needs it; --prune drops it"))
                continue
            if foreign:
                assert trig is not None
                raise self.ownership_error(trig)
            spec = needed[key]
            columns = spec.columns
            watched = "; ".join(part for part in (
                f"columns: {', '.join(sorted(columns))}" if columns else "", describe_filters(spec)
            ) if part)
            if trig is None:
                steps.append(PlanStep("create", table, kind, watched))
            elif trig.spec == spec and trig.enabled and (trig.current or trig.own_function is None):
                steps.append(PlanStep("keep", table, kind, watched))
                continue
            else:
                if trig.columns != columns:
                    was = f"watched {', '.join(sorted(trig.columns))}" if trig.columns else "watched every column"
                elif trig.spec != spec:
                    was = describe_filters(trig.spec) or "not filtered"
                else:
                    was = "disabled" if not trig.enabled else "from another release"
                steps.append(PlanStep("replace", table, kind, f"{watched or 'every column'}; was {was}"))
            statements.append(self.trigger_sql(table, kind, spec, owner))
            if trig is not None and trig.own_function is not None and not spec.filtered:
                statements[-1] += "\n" + render(
                    "drop_own_function", schema=quote_ident(self.schema), function=trig.own_function
                )
            tables.append(table)
        return InstallPlan(tuple(steps), tuple(statements), tuple(tables))

    def ownership_error(self, trig: InstalledTrigger) -> TriggerOwnershipError:
        """The error for another app's trigger that this app needs too."""
        return TriggerOwnershipError(
            f"The {trig.kind} trigger on {str(trig.table)!r} in schema {self.schema!r} was installed"
            f" for the app {trig.app!r}, and this app ({self.app_name!r}) needs it too. Apps"
            " that share an event schema share its events, so each would miss the other's:"
            " give this app its own PGEVENTS_SCHEMA. If it is the same app under a new name,"
            f" set PGEVENTS_APP_NAME = {trig.app!r}."
        )

    def drift(self, needed: TriggerSet, installed: Sequence[InstalledTrigger]) -> list[TriggerChange]:
        """The trigger changes that bring this app's installed triggers in line
        with the handlers: what an autogenerated migration writes.

        Unlike :meth:`plan`, this app's triggers that no handler needs are
        dropped: a migration is reviewed before it runs, and its downgrade
        puts them back. Another app's triggers are left alone. Capture
        functions of another release are no drift: every Alembic operation that
        installs a trigger brings them up to date.

        :raises TriggerOwnershipError: if another app's trigger in this schema
            is one this app needs.
        """
        by_key: dict[TriggerKey, InstalledTrigger] = {}
        for copy in installed:
            key = (copy.table, copy.kind)
            if copy.app is not None and copy.app != self.app_name:
                if key in needed:
                    raise self.ownership_error(copy)
                continue
            if key not in by_key or copy.name == trigger_name(self.schema, copy.kind):
                by_key[key] = copy
        changes = []
        for key in sorted(set(needed) | set(by_key), key=trigger_order):
            table, kind = key
            trig = by_key.get(key)
            if trig is None:
                spec = needed[key]
                changes.append(TriggerChange(
                    "create", table, kind, spec.columns, filters=spec.filters, every_row=spec.every_row
                ))
            elif key not in needed:
                changes.append(TriggerChange(
                    "drop", table, kind, trig.columns, filters=trig.filters, every_row=trig.every_row
                ))
            elif trig.spec != needed[key] or not trig.enabled:
                spec = needed[key]
                changes.append(TriggerChange(
                    "alter", table, kind, spec.columns, trig.columns, spec.filters, spec.every_row,
                    trig.filters, trig.every_row,
                ))
        return changes

    def uninstall_plan(self, installed: Sequence[InstalledTrigger], *, drop_schema: bool = False) -> InstallPlan:
        """Drop this app's triggers (and those of no app), and the whole schema if asked."""
        own = self.own(installed)
        steps = [PlanStep("drop", t.table, t.kind) for t in own]
        statements = [self.drop_trigger_sql(t) for t in own]
        tables: list[Optional[TableKey]] = [t.table for t in own]
        if drop_schema:
            steps.append(PlanStep("drop", None, "event schema", "with every stored event"))
            statements.append(render("drop_schema", schema=quote_ident(self.schema)))
            tables.append(None)
        return InstallPlan(tuple(steps), tuple(statements), tuple(tables))

    def own(self, installed: Sequence[InstalledTrigger]) -> list[InstalledTrigger]:
        """The triggers of this app, and those no app claims (from earlier releases)."""
        return [t for t in installed if t.app is None or t.app == self.app_name]

    def check_tables(self, needed: TriggerSet, columns_of: Callable[[TableKey], set[str]]) -> None:
        """Fail clearly, before any DDL, for a missing table or a watched column it lacks.

        :param columns_of: the columns of a table, empty when it does not exist.
        :raises MissingTableError, UnknownColumnError:
        """
        existing_by_table: dict[TableKey, set[str]] = {}
        for table, _ in sorted(needed, key=trigger_order):
            if table not in existing_by_table:
                existing_by_table[table] = columns_of(table)
        missing = [str(table) for table, existing in existing_by_table.items() if not existing]
        if missing:
            names = ", ".join(map(repr, missing))
            raise MissingTableError(
                f"{'Tables' if len(missing) > 1 else 'Table'} {names} {'do' if len(missing) > 1 else 'does'}"
                " not exist, so no trigger can be installed on"
                f" {'them' if len(missing) > 1 else 'it'}. Create {'them' if len(missing) > 1 else 'it'}"
                " first (db.create_all() or a migration), or fix the handlers' targets."
                " Nothing was installed."
            )
        for (table, kind), spec in sorted(needed.items(), key=lambda item: trigger_order(item[0])):
            existing = existing_by_table[table]
            unknown = sorted((spec.columns or frozenset()) - existing)
            if unknown:
                raise UnknownColumnError(
                    f"No column {', '.join(map(repr, unknown))} in table {str(table)!r},"
                    f" watched by an 'after_{op_of(kind)}' handler. Expected some of"
                    f" {', '.join(map(repr, sorted(existing)))}."
                )

    def check_filters(
        self, needed: TriggerSet, plan: InstallPlan, error_of: Callable[[TableKey, str, str], Optional[str]]
    ) -> None:
        """Fail clearly, before any DDL, for a ``where=`` filter its capture
        function could not run: installed, it would fail every write to the table.

        Only the triggers ``plan`` creates or replaces are checked, so that an
        install with nothing to change touches no table.

        :param error_of: why PostgreSQL cannot run a condition on a table's
            rows of an op; ``None`` if it can.
        :raises InvalidFilterError:
        """
        changed = {(step.table, step.kind) for step in plan.steps if step.action in ("create", "replace")}
        for (table, kind), spec in sorted(needed.items(), key=lambda item: trigger_order(item[0])):
            if (table, kind) not in changed:
                continue
            for condition in sorted(spec.filters):
                error = error_of(table, op_of(kind), condition)
                if error is not None:
                    raise InvalidFilterError(
                        f"The where= filter {condition!r} of the 'after_{op_of(kind)}' handlers of"
                        f" {str(table)!r} cannot run in its capture function: {error}. Installed, it would"
                        " fail every write to the table, so nothing was installed. Capture runs with"
                        " search_path = pg_catalog, pg_temp: name a function or type of another schema"
                        " with its schema (sa.func.myschema.f(...), sa.Enum(..., schema='public'))."
                    )

    # Compare --------------------------------------------------------------------

    def installed(self, rows: Sequence[TriggerRow]) -> list[InstalledTrigger]:
        """The capture triggers among the catalog's rows, and whether each is current."""
        found = []
        for row in rows:
            kind = row.function[len("capture_"):] if row.function.startswith("capture_") else ""
            kind, separator, _ = kind.partition(FILTERED_FUNCTION_SEPARATOR)
            if kind not in TRIGGER_KINDS:
                continue
            columns = frozenset(row.arguments) or None
            filters, every_row, own_function = frozenset[str](), True, None
            if separator:
                own_function = row.function
                recorded = read_filters_marker(row.source)
                if recorded is not None:
                    filters, every_row = recorded
            spec = TriggerSpec(columns, filters, every_row)
            current = row.name == trigger_name(self.schema, kind) and (
                row.function == function_name(kind, row.table if separator else None)
                and row.source == function_body(self.schema, kind, spec, row.table)
            )
            comment = row.comment or ""
            found.append(InstalledTrigger(
                row.table, kind, row.name, columns, current, row.enabled,
                comment[len(APP_COMMENT_PREFIX):] if comment.startswith(APP_COMMENT_PREFIX) else None,
                filters, every_row, own_function,
            ))
        return found

    def status(self, needed: TriggerSet, installed: Sequence[InstalledTrigger]) -> list[TriggerStatus]:
        """Compare needed triggers with installed ones."""
        by_key: dict[TriggerKey, InstalledTrigger] = {(t.table, t.kind): t for t in installed}
        report = []
        for key in sorted(set(needed) | set(by_key), key=trigger_order):
            trig = by_key.get(key)
            if key not in needed:
                state = "unneeded"
            elif trig is None:
                state = "missing"
            elif not trig.current or trig.spec != needed[key] or not trig.enabled:
                state = "outdated"
            else:
                state = "installed"
            report.append(TriggerStatus(key[0], key[1], state))
        return report

    # Grants ---------------------------------------------------------------------

    def listener_grants_sql(
        self, role: str, *, role_exists: bool, schema_exists: bool, server_version: int, broadcast: bool
    ) -> list[str]:
        """Exactly the privileges a role that only listens needs.

        :param broadcast: the role also reads broadcast changes.
        :raises UnknownRoleError: if the role does not exist.
        :raises MissingTableError: if the event schema is not installed.
        """
        if not role_exists:
            raise UnknownRoleError(
                f"Role {role!r} does not exist. Create it first, for example with"
                f" 'CREATE ROLE {quote_ident(role)} LOGIN PASSWORD ...', then grant again."
            )
        if not schema_exists:
            raise MissingTableError(
                f"The event schema {self.schema!r} is not installed, so there is nothing to"
                " grant yet. Run 'flask pgevents install-triggers' first."
            )
        names = {"schema": quote_ident(self.schema), "role": quote_ident(role)}
        statements = [render("listener_grants", **names)]
        if broadcast:
            statements.append(render("listener_broadcast_grants", **names))
        if server_version >= 170000:
            statements.append(render("listener_vacuum_grant", **names))
        return statements
