"""Every query flask-pgevents runs, on one connection, returning typed rows.

The SQL lives in ``sql/queries.sql``; rows are read by column name into the
dataclasses below. Every query on flask-pgevents' own connections runs here,
the DDL that :mod:`flask_pgevents.triggers` renders included. Other modules
execute only session settings, each a rendered block: the handlers'
savepoints and search_path on the claiming connection (:mod:`~flask_pgevents.atomic`),
``pgevents.context`` and ``pgevents.suppress`` on the app's session
(:mod:`~flask_pgevents.context`, :mod:`~flask_pgevents.suppression`), the safe
search_path at connect (:mod:`~flask_pgevents.connection`,
:mod:`~flask_pgevents.state`); and the pytest plugin creates its test databases.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import string
from typing import Any, Iterator, NamedTuple, Optional, Sequence

from .connection import DATABASE_ERRORS, Connection, sqlstate
from .filters import ROW_ALIASES
from .registry import TableKey
from .sql import BLOCKS, quote_ident, quote_literal, render
from .stats import PendingEvents


class StoredEvent(NamedTuple):
    """An event row as claimed (queued) or read (broadcast); rows are json text.

    A named tuple: one is made per event on the hot path.
    """

    id: int
    table: TableKey
    op: str
    old: Optional[str]
    new: Optional[str]
    created_at: datetime.datetime
    #: Failed attempts so far.
    attempt: int = 0
    #: Handlers that already succeeded in a failed attempt.
    done_handlers: tuple[str, ...] = ()
    size: int = 0
    #: The writing transaction, as text; ``None`` for events of releases before 0.2.
    txid: Optional[str] = None
    #: The writer's ``pgevents.context`` setting, as set (JSON text), or ``None``.
    context: Optional[str] = None
    #: A backfill event (``flask pgevents backfill``), not a captured change.
    backfill: bool = False
    #: The one handler a backfill event is for; ``None``: every handler.
    handler: Optional[str] = None
    #: The ids of the ``where=`` filters the row matched, space-separated;
    #: ``None`` when its trigger had no filters.
    matched: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Claim:
    """A claimed batch, and what was in flight when it looked."""

    #: Transactions in progress at the claim's snapshot.
    in_flight: int
    #: The snapshot's xmin: every transaction before it has ended.
    xmin: int
    #: The newest transaction in progress at the snapshot, if any.
    newest_in_flight: Optional[int]
    events: list[StoredEvent]


@dataclasses.dataclass(frozen=True)
class Backlog:
    pending: int
    oldest_pending_age: Optional[datetime.timedelta]
    failed: int


@dataclasses.dataclass(frozen=True)
class FailedEvent:
    """An event kept as failed, with each failing step's error and traceback."""

    id: int
    table: str
    op: str
    timestamp: datetime.datetime
    #: Failed attempts, counted across retries.
    attempt: int
    errors: dict[str, dict[str, str]]
    #: The row as stored, json text.
    old: Optional[str] = None
    new: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class TriggerRow:
    """A trigger whose function lives in the event schema, as the catalog has it."""

    table: TableKey
    name: str
    function: str
    arguments: tuple[str, ...]
    source: str
    enabled: bool
    #: The trigger's comment: install writes the app that needs it there.
    comment: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class CaptureFunction:
    """A function in the event schema, as the catalog has it."""

    source: str
    owner: str
    #: PUBLIC may call it (installs before 0.2 left it so).
    public_execute: bool


@dataclasses.dataclass(frozen=True)
class SchemaObjects:
    """What the event schema holds now: compared by install with what it would create."""

    tables: frozenset[str] = frozenset()
    #: The columns of the event table.
    event_columns: frozenset[str] = frozenset()
    functions: dict[str, CaptureFunction] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ListenerSession:
    """A listener registered in the event schema, whose database session is alive."""

    pid: int
    #: Waiting for events (``False``: handling a batch).
    idle: bool
    #: When it last became idle or busy.
    since: datetime.datetime
    application_name: str
    #: ``None`` for a Unix socket, or when the role may not see it.
    client_addr: Optional[str]
    connected_for: Optional[datetime.timedelta]


@dataclasses.dataclass(frozen=True)
class LockHolder:
    """A session holding a lock on a table that install needs."""

    pid: int
    application_name: str
    state: Optional[str]
    transaction_seconds: Optional[float]


#: SQLSTATE classes of what is wrong with a filter itself: data exceptions
#: (a literal its column's type refuses), names and types (an unknown
#: function, operator or type), unsupported features.
_FILTER_ERROR_CLASSES = ("22", "42", "0A")


class LockTimeout(Exception):
    """A statement of :meth:`Store.run_ddl` gave up waiting for its lock.

    :param index: the position of that statement in the list run.
    :param table: the table whose lock it waited for, when known.
    """

    def __init__(self, index: int, table: Optional[TableKey] = None) -> None:
        super().__init__(f"statement {index} could not take its lock")
        self.index = index
        self.table = table


@dataclasses.dataclass(frozen=True)
class BackfillRun:
    """A backfill run as stored: started or resumed."""

    id: int
    #: Rows emitted so far, by every process that ran it.
    emitted: int
    #: An unfinished run of the same backfill was found and goes on.
    resumed: bool


@dataclasses.dataclass(frozen=True)
class BackfillBatch:
    """What one batch of a backfill did."""

    #: Rows it emitted as events.
    batch: int
    #: Rows the run has emitted in all.
    emitted: int
    #: The run reached the end of the table.
    finished: bool


@dataclasses.dataclass(frozen=True)
class CaptureRoleState:
    """What decides who owns the capture functions."""

    installer: str
    superuser: bool
    createrole: bool
    role_exists: bool
    is_member: bool


@dataclasses.dataclass(frozen=True)
class RoleState:
    """What granting a role the listener's privileges depends on."""

    role_exists: bool
    #: The server's version number (``server_version_num``).
    server_version: int


def _placeholders(sql: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(sql) if field}


#: Blocks whose one placeholder is the event schema: rendered once per store.
_SCHEMA_QUERIES = [name for name, sql in BLOCKS.items() if _placeholders(sql) == {"schema"}]


#: The payload of a wake-up that asks listeners to claim from the first id
#: (writers' wake-ups have none).
RESCAN = "rescan"


def qualified_name(table: TableKey) -> str:
    return f"{quote_ident(table.schema)}.{quote_ident(table.name)}"


def _verbatim(condition: Optional[str]) -> str:
    """A user's SQL condition as a statement with parameters takes it (``%`` doubled)."""
    return "TRUE" if not condition else condition.replace("%", "%%")


def _by_name(cursor: Any) -> list[dict[str, Any]]:
    """A cursor's rows, each read by column name."""
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def subscription_key(table: TableKey, op: str) -> str:
    """How the claim names a table and op, unambiguously for any names."""
    return f"{len(table.schema)}:{table.schema}{table.name}:{op}"


class Store:
    """Runs every query of flask-pgevents on ``conn``, for the event schema ``schema``.

    :param conn: an autocommit connection; :meth:`begin` opens a transaction.
    :param schema: the event schema's name.
    """

    def __init__(self, conn: Connection, schema: str) -> None:
        self.conn = conn
        self.schema = schema
        quoted = quote_ident(schema)
        self._sql = {name: render(name, schema=quoted) for name in _SCHEMA_QUERIES}
        #: The event table, as to_regclass() takes it.
        self.event_table = f'{quoted}."event"'

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.conn.close()

    def _rows(self, name: str, params: Any = None) -> list[dict[str, Any]]:
        return _by_name(self.conn.execute(self._sql.get(name) or BLOCKS[name], params))

    def _events(self, name: str, params: Any) -> tuple[list[dict[str, Any]], list[StoredEvent]]:
        """Run a query of events; return its first row by column name, and the events.

        Columns are found by name once per query, not per row: this is the
        hot path of every claim. Columns a query lacks take their defaults.
        """
        cursor = self.conn.execute(self._sql[name], params)
        rows = cursor.fetchall()
        index = {column[0]: i for i, column in enumerate(cursor.description)}
        id_, schema, table, op, old, new, created_at = (
            index[column] for column in ("id", "table_schema", "table_name", "op", "old", "new", "created_at")
        )
        attempt, done, size, txid, context, backfill, handler, matched = (
            index.get(column)
            for column in ("attempt", "done_handlers", "size", "txid", "context", "backfill", "handler", "matched")
        )
        events = [
            StoredEvent(
                row[id_], TableKey(row[schema], row[table]), row[op], row[old], row[new], row[created_at],
                0 if attempt is None else row[attempt],
                () if done is None else tuple(row[done] or ()),
                0 if size is None else row[size],
                None if txid is None else row[txid],
                None if context is None else row[context],
                False if backfill is None else bool(row[backfill]),
                None if handler is None else row[handler],
                None if matched is None else row[matched],
            )
            for row in rows if row[id_] is not None
        ]
        return [dict(zip(index, row)) for row in rows[:1]], events

    def _run(self, name: str, params: Any = None) -> int:
        """Run a statement; return how many rows it changed."""
        return int(self.conn.execute(self._sql.get(name) or BLOCKS[name], params).rowcount)

    # Transactions -------------------------------------------------------------

    def begin(self) -> None:
        self._run("begin")

    def commit(self) -> None:
        self._run("commit")

    def rollback(self) -> None:
        self._run("rollback")

    def savepoint(self) -> None:
        self._run("savepoint")

    def rollback_to_savepoint(self) -> None:
        self._run("rollback_to_savepoint")

    def release_savepoint(self) -> None:
        self._run("release_savepoint")

    def run_script(self, statements: Sequence[str]) -> None:
        """Run rendered DDL statements in one transaction."""
        self.begin()
        try:
            self.run_ddl(statements)
        except BaseException:
            self.rollback()
            raise
        self.commit()

    def run_ddl(self, statements: Sequence[str]) -> None:
        """Run rendered DDL statements in the current transaction.

        :raises LockTimeout: naming the statement that waited past ``lock_timeout``.
        """
        for index, statement in enumerate(statements):
            try:
                self.conn.execute(statement)
            except Exception as exc:
                if sqlstate(exc) == "55P03":  # lock_not_available
                    raise LockTimeout(index) from exc
                raise

    @contextlib.contextmanager
    def safe_search_path(self) -> Iterator[None]:
        """Run the block with ``search_path = pg_catalog, pg_temp``, then restore
        the connection's own; call inside a transaction (a borrowed connection's).

        If the block raises, the transaction is aborted and the setting, made
        with ``SET LOCAL``, ends with it.
        """
        saved = self._rows("current_search_path")[0]["search_path"]
        self._run("safe_local_search_path")
        yield
        self._run("set_local_search_path", (saved,))

    def set_lock_timeout(self, seconds: float) -> None:
        """Until the transaction ends, give up on a lock after ``seconds`` (0: wait forever)."""
        self._run("set_lock_timeout", (f"{max(int(seconds * 1000), 1) if seconds > 0 else 0}ms",))

    # Listening ------------------------------------------------------------------

    def listen(self) -> None:
        """Receive the wake-ups of writers; the channel is the schema's name."""
        self.conn.execute(render("listen", channel=quote_ident(self.schema)))

    def notify(self, payload: str = "") -> None:
        """Wake the listeners; :data:`RESCAN` also makes them claim from the first id."""
        self._run("notify", (self.schema, payload))

    def skip_commit_flush(self) -> None:
        self._run("skip_commit_flush")

    def claim_in_id_order(self) -> None:
        """Make this connection's claims walk the pending index, whatever the backlog."""
        self._run("claim_in_id_order")

    def register_listener(self) -> None:
        self._run("register_listener")

    def set_listener_idle(self, idle: bool) -> None:
        self._run("set_listener_idle", (idle,))

    def unregister_listener(self) -> None:
        self._run("unregister_listener")

    # Delivery ---------------------------------------------------------------------

    def claim_batch(self, subscriptions: list[str], after_id: int, limit: int, max_bytes: int) -> Claim:
        """Lock and read the next due events with ids above ``after_id``; call inside :meth:`begin`.

        :param subscriptions: the (table, op) keys of :func:`subscription_key`.
        """
        first, events = self._events("claim_batch", (after_id, subscriptions, limit, max_bytes))
        # An empty claim is one row, of the snapshot's columns alone.
        snapshot = first[0]
        return Claim(snapshot["in_flight"], snapshot["xmin"], snapshot["newest_in_flight"], events)

    def delete_handled(self, event_ids: list[int]) -> None:
        self._run("delete_handled", (event_ids,))

    def mark_handled(self, event_ids: list[int]) -> None:
        self._run("mark_handled", (event_ids,))

    def record_failure(
        self, event_id: int, *, attempt: int, done: list[str], errors_json: str, failed: bool, delay: float
    ) -> None:
        """Count a failed attempt: due again after ``delay`` seconds, or kept as failed."""
        self._run("record_failure", {
            "attempt": attempt, "done": done, "errors": errors_json,
            "status": "failed" if failed else "pending", "delay": delay, "id": event_id,
        })

    def purge_handled(self, older_than: float) -> None:
        self._run("purge_handled", (older_than,))

    def purge_failed(self, older_than: float) -> None:
        self._run("purge_failed", (older_than,))

    def vacuum_events(self) -> None:
        self._run("vacuum_events")

    # Broadcast ----------------------------------------------------------------------

    def broadcast_start(self) -> str:
        """The position from which changes committed from now on are read."""
        return str(self._rows("broadcast_start")[0]["txid"])

    def read_broadcast(self, after: tuple[str, int], limit: int, max_bytes: int) -> list[StoredEvent]:
        """Broadcast rows committed after position ``after`` (txid, id), in commit-safe order."""
        return self._events("read_broadcast", (*after, limit, max_bytes))[1]

    def purge_broadcast(self, older_than: float) -> None:
        self._run("purge_broadcast", (older_than,))

    # Administration -------------------------------------------------------------------

    def schema_exists(self) -> bool:
        return bool(self._rows("relation_exists", (self.event_table,))[0]["found"])

    def backlog(self) -> Optional[Backlog]:
        """Pending and failed events, or ``None`` when the schema is not installed."""
        if not self.schema_exists():
            return None
        row = self._rows("backlog")[0]
        oldest = row["oldest_pending"]
        return Backlog(row["pending"], (row["now"] - oldest) if oldest is not None else None, row["failed"])

    def pending_by_table(self) -> list[PendingEvents]:
        """Pending events by table and operation, largest first; empty when the schema is not installed."""
        if not self.schema_exists():
            return []
        return [
            PendingEvents(
                table=f"{row['table_schema']}.{row['table_name']}", op=row["op"],
                pending=row["pending"], oldest_pending_age=row["oldest_pending_age"],
            )
            for row in self._rows("pending_by_table")
        ]

    def database_now(self) -> datetime.datetime:
        now: datetime.datetime = self._rows("database_now")[0]["now"]
        return now

    def failed_events(self, limit: int) -> list[FailedEvent]:
        if not self.schema_exists():
            return []
        return [
            FailedEvent(
                id=row["id"], table=f"{row['table_schema']}.{row['table_name']}", op=row["op"],
                timestamp=row["created_at"], attempt=row["attempts"],
                errors=row["errors"] if isinstance(row["errors"], dict) else json.loads(row["errors"] or "{}"),
                old=row["old"], new=row["new"],
            )
            for row in self._rows("failed_events", (limit,))
        ]

    def retry_failed(self, event_ids: Optional[Sequence[int]]) -> int:
        """Queue failed events again (all when ``event_ids`` is None); wake listeners."""
        if not self.schema_exists():
            return 0
        count = self._run("retry_failed", (event_ids is None, list(event_ids or [])))
        if count:
            self.notify(RESCAN)  # the retried events lie behind the listeners' cursors
        return count

    def discard_failed(self, event_ids: Optional[Sequence[int]]) -> int:
        """Delete failed events for good (all when ``event_ids`` is None); return how many there were."""
        if not self.schema_exists():
            return 0
        return self._run("discard_failed", (event_ids is None, list(event_ids or [])))

    def live_listeners(self) -> list[ListenerSession]:
        """The registered listeners whose database session is alive, oldest first."""
        if not self.schema_exists():
            return []
        return [
            ListenerSession(
                pid=row["pid"], idle=row["idle"], since=row["since"],
                application_name=row["application_name"] or "", client_addr=row["client_addr"],
                connected_for=row["now"] - row["backend_start"] if row["backend_start"] is not None else None,
            )
            for row in self._rows("live_listeners")
        ]

    def schema_objects(self) -> SchemaObjects:
        """The event schema's tables, the event table's columns, and its functions."""
        rows = self._rows("schema_objects", {"schema": self.schema})
        return SchemaObjects(
            tables=frozenset(row["name"] for row in rows if row["kind"] == "table"),
            event_columns=frozenset(row["name"] for row in rows if row["kind"] == "column"),
            functions={
                row["name"]: CaptureFunction(row["source"], row["owner"], bool(row["public_execute"]))
                for row in rows if row["kind"] == "function"
            },
        )

    def lock_holders(self, table: str) -> list[LockHolder]:
        """The sessions holding a lock on ``table`` (a quoted qualified name)."""
        return [
            LockHolder(row["pid"], row["application_name"] or "", row["state"], row["transaction_seconds"])
            for row in self._rows("lock_holders", (table,))
        ]

    def installed_triggers(self) -> list[TriggerRow]:
        return [
            TriggerRow(
                table=TableKey(row["table_schema"], row["table_name"]), name=row["name"],
                function=row["function"],
                arguments=tuple(a.decode() for a in bytes(row["arguments"]).split(b"\x00")[:row["argument_count"]]),
                source=row["source"], enabled=row["enabled"] != "D", comment=row["comment"],
            )
            for row in self._rows("installed_triggers", (self.schema,))
        ]

    def table_columns(self, table: TableKey) -> set[str]:
        """The columns of ``table``; empty if there is no such table."""
        return {row["name"] for row in self._rows("table_columns", (table.schema, table.name))}

    def filter_error(self, table: TableKey, op: str, condition: str) -> Optional[str]:
        """Why PostgreSQL cannot run a ``where=`` condition in a capture function; ``None`` if it can.

        Planned under a savepoint, rolled back whatever happens, with the
        capture functions' ``search_path``; call inside a transaction.

        :raises LockTimeout: if the table stayed locked (by an ``ALTER TABLE``,
            say) past the transaction's ``lock_timeout``.
        """
        rows = ", ".join(
            render("filter_row", table=qualified_name(table), alias=alias) for alias in ROW_ALIASES[op].values()
        )
        self.savepoint()
        try:
            self._run("safe_local_search_path")
            self.conn.execute(render("check_filter", rows=rows, condition=condition))
            error = None
        except DATABASE_ERRORS as exc:
            state = sqlstate(exc) or ""
            if state == "55P03":  # lock_not_available: planning waited past lock_timeout
                raise LockTimeout(-1, table) from exc
            if state[:2] not in _FILTER_ERROR_CLASSES:
                raise  # the connection, not the filter
            error = str(exc).strip().splitlines()[0]
        self.rollback_to_savepoint()
        self.release_savepoint()
        return error

    # Backfill -----------------------------------------------------------------------

    def primary_key(self, table: TableKey) -> list[str]:
        """The primary key's columns of ``table``, in key order; empty without one."""
        return [row["name"] for row in self._rows("primary_key", (qualified_name(table),))]

    def row_estimate(self, table: TableKey, condition: Optional[str]) -> int:
        """How many rows a backfill will read: the planner's count, or a count(*)
        of the rows ``condition`` selects when the table was never analyzed."""
        estimate = self._rows("row_estimate", (qualified_name(table),))[0]["estimate"]
        if estimate is not None:
            return int(estimate)
        sql = render("count_rows", table=qualified_name(table), condition=_verbatim(condition))
        return int(_by_name(self.conn.execute(sql, {}))[0]["count"])  # parameters: "%%" reads "%"

    def start_backfill(self, table: TableKey, handler: Optional[str], condition: Optional[str]) -> BackfillRun:
        """Resume the unfinished run of the same backfill, or start one."""
        params = {
            "table_schema": table.schema, "table_name": table.name, "handler": handler, "condition": condition,
        }
        rows = self._rows("start_backfill", params) or self._rows("start_backfill", params)
        row = rows[0]
        return BackfillRun(int(row["id"]), int(row["emitted"]), bool(row["resumed"]))

    def backfill_batch(
        self, run: int, table: TableKey, keys: Sequence[str], condition: Optional[str],
        handler: Optional[str], limit: int,
    ) -> BackfillBatch:
        """Emit the next ``limit`` rows after the run's last key; call inside :meth:`begin`.

        The run's row is locked first, so a second process running the same
        backfill waits and then goes on from the key this batch stores.

        :param condition: the user's SQL, put in the statement verbatim.
        """
        locked = self._rows("lock_backfill", (run,))
        if not locked or locked[0]["finished"]:
            return BackfillBatch(0, 0, True)
        quoted = [quote_ident(key) for key in keys]
        after = "TRUE"
        if locked[0]["last_key"] is not None:
            after = render(
                "backfill_after",
                keys=", ".join(f"x.{key}" for key in quoted),
                last_keys=", ".join(
                    render("backfill_last_key", table=qualified_name(table), key=key) for key in quoted
                ),
            )
        sql = render(
            "backfill_batch",
            schema=quote_ident(self.schema),
            table=qualified_name(table),
            after=after,
            condition=_verbatim(condition),
            order=", ".join(f"x.{key}" for key in quoted),
            batch_order=", ".join(f"b.{key}" for key in quoted),
            batch_order_desc=", ".join(f"b.{key} DESC" for key in quoted),
            key_pairs=", ".join(f"{quote_literal(key)}, b.{quoted_key}" for key, quoted_key in zip(keys, quoted)),
        )
        row = _by_name(self.conn.execute(sql, {
            "after": locked[0]["last_key"], "limit": limit, "table_schema": table.schema,
            "table_name": table.name, "handler": handler, "run": run,
        }))[0]
        if row["batch"]:
            self.notify()  # a listener that sleeps claims the batch at once
        return BackfillBatch(int(row["batch"]), int(row["emitted"]), bool(row["finished"]))

    def capture_role_state(self, role: str) -> CaptureRoleState:
        row = self._rows("capture_role_state", {"role": role})[0]
        return CaptureRoleState(
            installer=row["installer"], superuser=row["superuser"], createrole=row["createrole"],
            role_exists=row["role_exists"], is_member=bool(row["is_member"]),
        )

    def role_state(self, role: str) -> RoleState:
        """Whether ``role`` exists, and the server's version number."""
        row = self._rows("role_state", (role,))[0]
        return RoleState(bool(row["role_exists"]), int(row["server_version"]))
