"""Install, uninstall and compare the event schema and the capture triggers.

:class:`TriggerManager` decides and renders the DDL; it runs no query. What
it needs to know of the database (installed triggers, table columns, roles)
comes from :class:`~flask_pgevents.store.Store`, and the statements it
returns are run by the store, in one transaction.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

from .config import trigger_name
from .errors import MissingTableError, UnknownColumnError, UnknownRoleError
from .registry import TRIGGER_KINDS, TableKey, TriggerKey, TriggerSet, is_broadcast, op_of, trigger_order
from .sql import quote_ident, quote_literal, render
from .store import CaptureRoleState, TriggerRow

#: Transition tables each op's trigger declares.
TRANSITION_TABLES = {
    "insert": "NEW TABLE AS pgevents_new",
    "update": "OLD TABLE AS pgevents_old NEW TABLE AS pgevents_new",
    "delete": "OLD TABLE AS pgevents_old",
}


def function_name(kind: str) -> str:
    return f"capture_{kind}"


def function_body(schema: str, kind: str) -> str:
    """The exact source PostgreSQL stores for a capture function (``prosrc``)."""
    quoted, op = quote_ident(schema), op_of(kind)
    fragments = {
        "schema": quoted,
        "target": '"broadcast"' if is_broadcast(kind) else '"event"',
        "guard": "\n" + render("broadcast_guard", schema=quoted) if is_broadcast(kind) else "",
        "wake": render("capture_wake", schema=quoted, channel=quote_literal(schema)),
    }
    if op == "update":
        return "\n" + render("capture_update", **fragments) + "\n"
    side = "new" if op == "insert" else "old"
    return "\n" + render(
        "capture_rows", column=side, op=quote_literal(op), rows=f"pgevents_{side}", **fragments
    ) + "\n"


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

    def __init__(self, schema: str, capture_role: str) -> None:
        self.schema = schema
        self.capture_role = capture_role

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

    def schema_sql(self, owner: CaptureOwner) -> list[str]:
        """The event schema and the capture functions, callable by their owner only."""
        schema = quote_ident(self.schema)
        statements = [
            render(
                "create_schema",
                schema=schema,
                event_id_sequence=quote_literal(f'{schema}."event_id_seq"'),
            )
        ]
        role = quote_ident(owner.role) if owner.role else ""
        if owner.create:
            statements.append(render("create_capture_role", role=role))
        if owner.join:
            statements.append(render("join_capture_role", role=role))
        if owner.role:
            statements.append(render("grant_capture_role", schema=schema, role=role))
        for kind in TRIGGER_KINDS:
            function = function_name(kind)
            statements.append(
                render("capture_function_header", schema=schema, function=function)
                + function_body(self.schema, kind)
                + "$pgevents$;"
            )
            statements.append(render("revoke_function", schema=schema, function=function))
            if owner.role:
                statements.append(render("own_function", schema=schema, function=function, role=role))
        if owner.role:
            statements.append(render("end_capture_grants", schema=schema, role=role))
        return statements

    def trigger_sql(self, table: TableKey, kind: str, columns: Optional[frozenset[str]]) -> str:
        return render(
            "create_trigger",
            trigger=quote_ident(trigger_name(self.schema, kind)),
            table=qualified(table),
            operation=op_of(kind).upper(),
            transition_tables=TRANSITION_TABLES[op_of(kind)],
            schema=quote_ident(self.schema),
            function=function_name(kind),
            arguments=", ".join(quote_literal(c) for c in sorted(columns or ())),
        )

    def drop_trigger_sql(self, trigger: InstalledTrigger) -> str:
        """Drop an installed trigger by the name it has (which may not be the usual one)."""
        return render("drop_trigger", trigger=quote_ident(trigger.name), table=qualified(trigger.table))

    def lock_sql(self) -> str:
        return render("lock_install", lock=quote_literal(f"pgevents install {self.schema}"))

    def install_sql(
        self, needed: TriggerSet, installed: Sequence[InstalledTrigger], owner: CaptureOwner
    ) -> list[str]:
        """Statements that make the database hold exactly the needed triggers."""
        statements = [self.lock_sql(), *self.schema_sql(owner)]
        for trig in installed:
            # Unneeded, or a copy under another name that would capture twice.
            if (trig.table, trig.kind) not in needed or trig.name != trigger_name(self.schema, trig.kind):
                statements.append(self.drop_trigger_sql(trig))
        for (table, kind), columns in sorted(needed.items(), key=lambda item: trigger_order(item[0])):
            statements.append(self.trigger_sql(table, kind, columns))
        return statements

    def uninstall_sql(self, installed: Sequence[InstalledTrigger], *, drop_schema: bool = False) -> list[str]:
        statements = [self.lock_sql(), *(self.drop_trigger_sql(t) for t in installed)]
        if drop_schema:
            statements.append(render("drop_schema", schema=quote_ident(self.schema)))
        return statements

    def check_tables(self, needed: TriggerSet, columns_of: Callable[[TableKey], set[str]]) -> None:
        """Fail clearly, before any DDL, for a missing table or a watched column it lacks.

        :param columns_of: the columns of a table, empty when it does not exist.
        :raises MissingTableError, UnknownColumnError:
        """
        existing_by_table: dict[TableKey, set[str]] = {}
        for (table, kind), watched in sorted(needed.items(), key=lambda item: trigger_order(item[0])):
            if table not in existing_by_table:
                existing_by_table[table] = columns_of(table)
            existing = existing_by_table[table]
            if not existing:
                raise MissingTableError(
                    f"Table {str(table)!r} does not exist, so no trigger can be installed"
                    " on it. Create it first (db.create_all() or a migration), or fix the"
                    " handler's target."
                )
            unknown = sorted((watched or frozenset()) - existing)
            if unknown:
                raise UnknownColumnError(
                    f"No column {', '.join(map(repr, unknown))} in table {str(table)!r},"
                    f" watched by an 'after_{op_of(kind)}' handler. Expected some of"
                    f" {', '.join(map(repr, sorted(existing)))}."
                )

    # Compare --------------------------------------------------------------------

    def installed(self, rows: Sequence[TriggerRow]) -> list[InstalledTrigger]:
        """The capture triggers among the catalog's rows, and whether each is current."""
        found = []
        for row in rows:
            kind = row.function[len("capture_"):] if row.function.startswith("capture_") else ""
            if kind not in TRIGGER_KINDS:
                continue
            current = row.name == trigger_name(self.schema, kind) and row.source == function_body(self.schema, kind)
            found.append(InstalledTrigger(
                row.table, kind, row.name, frozenset(row.arguments) or None, current, row.enabled
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
            elif not trig.current or trig.columns != needed[key] or not trig.enabled:
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
