"""triggers.py: who owns the capture functions, the DDL install and uninstall run,
how installed triggers compare with what the handlers need, and listener grants.

TriggerManager runs no query: what it knows of the database comes in as
store rows (CaptureRoleState, TriggerRow), built here by hand.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional

import pytest
from conftest import raises

from flask_pgevents import InvalidFilterError, MissingTableError, UnknownColumnError, UnknownRoleError
from flask_pgevents.errors import TriggerOwnershipError
from flask_pgevents.registry import TRIGGER_KINDS, TableKey, TriggerSpec
from flask_pgevents.sql import quote_ident, quote_literal, render
from flask_pgevents.store import CaptureFunction, CaptureRoleState, SchemaObjects, TriggerRow
from flask_pgevents.triggers import (
    EVENT_TABLE_UPGRADES,
    SCHEMA_TABLES,
    SUPPRESS_SETTING,
    CaptureOwner,
    InstalledTrigger,
    InstallPlan,
    PlanStep,
    TriggerManager,
    TriggerStatus,
    function_body,
    function_name,
)

USER = TableKey("public", "user")
SPEC = TriggerSpec()  # every column, no filter
LEDGER = TableKey("public", "ledger")
ENTRY = TableKey("audit", "entry")
MANAGER = TriggerManager("pgevents", "pgevents_capture", "shop")
OWNED = CaptureOwner("pgevents_capture")
KEPT = CaptureOwner(None)


def role_state(
    *, superuser: bool = False, createrole: bool = False, role_exists: bool = False, is_member: bool = False
) -> CaptureRoleState:
    return CaptureRoleState(
        installer="app", superuser=superuser, createrole=createrole, role_exists=role_exists, is_member=is_member
    )


def row(
    table: TableKey, kind: str, *, name: Optional[str] = None, source: Optional[str] = None,
    arguments: tuple[str, ...] = (), enabled: bool = True, schema: str = "pgevents",
    comment: Optional[str] = "flask-pgevents app: shop",
) -> TriggerRow:
    """A catalog row of a trigger as install-triggers creates it, unless told otherwise."""
    return TriggerRow(
        table=table,
        name=f"{schema}_{kind}" if name is None else name,
        function=function_name(kind),
        arguments=arguments,
        source=function_body(schema, kind) if source is None else source,
        enabled=enabled,
        comment=comment,
    )


def installed(
    table: TableKey, kind: str, columns: Optional[frozenset[str]] = None, *, current: bool = True,
    enabled: bool = True, app: Optional[str] = "shop",
) -> InstalledTrigger:
    return InstalledTrigger(table, kind, f"pgevents_{kind}", columns, current, enabled, app)


def current_objects(**functions: CaptureFunction) -> SchemaObjects:
    """An event schema as this release installs it, with ``functions`` overriding some."""
    return SchemaObjects(
        tables=SCHEMA_TABLES,
        event_columns=frozenset({"id", "op", "attempt"}) | frozenset(EVENT_TABLE_UPGRADES),
        functions={
            function_name(kind): functions.get(
                function_name(kind), CaptureFunction(function_body("pgevents", kind), "pgevents_capture", False)
            )
            for kind in TRIGGER_KINDS
        },
    )


# Who owns the capture functions -------------------------------------------------------


SUPERUSER_WARNING = (
    "install-triggers runs as the superuser 'app'. The capture functions are given to the"
    " NOLOGIN role 'pgevents_capture', which may only write events, but the event schema and"
    " its tables now belong to a superuser. Install as the role that owns your tables instead"
    " (see 'Security' in the README)."
)


@pytest.mark.parametrize("role_exists", [True, False])
def test_a_superuser_gives_the_functions_to_the_capture_role_and_is_warned(role_exists):
    owner = MANAGER.capture_owner(role_state(superuser=True, role_exists=role_exists, is_member=role_exists))
    assert owner == CaptureOwner(
        "pgevents_capture", create=not role_exists, join=False, warnings=(SUPERUSER_WARNING,)
    )


@pytest.mark.parametrize("createrole", [True, False])
def test_a_member_of_the_existing_capture_role_gives_it_the_functions_silently(createrole):
    owner = MANAGER.capture_owner(role_state(createrole=createrole, role_exists=True, is_member=True))
    assert owner == CaptureOwner("pgevents_capture", create=False, join=False, warnings=())


def test_a_createrole_installer_creates_the_capture_role_and_joins_it():
    owner = MANAGER.capture_owner(role_state(createrole=True))
    assert owner == CaptureOwner("pgevents_capture", create=True, join=True, warnings=())


def test_an_installer_that_may_not_create_the_role_keeps_the_functions_and_is_told_the_fix():
    owner = MANAGER.capture_owner(role_state())
    assert owner == CaptureOwner(None, warnings=(
        "The capture functions stay owned by 'app', which may not create the NOLOGIN role"
        " 'pgevents_capture': the owner of a watched table could run code as 'app' through a"
        " column type's cast. To confine them, have a superuser run 'CREATE ROLE"
        ' "pgevents_capture" NOLOGIN; GRANT "pgevents_capture" TO "app";\', then install again.',
    ))


@pytest.mark.parametrize("createrole", [True, False])
def test_an_installer_that_may_not_act_as_the_existing_role_keeps_the_functions_and_is_told_the_fix(
    createrole,
):
    owner = MANAGER.capture_owner(role_state(createrole=createrole, role_exists=True))
    assert owner == CaptureOwner(None, warnings=(
        "The capture functions stay owned by 'app', which may not act as the NOLOGIN role"
        " 'pgevents_capture': the owner of a watched table could run code as 'app' through a"
        " column type's cast. To confine them, have a superuser run 'GRANT \"pgevents_capture\""
        ' TO "app";\', then install again.',
    ))


def test_the_fix_statement_quotes_the_role_names():
    manager = TriggerManager("pgevents", 'Capture "Role"')
    state = CaptureRoleState(installer="App Owner", superuser=False, createrole=False, role_exists=False,
                             is_member=False)
    [warning] = manager.capture_owner(state).warnings
    assert (
        "have a superuser run 'CREATE ROLE \"Capture \"\"Role\"\"\" NOLOGIN; GRANT \"Capture \"\"Role\"\"\""
        " TO \"App Owner\";', then install again." in warning
    )


# The event schema and the capture functions ------------------------------------------------


def function_statements(statements: list[str]) -> dict[str, str]:
    """The body of each CREATE FUNCTION statement, by function name."""
    bodies = {}
    for statement in statements:
        match = re.fullmatch(
            r'CREATE OR REPLACE FUNCTION "pgevents"\.(\w+)\(\) RETURNS trigger\n.*?AS \$pgevents\$(.*)\$pgevents\$;',
            statement, re.DOTALL,
        )
        if match:
            bodies[match[1]] = match[2]
    return bodies


@pytest.mark.parametrize("owner", [OWNED, KEPT, CaptureOwner("pgevents_capture", create=True, join=True)])
def test_each_capture_function_is_created_with_the_source_that_installed_compares(owner):
    statements = MANAGER.schema_sql(owner)
    assert function_statements(statements) == {
        function_name(kind): function_body("pgevents", kind) for kind in TRIGGER_KINDS
    }


@pytest.mark.parametrize("owner", [OWNED, KEPT])
def test_no_capture_function_may_be_executed_by_public(owner):
    statements = MANAGER.schema_sql(owner)
    revokes = [s for s in statements if s.startswith("REVOKE ALL ON FUNCTION")]
    assert revokes == [
        f'REVOKE ALL ON FUNCTION "pgevents".{function_name(kind)}() FROM PUBLIC;' for kind in TRIGGER_KINDS
    ]
    # Each right after its function is created.
    for kind in TRIGGER_KINDS:
        revoke = statements.index(f'REVOKE ALL ON FUNCTION "pgevents".{function_name(kind)}() FROM PUBLIC;')
        assert statements[revoke - 1].startswith(f'CREATE OR REPLACE FUNCTION "pgevents".{function_name(kind)}()')


def test_the_capture_role_owns_the_functions_and_may_only_write_events():
    statements = MANAGER.schema_sql(OWNED)
    owners = [s for s in statements if s.startswith("ALTER FUNCTION")]
    assert owners == [
        f'ALTER FUNCTION "pgevents".{function_name(kind)}() OWNER TO "pgevents_capture";'
        for kind in TRIGGER_KINDS
    ]
    grants = statements.index(render("grant_capture_role", schema='"pgevents"', role='"pgevents_capture"'))
    # Granted before it takes the functions (it needs CREATE on the schema), revoked once it has.
    assert grants < min(statements.index(s) for s in owners)
    assert statements[-1] == 'REVOKE CREATE ON SCHEMA "pgevents" FROM "pgevents_capture";'
    assert statements[0].startswith('CREATE SCHEMA IF NOT EXISTS "pgevents";')
    assert not any("CREATE ROLE" in s or "TO CURRENT_USER" in s for s in statements)


def test_without_a_capture_role_the_installer_keeps_the_functions():
    statements = MANAGER.schema_sql(KEPT)
    assert len(statements) == 1 + 2 * len(TRIGGER_KINDS)
    assert not any(
        s.startswith(("ALTER FUNCTION", "GRANT", "REVOKE CREATE")) or "pgevents_capture" in s for s in statements
    )


def test_a_capture_role_to_create_is_created_then_joined_before_it_is_granted_anything():
    statements = MANAGER.schema_sql(CaptureOwner("pgevents_capture", create=True, join=True))
    assert statements[1:4] == [
        render("create_capture_role", role='"pgevents_capture"'),
        'GRANT "pgevents_capture" TO CURRENT_USER;',
        render("grant_capture_role", schema='"pgevents"', role='"pgevents_capture"'),
    ]
    assert 'CREATE ROLE "pgevents_capture" NOLOGIN;' in statements[1]
    superuser = MANAGER.schema_sql(CaptureOwner("pgevents_capture", create=True))
    assert "TO CURRENT_USER" not in "".join(superuser)


def test_the_event_schema_name_is_quoted_everywhere():
    manager = TriggerManager('My "Events"', "capture")
    sql = "\n".join(manager.schema_sql(CaptureOwner("capture")))
    assert 'CREATE SCHEMA IF NOT EXISTS "My ""Events""";' in sql
    assert 'nextval(\'"My ""Events"""."event_id_seq"\'::regclass)' in sql
    assert "pgevents\"" not in sql.replace("$pgevents$", "")


@pytest.mark.parametrize("kind", TRIGGER_KINDS)
def test_capture_bodies_write_to_their_table_and_wake_listeners_on_the_schema_channel(kind):
    body = function_body("pgevents", kind)
    table = '"pgevents"."broadcast"' if kind.startswith("broadcast_") else '"pgevents"."event"'
    other = '"pgevents"."event"' if kind.startswith("broadcast_") else '"pgevents"."broadcast"'
    assert body.startswith("\n") and body.endswith("\n")
    assert f"INSERT INTO {table} (" in body and f"INSERT INTO {other}" not in body
    assert f"'{kind.replace('broadcast_', '')}'" in body  # the op stored
    assert "PERFORM pg_notify('pgevents', '');" in body


@pytest.mark.parametrize("kind", TRIGGER_KINDS)
def test_only_broadcast_bodies_skip_writing_while_no_listener_is_registered(kind):
    guard = 'IF NOT EXISTS (SELECT FROM "pgevents"."listener") THEN\n        RETURN NULL;'
    body = function_body("pgevents", kind)
    if kind.startswith("broadcast_"):
        assert body.index(guard) < body.index("INSERT INTO")
    else:
        assert guard not in body


@pytest.mark.parametrize("kind", TRIGGER_KINDS)
@pytest.mark.parametrize("schema", ["pgevents", "billing"])
def test_every_body_first_skips_a_transaction_that_suppressed_capture(kind, schema):
    # One setting for every schema, read once per statement, before anything else.
    check = (
        "IF pg_catalog.lower(pg_catalog.current_setting('pgevents.suppress', true))"
        " IN ('on', 'true', 'yes', '1') THEN\n        RETURN NULL;"
    )
    body = function_body(schema, kind)
    assert SUPPRESS_SETTING == "pgevents.suppress"
    assert body.count(check) == 1
    assert body.index("BEGIN") < body.index(check) < body.index("INSERT INTO")
    if kind.startswith("broadcast_"):
        assert body.index(check) < body.index("IF NOT EXISTS")


@pytest.mark.parametrize("schema", ["pg\\events", "it's", 'a"b'])
def test_capture_bodies_quote_the_channel_as_a_literal_and_the_schema_as_an_identifier(schema):
    body = function_body(schema, "insert")
    assert f"pg_notify({quote_literal(schema)}, '')" in body
    assert f"INSERT INTO {quote_ident(schema)}.\"event\"" in body
    assert "$pgevents$" not in body


# Triggers --------------------------------------------------------------------------


def comment_block(trigger: str, table: str, comment: str) -> list[str]:
    return [
        "DO $pgevents$",
        "BEGIN",
        f"    COMMENT ON TRIGGER {trigger} ON {table} IS {comment};",
        "EXCEPTION WHEN insufficient_privilege THEN",
        "    NULL;",
        "END",
        "$pgevents$;",
    ]


def test_a_trigger_is_replaced_by_name_with_its_transition_tables_watched_columns_and_app():
    assert MANAGER.trigger_sql(USER, "insert", SPEC).splitlines() == [
        'DROP TRIGGER IF EXISTS "pgevents_insert" ON "public"."user";',
        'CREATE TRIGGER "pgevents_insert" AFTER INSERT ON "public"."user"',
        "REFERENCING NEW TABLE AS pgevents_new",
        'FOR EACH STATEMENT EXECUTE FUNCTION "pgevents".capture_insert();',
        *comment_block('"pgevents_insert"', '"public"."user"', "'flask-pgevents app: shop'"),
    ]
    assert MANAGER.trigger_sql(ENTRY, "update", TriggerSpec(frozenset({"name", "email"}))).splitlines()[:4] == [
        'DROP TRIGGER IF EXISTS "pgevents_update" ON "audit"."entry";',
        'CREATE TRIGGER "pgevents_update" AFTER UPDATE ON "audit"."entry"',
        "REFERENCING OLD TABLE AS pgevents_old NEW TABLE AS pgevents_new",
        "FOR EACH STATEMENT EXECUTE FUNCTION \"pgevents\".capture_update('email', 'name');",
    ]
    odd_table = TableKey('Odd "Schema"', "it's")
    odd = TriggerManager("pgevents", "c", "it's").trigger_sql(odd_table, "broadcast_delete", SPEC)
    assert odd.splitlines() == [
        'DROP TRIGGER IF EXISTS "pgevents_broadcast_delete" ON "Odd ""Schema"""."it\'s";',
        'CREATE TRIGGER "pgevents_broadcast_delete" AFTER DELETE ON "Odd ""Schema"""."it\'s"',
        "REFERENCING OLD TABLE AS pgevents_old",
        'FOR EACH STATEMENT EXECUTE FUNCTION "pgevents".capture_broadcast_delete();',
        *comment_block('"pgevents_broadcast_delete"', '"Odd ""Schema"""."it\'s"', "'flask-pgevents app: it''s'"),
    ]


def test_watched_column_names_are_quoted_as_literals():
    sql = MANAGER.trigger_sql(USER, "update", TriggerSpec(frozenset({"it's", "back\\slash"})))
    assert "capture_update(E'back\\\\slash', 'it''s');" in sql


def test_a_fresh_database_gets_the_schema_and_every_needed_trigger_in_order():
    needed = {
        (USER, "update"): TriggerSpec(frozenset({"email"})),
        (ENTRY, "insert"): SPEC,
        (USER, "broadcast_insert"): SPEC,
    }
    plan = MANAGER.plan(needed, [], SchemaObjects(), OWNED)
    assert plan.steps == (
        PlanStep("create", None, "event schema"),
        PlanStep("create", ENTRY, "insert"),
        PlanStep("create", USER, "broadcast_insert"),
        PlanStep("create", USER, "update", "columns: email"),
    )
    schema_sql = MANAGER.schema_sql(OWNED)
    assert plan.statements == (
        *schema_sql,
        MANAGER.trigger_sql(ENTRY, "insert", SPEC),
        MANAGER.trigger_sql(USER, "broadcast_insert", SPEC),
        MANAGER.trigger_sql(USER, "update", TriggerSpec(frozenset({"email"}))),
    )
    assert plan.tables == (*[None] * len(schema_sql), ENTRY, USER, USER)
    assert plan.changes == 4


def test_nothing_to_change_is_zero_changes_and_no_statement():
    needed = {(USER, "insert"): SPEC, (USER, "update"): TriggerSpec(frozenset({"email"}))}
    present = [installed(USER, "insert"), installed(USER, "update", frozenset({"email"}))]
    plan = MANAGER.plan(needed, present, current_objects(), OWNED)
    assert plan.steps == (PlanStep("keep", USER, "insert"), PlanStep("keep", USER, "update", "columns: email"))
    assert (plan.statements, plan.changes) == ((), 0)
    # Triggers of releases before 0.2 carry no app: they count as this app's.
    assert MANAGER.plan(needed, [installed(t.table, t.kind, t.columns, app=None) for t in present],
                        current_objects(), OWNED).changes == 0


def test_changed_columns_and_disabled_triggers_are_replaced_and_say_why():
    needed = {(USER, "update"): TriggerSpec(frozenset({"email", "name"})), (USER, "insert"): SPEC}
    present = [installed(USER, "update", frozenset({"email"})), installed(USER, "insert", enabled=False)]
    plan = MANAGER.plan(needed, present, current_objects(), OWNED)
    assert plan.steps == (
        PlanStep("replace", USER, "insert", "every column; was disabled"),
        PlanStep("replace", USER, "update", "columns: email, name; was watched email"),
    )
    assert plan.statements == (
        MANAGER.trigger_sql(USER, "insert", SPEC),
        MANAGER.trigger_sql(USER, "update", TriggerSpec(frozenset({"email", "name"}))),
    )


def test_unneeded_triggers_are_left_unless_pruned_and_another_apps_always():
    present = [installed(USER, "insert"), installed(LEDGER, "insert", app="billing")]
    plan = MANAGER.plan({}, present, current_objects(), OWNED)
    assert plan.steps == (
        PlanStep("leave", LEDGER, "insert", "installed for app 'billing'"),
        PlanStep("leave", USER, "insert", "no handler needs it; --prune drops it"),
    )
    assert plan.statements == ()
    pruned = MANAGER.plan({}, present, current_objects(), OWNED, prune=True)
    assert pruned.steps == (
        PlanStep("leave", LEDGER, "insert", "installed for app 'billing'"),
        PlanStep("drop", USER, "insert", "no handler needs it"),
    )
    assert pruned.statements == ('DROP TRIGGER IF EXISTS "pgevents_insert" ON "public"."user";',)
    assert pruned.tables == (USER,)


def test_a_trigger_another_app_installed_and_this_app_needs_is_refused():
    with raises(
        TriggerOwnershipError,
        "The insert trigger on 'public.ledger' in schema 'pgevents' was installed for the app"
        " 'billing', and this app ('shop') needs it too. Apps that share an event schema share its"
        " events, so each would miss the other's: give this app its own PGEVENTS_SCHEMA. If it is"
        " the same app under a new name, set PGEVENTS_APP_NAME = 'billing'.",
    ):
        MANAGER.plan({(LEDGER, "insert"): SPEC}, [installed(LEDGER, "insert", app="billing")], current_objects(), OWNED)


@pytest.mark.parametrize(("objects", "owner", "detail"), [
    (current_objects(capture_insert=CaptureFunction("\nBEGIN RETURN NULL; END\n", "pgevents_capture", False)),
     OWNED, "capture functions from another release"),
    (current_objects(capture_delete=CaptureFunction(function_body("pgevents", "delete"), "pgevents_capture", True)),
     OWNED, "capture functions callable by PUBLIC"),
    (current_objects(capture_update=CaptureFunction(function_body("pgevents", "update"), "app", False)),
     OWNED, "capture functions to be owned by 'pgevents_capture'"),
    (current_objects(), CaptureOwner("pgevents_capture", create=True), "create the capture role 'pgevents_capture'"),
])
def test_an_outdated_schema_is_replaced_without_creating_its_tables_again(objects, owner, detail):
    plan = MANAGER.plan({(USER, "insert"): SPEC}, [installed(USER, "insert")], objects, owner)
    assert plan.steps == (PlanStep("replace", None, "event schema", detail), PlanStep("keep", USER, "insert"))
    assert plan.statements == tuple(MANAGER.schema_sql(owner, objects))
    # CREATE INDEX IF NOT EXISTS would lock the event table against every writer.
    assert not any("CREATE TABLE" in statement for statement in plan.statements)


def test_functions_kept_by_the_installer_are_not_outdated_for_their_owner():
    objects = current_objects(capture_insert=CaptureFunction(function_body("pgevents", "insert"), "app", False))
    assert MANAGER.plan({}, [], objects, KEPT).statements == ()


def test_an_event_table_of_release_0_1_gets_its_new_column():
    objects = SchemaObjects(SCHEMA_TABLES, frozenset({"id", "attempt"}), current_objects().functions)
    plan = MANAGER.plan({}, [], objects, OWNED)
    assert plan.steps == (PlanStep("replace", None, "event schema", "event table from an earlier release"),)
    assert plan.statements[0] == (
        'ALTER TABLE "pgevents"."event" ADD COLUMN IF NOT EXISTS retried_attempts integer NOT NULL DEFAULT 0;'
    )
    missing_table = SchemaObjects(frozenset({"event"}), frozenset(), {})
    assert MANAGER.plan({}, [], missing_table, OWNED).steps[0].detail.startswith(
        "tables missing: backfill, broadcast, listener; capture functions from another release"
    )


def test_installs_of_two_schemas_take_different_locks():
    assert MANAGER.lock_sql() != TriggerManager("audit_events", "c").lock_sql()
    assert "hashtext(E'pgevents install a\\\\b')" in TriggerManager("a\\b", "c").lock_sql()


def test_uninstall_drops_this_apps_triggers_and_the_schema_only_when_asked():
    present = [installed(USER, "insert"), installed(ENTRY, "broadcast_update", app=None),
               installed(LEDGER, "insert", app="billing")]
    drops = (
        'DROP TRIGGER IF EXISTS "pgevents_insert" ON "public"."user";',
        'DROP TRIGGER IF EXISTS "pgevents_broadcast_update" ON "audit"."entry";',
    )
    plan = MANAGER.uninstall_plan(present)
    assert (plan.statements, plan.tables, plan.changes) == (drops, (USER, ENTRY), 2)
    with_schema = MANAGER.uninstall_plan(present, drop_schema=True)
    assert with_schema.statements == (*drops, 'DROP SCHEMA IF EXISTS "pgevents" CASCADE;')
    assert with_schema.steps[-1] == PlanStep("drop", None, "event schema", "with every stored event")
    assert MANAGER.uninstall_plan([]).statements == ()


# Installed triggers ------------------------------------------------------------------


def test_installed_reads_the_capture_triggers_of_the_catalog():
    rows = [
        row(USER, "insert"),
        row(USER, "update", arguments=("name", "email")),
        row(ENTRY, "broadcast_delete", enabled=False),
    ]
    assert MANAGER.installed([*rows, row(LEDGER, "insert", comment=None), row(LEDGER, "delete", comment="notes")]) == [
        InstalledTrigger(USER, "insert", "pgevents_insert", None, current=True, enabled=True, app="shop"),
        InstalledTrigger(USER, "update", "pgevents_update", frozenset({"name", "email"}), True, True, "shop"),
        InstalledTrigger(ENTRY, "broadcast_delete", "pgevents_broadcast_delete", None, True, False, "shop"),
        InstalledTrigger(LEDGER, "insert", "pgevents_insert", None, True, True, None),
        InstalledTrigger(LEDGER, "delete", "pgevents_delete", None, True, True, None),
    ]


def test_a_trigger_with_another_source_or_name_is_not_current():
    rows = [
        row(USER, "insert", source="\nBEGIN RETURN NULL; END\n"),  # written by an older version
        row(USER, "delete", source=function_body("other_schema", "delete")),
        row(USER, "update", name="legacy_update"),
    ]
    assert [(t.kind, t.name, t.current) for t in MANAGER.installed(rows)] == [
        ("insert", "pgevents_insert", False),
        ("delete", "pgevents_delete", False),
        ("update", "legacy_update", False),
    ]


def test_triggers_on_other_functions_of_the_schema_are_not_capture_triggers():
    foreign = [
        TriggerRow(USER, "audit_log", "audit_log", (), "BEGIN END", True),
        TriggerRow(USER, "pgevents_vacuum", "capture_vacuum", (), "BEGIN END", True),
        TriggerRow(USER, "capture", "capture_", (), "BEGIN END", True),
        TriggerRow(USER, "x", "my_capture_insert", (), function_body("pgevents", "insert"), True),
    ]
    assert MANAGER.installed([*foreign, row(USER, "insert")]) == [
        InstalledTrigger(USER, "insert", "pgevents_insert", None, True, True, "shop"),
    ]


# Status ------------------------------------------------------------------------------


def test_status_compares_needed_and_installed_triggers():
    needed = {
        (USER, "insert"): SPEC,
        (USER, "update"): TriggerSpec(frozenset({"email"})),
        (USER, "delete"): SPEC,
        (ENTRY, "insert"): SPEC,
        (ENTRY, "update"): TriggerSpec(frozenset({"at"})),
        (ENTRY, "delete"): SPEC,
        (ENTRY, "broadcast_insert"): SPEC,
    }
    present = [
        installed(USER, "insert"),
        installed(USER, "update", frozenset({"email"})),
        installed(USER, "delete", current=False),  # older source
        installed(ENTRY, "insert", enabled=False),  # disabled by hand
        installed(ENTRY, "update", frozenset({"at", "by"})),  # watches other columns
        installed(ENTRY, "delete", frozenset({"at"})),  # watches columns, should watch all
        installed(LEDGER, "insert"),  # no handler any more
    ]
    assert MANAGER.status(needed, present) == [
        TriggerStatus(ENTRY, "broadcast_insert", "missing"),
        TriggerStatus(ENTRY, "delete", "outdated"),
        TriggerStatus(ENTRY, "insert", "outdated"),
        TriggerStatus(ENTRY, "update", "outdated"),
        TriggerStatus(LEDGER, "insert", "unneeded"),
        TriggerStatus(USER, "delete", "outdated"),
        TriggerStatus(USER, "insert", "installed"),
        TriggerStatus(USER, "update", "installed"),
    ]


def test_freshly_installed_triggers_read_back_from_the_catalog_are_installed():
    needed = {(USER, "insert"): SPEC, (USER, "update"): TriggerSpec(frozenset({"name", "email"}))}
    rows = [row(USER, "insert"), row(USER, "update", arguments=("email", "name"))]
    states = MANAGER.status(needed, MANAGER.installed(rows))
    assert [s.state for s in states] == ["installed", "installed"]
    other_schema = TriggerManager("audit_events", "c")
    assert [s.state for s in other_schema.status(needed, other_schema.installed(rows))] == ["outdated"] * 2


def test_status_of_nothing_is_empty():
    assert MANAGER.status({}, []) == []


# Checking tables before any DDL --------------------------------------------------------


def columns_of(tables: dict[TableKey, set[str]], asked: list[TableKey]) -> Callable[[TableKey], set[str]]:
    """What the store would say of each table's columns; records what was asked."""

    def columns(table: TableKey) -> set[str]:
        asked.append(table)
        return tables.get(table, set())

    return columns


def test_check_tables_accepts_existing_tables_and_columns_and_asks_once_per_table():
    asked: list[TableKey] = []
    needed = {
        (LEDGER, "insert"): SPEC,
        (LEDGER, "update"): TriggerSpec(frozenset({"amount"})),
        (LEDGER, "broadcast_update"): TriggerSpec(frozenset({"memo", "amount"})),
        (ENTRY, "delete"): SPEC,
    }
    tables = {LEDGER: {"id", "amount", "memo"}, ENTRY: {"id"}}
    assert MANAGER.check_tables(needed, columns_of(tables, asked)) is None
    assert asked == [ENTRY, LEDGER]


def test_check_tables_names_a_missing_table():
    with raises(
        MissingTableError,
        "Table 'public.ledgers' does not exist, so no trigger can be installed on it. Create it"
        " first (db.create_all() or a migration), or fix the handlers' targets. Nothing was installed.",
    ):
        MANAGER.check_tables({(TableKey("public", "ledgers"), "insert"): SPEC}, columns_of({}, []))


@pytest.mark.parametrize("kind", ["update", "broadcast_update"])
def test_check_tables_names_a_watched_column_the_table_lacks(kind):
    tables = {LEDGER: {"id", "amount", "memo"}}
    with raises(
        UnknownColumnError,
        "No column 'ammount', 'mmo' in table 'public.ledger', watched by an 'after_update'"
        " handler. Expected some of 'amount', 'id', 'memo'.",
    ):
        MANAGER.check_tables({(LEDGER, kind): TriggerSpec(frozenset({"mmo", "ammount", "amount"}))},
                             columns_of(tables, []))


def test_check_tables_names_every_missing_table_in_trigger_order():
    needed = {(USER, "insert"): SPEC, (ENTRY, "insert"): SPEC, (LEDGER, "delete"): SPEC, (USER, "delete"): SPEC}
    with raises(
        MissingTableError,
        "Tables 'audit.entry', 'public.ledger', 'public.user' do not exist, so no trigger can be"
        " installed on them. Create them first (db.create_all() or a migration), or fix the"
        " handlers' targets. Nothing was installed.",
    ):
        MANAGER.check_tables(needed, columns_of({}, []))


def test_check_filters_asks_for_each_filter_of_each_trigger_with_its_operation():
    asked: list[tuple[TableKey, str, str]] = []

    def error_of(table: TableKey, op: str, condition: str) -> Optional[str]:
        asked.append((table, op, condition))
        return None

    needed = {
        (LEDGER, "update"): TriggerSpec(None, frozenset({"new_row.amount > 1", "old_row.amount = 0"})),
        (LEDGER, "insert"): SPEC,
        (ENTRY, "delete"): TriggerSpec(None, frozenset({"x.id = 1"}), every_row=True),
        (ENTRY, "insert"): TriggerSpec(None, frozenset({"x.id = 2"})),  # installed as it is: not asked
    }
    plan = InstallPlan((
        PlanStep("create", ENTRY, "delete"), PlanStep("keep", ENTRY, "insert"),
        PlanStep("create", LEDGER, "insert"), PlanStep("replace", LEDGER, "update"),
    ), ("...",))
    assert MANAGER.check_filters(needed, plan, error_of) is None
    assert asked == [
        (ENTRY, "delete", "x.id = 1"),
        (LEDGER, "update", "new_row.amount > 1"),
        (LEDGER, "update", "old_row.amount = 0"),
    ]


def test_check_filters_names_the_filter_the_database_cannot_run_and_the_fix():
    needed = {(LEDGER, "insert"): TriggerSpec(None, frozenset({"is_big(x.amount)"}))}
    with raises(
        InvalidFilterError,
        "The where= filter 'is_big(x.amount)' of the 'after_insert' handlers of 'public.ledger' cannot"
        " run in its capture function: function is_big(numeric) does not exist. Installed, it would fail"
        " every write to the table, so nothing was installed. Capture runs with search_path = pg_catalog,"
        " pg_temp: name a function or type of another schema with its schema (sa.func.myschema.f(...),"
        " sa.Enum(..., schema='public')).",
    ):
        MANAGER.check_filters(
            needed, InstallPlan((PlanStep("create", LEDGER, "insert"),), ("...",)),
            lambda *_: "function is_big(numeric) does not exist",
        )


# Grants of a listening role ------------------------------------------------------------


def grants(**overrides: object) -> list[str]:
    arguments: dict[str, object] = {
        "role_exists": True, "schema_exists": True, "server_version": 160004, "broadcast": False,
    }
    arguments.update(overrides)
    return MANAGER.listener_grants_sql("reader", **arguments)  # type: ignore[arg-type]


def test_a_listener_role_gets_exactly_the_listener_grants():
    assert grants() == [render("listener_grants", schema='"pgevents"', role='"reader"')]
    sql = grants()[0]
    assert sql.startswith('REVOKE ALL ON SCHEMA "pgevents" FROM "reader";')
    assert 'GRANT DELETE ON "pgevents"."event" TO "reader";' in sql
    assert "GRANT INSERT" not in sql and "broadcast\" TO" not in sql


def test_broadcast_grants_only_when_a_handler_is_broadcast():
    assert grants(broadcast=True) == [
        render("listener_grants", schema='"pgevents"', role='"reader"'),
        'GRANT SELECT (txid, id, table_schema, table_name, op, old, new, created_at, context), DELETE'
        ' ON "pgevents"."broadcast" TO "reader";',
    ]


@pytest.mark.parametrize("server_version, maintain", [(160004, False), (169999, False), (170000, True), (180001, True)])
def test_vacuuming_is_granted_from_postgresql_17(server_version, maintain):
    statements = grants(server_version=server_version)
    assert ('GRANT MAINTAIN ON "pgevents"."event" TO "reader";' in statements) is maintain
    assert len(statements) == 1 + maintain


def test_grants_to_an_unknown_role_are_refused():
    with raises(
        UnknownRoleError,
        "Role 'reader' does not exist. Create it first, for example with 'CREATE ROLE \"reader\""
        " LOGIN PASSWORD ...', then grant again.",
    ):
        grants(role_exists=False, schema_exists=False)


def test_grants_before_install_are_refused():
    with raises(
        MissingTableError,
        "The event schema 'pgevents' is not installed, so there is nothing to grant yet. Run"
        " 'flask pgevents install-triggers' first.",
    ):
        grants(schema_exists=False)


def test_grant_statements_quote_the_role():
    sql = TriggerManager("pgevents", "c").listener_grants_sql(
        'Read "Only"', role_exists=True, schema_exists=True, server_version=170000, broadcast=True
    )
    assert all('TO "Read ""Only""";' in statement for statement in sql)


def test_a_capture_trigger_under_another_name_is_dropped_by_its_own_name():
    # A copy of the insert trigger under another name would capture every row twice.
    copies = MANAGER.installed([row(USER, "insert"), row(USER, "insert", name="legacy_insert")])
    plan = MANAGER.plan({(USER, "insert"): SPEC}, copies, current_objects(), OWNED)
    assert plan.steps == (
        PlanStep("drop", USER, "insert", "a copy named 'legacy_insert'"), PlanStep("keep", USER, "insert"),
    )
    assert plan.statements == ('DROP TRIGGER IF EXISTS "legacy_insert" ON "public"."user";',)
    assert MANAGER.uninstall_plan(copies).statements == (
        'DROP TRIGGER IF EXISTS "pgevents_insert" ON "public"."user";',
        'DROP TRIGGER IF EXISTS "legacy_insert" ON "public"."user";',
    )


# Drift: what an autogenerated migration writes ---------------------------------------


def test_drift_creates_alters_and_drops_what_differs_from_the_handlers():
    from flask_pgevents.triggers import TriggerChange

    needed = {
        (USER, "insert"): SPEC,
        (USER, "update"): TriggerSpec(frozenset({"email", "name"})),
        (LEDGER, "delete"): SPEC,
        (ENTRY, "insert"): SPEC,
    }
    found = [
        installed(USER, "insert"),
        installed(USER, "update", frozenset({"email"})),
        installed(LEDGER, "delete", enabled=False),
        installed(LEDGER, "insert", app=None),  # from release 0.1: this app's
        installed(ENTRY, "delete", app="billing"),  # another app's: left alone
        installed(ENTRY, "broadcast_update", current=False),  # outdated functions are no drift
    ]
    needed[(ENTRY, "broadcast_update")] = SPEC
    assert MANAGER.drift(needed, found) == [
        TriggerChange("create", ENTRY, "insert"),
        TriggerChange("alter", LEDGER, "delete"),
        TriggerChange("drop", LEDGER, "insert"),
        TriggerChange("alter", USER, "update", frozenset({"email", "name"}), frozenset({"email"})),
    ]


def test_no_drift_when_the_installed_triggers_match():
    found = [installed(USER, "insert"), installed(USER, "update", frozenset({"email"}))]
    needed = {(USER, "insert"): SPEC, (USER, "update"): TriggerSpec(frozenset({"email"}))}
    assert MANAGER.drift(needed, found) == []


def test_drift_refuses_a_trigger_another_app_installed():
    with pytest.raises(TriggerOwnershipError, match="installed for the app 'billing'"):
        MANAGER.drift({(USER, "insert"): SPEC}, [installed(USER, "insert", app="billing")])


def test_drift_prefers_the_trigger_under_its_usual_name_to_a_copy():
    copy = InstalledTrigger(USER, "update", "legacy_update", frozenset({"name"}), True, True, "shop")
    found = [installed(USER, "update", frozenset({"email"})), copy]
    assert MANAGER.drift({(USER, "update"): TriggerSpec(frozenset({"email"}))}, found) == []


# where= filters and TRUNCATE ------------------------------------------------------------

PAID = TriggerSpec(None, frozenset({"new_row.status = 'paid'", "old_row.status != new_row.status"}), every_row=False)


def filtered_row(table: TableKey, kind: str, spec: TriggerSpec) -> TriggerRow:
    """A catalog row of a filtered trigger, as install-triggers creates it."""
    return TriggerRow(
        table, f"pgevents_{kind}", function_name(kind, table), tuple(sorted(spec.columns or ())),
        function_body("pgevents", kind, spec, table), True, "flask-pgevents app: shop",
    )


def test_a_filtered_trigger_gets_its_own_function_owned_by_the_capture_role_and_not_public():
    sql = MANAGER.trigger_sql(USER, "update", PAID, OWNED)
    function = function_name("update", USER)
    assert function.startswith("capture_update__") and len(function) <= 63
    assert function != function_name("update", ENTRY)
    assert sql.index('GRANT CREATE ON SCHEMA "pgevents"') < sql.index(f'"pgevents".{function}() RETURNS trigger')
    assert f'REVOKE ALL ON FUNCTION "pgevents".{function}() FROM PUBLIC;' in sql
    assert f'ALTER FUNCTION "pgevents".{function}() OWNER TO "pgevents_capture";' in sql
    assert sql.index('REVOKE CREATE ON SCHEMA') < sql.index("CREATE TRIGGER")
    assert f"EXECUTE FUNCTION \"pgevents\".{function}();" in sql
    body = function_body("pgevents", "update", PAID, USER)
    assert "CASE WHEN (new_row.status = 'paid') THEN " in body
    assert "AND ((new_row.status = 'paid') OR (old_row.status != new_row.status))" in body
    assert '(x.*)::"public"."user" AS r' in body
    # The shared functions do not change with filters.
    assert "NULL AS m FROM pgevents_new AS x) AS r;" in function_body("pgevents", "insert")


def test_installed_filtered_triggers_read_their_filters_back_and_compare_by_them():
    found = MANAGER.installed([filtered_row(USER, "update", PAID)])
    assert [(t.kind, t.spec, t.current, t.own_function) for t in found] == [
        ("update", PAID, True, function_name("update", USER))
    ]
    assert MANAGER.status({(USER, "update"): PAID}, found) == [TriggerStatus(USER, "update", "installed")]
    other = TriggerSpec(None, frozenset({"new_row.status = 'shipped'"}), every_row=False)
    assert MANAGER.status({(USER, "update"): other}, found) == [TriggerStatus(USER, "update", "outdated")]
    plan = MANAGER.plan({(USER, "update"): other}, found, current_objects(), OWNED)
    [step] = [s for s in plan.steps if s.table is not None]
    assert step.action == "replace" and "was filters: " in step.detail
    # Back to no filter: the shared function, and the trigger's own one dropped after it.
    plan = MANAGER.plan({(USER, "update"): SPEC}, found, current_objects(), OWNED)
    statement = plan.statements[-1]
    assert statement.index("EXECUTE FUNCTION \"pgevents\".capture_update()") < statement.index(
        f'DROP FUNCTION IF EXISTS "pgevents".{function_name("update", USER)}();'
    )
    assert MANAGER.drift({(USER, "update"): PAID}, found) == []
    [change] = MANAGER.drift({(USER, "update"): SPEC}, found)
    assert (change.action, change.existing_filters, change.existing_every_row) == ("alter", PAID.filters, False)
    uninstall = MANAGER.uninstall_plan(found)
    assert 'DROP FUNCTION IF EXISTS "pgevents".capture_update__' in uninstall.statements[0]


def test_an_edited_filtered_function_is_outdated():
    edited = dataclasses.replace(filtered_row(USER, "update", PAID), source="\nBEGIN RETURN NULL; END\n")
    [found] = MANAGER.installed([edited])
    assert not found.current
    assert MANAGER.status({(USER, "update"): SPEC}, [found]) == [TriggerStatus(USER, "update", "outdated")]


def test_truncate_triggers_have_no_transition_tables_and_insert_one_row():
    sql = MANAGER.trigger_sql(USER, "truncate", SPEC)
    assert 'CREATE TRIGGER "pgevents_truncate" AFTER TRUNCATE ON "public"."user"\nFOR EACH STATEMENT' in sql
    assert "REFERENCING" not in sql
    body = function_body("pgevents", "truncate")
    assert "VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, 'truncate'" in body
    assert "pgevents.suppress" in body
