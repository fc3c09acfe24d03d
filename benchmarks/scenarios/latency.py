"""Scenario latency: commit to handler-call latency of single-row transactions at a steady rate."""
from __future__ import annotations

import logging

from .common import (
    ITEM_DDL,
    OURS,
    RAW_CHANNEL,
    ArrivalLog,
    Arrivals,
    BenchServer,
    ListenerProcess,
    ListenerSpec,
    RawListener,
    ScenarioResult,
    Settings,
    build_app,
    connect,
    create_anchor_tables,
    item_table,
    measure_paced_latency,
    percentile_curve,
    record_latency,
    sqlalchemy_url,
    wait_listening,
)

logger = logging.getLogger("benchmarks.latency")

#: The listener processes' event schema and NOTIFY channel: nothing they
#: receive wakes the listeners of this process, and the other way round.
PROCESS_SCHEMA = "pgevents_proc"
PROCESS_CHANNEL = "bench_raw_proc"
#: The metric suffix of the measurements with each listener in its own process.
PROCESS_LAYOUT = "listener process, from send"


def scenario_latency(server: BenchServer, settings: Settings) -> ScenarioResult:
    """Commit → handler-call latency of single-row transactions at a steady rate.

    Paced writer threads insert one row per transaction on a fixed schedule
    (``latency_rate`` per second for ``latency_seconds``), keyed by row id;
    the handler (or raw loop) records when it sees each row. Reported per
    run: p50, p99 and max in ms, and the writer's INSERT+commit round trip.
    Every clock is ``CLOCK_MONOTONIC``, shared by all processes.

    Two layouts, interleaved in every run:

    * Listener processes (metrics "…, listener process, from send"): our
      listener thread runs in a spawned process of its own (an app with
      ``pgevents.start``, event schema ``pgevents_proc``), and so does the
      anchor, a raw psycopg 3 LISTEN loop fed by a per-row AFTER INSERT
      trigger calling ``pg_notify`` with the row as JSON payload (the time
      taken after parsing it). The clock starts right before the writer
      sends the INSERT, so latencies include the INSERT+commit round trip
      and are never negative.
    * In-process (metrics without suffix, the history of earlier results):
      our listener thread, and the raw loop, run in the writers' process;
      the clock starts when the commit returns to the writer thread. A
      NOTIFY can reach the listener thread before the writer thread reads
      the clock again, which gives latencies slightly below zero
      (``negative_fraction`` in the extra data).
    """
    name = "pgevents_bench_latency"
    url = server.create_database(name)
    raw_in_process = "raw LISTEN (psycopg, per-row NOTIFY), in-process"
    raw = "raw LISTEN (psycopg, per-row NOTIFY)"
    result = ScenarioResult(
        params={"rate_per_s": settings.latency_rate, "seconds": settings.latency_seconds,
                "writers": settings.latency_writers, "driver": settings.driver},
        measurements=[],
    )
    create_anchor_tables(url, "latency_item", "latency_raw", [("latency_raw_proc", PROCESS_CHANNEL)])
    with connect(url) as conn:
        conn.execute(ITEM_DDL.format(name="latency_proc"))

    ours_log = ArrivalLog()
    raw_log = ArrivalLog()
    ours_url = sqlalchemy_url(url, settings.driver)
    app, pgevents = build_app(
        ours_url, [item_table("latency_item")], ["after_insert"],
        lambda event: ours_log.record(event.new["id"]),
    )
    raw_listener = RawListener(url, RAW_CHANNEL, raw_log, "psycopg")
    ours_process = raw_process = None
    pooled: dict[tuple[str, bool], list[float]] = {}
    next_id = 1_000_000
    try:
        ours_process = ListenerProcess(
            ListenerSpec("pgevents", ours_url, tables=("latency_proc",), install=True,
                         config=(("PGEVENTS_SCHEMA", PROCESS_SCHEMA),)),
            "bench-latency-listener",
        )
        raw_process = ListenerProcess(ListenerSpec("raw", url, channel=PROCESS_CHANNEL), "bench-latency-raw")
        pgevents.start(app)
        raw_listener.start()
        # (variant, table, arrivals, listener in its own process)
        variants: list[tuple[str, str, Arrivals, bool]] = [
            (OURS, "latency_item", ours_log, False),
            (raw_in_process, "latency_raw", raw_log, False),
            (OURS, "latency_proc", ours_process, True),
            (raw, "latency_raw_proc", raw_process, True),
        ]
        with connect(url) as probe:
            for _, table, log, _ in variants:
                wait_listening(lambda t=table: probe.execute(f"INSERT INTO {t} (payload) VALUES ('warm-up')"), log)
        # One short unreported round warms every path (prepared statements, caches).
        for _, table, log, _ in variants:
            measure_paced_latency(url, table, log, settings.latency_rate, 0.3, settings.latency_writers,
                                  next_id, settings.drain_timeout)
            next_id += 10_000_000
        for run in range(settings.runs):
            shift = run % len(variants)
            for variant, table, log, own_process in variants[shift:] + variants[:shift]:
                paced = measure_paced_latency(
                    url, table, log, settings.latency_rate, settings.latency_seconds,
                    settings.latency_writers, next_id, settings.drain_timeout,
                )
                next_id += 10_000_000
                if own_process:
                    anchor = None if variant == raw else raw
                    latencies = record_latency(result, paced, variant, anchor, from_send=True, label=PROCESS_LAYOUT)
                else:
                    anchor = None if variant == raw_in_process else raw_in_process
                    latencies = record_latency(result, paced, variant, anchor)
                pooled.setdefault((variant, own_process), []).extend(latencies)
    finally:
        for process in (ours_process, raw_process):
            if process is not None:
                process.close()
        raw_listener.stop()
        pgevents.stop(timeout=10, app=app)
        server.drop_database(name)
    for own_process, key in ((False, "latency_ms_percentiles"), (True, "latency_from_send_ms_percentiles")):
        result.extra[key] = {
            variant: percentile_curve(sorted(samples), 1e3)
            for (variant, in_own), samples in pooled.items() if in_own == own_process
        }
    result.extra["samples"] = {
        f"{variant}{f', {PROCESS_LAYOUT}' if own else ''}": len(samples) for (variant, own), samples in pooled.items()
    }
    # Below zero: the event arrived before the writer thread got to read the
    # clock after its commit returned (GIL hand-off, CPU contention).
    result.extra["negative_fraction"] = {
        f"{variant}{f', {PROCESS_LAYOUT}' if own else ''}":
            round(sum(1 for s in samples if s < 0) / len(samples), 4) if samples else None
        for (variant, own), samples in pooled.items()
    }
    return result
