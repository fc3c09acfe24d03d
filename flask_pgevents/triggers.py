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

from .errors import MissingTableError, UnknownColumnError, UnknownRoleError
from .registry import BROADCAST_PREFIX, MAX_IDENTIFIER_BYTES, OPERATIONS, TableKey, base_operation

#: Every kind of trigger: queued delivery per operation, and broadcast.
TRIGGER_KINDS = OPERATIONS + tuple(BROADCAST_PREFIX + op for op in OPERATIONS)

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
    handled_at timestamptz,
    size integer  -- bytes of old and new as text: claims are bounded by PGEVENTS_BATCH_BYTES
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
    created_at timestamptz NOT NULL DEFAULT now(),
    size integer
);
CREATE INDEX IF NOT EXISTS "broadcast_order" ON {schema}."broadcast" (txid, id);
-- Tables made by flask-pgevents 0.1 have no size column yet.
DO $pgevents$
BEGIN
    IF NOT EXISTS (
        SELECT FROM pg_catalog.pg_attribute
        WHERE attrelid = {event_table}::pg_catalog.regclass AND attname = 'size'
    ) THEN
        ALTER TABLE {schema}."event" ADD COLUMN size integer;
        ALTER TABLE {schema}."broadcast" ADD COLUMN size integer;
    END IF;
END
$pgevents$;
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
# Each event row records its size (pg_column_size of a value just built is
# its length, in O(1)), so that a claim can be bounded by bytes.
#
# The bodies see the user's columns: "#variable_conflict use_variable" keeps a
# column named like a PL/pgSQL variable (tg_table_name, ...) from making the
# write fail, and "alias.*" is a whole-row reference even when the table has
# a column named like the alias.
#
# {guard} is empty for queued events. Broadcast rows are written only while
# some listener is registered: nobody would read them, nor purge them.

CAPTURE_BODIES = {
    "insert": """
#variable_conflict use_variable
BEGIN{guard}
    INSERT INTO {schema}.{target} (table_schema, table_name, op, new, size)
    SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME, 'insert', n.j, pg_column_size(n.j)
    FROM (SELECT to_json(x.*) AS j FROM pgevents_new AS x) AS n;
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
BEGIN{guard}
    INSERT INTO {schema}.{target} (table_schema, table_name, op, old, new, size)
    SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME, 'update', o.j, n.j, pg_column_size(o.j) + pg_column_size(n.j)
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
BEGIN{guard}
    INSERT INTO {schema}.{target} (table_schema, table_name, op, old, size)
    SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME, 'delete', o.j, pg_column_size(o.j)
    FROM (SELECT to_json(x.*) AS j FROM pgevents_old AS x) AS o;
    IF FOUND AND EXISTS (SELECT FROM {schema}."listener" WHERE idle) THEN
        PERFORM pg_notify({channel}, '');
    END IF;
    RETURN NULL;
END
""",
}
BROADCAST_GUARD = """
    IF NOT EXISTS (SELECT FROM {schema}."listener") THEN
        RETURN NULL;
    END IF;"""

TRANSITION_TABLES = {
    "insert": "NEW TABLE AS pgevents_new",
    "update": "OLD TABLE AS pgevents_old NEW TABLE AS pgevents_new",
    "delete": "OLD TABLE AS pgevents_old",
}

# The capture functions run as their owner, which every table owner whose
# table is watched can make run code (a column type with a cast to json). So
# no role but their owner may attach them to a table, and their owner is a
# NOLOGIN role that may do nothing but write events.
REVOKE_FUNCTION = "REVOKE ALL ON FUNCTION {schema}.{function}() FROM PUBLIC;"
CREATE_CAPTURE_ROLE = """
DO $pgevents$
BEGIN
    CREATE ROLE {role} NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- made meanwhile by an install into another database of the cluster
END
$pgevents$;
"""
# A role made by a non-superuser with CREATEROLE: the installer must be able
# to act as it, to give it the functions and to replace them later.
JOIN_CAPTURE_ROLE = "GRANT {role} TO CURRENT_USER;"
GRANT_CAPTURE_ROLE = """
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT INSERT ({captured}) ON {schema}."event" TO {role};
GRANT INSERT ({captured}) ON {schema}."broadcast" TO {role};
GRANT USAGE ON SEQUENCE {schema}."event_id_seq" TO {role};
GRANT SELECT (idle) ON {schema}."listener" TO {role};
GRANT CREATE ON SCHEMA {schema} TO {role};
"""
OWN_FUNCTION = "ALTER FUNCTION {schema}.{function}() OWNER TO {role};"
# CREATE was needed only to take ownership.
END_CAPTURE_GRANTS = "REVOKE CREATE ON SCHEMA {schema} FROM {role};"
CAPTURED_COLUMNS = "table_schema, table_name, op, old, new, size"

# What decides the functions' owner: the installing role's powers and the
# capture role, if it exists.
CAPTURE_ROLE_STATE = """
SELECT r.rolsuper, r.rolcreaterole, r.rolname,
       EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = %(role)s) AS role_exists,
       CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = %(role)s)
            THEN pg_catalog.pg_has_role(CURRENT_USER, %(role)s, 'USAGE') END AS is_member
FROM pg_catalog.pg_roles AS r WHERE r.rolname = CURRENT_USER
"""

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
#
# A claim is bounded by rows and by bytes: rows past PGEVENTS_BATCH_BYTES are
# not sent (at least one always is) and are released when the batch commits.
# The listener sizes its LIMIT from the bytes per row it has seen, so that
# it rarely locks rows it will not send. Rows written before events had a
# size count their stored size.
CLAIM_BATCH = """
WITH claimed AS (
    SELECT id, table_schema, table_name, op, old, new, created_at, attempt, done_handlers,
           coalesce(size, coalesce(pg_column_size(old), 0) + coalesce(pg_column_size(new), 0)) AS size
    FROM {schema}."event"
    WHERE status = 'pending' AND (run_after IS NULL OR run_after <= now())
      AND length(table_schema) || ':' || table_schema || table_name || ':' || op = ANY(%s)
    ORDER BY id
    LIMIT %s
    FOR UPDATE SKIP LOCKED
), measured AS (
    SELECT claimed.*, sum(size) OVER (ORDER BY id) - size AS bytes_before
    FROM claimed
)
SELECT (SELECT count(*) FROM pg_catalog.pg_snapshot_xip(pg_catalog.pg_current_snapshot())),
       m.id, m.table_schema, m.table_name, m.op, m.old::text, m.new::text, m.created_at,
       m.attempt, m.done_handlers, m.size
FROM (SELECT) AS snapshot LEFT JOIN measured AS m ON m.bytes_before < %s
ORDER BY m.id
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
# A failed event's handled_at is when it was given up: PGEVENTS_FAILED_RETENTION counts from there.
RECORD_FAILURE = """
UPDATE {schema}."event"
SET attempt = %(attempt)s, done_handlers = %(done)s, errors = %(errors)s::jsonb, status = %(status)s,
    run_after = now() + %(delay)s * interval '1 second',
    handled_at = CASE WHEN %(status)s = 'failed' THEN now() END
WHERE id = %(id)s AND status = 'pending'
"""
PURGE_FAILED = (
    'DELETE FROM {schema}."event" WHERE status = \'failed\''
    " AND handled_at < now() - %s * interval '1 second'"
)

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
# What a role that only listens needs (flask pgevents grant-listener): read
# and settle events, and nothing more. It may not insert an event nor change
# what one says (table, operation, rows), so it cannot forge one.
LISTENER_GRANTS = """
REVOKE ALL ON SCHEMA {schema} FROM {role};
REVOKE ALL ON {schema}."event", {schema}."broadcast", {schema}."listener" FROM {role};
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT (id, table_schema, table_name, op, old, new, size, created_at, status, attempt,
              run_after, done_handlers, handled_at) ON {schema}."event" TO {role};
GRANT UPDATE (status, attempt, run_after, done_handlers, errors, handled_at) ON {schema}."event" TO {role};
GRANT DELETE ON {schema}."event" TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}."listener" TO {role};
"""
LISTENER_BROADCAST_GRANTS = (
    'GRANT SELECT (txid, id, table_schema, table_name, op, old, new, size, created_at), DELETE'
    ' ON {schema}."broadcast" TO {role};'
)
# PostgreSQL 17 lets a role that does not own a table vacuum it.
LISTENER_VACUUM_GRANT = 'GRANT MAINTAIN ON {schema}."event" TO {role};'
ROLE_EXISTS = "SELECT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = %s), pg_catalog.current_setting('server_version_num')::int"
UNREGISTER_LISTENER = 'DELETE FROM {schema}."listener" WHERE pid = pg_catalog.pg_backend_pid()'


# Broadcast: every listener reads, in commit-safe order, what committed
# transactions wrote. Only transactions older than the snapshot's xmin are
# read, so one that commits late can never be skipped.
BROADCAST_START = "SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::text"
READ_BROADCAST = """
SELECT txid::text, id, table_schema, table_name, op, old::text, new::text, created_at
FROM (
    SELECT b.*, sum(b.size) OVER (ORDER BY txid, id) - b.size AS bytes_before
    FROM (
        SELECT txid, id, table_schema, table_name, op, old, new, created_at,
               coalesce(size, coalesce(pg_column_size(old), 0) + coalesce(pg_column_size(new), 0)) AS size
        FROM {schema}."broadcast"
        WHERE (txid, id) > (%s::xid8, %s)
          AND txid < pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())
        ORDER BY txid, id
        LIMIT %s
    ) AS b
) AS m
WHERE bytes_before < %s
ORDER BY txid, id
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
UPDATE {schema}."event" SET status = 'pending', attempt = 0, run_after = NULL, handled_at = NULL
WHERE status = 'failed' AND (%s OR id = ANY(%s))
"""


def quote_ident(name: str) -> str:
    """Quote an identifier for PostgreSQL, whatever characters it holds."""
    if "\x00" in name:
        raise ValueError(f"Identifier {name!r} contains a NUL character.")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """Quote a string literal, read the same whatever ``standard_conforming_strings`` is.

    A value with a backslash becomes an escape string (``E'a\\\\b'``), as
    PostgreSQL's own ``quote_literal`` does: function bodies are parsed with
    the writing session's settings.
    """
    if "\x00" in value:
        raise ValueError(f"Literal {value!r} contains a NUL character.")
    quoted = "'" + value.replace("'", "''") + "'"
    if "\\" in value:
        return "E" + quoted.replace("\\", "\\\\")
    return quoted


def qualified(table: TableKey) -> str:
    return f"{quote_ident(table.schema)}.{quote_ident(table.name)}"


def trigger_name(schema: str, kind: str) -> str:
    """The trigger's name: one per kind per table, named after the schema."""
    return f"{schema}_{kind}"


def function_name(kind: str) -> str:
    return f"capture_{kind}"


def function_body(schema: str, kind: str) -> str:
    """The exact source PostgreSQL stores for a capture function (``prosrc``)."""
    broadcast = kind.startswith(BROADCAST_PREFIX)
    quoted = quote_ident(schema)
    return CAPTURE_BODIES[base_operation(kind)].format(
        schema=quoted,
        channel=quote_literal(schema),
        target='"broadcast"' if broadcast else '"event"',
        guard=BROADCAST_GUARD.format(schema=quoted) if broadcast else "",
    )


def channel_for(schema: str) -> str:
    """The NOTIFY channel that wakes listeners: the schema's name."""
    return schema


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

    def __init__(self, schema: str, capture_role: Optional[str] = None) -> None:
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
        #: The NOLOGIN role that owns the capture functions.
        self.capture_role = capture_role or f"{schema}_capture"

    # SQL rendering -------------------------------------------------------

    def lock_sql(self) -> str:
        return LOCK_INSTALL.format(name=quote_literal(f"pgevents install {self.schema}"))

    def schema_sql(self, owner: CaptureOwner) -> list[str]:
        """The event schema and the capture functions, callable by their owner only."""
        schema = quote_ident(self.schema)
        statements = [
            CREATE_SCHEMA.format(
                schema=schema,
                event_id_sequence=quote_literal(f'{schema}."event_id_seq"'),
                event_table=quote_literal(self.event_table),
            )
        ]
        role = quote_ident(owner.role) if owner.role else ""
        if owner.create:
            statements.append(CREATE_CAPTURE_ROLE.format(role=role))
        if owner.join:
            statements.append(JOIN_CAPTURE_ROLE.format(role=role))
        if owner.role:
            statements.append(GRANT_CAPTURE_ROLE.format(schema=schema, role=role, captured=CAPTURED_COLUMNS))
        for kind in TRIGGER_KINDS:
            function = function_name(kind)
            statements.append(
                FUNCTION_HEADER.format(schema=schema, function=function)
                + function_body(self.schema, kind)
                + "$pgevents$;"
            )
            statements.append(REVOKE_FUNCTION.format(schema=schema, function=function))
            if owner.role:
                statements.append(OWN_FUNCTION.format(schema=schema, function=function, role=role))
        if owner.role:
            statements.append(END_CAPTURE_GRANTS.format(schema=schema, role=role))
        return statements

    def capture_owner(self, cursor: Any) -> CaptureOwner:
        """Decide who owns the capture functions, from the installing role's powers."""
        cursor.execute(CAPTURE_ROLE_STATE, {"role": self.capture_role})
        superuser, createrole, installer, exists, member = cursor.fetchone()
        role = self.capture_role
        if superuser:
            return CaptureOwner(role, create=not exists, warnings=(
                f"install-triggers runs as the superuser {installer!r}. The capture functions"
                f" are given to the NOLOGIN role {role!r}, which may only write events, but the"
                f" event schema and its tables now belong to a superuser. Install as the role"
                " that owns your tables instead (see 'Security' in the README).",
            ))
        if exists and member:
            return CaptureOwner(role)
        if not exists and createrole:
            return CaptureOwner(role, create=True, join=True)
        fix = f"GRANT {quote_ident(role)} TO {quote_ident(installer)};"
        if not exists:
            fix = f"CREATE ROLE {quote_ident(role)} NOLOGIN; {fix}"
        return CaptureOwner(None, warnings=(
            f"The capture functions stay owned by {installer!r}, which may not"
            f" {'act as' if exists else 'create'} the NOLOGIN role {role!r}: the owner of a"
            f" watched table could run code as {installer!r} through a column type's cast."
            f" To confine them, have a superuser run '{fix}', then install again.",
        ))

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
        installed: Sequence[InstalledTrigger],
        owner: CaptureOwner,
    ) -> list[str]:
        """Statements that make the database hold exactly the needed triggers."""
        statements = [self.lock_sql(), *self.schema_sql(owner)]
        for trig in installed:
            if (trig.table, trig.operation) not in needed:
                statements.append(self.drop_trigger_sql(trig.table, trig.operation))
        for (table, op), columns in sorted(needed.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            statements.append(self.trigger_sql(table, op, columns))
        return statements

    def listener_grants_sql(self, cursor: Any, role: str, *, broadcast: bool) -> list[str]:
        """Exactly the privileges a role that only listens needs.

        :param broadcast: the role also reads broadcast changes.
        :raises UnknownRoleError: if the role does not exist.
        :raises MissingTableError: if the event schema is not installed.
        """
        cursor.execute(ROLE_EXISTS, (role,))
        exists, server_version = cursor.fetchone()
        if not exists:
            raise UnknownRoleError(
                f"Role {role!r} does not exist. Create it first, for example with"
                f" 'CREATE ROLE {quote_ident(role)} LOGIN PASSWORD ...', then grant again."
            )
        if not self.schema_exists(cursor):
            raise MissingTableError(
                f"The event schema {self.schema!r} is not installed, so there is nothing to"
                " grant yet. Run 'flask pgevents install-triggers' first."
            )
        names = {"schema": quote_ident(self.schema), "role": quote_ident(role)}
        statements = [LISTENER_GRANTS.format(**names)]
        if broadcast:
            statements.append(LISTENER_BROADCAST_GRANTS.format(**names))
        if server_version >= 170000:
            statements.append(LISTENER_VACUUM_GRANT.format(**names))
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
