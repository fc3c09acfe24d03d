"""Every query flask-pgevents runs, on one connection, returning typed rows.

The SQL lives in ``sql/queries.sql``; rows are read by column name into the
dataclasses below. Nothing else in the package executes SQL, except the DDL
scripts that :mod:`flask_pgevents.triggers` renders and this store runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import string
from typing import Any, Iterator, NamedTuple, Optional, Sequence

from .connection import Connection, sqlstate
from .registry import TableKey
from .sql import BLOCKS, quote_ident, render


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
    #: The writing transaction (broadcast rows only), as text.
    txid: Optional[str] = None


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
class LockHolder:
    """A session holding a lock on a table that install needs."""

    pid: int
    application_name: str
    state: Optional[str]
    transaction_seconds: Optional[float]


class LockTimeout(Exception):
    """A statement of :meth:`Store.run_ddl` gave up waiting for its lock.

    :param index: the position of that statement in the list run.
    """

    def __init__(self, index: int) -> None:
        super().__init__(f"statement {index} could not take its lock")
        self.index = index


@dataclasses.dataclass(frozen=True)
class CaptureRoleState:
    """What decides who owns the capture functions."""

    installer: str
    superuser: bool
    createrole: bool
    role_exists: bool
    is_member: bool


def _placeholders(sql: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(sql) if field}


#: Blocks whose one placeholder is the event schema: rendered once per store.
_SCHEMA_QUERIES = [name for name, sql in BLOCKS.items() if _placeholders(sql) == {"schema"}]


#: The payload of a wake-up that asks listeners to claim from the first id
#: (writers' wake-ups have none).
RESCAN = "rescan"


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
        cursor = self.conn.execute(self._sql.get(name) or BLOCKS[name], params)
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

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
        attempt, done, size, txid = (index.get(column) for column in ("attempt", "done_handlers", "size", "txid"))
        events = [
            StoredEvent(
                row[id_], TableKey(row[schema], row[table]), row[op], row[old], row[new], row[created_at],
                0 if attempt is None else row[attempt],
                () if done is None else tuple(row[done] or ()),
                0 if size is None else row[size],
                None if txid is None else row[txid],
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

    def capture_role_state(self, role: str) -> CaptureRoleState:
        row = self._rows("capture_role_state", {"role": role})[0]
        return CaptureRoleState(
            installer=row["installer"], superuser=row["superuser"], createrole=row["createrole"],
            role_exists=row["role_exists"], is_member=bool(row["is_member"]),
        )

    def role_state(self, role: str) -> tuple[bool, int]:
        """Whether ``role`` exists, and the server's version number."""
        row = self._rows("role_state", (role,))[0]
        return bool(row["role_exists"]), int(row["server_version"])
