"""Scenario latency_history: single-row commit → handler latency in lived-in states of the database."""
from __future__ import annotations

import logging
import threading
from typing import Any, Optional

import psycopg

from flask_pgevents.sql import quote_ident

from .common import (
    BULK_INSERT,
    EVENT_TABLE,
    ITEM_DDL,
    BenchServer,
    ListenerProcess,
    ListenerSpec,
    PacedRun,
    ScenarioResult,
    Settings,
    build_app,
    connect,
    drain_allowance,
    measure_paced_latency,
    record_latency,
    scalar,
    sqlalchemy_url,
    wait_listening,
)

logger = logging.getLogger("benchmarks.latency_history")

#: The second app's event schema: each app that shares a database has its own.
OTHER_SCHEMA = "pgevents_other"
OTHER_EVENT_TABLE = f'{quote_ident(OTHER_SCHEMA)}."event"'
#: Rows per INSERT statement of the long transaction.
BULK_CHUNK = 5_000



class BulkLoad:
    """A long transaction inserting ``rows`` rows into ``table`` in chunks; committed by :meth:`commit`.

    Each chunk is one ``INSERT … SELECT`` statement, so capture triggers write
    its events when it ends: they stay uncommitted until the end.
    """

    def __init__(self, url: str, table: str, rows: int) -> None:
        self._conn: psycopg.Connection[Any] = psycopg.connect(url)  # not autocommit: one transaction
        self.table = table
        self.rows = rows
        self.inserted = 0
        self._error: Optional[Exception] = None
        self._first_chunk = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-bulk-load", daemon=True)

    def start(self, timeout: float = 60.0) -> None:
        """Start inserting; return once the first chunk is in."""
        self._thread.start()
        if not self._first_chunk.wait(timeout):
            raise RuntimeError(f"The bulk load's first {BULK_CHUNK:,} rows took over {timeout:.0f} s.")

    def _run(self) -> None:
        sql = BULK_INSERT.format(table=self.table)
        try:
            while self.inserted < self.rows:
                step = min(BULK_CHUNK, self.rows - self.inserted)
                self._conn.execute(sql, ("", step))
                self.inserted += step
                self._first_chunk.set()
        except Exception as exc:  # noqa: BLE001 - reported by commit()
            self._error = exc
        finally:
            self._first_chunk.set()

    def commit(self, timeout: float) -> int:
        """Wait for the last chunk, commit; return the rows committed.

        :raises RuntimeError: if the load failed or did not end within ``timeout`` seconds.
        """
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"The bulk load of {self.rows:,} rows did not end within {timeout:.0f} s.")
        if self._error is not None:
            raise RuntimeError(f"The bulk load failed: {self._error}") from self._error
        self._conn.commit()
        self._conn.close()
        return self.inserted

    def close(self) -> None:
        """Roll back and close, if not committed (the thread is a daemon)."""
        self._conn.close()


def scenario_latency_history(server: BenchServer, settings: Settings) -> ScenarioResult:
    """Single-row commit → handler latency (p50, p99, from send) in lived-in states.

    Our listener runs in a spawned process (``pgevents.start``), as in the
    latency scenario's "listener process" layout: paced writers insert
    ``history_rate`` rows per second for ``history_seconds``, the clock
    starting right before each INSERT is sent. States, in this order in each
    run (each run starts from a new event schema):

    * fresh event table: the schema dropped and the triggers installed again,
      the listener restarted and warmed up (the anchor);
    * right after the same listener drained a backlog of ``history_backlog``
      events (one committed ``INSERT … SELECT``) on the measured table; no
      manual VACUUM in between (the listener vacuums when it does). A
      backlog not drained in time (``incomplete_drains``) is emptied, not
      measured, and not tried again;
    * while a second app's bulk load is in flight: a long transaction inserts
      ``history_bulk_rows`` rows in statements of 5,000 into a table of a
      second app (its own ``PGEVENTS_SCHEMA``, its listener in another
      process), and commits only after the measurement;
    * the same, into another table of our own app: the uncommitted events are
      in our event table, ahead of the measured ones.

    Also per state: the event table's size on disk when the measurement
    starts, and the writer's INSERT+commit round trip, which shows what the
    database itself was slowed down by.
    """
    name = "pgevents_bench_latency_history"
    url = server.create_database(name)
    backlog, bulk_rows = settings.history_backlog, settings.history_bulk_rows
    fresh = "fresh event table"
    after_drain = f"after draining {backlog:,} events"
    second_app = f"second app's bulk load in flight ({bulk_rows:,} rows)"
    same_app = f"own bulk load in flight ({bulk_rows:,} rows, same event table)"
    result = ScenarioResult(
        params={"backlog": backlog, "bulk_rows": bulk_rows, "rate_per_s": settings.history_rate,
                "seconds": settings.history_seconds, "writers": settings.latency_writers,
                "driver": settings.driver},
        measurements=[],
    )
    with connect(url) as conn:
        for table in ("history_item", "history_bulk", "history_other"):
            conn.execute(ITEM_DDL.format(name=table))
    ours_url = sqlalchemy_url(url, settings.driver)
    ours_tables = ("history_item", "history_bulk")
    # The apps of this process only install triggers: their listeners run in child processes.
    app, pgevents = build_app(ours_url, list(ours_tables), ["after_insert"], lambda event: None)
    build_app(ours_url, ["history_other"], ["after_insert"], lambda event: None, PGEVENTS_SCHEMA=OTHER_SCHEMA)
    listener: Optional[ListenerProcess] = None
    other: Optional[ListenerProcess] = None
    writer = connect(url)
    next_id = 1_000_000_000
    overlap: list[dict[str, Any]] = []
    incomplete: list[dict[str, Any]] = []

    def probe() -> None:
        writer.execute("INSERT INTO history_item (payload) VALUES ('warm-up')")

    def paced(seconds: float) -> PacedRun:
        nonlocal next_id
        assert listener is not None
        next_id += 10_000_000
        return measure_paced_latency(url, "history_item", listener, settings.history_rate, seconds,
                                     settings.latency_writers, next_id, settings.drain_timeout)

    def measure(state: str) -> None:
        size = scalar(writer, "SELECT pg_total_relation_size(%s)", (EVENT_TABLE,))
        run = paced(settings.history_seconds)
        record_latency(result, run, state, None if state == fresh else fresh, from_send=True, label="from send")
        result.add("event table size at start", state, "MB").values.append(size / 2**20)

    def drained(handler: ListenerProcess, count: int, event_table: str, what: str) -> bool:
        """Wait for ``handler`` to handle ``count`` events; if it does not in time, empty its event table."""
        if handler.wait_for(count, drain_allowance(settings, count)):
            return True
        logger.warning("The listener handled %d of %d events of the %s in time; emptying its event table.",
                       handler.count, count, what)
        incomplete.append({"what": what, "events": count, "handled": handler.count})
        handler.stop()
        writer.execute(f"TRUNCATE {event_table}")
        handler.start()
        return False

    def measure_during_load(state: str, table: str, handler: ListenerProcess, event_table: str) -> None:
        load = BulkLoad(url, table, bulk_rows)
        try:
            load.start()
            measure(state)
            overlap.append({"state": state, "rows_inserted_by_end_of_measurement": load.inserted})
            handler.reset()  # before the commit: count every event of the load
            committed = load.commit(settings.drain_timeout)
        finally:
            load.close()
        drained(handler, committed, event_table, f"bulk load ({state})")

    try:
        listener = ListenerProcess(ListenerSpec("pgevents", ours_url, tables=ours_tables), "bench-history-listener")
        other = ListenerProcess(
            ListenerSpec("pgevents", ours_url, tables=("history_other",), config=(("PGEVENTS_SCHEMA", OTHER_SCHEMA),)),
            "bench-history-other-app",
        )
        for _ in range(settings.long_runs):
            listener.stop()
            pgevents.uninstall_triggers(app, drop_schema=True)
            pgevents.install_triggers(app)
            listener.start()
            wait_listening(probe, listener)
            paced(0.2)  # warms the new connection and schema up: not reported
            measure(fresh)

            # A backlog that could not be drained in time is not tried again.
            if not any(d["what"] == "backlog" for d in incomplete):
                listener.reset()
                writer.execute(BULK_INSERT.format(table="history_item"), ("", backlog))
                if drained(listener, backlog, EVENT_TABLE, "backlog"):
                    measure(after_drain)

            measure_during_load(second_app, "history_other", other, OTHER_EVENT_TABLE)
            measure_during_load(same_app, "history_bulk", listener, EVENT_TABLE)
    finally:
        for process in (listener, other):
            if process is not None:
                process.close()
        writer.close()
        server.drop_database(name)
    result.extra["bulk_load_overlap"] = overlap
    result.extra["incomplete_drains"] = incomplete
    return result
