"""SQL for the event schema, the capture functions and the triggers.

Every template here is named; identifiers are quoted with :func:`quote_ident`
and the few literals (trigger arguments, the channel) with
:func:`quote_literal`. No row value is ever put into SQL text.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any, Optional, Sequence

from .errors import MissingTableError, UnknownColumnError
from .registry import BROADCAST_PREFIX, OPERATIONS, TableKey, base_operation

#: Every kind of trigger: queued delivery per operation, and broadcast.
TRIGGER_KINDS = OPERATIONS + tuple(BROADCAST_PREFIX + op for op in OPERATIONS)

#: PostgreSQL truncates longer identifiers (NAMEDATALEN - 1).
MAX_IDENTIFIER_BYTES = 63

CREATE_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}."event" (
    id bigint GENERATED ALWAYS AS IDENTITY,
    table_schema text NOT NULL,
    table_name text NOT NULL,
    op text NOT NULL,
    old json,
    new json,
    created_at timestamptz NOT NULL DEFAULT now(),
    status text NOT NULL DEFAULT 'pending',
    attempt integer NOT NULL DEFAULT 0,
    run_after timestamptz,
    done_handlers text[],  -- NULL until a handler of a failed attempt succeeded: no bytes per row
    errors jsonb,
    handled_at timestamptz
);
-- The one index: every hot query reads pending events by id. Handled events
-- are deleted (or kept for PGEVENTS_RETENTION) and never slow the claim.
CREATE INDEX IF NOT EXISTS "event_pending" ON {schema}."event" (id) WHERE status = 'pending';
-- Changes for broadcast handlers, which every listening process reads and
-- none claims. Unlogged and short-lived: broadcast is at most once.
CREATE UNLOGGED TABLE IF NOT EXISTS {schema}."broadcast" (
    id bigint NOT NULL DEFAULT nextval({event_id_sequence}::regclass),
    txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    table_schema text NOT NULL,
    table_name text NOT NULL,
    op text NOT NULL,
    old json,
    new json,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS "broadcast_order" ON {schema}."broadcast" (txid, id);
-- Listeners that sleep, waiting for a NOTIFY. Writers notify only when one
-- does: NOTIFY serializes every notifying commit in the cluster.
CREATE UNLOGGED TABLE IF NOT EXISTS {schema}."listener" (
    pid integer PRIMARY KEY,
    idle boolean NOT NULL DEFAULT false,
    since timestamptz NOT NULL DEFAULT now()
);
"""

# Functions run as their owner (SECURITY DEFINER) so that a role which may
# write the table but not the event table still writes successfully, and with
# a fixed search_path so that no caller can redirect what they reference.
# The writer's output settings are pinned too: to_json() formats intervals,
# bytea and floats with them, and the decoder expects the defaults.
FUNCTION_HEADER = """
CREATE OR REPLACE FUNCTION {schema}.{function}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET IntervalStyle = postgres SET bytea_output = hex SET extra_float_digits = 1
AS $pgevents$"""

# Rows are stored as json, not jsonb: fewer bytes per event (less WAL for
# every write) and the values' exact text (a json column's 1e16 stays 1e16).
# Updates compare that text: json has no equality operator, and the same
# values always render the same text (output settings are pinned below).
#
# The bodies see the user's columns: "#variable_conflict use_variable" keeps a
# column named like a PL/pgSQL variable (tg_table_name, ...) from making the
# write fail, and "alias.*" is a whole-row reference even when the table has
# a column named like the alias.

CAPTURE_BODIES = {
    "insert": """
#variable_conflict use_variable
BEGIN
    INSERT INTO {schema}.{target} (table_schema, table_name, op, new)
    SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME, 'insert', to_json(n.*)
    FROM pgevents_new AS n;
    IF FOUND AND EXISTS (SELECT FROM {schema}."listener" WHERE idle) THEN
        PERFORM pg_notify({channel}, '');
    END IF;
    RETURN NULL;
END
""",
    # Transition tables hold old and new rows in the same order, so pairing
    # them by position works for every key, composite keys and no key at all.
    "update": """
#variable_conflict use_variable
BEGIN
    INSERT INTO {schema}.{target} (table_schema, table_name, op, old, new)
    SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME, 'update', o.j, n.j
    FROM (SELECT row_number() OVER () AS rn, to_json(x.*) AS j FROM pgevents_old AS x) AS o
    JOIN (SELECT row_number() OVER () AS rn, to_json(x.*) AS j FROM pgevents_new AS x) AS n
        USING (rn)
    WHERE CASE
        WHEN TG_NARGS = 0 THEN o.j::text <> n.j::text
        ELSE EXISTS (
            SELECT FROM unnest(TG_ARGV) AS c(name)
            WHERE (o.j -> c.name)::text IS DISTINCT FROM (n.j -> c.name)::text
        )
    END
    ORDER BY rn;
    IF FOUND AND EXISTS (SELECT FROM {schema}."listener" WHERE idle) THEN
        PERFORM pg_notify({channel}, '');
    END IF;
    RETURN NULL;
END
""",
    "delete": """
#variable_conflict use_variable
BEGIN
    INSERT INTO {schema}.{target} (table_schema, table_name, op, old)
    SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME, 'delete', to_json(o.*)
    FROM pgevents_old AS o;
    IF FOUND AND EXISTS (SELECT FROM {schema}."listener" WHERE idle) THEN
        PERFORM pg_notify({channel}, '');
    END IF;
    RETURN NULL;
END
""",
}

TRANSITION_TABLES = {
    "insert": "NEW TABLE AS pgevents_new",
    "update": "OLD TABLE AS pgevents_old NEW TABLE AS pgevents_new",
    "delete": "OLD TABLE AS pgevents_old",
}

CREATE_TRIGGER = """
DROP TRIGGER IF EXISTS {trigger} ON {table};
CREATE TRIGGER {trigger} AFTER {operation} ON {table}
REFERENCING {transition_tables}
FOR EACH STATEMENT EXECUTE FUNCTION {schema}.{function}({arguments});
"""

DROP_TRIGGER = "DROP TRIGGER IF EXISTS {trigger} ON {table};"

# Taken first in the install and uninstall transactions: processes that
# install at once (each worker at start-up) wait for each other instead of
# failing on CREATE SCHEMA IF NOT EXISTS or CREATE OR REPLACE FUNCTION.
LOCK_INSTALL = "SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext({name}));"

DROP_SCHEMA = "DROP SCHEMA IF EXISTS {schema} CASCADE;"

# Triggers whose function lives in the event schema, with what they watch.
INSTALLED_TRIGGERS = """
SELECT tn.nspname, c.relname, t.tgname, p.proname, t.tgargs, t.tgnargs,
       p.prosrc, t.tgenabled
FROM pg_catalog.pg_trigger AS t
JOIN pg_catalog.pg_class AS c ON c.oid = t.tgrelid
JOIN pg_catalog.pg_namespace AS tn ON tn.oid = c.relnamespace
JOIN pg_catalog.pg_proc AS p ON p.oid = t.tgfoid
JOIN pg_catalog.pg_namespace AS pn ON pn.oid = p.pronamespace
WHERE pn.nspname = %s AND NOT t.tgisinternal
ORDER BY tn.nspname, c.relname, t.tgname
"""

SCHEMA_EXISTS = "SELECT to_regclass(%s) IS NOT NULL"

# The columns of a table named by schema and name (no SQL built from names).
TABLE_COLUMNS = """
SELECT a.attname
FROM pg_catalog.pg_class AS c
JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute AS a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')
"""

BACKLOG = """
SELECT count(*) FILTER (WHERE status = 'pending'),
       min(created_at) FILTER (WHERE status = 'pending'),
       count(*) FILTER (WHERE status = 'failed'),
       now()
FROM {schema}."event"
"""

# Delivery: claim a batch, settle it, keep or purge handled events.
#
# The claim also counts the transactions in progress at its snapshot: a writer
# that saw no idle listener may still commit after this claim came back empty,
# so the listener polls again soon while any is in flight.
CLAIM_BATCH = """
WITH claimed AS (
    SELECT id, table_schema, table_name, op, old::text, new::text, created_at, attempt, done_handlers
    FROM {schema}."event"
    WHERE status = 'pending' AND (run_after IS NULL OR run_after <= now())
      AND length(table_schema) || ':' || table_schema || table_name || ':' || op = ANY(%s)
    ORDER BY id
    LIMIT %s
    FOR UPDATE SKIP LOCKED
)
SELECT (SELECT count(*) FROM pg_catalog.pg_snapshot_xip(pg_catalog.pg_current_snapshot())),
       claimed.*
FROM (SELECT) AS snapshot LEFT JOIN claimed ON true
ORDER BY claimed.id
"""
DELETE_HANDLED = 'DELETE FROM {schema}."event" WHERE id = ANY(%s) AND status = \'pending\''
MARK_HANDLED = (
    'UPDATE {schema}."event" SET status = \'done\', handled_at = now(), errors = NULL'
    " WHERE id = ANY(%s) AND status = 'pending'"
)
PURGE_HANDLED = (
    'DELETE FROM {schema}."event" WHERE status = \'done\''
    " AND handled_at < now() - %s * interval '1 second'"
)
RECORD_FAILURE = """
UPDATE {schema}."event"
SET attempt = %s, done_handlers = %s, errors = %s::jsonb, status = %s,
    run_after = now() + %s * interval '1 second'
WHERE id = %s AND status = 'pending'
"""

# Listener registration and the idle flag writers read.
REGISTER_LISTENER = """
DELETE FROM {schema}."listener"
WHERE pid NOT IN (SELECT pid FROM pg_catalog.pg_stat_activity WHERE pid IS NOT NULL);
INSERT INTO {schema}."listener" (pid, idle) VALUES (pg_catalog.pg_backend_pid(), false)
ON CONFLICT (pid) DO UPDATE SET idle = false, since = now();
"""
SET_LISTENER_IDLE = (
    'UPDATE {schema}."listener" SET idle = %s, since = now() WHERE pid = pg_catalog.pg_backend_pid()'
)
#: What a role that only listens needs (the README repeats it).
LISTENER_GRANTS = (
    "GRANT USAGE ON SCHEMA {schema} TO {role};"
    " GRANT SELECT, UPDATE, DELETE ON {schema}.\"event\" TO {role};"
    " GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.\"listener\" TO {role};"
)
UNREGISTER_LISTENER = 'DELETE FROM {schema}."listener" WHERE pid = pg_catalog.pg_backend_pid()'


# Broadcast: every listener reads, in commit-safe order, what committed
# transactions wrote. Only transactions older than the snapshot's xmin are
# read, so one that commits late can never be skipped.
BROADCAST_START = "SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::text"
READ_BROADCAST = """
SELECT txid::text, id, table_schema, table_name, op, old::text, new::text, created_at
FROM {schema}."broadcast"
WHERE (txid, id) > (%s::xid8, %s)
  AND txid < pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())
ORDER BY txid, id
LIMIT %s
"""
# Autovacuum wakes once a minute: at thousands of events a second the event
# table would grow by a minute of deleted rows between its visits, so the
# listener vacuums it itself (skipped with a warning if its role may not).
VACUUM_EVENTS = 'VACUUM (SKIP_LOCKED) {schema}."event"'

#: Broadcast rows are kept this long: a listener further behind misses them.
BROADCAST_RETENTION_SECONDS = 60
PURGE_BROADCAST = (
    'DELETE FROM {schema}."broadcast" WHERE created_at < now() - %s * interval \'1 second\''
)


def subscription_key(table: TableKey, operation: str) -> str:
    """How CLAIM_BATCH names a table and operation, unambiguously for any names."""
    return f"{len(table.schema)}:{table.schema}{table.name}:{operation}"


FAILED_EVENTS = """
SELECT id, table_schema, table_name, op, created_at, attempt, errors
FROM {schema}."event" WHERE status = 'failed' ORDER BY id LIMIT %s
"""

RETRY_FAILED = """
UPDATE {schema}."event" SET status = 'pending', attempt = 0, run_after = NULL
WHERE status = 'failed' AND (%s OR id = ANY(%s))
"""


def quote_ident(name: str) -> str:
    """Quote an identifier for PostgreSQL, whatever characters it holds."""
    if "\x00" in name:
        raise ValueError(f"Identifier {name!r} contains a NUL character.")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """Quote a string literal (standard_conforming_strings is on since 9.1)."""
    if "\x00" in value:
        raise ValueError(f"Literal {value!r} contains a NUL character.")
    return "'" + value.replace("'", "''") + "'"


def qualified(table: TableKey) -> str:
    return f"{quote_ident(table.schema)}.{quote_ident(table.name)}"


def trigger_name(schema: str, kind: str) -> str:
    """The trigger's name: one per kind per table, named after the schema."""
    return f"{schema}_{kind}"


def function_name(kind: str) -> str:
    return f"capture_{kind}"


def function_body(schema: str, kind: str) -> str:
    """The exact source PostgreSQL stores for a capture function (``prosrc``)."""
    target = '"broadcast"' if kind.startswith(BROADCAST_PREFIX) else '"event"'
    return CAPTURE_BODIES[base_operation(kind)].format(
        schema=quote_ident(schema), channel=quote_literal(schema), target=target
    )


def channel_for(schema: str) -> str:
    """The NOTIFY channel that wakes listeners: the schema's name."""
    return schema


@dataclasses.dataclass(frozen=True)
class InstalledTrigger:
    table: TableKey
    operation: str
    name: str
    columns: Optional[frozenset[str]]
    current: bool
    enabled: bool


@dataclasses.dataclass(frozen=True)
class TriggerStatus:
    table: TableKey
    operation: str
    #: "installed", "outdated", "missing" or "unneeded".
    state: str


@dataclasses.dataclass(frozen=True)
class Backlog:
    pending: int
    oldest_pending_age: Optional[datetime.timedelta]
    failed: int


class TriggerManager:
    """Installs, compares and removes the event schema and the triggers.

    :param schema: the schema holding the event table and capture functions.
    """

    def __init__(self, schema: str) -> None:
        if not schema or "$" in schema:
            raise ValueError(
                f"Invalid event schema name {schema!r}: it must be non-empty and"
                " contain no '$'. Set PGEVENTS_SCHEMA to a plain name."
            )
        # Longer trigger names would be cut by PostgreSQL and could collide.
        suffix = max(len(trigger_name("", kind)) for kind in TRIGGER_KINDS)
        if len(schema.encode()) + suffix > MAX_IDENTIFIER_BYTES:
            raise ValueError(
                f"Event schema name {schema!r} is too long: trigger names are"
                f" '<schema>_<operation>' and PostgreSQL cuts names at {MAX_IDENTIFIER_BYTES}"
                f" bytes, so it must be at most {MAX_IDENTIFIER_BYTES - suffix} bytes."
                " Set PGEVENTS_SCHEMA to a shorter name."
            )
        self.schema = schema
        self.event_table = f"{quote_ident(schema)}.\"event\""

    # SQL rendering -------------------------------------------------------

    def lock_sql(self) -> str:
        return LOCK_INSTALL.format(name=quote_literal(f"pgevents install {self.schema}"))

    def schema_sql(self) -> list[str]:
        schema = quote_ident(self.schema)
        sequence = quote_literal(f'{schema}."event_id_seq"')
        statements = [CREATE_SCHEMA.format(schema=schema, event_id_sequence=sequence)]
        for op in TRIGGER_KINDS:
            statements.append(
                FUNCTION_HEADER.format(schema=schema, function=function_name(op))
                + function_body(self.schema, op)
                + "$pgevents$;"
            )
        return statements

    def trigger_sql(self, table: TableKey, operation: str, columns: Optional[frozenset[str]]) -> str:
        arguments = ", ".join(quote_literal(c) for c in sorted(columns or ()))
        return CREATE_TRIGGER.format(
            trigger=quote_ident(trigger_name(self.schema, operation)),
            table=qualified(table),
            operation=base_operation(operation).upper(),
            transition_tables=TRANSITION_TABLES[base_operation(operation)],
            schema=quote_ident(self.schema),
            function=function_name(operation),
            arguments=arguments,
        )

    def drop_trigger_sql(self, table: TableKey, operation: str) -> str:
        return DROP_TRIGGER.format(
            trigger=quote_ident(trigger_name(self.schema, operation)), table=qualified(table)
        )

    def install_sql(
        self,
        needed: dict[tuple[TableKey, str], Optional[frozenset[str]]],
        installed: Sequence[InstalledTrigger] = (),
    ) -> list[str]:
        """Statements that make the database hold exactly the needed triggers."""
        statements = [self.lock_sql(), *self.schema_sql()]
        for trig in installed:
            if (trig.table, trig.operation) not in needed:
                statements.append(self.drop_trigger_sql(trig.table, trig.operation))
        for (table, op), columns in sorted(needed.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            statements.append(self.trigger_sql(table, op, columns))
        return statements

    def uninstall_sql(self, installed: Sequence[InstalledTrigger], *, drop_schema: bool = False) -> list[str]:
        statements = [self.lock_sql(), *(self.drop_trigger_sql(t.table, t.operation) for t in installed)]
        if drop_schema:
            statements.append(DROP_SCHEMA.format(schema=quote_ident(self.schema)))
        return statements

    def failed_events(self, cursor: Any, limit: int) -> list[dict[str, Any]]:
        if not self.schema_exists(cursor):
            return []
        cursor.execute(FAILED_EVENTS.format(schema=quote_ident(self.schema)), (limit,))
        return [
            {
                "id": id_, "table": f"{schema}.{table}", "op": op, "timestamp": created_at,
                "attempt": attempt, "errors": errors if isinstance(errors, dict) else json.loads(errors or "{}"),
            }
            for id_, schema, table, op, created_at, attempt, errors in cursor.fetchall()
        ]

    def retry_failed(self, cursor: Any, event_ids: Optional[Sequence[int]]) -> int:
        if not self.schema_exists(cursor):
            return 0
        cursor.execute(
            RETRY_FAILED.format(schema=quote_ident(self.schema)),
            (event_ids is None, list(event_ids or [])),
        )
        count = int(cursor.rowcount)
        if count:
            cursor.execute("SELECT pg_notify(%s, '')", (channel_for(self.schema),))
        return count

    # Reading the catalog ---------------------------------------------------

    def installed(self, cursor: Any) -> list[InstalledTrigger]:
        """The capture triggers present in the database."""
        cursor.execute(INSTALLED_TRIGGERS, (self.schema,))
        found = []
        for schema, table, name, function, args, nargs, source, enabled in cursor.fetchall():
            if not function.startswith("capture_"):
                continue
            operation = function[len("capture_"):]
            if operation not in TRIGGER_KINDS:
                continue
            values = [a.decode() for a in bytes(args).split(b"\x00")[:nargs]]
            columns = frozenset(values) if values else None
            current = (
                name == trigger_name(self.schema, operation)
                and source == function_body(self.schema, operation)
            )
            found.append(
                InstalledTrigger(TableKey(schema, table), operation, name, columns, current, enabled != "D")
            )
        return found

    def status(
        self,
        cursor: Any,
        needed: dict[tuple[TableKey, str], Optional[frozenset[str]]],
    ) -> list[TriggerStatus]:
        """Compare needed triggers with installed ones."""
        installed = {(t.table, t.operation): t for t in self.installed(cursor)}
        report = []
        for key in sorted(set(needed) | set(installed), key=lambda k: (str(k[0]), k[1])):
            trig = installed.get(key)
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

    def check_tables(
        self, cursor: Any, needed: dict[tuple[TableKey, str], Optional[frozenset[str]]]
    ) -> None:
        """Fail clearly, before any DDL, for a missing table or a watched column it lacks.

        :raises MissingTableError, UnknownColumnError:
        """
        columns_by_table: dict[TableKey, set[str]] = {}
        for (table, kind), watched in sorted(needed.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            if table not in columns_by_table:
                cursor.execute(TABLE_COLUMNS, (table.schema, table.name))
                columns_by_table[table] = {name for (name,) in cursor.fetchall()}
            existing = columns_by_table[table]
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
                    f" watched by an 'after_{base_operation(kind)}' handler. Expected some of"
                    f" {', '.join(map(repr, sorted(existing)))}."
                )

    def schema_exists(self, cursor: Any) -> bool:
        cursor.execute(SCHEMA_EXISTS, (self.event_table,))
        return bool(cursor.fetchone()[0])

    def backlog(self, cursor: Any) -> Optional[Backlog]:
        if not self.schema_exists(cursor):
            return None
        cursor.execute(BACKLOG.format(schema=quote_ident(self.schema)))
        pending, oldest, failed, now = cursor.fetchone()
        return Backlog(pending, (now - oldest) if oldest is not None else None, failed)
