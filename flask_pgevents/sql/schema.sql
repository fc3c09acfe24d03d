-- DDL of flask-pgevents: the event schema, the capture functions and role,
-- the triggers, and the grants of a listening role.
--
-- Each block starts with a "-- name: <block>" line and is rendered by
-- flask_pgevents.sql.render(), which fills the {placeholders} with quoted
-- identifiers and literals. No row value is ever put into SQL text.

-- name: create_schema
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
    retried_attempts integer NOT NULL DEFAULT 0,  -- failed attempts before the last retry
    run_after timestamptz,
    done_handlers text[],  -- NULL until a handler of a failed attempt succeeded: no bytes per row
    errors jsonb,
    handled_at timestamptz,
    -- The writing transaction: events of one transaction share it, in id order.
    txid xid8 DEFAULT pg_current_xact_id(),
    -- The writer's pgevents.context setting, as it was set: NULL without one.
    context text,
    -- Backfill events (flask pgevents backfill): true, and the one handler
    -- they are for, if any. NULL for captured changes: no bytes per row.
    backfill boolean,
    handler text,
    -- The ids of the where= filters the row matched, space-separated; NULL
    -- when the trigger has no filters.
    matched text
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
    context text,
    matched text
);
CREATE INDEX IF NOT EXISTS "broadcast_order" ON {schema}."broadcast" (txid, id);
-- Listeners that sleep, waiting for a NOTIFY. Writers notify only when one
-- does: NOTIFY serializes every notifying commit in the cluster.
CREATE UNLOGGED TABLE IF NOT EXISTS {schema}."listener" (
    pid integer PRIMARY KEY,
    idle boolean NOT NULL DEFAULT false,
    since timestamptz NOT NULL DEFAULT now()
);
-- The backfill runs (flask pgevents backfill): where each one is, so that an
-- interrupted run resumes after the last key it emitted. last_key is the
-- primary key of that row as a json object; only the admin role reads it.
CREATE TABLE IF NOT EXISTS {schema}."backfill" (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_schema text NOT NULL,
    table_name text NOT NULL,
    handler text,
    condition text,
    last_key jsonb,
    emitted bigint NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE UNIQUE INDEX IF NOT EXISTS "backfill_unfinished" ON {schema}."backfill"
    (table_schema, table_name, coalesce(handler, ''), coalesce(condition, '')) WHERE finished_at IS NULL;

-- name: add_retried_attempts
-- Upgrades an event table of release 0.1: attempts keep counting across
-- 'flask pgevents retry'. A constant default adds no bytes to existing rows.
ALTER TABLE {schema}."event" ADD COLUMN IF NOT EXISTS retried_attempts integer NOT NULL DEFAULT 0;

-- name: add_txid
-- Upgrades an event table of an earlier release. The column is added without
-- a default (no rewrite: earlier events keep NULL), then new rows get one.
ALTER TABLE {schema}."event" ADD COLUMN IF NOT EXISTS txid xid8;
ALTER TABLE {schema}."event" ALTER COLUMN txid SET DEFAULT pg_catalog.pg_current_xact_id();

-- name: add_context
ALTER TABLE {schema}."event" ADD COLUMN IF NOT EXISTS context text;
ALTER TABLE {schema}."broadcast" ADD COLUMN IF NOT EXISTS context text;

-- name: add_backfill
ALTER TABLE {schema}."event" ADD COLUMN IF NOT EXISTS backfill boolean;
ALTER TABLE {schema}."event" ADD COLUMN IF NOT EXISTS handler text;

-- name: add_matched
ALTER TABLE {schema}."event" ADD COLUMN IF NOT EXISTS matched text;
ALTER TABLE {schema}."broadcast" ADD COLUMN IF NOT EXISTS matched text;

-- name: capture_function_header
-- Functions run as their owner (SECURITY DEFINER) so that a role which may
-- write the table but not the event table still writes successfully, and with
-- a fixed search_path so that no caller can redirect what they reference.
-- The writer's output settings are pinned too: to_json() formats intervals,
-- bytea and floats with them, and the decoder expects the defaults.
CREATE OR REPLACE FUNCTION {schema}.{function}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET IntervalStyle = postgres SET bytea_output = hex SET extra_float_digits = 1
AS $pgevents$

-- name: capture_rows
-- The capture bodies. Rows are stored as json, not jsonb: fewer bytes per
-- event (less WAL for every write) and the values' exact text (a json
-- column's 1e16 stays 1e16). Updates compare that text: json has no equality
-- operator, and the same values always render the same text (the output
-- settings are pinned in the header). Nothing else is computed per row:
-- every function call here is paid by each write (recording a size per row
-- cost 10-14 % of a bulk write; claims measure stored sizes instead).
--
-- The bodies see the user's columns: "#variable_conflict use_variable" keeps
-- a column named like a PL/pgSQL variable (tg_table_name, ...) from making
-- the write fail, and "alias.*" is a whole-row reference even when the table
-- has a column named like the alias. {suppress} returns early in a writer's
-- transaction that suppressed capture. {guard} is empty for queued events.
--
-- This body serves inserts (new rows into "new") and deletes (old rows into
-- "old"); updates pair both.
--
-- {matched} and {where} are the handlers' where= filters (see
-- triggers.filter_fragments); without filters they are NULL and empty.
#variable_conflict use_variable
{context}
BEGIN{suppress}{guard}
    INSERT INTO {schema}.{target} (table_schema, table_name, op, {column}, context, matched)
    SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME, {op}, r.j, pgevents_context, r.m
    FROM (SELECT to_json(x.*) AS j, {matched} AS m FROM {rows} AS x{where}) AS r;
{wake}
END

-- name: capture_update
-- Transition tables hold old and new rows in the same order, so pairing
-- them by position works for every key, composite keys and no key at all.
-- With filters, {row} keeps each row whole and {rows} spreads the pair into
-- old_row and new_row, whose columns the filters read.
#variable_conflict use_variable
{context}
BEGIN{suppress}{guard}
    INSERT INTO {schema}.{target} (table_schema, table_name, op, old, new, context, matched)
    SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME, 'update', o.j, n.j, pgevents_context, {matched}
    FROM (SELECT row_number() OVER () AS rn, to_json(x.*) AS j{row} FROM pgevents_old AS x) AS o
    JOIN (SELECT row_number() OVER () AS rn, to_json(x.*) AS j{row} FROM pgevents_new AS x) AS n
        USING (rn){rows}
    WHERE CASE
        WHEN TG_NARGS = 0 THEN o.j::text <> n.j::text
        ELSE EXISTS (
            SELECT FROM unnest(TG_ARGV) AS c(name)
            WHERE (o.j -> c.name)::text IS DISTINCT FROM (n.j -> c.name)::text
        )
    END{where}
    ORDER BY rn;
{wake}
END

-- name: filter_matched
-- The where= filters' parts of a capture body (triggers.filter_fragments).
-- {matched}: the ids of the filters a row matched, space-separated;
-- concat_ws skips the NULL of a filter that did not match. {cases} are
-- filter_case blocks, joined by commas.
pg_catalog.concat_ws(' ', {cases})

-- name: filter_case
CASE WHEN ({condition}) THEN {id} END

-- name: filter_test
-- One filter in {where}: those of a trigger are joined by OR.
({condition})

-- name: filter_rows_where
-- {where} of inserts and deletes: rows that match no filter are not stored.
        WHERE {tests}

-- name: filter_pair_where
-- {where} of updates.
      AND ({tests})

-- name: filter_pair_row
-- {row} of updates: each transition row whole, as the table's row type...
, (x.*)::{table} AS r

-- name: filter_pair_rows
-- ...spread by {rows} into aliases that hold the user's columns only (no
-- rn, no j), which the filters read.
    CROSS JOIN LATERAL (SELECT (o.r).*) AS {old}
    CROSS JOIN LATERAL (SELECT (n.r).*) AS {new}

-- name: capture_truncate
-- TRUNCATE has no rows (and no transition tables): one event per table.
#variable_conflict use_variable
{context}
BEGIN{suppress}{guard}
    INSERT INTO {schema}.{target} (table_schema, table_name, op, context)
    VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, 'truncate', pgevents_context);
{wake}
END

-- name: capture_context
-- The writer's context (SET LOCAL pgevents.context = '{"actor": "cron"}';
-- pgevents.context() and the Flask request set it through the session), read
-- once per statement and stored as the text it was set to: a malformed value
-- never makes the write fail, the listener decodes it. Unset, or reset at the
-- end of a transaction (''), it stores NULL: writes without a context pay one
-- lookup per statement and no byte per row. The transaction's id needs no
-- code here: it is the event table's column default.
DECLARE
    pgevents_context text := NULLIF(pg_catalog.current_setting({setting}, true), '');

-- name: capture_wake
-- The end of every capture body: wake a sleeping listener, if there is one.
    IF FOUND AND EXISTS (SELECT FROM {schema}."listener" WHERE idle) THEN
        PERFORM pg_notify({channel}, '');
    END IF;
    RETURN NULL;

-- name: capture_suppress
-- Writes made while the writer's transaction has the setting on (SET LOCAL
-- pgevents.suppress = on; pgevents.suppressed() does it through the session)
-- are not captured, by any app's schema. One lookup per statement, not per
-- row; an unset or reset setting reads NULL or ''. Anyone who may write a
-- table may set it: it is a convenience, not a permission.

    IF pg_catalog.lower(pg_catalog.current_setting({setting}, true)) IN ('on', 'true', 'yes', '1') THEN
        RETURN NULL;
    END IF;

-- name: set_suppress
-- Turns capture off (or back on) for the rest of the current transaction.
SELECT pg_catalog.set_config({setting}, {value}, true)

-- name: broadcast_guard
-- Broadcast rows are written only while some listener is registered: nobody
-- would read them, nor purge them.

    IF NOT EXISTS (SELECT FROM {schema}."listener") THEN
        RETURN NULL;
    END IF;

-- name: revoke_function
-- The capture functions run as their owner, which every table owner whose
-- table is watched can make run code (a column type with a cast to json). So
-- no role but their owner may attach them to a table, and their owner is a
-- NOLOGIN role that may do nothing but write events.
REVOKE ALL ON FUNCTION {schema}.{function}() FROM PUBLIC;

-- name: create_capture_role
DO $pgevents$
BEGIN
    CREATE ROLE {role} NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- made meanwhile by an install into another database of the cluster
END
$pgevents$;

-- name: join_capture_role
-- A role made by a non-superuser with CREATEROLE: the installer must be able
-- to act as it, to give it the functions and to replace them later.
GRANT {role} TO CURRENT_USER;

-- name: grant_capture_role
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT INSERT (table_schema, table_name, op, old, new, context, matched) ON {schema}."event" TO {role};
GRANT INSERT (table_schema, table_name, op, old, new, context, matched) ON {schema}."broadcast" TO {role};
GRANT USAGE ON SEQUENCE {schema}."event_id_seq" TO {role};
GRANT SELECT (idle) ON {schema}."listener" TO {role};
GRANT CREATE ON SCHEMA {schema} TO {role};

-- name: own_function
ALTER FUNCTION {schema}.{function}() OWNER TO {role};

-- name: grant_capture_create
-- Before giving a filtered trigger's own function to the capture role.
GRANT CREATE ON SCHEMA {schema} TO {role};

-- name: drop_own_function
-- A filtered trigger's own function, dropped after its trigger.
DROP FUNCTION IF EXISTS {schema}.{function}();

-- name: end_capture_grants
-- CREATE was needed only to take ownership.
REVOKE CREATE ON SCHEMA {schema} FROM {role};

-- name: create_trigger
-- The comment names the app whose handlers need the trigger: an install of
-- another app sharing the schema leaves it alone. Only the table's owner may
-- comment; an installer with just the TRIGGER privilege leaves the trigger
-- unnamed, which every app's install treats as its own. {tag} is a
-- dollar-quote tag that neither the table's name nor the app's contains.
-- {transition_tables} is the REFERENCING clause on a line of its own, or
-- nothing (TRUNCATE has no rows).
DROP TRIGGER IF EXISTS {trigger} ON {table};
CREATE TRIGGER {trigger} AFTER {op} ON {table}{transition_tables}
FOR EACH STATEMENT EXECUTE FUNCTION {schema}.{function}({arguments});
DO {tag}
BEGIN
    COMMENT ON TRIGGER {trigger} ON {table} IS {app};
EXCEPTION WHEN insufficient_privilege THEN
    NULL;
END
{tag};

-- name: transition_tables_insert
-- The transition tables each op's trigger declares ({transition_tables}).
REFERENCING NEW TABLE AS pgevents_new

-- name: transition_tables_update
REFERENCING OLD TABLE AS pgevents_old NEW TABLE AS pgevents_new

-- name: transition_tables_delete
REFERENCING OLD TABLE AS pgevents_old

-- name: drop_trigger
DROP TRIGGER IF EXISTS {trigger} ON {table};

-- name: lock_install
-- Taken first in the install and uninstall transactions: processes that
-- install at once (each worker at start-up) wait for each other instead of
-- failing on CREATE SCHEMA IF NOT EXISTS or CREATE OR REPLACE FUNCTION.
SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext({lock}));

-- name: drop_schema
DROP SCHEMA IF EXISTS {schema} CASCADE;

-- name: listener_grants
-- What a role that only listens needs (flask pgevents grant-listener): read
-- and settle events, and nothing more. It may not insert an event nor change
-- what one says (table, op, rows), so it cannot forge one.
REVOKE ALL ON SCHEMA {schema} FROM {role};
REVOKE ALL ON {schema}."event", {schema}."broadcast", {schema}."listener", {schema}."backfill" FROM {role};
REVOKE ALL ON ALL SEQUENCES IN SCHEMA {schema} FROM {role};
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT (id, table_schema, table_name, op, old, new, created_at, status, attempt,
              run_after, done_handlers, handled_at, txid, context, backfill, handler, matched)
    ON {schema}."event" TO {role};
GRANT UPDATE (status, attempt, run_after, done_handlers, errors, handled_at) ON {schema}."event" TO {role};
GRANT DELETE ON {schema}."event" TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}."listener" TO {role};

-- name: listener_broadcast_grants
GRANT SELECT (txid, id, table_schema, table_name, op, old, new, created_at, context), DELETE ON {schema}."broadcast" TO {role};

-- name: listener_vacuum_grant
-- PostgreSQL 17 lets a role that does not own a table vacuum it.
GRANT MAINTAIN ON {schema}."event" TO {role};
