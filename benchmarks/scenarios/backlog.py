"""Scenario backlog: drain throughput against the size of a committed backlog."""
from __future__ import annotations

import json
import logging
import time
from typing import Optional

import psycopg2

from .common import (
    BULK_INSERT,
    EVENT_TABLE,
    ITEM_DDL,
    OURS,
    ArrivalLog,
    BenchServer,
    ListenerProcess,
    ListenerSpec,
    ScenarioResult,
    Settings,
    build_app,
    connect,
    drain_allowance,
    item_table,
    now,
    sqlalchemy_url,
    timed_statement,
)

logger = logging.getLogger("benchmarks.backlog")

#: The raw limit's queue: the event table's columns and partial index, no trigger, no listener.
QUEUE = "backlog_queue"
QUEUE_DDL = f"CREATE TABLE {QUEUE} (LIKE {EVENT_TABLE} INCLUDING ALL)"
#: Rows like the ones the capture trigger writes for ``BULK_INSERT``.
QUEUE_FILL = f"""
INSERT INTO {QUEUE} (table_schema, table_name, op, new)
SELECT 'public', 'backlog_item', 'insert', r.j
FROM (SELECT to_json(x.*) AS j
      FROM (SELECT g::bigint AS id, g AS n, md5(g::text) AS payload, now() AS created_at
            FROM generate_series(1, %s) AS g) AS x) AS r
"""
RAW_BATCH = 500
#: Rows found by ctid (a TID scan): the DELETE costs the batch's rows only, whatever the queue's size.
RAW_DRAIN = f"""
DELETE FROM {QUEUE}
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {QUEUE} WHERE status = 'pending' ORDER BY id LIMIT {RAW_BATCH} FOR UPDATE SKIP LOCKED
))
RETURNING new::text
"""
#: The drain profile: the time of every 1/PROFILE_STEPS of the backlog.
PROFILE_STEPS = 20


def raw_drain(url: str, log: ArrivalLog, deadline: float) -> None:
    """The raw limit: ``DELETE … RETURNING`` batches in a psycopg2 loop, each row parsed, then commit.

    ``synchronous_commit`` is off, as on the listener's own connection.
    """
    conn = psycopg2.connect(url)
    try:
        cursor = conn.cursor()
        cursor.execute("SET synchronous_commit = off")
        conn.commit()
        while now() < deadline:
            cursor.execute(RAW_DRAIN)
            rows = cursor.fetchall()
            for (new,) in rows:
                log.record(json.loads(new)["id"])
            conn.commit()
            if not rows:
                break
    finally:
        conn.close()


def wait_processes(workers: list[ListenerProcess], count: int, deadline: float) -> tuple[int, Optional[float]]:
    """Poll the listener processes until together they handled ``count`` events, or until ``deadline``.

    :returns: how many they handled, and when the last one was (:func:`now`).
    """
    while True:
        progress = [worker.progress() for worker in workers]
        handled = sum(c for c, _ in progress)
        if handled >= count or now() > deadline:
            return handled, max((last for _, last in progress if last is not None), default=None)
        time.sleep(0.05)


def scenario_backlog(server: BenchServer, settings: Settings) -> ScenarioResult:
    """Drain throughput against backlog size: N committed events, then drained.

    For each size in ``backlog_sizes``, one ``INSERT … SELECT generate_series``
    of N rows commits N events (trigger installed, no listener running, the
    event table vacuumed before and a CHECKPOINT after), then the clock runs
    until the handler (a no-op reading ``event.new["id"]``) saw the last one:
    with ``process_pending()`` in this process; with the listener thread
    (``pgevents.start``, clock started just before); and, for the largest
    size only, with ``backlog_processes`` spawned listener processes of the
    same app started together. Reported as events/s, and per in-process
    variant the slowdown, events/s at the smallest size over events/s at the
    largest (the goal is below 1.5). A drain gets ``drain_timeout`` plus 1 s
    per 10,000 events; one that does not finish counts what it handled, is
    listed in ``incomplete_drains``, and is not repeated in later runs. The
    extra data hold each drain's events/s per twentieth of the backlog (the
    last run's), which shows where a drain slows down.

    Anchor: the raw limit, a psycopg2 loop of ``DELETE … WHERE id IN (SELECT
    … ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED) RETURNING new`` (each row
    parsed as JSON, one commit per batch) on a plain table with the event
    table's columns and index, holding N rows like the captured ones.
    """
    name = "pgevents_bench_backlog"
    url = server.create_database(name)
    sizes = sorted(settings.backlog_sizes)
    smallest, largest = sizes[0], sizes[-1]
    pending = f"{OURS} process_pending()"
    thread = f"{OURS} listener thread"
    processes = f"{OURS}, {settings.backlog_processes} listener processes"
    raw = f"raw psycopg2 DELETE … RETURNING, batches of {RAW_BATCH}"
    result = ScenarioResult(
        params={"sizes": sizes, "listener_processes": settings.backlog_processes, "driver": settings.driver},
        measurements=[],
    )
    with connect(url) as conn:
        conn.execute(ITEM_DDL.format(name="backlog_item"))
    log = ArrivalLog()
    ours_url = sqlalchemy_url(url, settings.driver)
    app, pgevents = build_app(
        ours_url, [item_table("backlog_item")], ["after_insert"], lambda event: log.record(event.new["id"]),
    )
    admin = connect(url)
    admin.execute(QUEUE_DDL)
    workers: list[ListenerProcess] = []
    profiles: dict[str, dict[str, list[float]]] = {}
    rates: dict[tuple[int, str, int], float] = {}
    incomplete: list[dict[str, object]] = []

    def fill(variant: str, size: int) -> None:
        admin.execute(f"VACUUM {EVENT_TABLE}, {QUEUE}")
        if variant == raw:
            admin.execute(QUEUE_FILL, (size,))
            admin.execute(f"ANALYZE {QUEUE}")  # the limit: a plan that walks the index, whatever the driver
        else:
            seconds = timed_statement(admin, BULK_INSERT.format(table="backlog_item"), ("", size))
            result.extra.setdefault("capture_insert_seconds", {}).setdefault(str(size), []).append(round(seconds, 3))
        admin.execute("CHECKPOINT")

    def drain_in_process(variant: str, size: int, deadline: float) -> tuple[int, float, Optional[float]]:
        log.reset(mark_every=max(1, size // PROFILE_STEPS))
        started = now()
        if variant == pending:
            pgevents.process_pending(timeout=deadline - started, app=app)
        elif variant == thread:
            pgevents.start(app)
            try:
                log.wait_for(size, deadline - started)
            finally:
                pgevents.stop(timeout=10, app=app)
        else:
            raw_drain(url, log, deadline)
        marks = [started, *log.marks]
        profiles.setdefault(variant, {})[str(size)] = [
            round(log.mark_every / (b - a)) for a, b in zip(marks, marks[1:])
        ]
        return log.count, started, log.last

    def drain_processes(size: int, deadline: float) -> tuple[int, float, Optional[float]]:
        for worker in workers:
            worker.reset()
        started = now()
        try:
            for worker in workers:
                worker.start()
            handled, last = wait_processes(workers, size, deadline)
        finally:
            for worker in workers:
                worker.stop()
        return handled, started, last

    def measure(run: int, variant: str, size: int) -> None:
        fill(variant, size)
        deadline = now() + drain_allowance(settings, size)
        if variant == processes:
            handled, started, last = drain_processes(size, deadline)
        else:
            handled, started, last = drain_in_process(variant, size, deadline)
        if handled != size:
            logger.warning("%s handled %d of %d events (%.0f s allowed); emptying the queues.",
                           variant, handled, size, deadline - started)
            incomplete.append({"run": run + 1, "variant": variant, "size": size, "handled": handled})
            admin.execute(f"TRUNCATE {EVENT_TABLE}, {QUEUE}")
        # An unfinished drain counts what it handled in the time it had.
        rate = handled / (last - started) if last is not None and last > started else 0.0
        rates[(run, variant, size)] = rate
        result.add(f"events/s, {size:,} backlog", variant, "events/s", None if variant == raw else raw).values.append(
            rate)
        logger.info("backlog %d, %s: %.0f events/s", size, variant, rate)

    try:
        spec = ListenerSpec("pgevents", ours_url, tables=("backlog_item",), autostart=False)
        workers = [ListenerProcess(spec, f"bench-backlog-listener-{i}") for i in range(settings.backlog_processes)]
        in_process = [pending, thread, raw]
        for run in range(settings.long_runs):
            for size in sizes:
                variants = in_process + ([processes] if size == largest else [])
                shift = run % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    if any(d["variant"] == variant and d["size"] == size for d in incomplete):
                        logger.warning("backlog %d, %s: not repeated, it did not finish in time before.",
                                       size, variant)
                        continue
                    measure(run, variant, size)
            for variant in in_process:
                small, large = rates.get((run, variant, smallest)), rates.get((run, variant, largest))
                if smallest != largest and small and large:
                    result.add(f"slowdown, {smallest:,} → {largest:,} backlog", variant, "x",
                               None if variant == raw else raw).values.append(small / large)
    finally:
        for worker in workers:
            worker.close()
        admin.close()
        pgevents.stop(timeout=10, app=app)
        server.drop_database(name)
    result.extra["drain"] = result.series(  # ours first, for plot.py
        [pending, thread, processes, raw], {str(size): f"events/s, {size:,} backlog" for size in sizes})
    result.extra["drain_profile_events_per_s"] = profiles
    result.extra["incomplete_drains"] = incomplete
    return result
