"""Scenario throughput: a bulk INSERT drained by one listener, and a steady load of writers."""
from __future__ import annotations

import logging
import time

from .common import (
    BULK_INSERT,
    OURS,
    RAW_CHANNEL,
    ArrivalLog,
    BenchServer,
    RawListener,
    ScenarioResult,
    Settings,
    build_app,
    connect,
    create_anchor_tables,
    item_table,
    now,
    run_insert_threads,
    sqlalchemy_url,
    timed_statement,
    wait_listening,
)

logger = logging.getLogger("benchmarks.throughput")


def scenario_throughput(server: BenchServer, settings: Settings) -> ScenarioResult:
    """Delivery throughput: a bulk INSERT drained by one listener, and a steady 4-writer load.

    Bulk: one INSERT statement of ``bulk_rows`` rows; the time from its commit
    to the last handler call (no-op handler, listener thread in this process),
    as events/s; also ``process_pending()`` draining the same backlog
    synchronously (listener stopped), which isolates the dispatch loop.
    Steady: ``steady_writers`` threads insert single rows as fast as they can
    for ``steady_seconds``; reports writer commits/s, events handled/s within
    the window, and the backlog left when the writers stop.

    Anchor: a raw psycopg2 LISTEN loop (``select`` + ``poll``) draining one
    ``pg_notify`` per row, with the row as JSON payload, for the same bulk
    insert and the same steady load (notifications/s).
    """
    name = "pgevents_bench_throughput"
    url = server.create_database(name)
    raw = "raw LISTEN (psycopg2, per-row NOTIFY)"
    pending_variant = "flask-pgevents process_pending()"
    rows = settings.bulk_rows
    result = ScenarioResult(
        params={"bulk_rows": rows, "steady_writers": settings.steady_writers,
                "steady_seconds": settings.steady_seconds, "driver": settings.driver},
        measurements=[],
    )
    create_anchor_tables(url, "tp_item", "tp_raw")

    ours_log = ArrivalLog()
    raw_log = ArrivalLog()
    app, pgevents = build_app(
        sqlalchemy_url(url, settings.driver), [item_table("tp_item")], ["after_insert"],
        lambda event: ours_log.record(),
    )
    raw_listener = RawListener(url, RAW_CHANNEL, raw_log, "psycopg2")
    pgevents.start(app)
    raw_listener.start()
    writer = connect(url)
    try:
        wait_listening(lambda: writer.execute("INSERT INTO tp_item (payload) VALUES ('warm-up')"), ours_log)
        wait_listening(lambda: writer.execute("INSERT INTO tp_raw (payload) VALUES ('warm-up')"), raw_log)

        def bulk(variant: str) -> None:
            table, log = ("tp_item", ours_log) if variant == OURS else ("tp_raw", raw_log)
            log.reset()
            insert_seconds = timed_statement(writer, BULK_INSERT.format(table=table), ("", rows))
            committed = now()
            if not log.wait_for(rows, settings.drain_timeout):
                logger.warning("%s handled only %d of %d events within %.0f s.",
                               variant, log.count, rows, settings.drain_timeout)
            assert log.first is not None and log.last is not None
            anchor = None if variant == raw else raw
            result.add("bulk: events/s", variant, "events/s", anchor).values.append(
                log.count / (log.last - committed))
            result.add("bulk: first event after commit", variant, "ms", anchor, "difference").values.append(
                (log.first - committed) * 1e3)
            result.add("bulk: INSERT statement", variant, "s", anchor).values.append(insert_seconds)
            logger.info("bulk %s: %.0f events/s (insert %.2f s)", variant,
                        log.count / (log.last - committed), insert_seconds)

        def bulk_process_pending() -> None:
            pgevents.stop(timeout=10, app=app)
            ours_log.reset()
            writer.execute(BULK_INSERT.format(table="tp_item"), ("", rows))
            started = time.perf_counter()
            handled = pgevents.process_pending(app=app)
            elapsed = time.perf_counter() - started
            result.add("bulk: events/s", pending_variant, "events/s", raw).values.append(handled / elapsed)
            logger.info("bulk process_pending(): %d events, %.0f events/s", handled, handled / elapsed)
            pgevents.start(app)
            wait_listening(lambda: writer.execute("INSERT INTO tp_item (payload) VALUES ('warm-up')"), ours_log)

        def steady(variant: str) -> None:
            table, log = ("tp_item", ours_log) if variant == OURS else ("tp_raw", raw_log)
            log.reset()
            conns = [connect(url) for _ in range(settings.steady_writers)]
            try:
                run = run_insert_threads(conns, table, settings.steady_seconds)
                handled_in_window = log.count
            finally:
                for conn in conns:
                    conn.close()
            drained_from = time.perf_counter()
            if not log.wait_for(run.commits, settings.drain_timeout):
                logger.warning("%s did not drain %d steady events within %.0f s.",
                               variant, run.commits, settings.drain_timeout)
            anchor = None if variant == raw else raw
            result.add("steady: writer commits/s", variant, "rows/s", anchor).values.append(
                run.commits / run.seconds)
            result.add("steady: events handled/s", variant, "events/s", anchor).values.append(
                handled_in_window / run.seconds)
            result.add("steady: backlog at end", variant, "events").values.append(
                run.commits - handled_in_window)
            result.add("steady: drain after end", variant, "ms").values.append(
                (time.perf_counter() - drained_from) * 1e3)
            logger.info("steady %s: %.0f commits/s, %.0f handled/s, backlog %d", variant,
                        run.commits / run.seconds, handled_in_window / run.seconds,
                        run.commits - handled_in_window)

        variants = [OURS, raw]
        for run_index in range(settings.runs):
            order = variants[run_index % 2:] + variants[:run_index % 2]
            for variant in order:
                bulk(variant)
            bulk_process_pending()
            for variant in order:
                steady(variant)
    finally:
        writer.close()
        raw_listener.stop()
        pgevents.stop(timeout=10, app=app)
        server.drop_database(name)
    return result

