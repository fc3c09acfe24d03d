"""Scenario writers: writer TPS with many concurrent single-row writers, with and without capture."""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
from typing import Any

from flask_pgevents.registry import TableKey
from flask_pgevents.sql import quote_ident
from flask_pgevents.triggers import CaptureOwner, TriggerManager

from .common import (
    EVENT_TABLE,
    ITEM_DDL,
    OURS,
    ArrivalLog,
    BenchServer,
    InsertRun,
    ScenarioResult,
    Settings,
    build_app,
    connect,
    item_table,
    pending_events,
    percentile,
    run_insert_threads,
    sqlalchemy_url,
    wait_drained,
    wait_listening,
)

logger = logging.getLogger("benchmarks.writers")


def writer_process_main(pipe: multiprocessing.connection.Connection) -> None:
    """A writer process: on each command, opens connections, waits for "go", inserts, reports."""
    while True:
        command = pipe.recv()
        if command is None:
            return
        url, table, threads, seconds = command
        conns = [connect(url) for _ in range(threads)]
        try:
            pipe.send("ready")
            pipe.recv()  # "go"
            result = run_insert_threads(conns, table, seconds)
        finally:
            for conn in conns:
                conn.close()
        pipe.send(result)


class WriterPool:
    """A few spawned processes that drive many writer connections, so 64 writers are not one GIL."""

    def __init__(self, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipes: list[multiprocessing.connection.Connection] = []
        self._processes: list[Any] = []
        for index in range(processes):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=writer_process_main, args=(child_end,), name=f"bench-writers-{index}", daemon=True
            )
            process.start()
            self._pipes.append(parent_end)
            self._processes.append(process)

    def run(self, url: str, table: str, writers: int, seconds: float) -> InsertRun:
        """``writers`` single-row writers spread over the processes for ``seconds``."""
        count = len(self._pipes)
        shares = [writers // count + (1 if i < writers % count else 0) for i in range(count)]
        active = [(pipe, share) for pipe, share in zip(self._pipes, shares) if share]
        for pipe, share in active:
            pipe.send((url, table, share, seconds))
        for pipe, _ in active:
            if pipe.recv() != "ready":
                raise RuntimeError("A writer process failed to connect.")
        for pipe, _ in active:
            pipe.send("go")
        results: list[InsertRun] = [pipe.recv() for pipe, _ in active]
        return InsertRun(
            sum(r.commits for r in results),
            max(r.seconds for r in results),
            [lat for r in results for lat in r.latencies],
        )

    def close(self) -> None:
        """End the processes: ask each to return, terminate those still alive after 10 s."""
        for pipe in self._pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for process in self._processes:
            process.join(10)
            if process.is_alive():
                process.terminate()


#: The schema of the diagnostic variant: a second install of the library's own.
DIAGNOSTIC_SCHEMA = "bench_diag"


def no_notify_capture_sql(table: str) -> list[str]:
    """The library's insert capture on ``table``, into a copy of the event table, that never notifies.

    The library's own DDL (event tables, capture functions, trigger) is
    installed a second time, in :data:`DIAGNOSTIC_SCHEMA`. No listener ever
    registers there, so its capture function's ``pg_notify`` is never
    reached: events are stored exactly as the library stores them, and only
    NOTIFY is missing. This isolates what NOTIFY costs concurrent writers.
    """
    manager = TriggerManager(DIAGNOSTIC_SCHEMA, capture_role=f"{DIAGNOSTIC_SCHEMA}_capture")
    return [
        *manager.schema_sql(CaptureOwner(role=None)),
        manager.trigger_sql(TableKey("public", table), "insert", None),
    ]


def writers_label(writers: int) -> str:
    """The label of a writer count in metric names: "1 writer", "16 writers"."""
    return "1 writer" if writers == 1 else f"{writers} writers"


def scenario_writers(server: BenchServer, settings: Settings) -> ScenarioResult:
    """Writer TPS with many concurrent single-row writers, with capture and a listener vs without.

    For each writer count (1, 4, 16, 64), that many connections insert one
    row per transaction as fast as they can for ``writer_seconds``, driven
    from ``writer_processes`` spawned processes (threads inside them), so
    that the writers are not serialised by one GIL. Variant: flask-pgevents'
    triggers installed and its listener thread running in this process,
    handling every event; anchor: the same table without triggers. Also
    reports the writers' commit latency p50/p99 and the listener's backlog
    when the window closes. A diagnostic variant runs the library's capture
    function without its ``pg_notify`` (into a copy of the event table), to
    separate the cost of storing events from the cost of NOTIFY, which
    PostgreSQL serialises across committing transactions.
    """
    name = "pgevents_bench_writers"
    url = server.create_database(name)
    plain, ours, diagnostic = "no triggers", f"{OURS} + listener", "capture without NOTIFY (diagnostic)"
    tables = {plain: "cw_plain", ours: "cw_item", diagnostic: "cw_nonotify"}
    result = ScenarioResult(
        params={"writer_counts": list(settings.writer_counts), "seconds": settings.writer_seconds,
                "processes": settings.writer_processes, "driver": settings.driver},
        measurements=[],
    )
    with connect(url) as conn:
        for table in tables.values():
            conn.execute(ITEM_DDL.format(name=table))
    log = ArrivalLog()
    pool = WriterPool(settings.writer_processes)
    app, pgevents = build_app(
        sqlalchemy_url(url, settings.driver), [item_table("cw_item")], ["after_insert"],
        lambda event: log.record(),
    )
    admin = connect(url)
    for statement in no_notify_capture_sql(tables[diagnostic]):
        admin.execute(statement)
    pgevents.start(app)

    def probe() -> None:
        admin.execute("INSERT INTO cw_item (payload) VALUES ('warm-up')")

    try:
        wait_listening(probe, log)
        for table in tables.values():  # warm-up of the writer processes
            pool.run(url, table, settings.writer_processes, 0.2)
        wait_drained(admin, settings.drain_timeout)

        def measure(writers: int, variant: str) -> None:
            log.reset()
            run = pool.run(url, tables[variant], writers, settings.writer_seconds)
            handled = log.count
            tps = run.commits / run.seconds
            latencies = sorted(run.latencies)
            anchor = None if variant == plain else plain
            label = writers_label(writers)
            result.add(f"TPS, {label}", variant, "commits/s", anchor).values.append(tps)
            result.add(f"commit p50, {label}", variant, "ms", anchor).values.append(
                percentile(latencies, 50) * 1e3)
            result.add(f"commit p99, {label}", variant, "ms", anchor).values.append(
                percentile(latencies, 99) * 1e3)
            if variant == ours:
                result.add(f"listener backlog at end, {label}", variant, "events").values.append(
                    run.commits - handled)
                if not wait_drained(admin, settings.drain_timeout):
                    logger.warning("The listener did not drain %d events within %.0f s; discarding them.",
                                   pending_events(admin), settings.drain_timeout)
                    pgevents.stop(timeout=10, app=app)
                    admin.execute(f"TRUNCATE {EVENT_TABLE}")
                    pgevents.start(app)
                    wait_listening(probe, log)
            elif variant == diagnostic:
                admin.execute(f'TRUNCATE {quote_ident(DIAGNOSTIC_SCHEMA)}."event"')
            logger.info("%s, %s: %.0f commits/s (commit p99 %.1f ms), handled %d of %d in the window",
                        label, variant, tps, percentile(latencies, 99) * 1e3, handled, run.commits)

        variants = [plain, ours, diagnostic]
        for run_index in range(settings.runs):
            for count_index, writers in enumerate(settings.writer_counts):
                shift = (run_index + count_index) % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    measure(writers, variant)
            admin.execute(f"TRUNCATE {', '.join(tables.values())}")
    finally:
        admin.close()
        pool.close()
        pgevents.stop(timeout=10, app=app)
        server.drop_database(name)
    result.extra["tps"] = result.series(
        variants, {str(writers): f"TPS, {writers_label(writers)}" for writers in settings.writer_counts})
    return result

