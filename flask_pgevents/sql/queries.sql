-- The runtime and administration queries of flask-pgevents, run by
-- flask_pgevents.store.Store. Blocks are rendered like those of schema.sql;
-- values are always passed as parameters (%s, %(name)s).

-- name: safe_search_path
-- Set on every connection flask-pgevents opens, before its first query: no
-- other schema's function or operator can stand in for a built-in one
-- (CVE-2018-1058). Every object of the project is schema-qualified too.
SET search_path = pg_catalog, pg_temp

-- name: handler_savepoint
-- Handlers' db.session work runs in the claim's transaction (flask_pgevents.atomic):
-- each handler under its own savepoint, taken before its first statement.
SAVEPOINT pgevents_handler

-- name: rollback_to_handler_savepoint
ROLLBACK TO SAVEPOINT pgevents_handler

-- name: release_handler_savepoint
RELEASE SAVEPOINT pgevents_handler

-- name: default_search_path_local
-- Handlers' queries name the app's tables as the app does: with the role's
-- own search_path, until the claim's transaction settles.
SET LOCAL search_path TO DEFAULT

-- name: current_search_path
-- On a connection flask-pgevents borrows (an Alembic migration's), its own
-- search_path is set for the length of its statements only, then restored.
SELECT pg_catalog.current_setting('search_path') AS search_path

-- name: safe_local_search_path
-- As safe_search_path, until the end of the current transaction at most.
SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true)

-- name: set_local_search_path
SELECT pg_catalog.set_config('search_path', %s, true)

-- name: set_statement_timeout
-- Administration sessions (the CLI, install, status): the server cancels a
-- statement that runs longer than PGEVENTS_STATEMENT_TIMEOUT.
SELECT pg_catalog.set_config('statement_timeout', %s, false)

-- name: begin
BEGIN

-- name: commit
COMMIT

-- name: rollback
ROLLBACK

-- name: savepoint
SAVEPOINT pgevents_savepoint

-- name: rollback_to_savepoint
ROLLBACK TO SAVEPOINT pgevents_savepoint

-- name: release_savepoint
RELEASE SAVEPOINT pgevents_savepoint

-- name: listen
LISTEN {channel}

-- name: notify
SELECT pg_catalog.pg_notify(%s, %s)

-- name: skip_commit_flush
-- Losing the commit of a settled batch in a server crash only means
-- redelivery, which at-least-once allows: skip the flush.
SET synchronous_commit = off

-- name: claim_in_id_order
-- For the connections that claim: walk the pending index in id order. The
-- planner cannot estimate the subscription filter and the LIMIT sits above
-- FOR UPDATE, so it would otherwise read and sort every pending row on each
-- claim (measured: 25 ms per claim at 50,000 pending, against 0.9 ms).
SET enable_seqscan = off;
SET enable_bitmapscan = off

-- name: installed_triggers
-- Triggers whose function lives in the event schema, with what they watch
-- and the app that installed them (their comment).
SELECT tn.nspname AS table_schema, c.relname AS table_name, t.tgname AS name,
       p.proname AS function, t.tgargs AS arguments, t.tgnargs AS argument_count,
       p.prosrc AS source, t.tgenabled AS enabled,
       pg_catalog.obj_description(t.oid, 'pg_trigger') AS comment
FROM pg_catalog.pg_trigger AS t
JOIN pg_catalog.pg_class AS c ON c.oid = t.tgrelid
JOIN pg_catalog.pg_namespace AS tn ON tn.oid = c.relnamespace
JOIN pg_catalog.pg_proc AS p ON p.oid = t.tgfoid
JOIN pg_catalog.pg_namespace AS pn ON pn.oid = p.pronamespace
WHERE pn.nspname = %s AND NOT t.tgisinternal
ORDER BY tn.nspname, c.relname, t.tgname

-- name: schema_objects
-- What install compares with what it would create: the event schema's
-- tables and the event table's columns, and the capture functions with
-- their owner and whether anyone may call them.
SELECT 'table' AS kind, c.relname AS name, NULL AS source, NULL AS owner, NULL::boolean AS public_execute
FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p')
UNION ALL
SELECT 'column', a.attname, NULL, NULL, NULL
FROM pg_catalog.pg_attribute AS a
JOIN pg_catalog.pg_class AS c ON c.oid = a.attrelid
JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = 'event' AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'function', p.proname, p.prosrc, pg_catalog.pg_get_userbyid(p.proowner),
       pg_catalog.has_function_privilege('public', p.oid, 'EXECUTE')
FROM pg_catalog.pg_proc AS p JOIN pg_catalog.pg_namespace AS n ON n.oid = p.pronamespace
WHERE n.nspname = %(schema)s

-- name: set_lock_timeout
-- For the rest of an install or uninstall transaction: give up on a table
-- that another transaction holds rather than make its writers queue behind us.
SELECT pg_catalog.set_config('lock_timeout', %s, true)

-- name: lock_holders
-- Who holds a lock on a table, oldest transaction first: named when install
-- cannot take its lock.
SELECT a.pid, a.application_name, a.state,
       extract(epoch FROM now() - a.xact_start)::float8 AS transaction_seconds
FROM pg_catalog.pg_locks AS l
JOIN pg_catalog.pg_stat_activity AS a ON a.pid = l.pid
WHERE l.locktype = 'relation' AND l.granted AND l.pid <> pg_catalog.pg_backend_pid()
  AND l.relation = pg_catalog.to_regclass(%s)
GROUP BY a.pid, a.application_name, a.state, a.xact_start
ORDER BY a.xact_start NULLS LAST
LIMIT 3

-- name: relation_exists
SELECT pg_catalog.to_regclass(%s) IS NOT NULL AS found

-- name: table_columns
-- The columns of a table named by schema and name (no SQL built from names).
SELECT a.attname AS name
FROM pg_catalog.pg_class AS c
JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute AS a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')

-- name: check_filter
-- A where= condition planned as its capture function would run it: under
-- the capture functions' search_path, on rows of the table's type; LIMIT 0
-- reads nothing (planning waits only for a lock that blocks reads, such as
-- an ALTER TABLE's). {rows} are filter_row blocks, one per row alias of the
-- op.
SELECT 1 FROM {rows} WHERE ({condition}) LIMIT 0

-- name: filter_row
(SELECT (NULL::{table}).*) AS {alias}

-- name: capture_role_state
-- What decides the capture functions' owner: the installing role's powers,
-- and the capture role if it exists.
SELECT r.rolsuper AS superuser, r.rolcreaterole AS createrole, r.rolname AS installer,
       EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = %(role)s) AS role_exists,
       CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = %(role)s)
            THEN pg_catalog.pg_has_role(CURRENT_USER, %(role)s, 'USAGE') END AS is_member
FROM pg_catalog.pg_roles AS r WHERE r.rolname = CURRENT_USER

-- name: role_state
SELECT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = %s) AS role_exists,
       pg_catalog.current_setting('server_version_num')::int AS server_version

-- name: backlog
SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
       min(created_at) FILTER (WHERE status = 'pending') AS oldest_pending,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       now() AS now
FROM {schema}."event"

-- name: claim_batch
-- Claims the next pending events of the subscribed tables and ops,
-- from after an id (the listener's cursor), so that a drain never walks the
-- index entries of the events it has already deleted.
--
-- It also returns the snapshot's xmin and its newest in-flight xid: an event
-- of a transaction still in flight may get a lower id than the cursor and
-- commit later, so the listener rescans what it passed once every
-- transaction in flight then has ended (see dispatch.ClaimCursor).
--
-- The claim also counts the transactions in progress at its snapshot: a
-- writer that saw no idle listener may still commit after this claim came
-- back empty, so the listener polls again soon while any is in flight.
--
-- A claim is bounded by rows and by bytes: rows past PGEVENTS_BATCH_BYTES are
-- not sent (at least one always is) and are released when the batch commits.
-- The listener sizes its LIMIT from the bytes per row it has seen, so that it
-- rarely locks rows it will not send. Sizes are the rows' stored sizes
-- (pg_column_size reads only the header, even of a TOASTed value), which
-- compression can make smaller than their text. The context counts too: any
-- writer sets it, as large as it likes, and every row of its statement stores it.
WITH claimed AS (
    SELECT id, table_schema, table_name, op, old, new, created_at, attempt, done_handlers,
           txid, context, backfill, handler, matched,
           coalesce(pg_column_size(old), 0) + coalesce(pg_column_size(new), 0)
               + coalesce(pg_column_size(context), 0) AS size
    FROM {schema}."event"
    WHERE status = 'pending' AND id > %s AND (run_after IS NULL OR run_after <= now())
      AND length(table_schema) || ':' || table_schema || table_name || ':' || op = ANY(%s)
    ORDER BY id
    LIMIT %s
    FOR UPDATE SKIP LOCKED
), measured AS (
    SELECT claimed.*, sum(size) OVER (ORDER BY id) - size AS bytes_before
    FROM claimed
)
SELECT s.in_flight, s.newest_in_flight,
       pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::text::bigint AS xmin,
       m.id, m.table_schema, m.table_name, m.op, m.old::text AS old, m.new::text AS new, m.created_at,
       m.attempt, m.done_handlers, m.size,
       m.txid::text AS txid, m.context, m.backfill, m.handler, m.matched
FROM (
    SELECT count(x) AS in_flight, max(x::text::bigint) AS newest_in_flight
    FROM pg_catalog.pg_snapshot_xip(pg_catalog.pg_current_snapshot()) AS x
) AS s
LEFT JOIN measured AS m ON m.bytes_before < %s
ORDER BY m.id

-- name: delete_handled
DELETE FROM {schema}."event" WHERE id = ANY(%s) AND status = 'pending'

-- name: mark_handled
UPDATE {schema}."event" SET status = 'done', handled_at = now(), errors = NULL
WHERE id = ANY(%s) AND status = 'pending'

-- name: purge_handled
DELETE FROM {schema}."event" WHERE status = 'done' AND handled_at < now() - %s * interval '1 second'

-- name: record_failure
-- A failed event's handled_at is when it was given up:
-- PGEVENTS_FAILED_RETENTION counts from there.
UPDATE {schema}."event"
SET attempt = %(attempt)s, done_handlers = %(done)s, errors = %(errors)s::jsonb, status = %(status)s,
    run_after = now() + %(delay)s * interval '1 second',
    handled_at = CASE WHEN %(status)s = 'failed' THEN now() END
WHERE id = %(id)s AND status = 'pending'

-- name: purge_failed
DELETE FROM {schema}."event" WHERE status = 'failed' AND handled_at < now() - %s * interval '1 second'

-- name: failed_events
SELECT id, table_schema, table_name, op, created_at, retried_attempts + attempt AS attempts, errors,
       old::text AS old, new::text AS new
FROM {schema}."event" WHERE status = 'failed' ORDER BY id LIMIT %s

-- name: retry_failed
-- A retried event gets PGEVENTS_MAX_ATTEMPTS attempts again; the attempts it
-- had are kept in retried_attempts, so that 'failed' counts them all.
UPDATE {schema}."event"
SET status = 'pending', retried_attempts = retried_attempts + attempt, attempt = 0,
    run_after = NULL, handled_at = NULL
WHERE status = 'failed' AND (%s OR id = ANY(%s))

-- name: discard_failed
-- Deletes failed events for good (all, or those ids: 'flask pgevents discard',
-- the dashboard's discard); never a pending one.
DELETE FROM {schema}."event" WHERE status = 'failed' AND (%s OR id = ANY(%s))

-- name: live_listeners
-- The registered listeners whose session is still alive, with what the
-- server knows of them. A role without pg_read_all_stats sees no client
-- address for other roles' sessions.
SELECT l.pid, l.idle, l.since, a.application_name, a.client_addr::text AS client_addr,
       a.backend_start, now() AS now
FROM {schema}."listener" AS l
JOIN pg_catalog.pg_stat_activity AS a ON a.pid = l.pid
ORDER BY a.backend_start, l.pid

-- name: register_listener
-- Listener registration and the idle flag writers read.
DELETE FROM {schema}."listener"
WHERE pid NOT IN (SELECT pid FROM pg_catalog.pg_stat_activity WHERE pid IS NOT NULL);
INSERT INTO {schema}."listener" (pid, idle) VALUES (pg_catalog.pg_backend_pid(), false)
ON CONFLICT (pid) DO UPDATE SET idle = false, since = now();

-- name: set_listener_idle
UPDATE {schema}."listener" SET idle = %s, since = now() WHERE pid = pg_catalog.pg_backend_pid()

-- name: unregister_listener
DELETE FROM {schema}."listener" WHERE pid = pg_catalog.pg_backend_pid()

-- name: broadcast_start
-- Broadcast: every listener reads, in commit-safe order, what committed
-- transactions wrote. Only transactions older than the snapshot's xmin are
-- read, so one that commits late can never be skipped.
SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::text AS txid

-- name: read_broadcast
SELECT txid::text AS txid, id, table_schema, table_name, op, old::text AS old, new::text AS new, created_at,
       context
FROM (
    SELECT b.*, sum(b.size) OVER (ORDER BY txid, id) - b.size AS bytes_before
    FROM (
        SELECT txid, id, table_schema, table_name, op, old, new, created_at, context,
               coalesce(pg_column_size(old), 0) + coalesce(pg_column_size(new), 0)
                   + coalesce(pg_column_size(context), 0) AS size
        FROM {schema}."broadcast"
        WHERE (txid, id) > (%s::xid8, %s)
          AND txid < pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())
        ORDER BY txid, id
        LIMIT %s
    ) AS b
) AS m
WHERE bytes_before < %s
ORDER BY txid, id

-- name: purge_broadcast
DELETE FROM {schema}."broadcast" WHERE created_at < now() - %s * interval '1 second'

-- name: vacuum_events
-- Autovacuum wakes once a minute: at thousands of events a second the event
-- table would grow by a minute of deleted rows between its visits, so the
-- listener vacuums it itself (skipped with a warning if its role may not).
VACUUM (SKIP_LOCKED) {schema}."event"

-- name: pending_by_table
-- Pending events by table and op, for stats() and 'status --json':
-- the partial pending index holds only pending rows. An admin query; on a
-- backlog of a million events it reads them all once.
SELECT table_schema, table_name, op, count(*) AS pending,
       extract(epoch FROM now() - min(created_at))::float8 AS oldest_pending_age
FROM {schema}."event"
WHERE status = 'pending'
GROUP BY table_schema, table_name, op
ORDER BY count(*) DESC, table_schema, table_name, op

-- name: database_now
SELECT now() AS now

-- name: primary_key
-- Backfill: the primary key's columns of a table, in key order; none without one.
SELECT a.attname AS name
FROM pg_catalog.pg_index AS i
JOIN pg_catalog.pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
WHERE i.indrelid = pg_catalog.to_regclass(%s) AND i.indisprimary
ORDER BY pg_catalog.array_position(i.indkey::int2[], a.attnum)

-- name: row_estimate
-- The planner's row count of a table: the backfill's progress bar. NULL for
-- a table never analyzed (then the backfill counts its rows).
SELECT CASE WHEN c.reltuples > 0 THEN c.reltuples::bigint END AS estimate
FROM pg_catalog.pg_class AS c WHERE c.oid = pg_catalog.to_regclass(%s)

-- name: count_rows
SELECT count(*) AS count FROM {table} AS x WHERE ({condition})

-- name: start_backfill
-- The unfinished run of the same backfill (table, handler, condition) is
-- resumed; otherwise a run starts. The unique index on unfinished runs makes
-- two processes that start the same backfill at once share one run.
WITH started AS (
    INSERT INTO {schema}."backfill" (table_schema, table_name, handler, condition)
    VALUES (%(table_schema)s, %(table_name)s, %(handler)s, %(condition)s)
    ON CONFLICT DO NOTHING
    RETURNING id, emitted, false AS resumed
)
SELECT id, emitted, resumed FROM started
UNION ALL
SELECT id, emitted, true FROM {schema}."backfill"
WHERE table_schema = %(table_schema)s AND table_name = %(table_name)s
  AND coalesce(handler, '') = coalesce(%(handler)s, '')
  AND coalesce(condition, '') = coalesce(%(condition)s, '')
  AND finished_at IS NULL

-- name: lock_backfill
-- The first statement of each batch's transaction: a second process running
-- the same backfill waits here, then reads the key the first one stored, so
-- that no row is emitted twice. Pins the output settings the capture
-- functions pin, so that rows read the same as captured ones.
SELECT last_key::text AS last_key, finished_at IS NOT NULL AS finished,
       pg_catalog.set_config('IntervalStyle', 'postgres', true) AS interval_style,
       pg_catalog.set_config('bytea_output', 'hex', true) AS bytea_output,
       pg_catalog.set_config('extra_float_digits', '1', true) AS extra_float_digits
FROM {schema}."backfill" WHERE id = %s
FOR UPDATE

-- name: backfill_after
-- The keyset condition of every batch but the first: rows whose key comes
-- after the last one emitted. The stored key is read back as the table's row
-- type, so that each value has its column's type, and the row comparison
-- walks the primary key's index.
({keys}) > ({last_keys})

-- name: backfill_last_key
-- One column of the stored last key, as the table's type reads it ({last_keys}).
(pg_catalog.jsonb_populate_record(NULL::{table}, %(after)s::jsonb)).{key}

-- name: backfill_batch
-- One batch: the next rows in key order become 'insert' events marked as
-- backfill, and the run records the last key, in the same transaction.
-- {condition} is the user's --where, verbatim (TRUE without one).
WITH batch AS MATERIALIZED (
    SELECT x.* FROM {table} AS x
    WHERE {after} AND ({condition})
    ORDER BY {order}
    LIMIT %(limit)s
), inserted AS (
    INSERT INTO {schema}."event" (table_schema, table_name, op, new, backfill, handler)
    SELECT %(table_schema)s, %(table_name)s, 'insert', to_json(b.*), true, %(handler)s
    FROM batch AS b
    ORDER BY {batch_order}
    RETURNING 1
), counted AS (
    SELECT (SELECT count(*) FROM inserted) AS inserted, (SELECT count(*) FROM batch) AS read
)
UPDATE {schema}."backfill" AS r
SET emitted = r.emitted + c.inserted,
    last_key = coalesce(
        (SELECT pg_catalog.jsonb_build_object({key_pairs}) FROM batch AS b ORDER BY {batch_order_desc} LIMIT 1),
        r.last_key
    ),
    updated_at = now(),
    finished_at = CASE WHEN c.read < %(limit)s THEN now() END
FROM counted AS c
WHERE r.id = %(run)s
RETURNING r.emitted, r.finished_at IS NOT NULL AS finished, c.inserted AS batch

-- name: set_context
-- The writer's context for the rest of the transaction (pgevents.context()
-- and the Flask request, through SQLAlchemy: the value is a bound parameter).
SELECT pg_catalog.set_config({setting}, :value, true)
