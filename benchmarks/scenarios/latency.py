"""Scenario latency: commit to handler-call latency of single-row transactions at a steady rate."""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Sequence

import psycopg

from .common import (
    OURS,
    PAYLOAD,
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
    percentile,
    percentile_curve,
    sqlalchemy_url,
    wait_listening,
)

logger = logging.getLogger("benchmarks.latency")

SINGLE_INSERT_WITH_ID = "INSERT INTO {table} (id, n, payload) VALUES (%s, %s, %s)"


def paced_writer(
    conn: psycopg.Connection[Any], table: str, ids: Sequence[int], rate: float, first_id: int,
    started: float, commits: dict[int, float], round_trips: list[float],
) -> None:
    """Insert one row per transaction on a fixed schedule; record each commit's return time."""
    sql = SINGLE_INSERT_WITH_ID.format(table=table)
    for row_id in ids:
        delay = started + (row_id - first_id) / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent = time.perf_counter()
        conn.execute(sql, (row_id, 0, PAYLOAD))
        commits[row_id] = time.perf_counter()
        round_trips.append(commits[row_id] - sent)


def measure_paced_latency(
    url: str, table: str, log: ArrivalLog, rate: float, seconds: float, writers: int,
    first_id: int, drain_timeout: float,
) -> tuple[list[float], int, float, list[float]]:
    """Run paced writers.

    :returns: sorted commit→delivery latencies (s), how many never arrived, the
        achieved write rate, and the sorted INSERT+commit round trips (s).
    """
    total = int(rate * seconds)
    ids = list(range(first_id, first_id + total))
    commit_maps: list[dict[int, float]] = [{} for _ in range(writers)]
    round_trips: list[list[float]] = [[] for _ in range(writers)]
    conns = [connect(url) for _ in range(writers)]
    try:
        log.reset(keep_times=True)
        started = time.perf_counter() + 0.05
        threads = [
            threading.Thread(
                target=paced_writer,
                args=(conns[w], table, ids[w::writers], rate, first_id, started, commit_maps[w], round_trips[w]),
                name=f"bench-paced-writer-{w}",
                daemon=True,
            )
            for w in range(writers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for conn in conns:
            conn.close()
    log.wait_for(total, drain_timeout)
    commits = {k: v for m in commit_maps for k, v in m.items()}
    arrivals = dict(log.times)
    latencies = sorted(arrivals[k] - t for k, t in commits.items() if k in arrivals)
    missing = sum(1 for k in commits if k not in arrivals)
    span = max(commits.values()) - min(commits.values()) if len(commits) > 1 else math.nan
    achieved = (len(commits) - 1) / span if span and span > 0 else math.nan
    return latencies, missing, achieved, sorted(t for trips in round_trips for t in trips)


def scenario_latency(server: BenchServer, settings: Settings) -> ScenarioResult:
    """Commit → handler-call latency of single-row transactions at a steady rate.

    A writer thread inserts one row per transaction on a fixed schedule
    (``latency_rate`` per second for ``latency_seconds``) and records
    ``perf_counter()`` right after each commit returns, keyed by row id; the
    handler records ``perf_counter()`` when it is called. Same process,
    different threads and connections. Reported per run: p50 and p99 in ms.
    The writer's INSERT+commit round trip is reported too: the commit happens
    somewhere inside it, so it bounds the method's resolution (a NOTIFY can
    reach the listener thread before the writer thread runs again, which
    gives latencies slightly below zero).

    Anchor: a raw psycopg 3 LISTEN loop fed by a per-row AFTER INSERT trigger
    calling ``pg_notify`` with the row as JSON payload, on the same server,
    measured the same way (time taken after parsing the payload).
    """
    name = "pgevents_bench_latency"
    url = server.create_database(name)
    raw = "raw LISTEN (psycopg, per-row NOTIFY)"
    result = ScenarioResult(
        params={"rate_per_s": settings.latency_rate, "seconds": settings.latency_seconds,
                "writers": settings.latency_writers, "driver": settings.driver},
        measurements=[],
    )
    create_anchor_tables(url, "latency_item", "latency_raw")

    ours_log = ArrivalLog()
    raw_log = ArrivalLog()
    app, pgevents = build_app(
        sqlalchemy_url(url, settings.driver), [item_table("latency_item")], ["after_insert"],
        lambda event: ours_log.record((event.new or {})["id"]),
    )
    raw_listener = RawListener(url, RAW_CHANNEL, raw_log, "psycopg")
    pgevents.start(app)
    raw_listener.start()
    pooled: dict[str, list[float]] = {OURS: [], raw: []}
    next_id = 1_000_000
    try:
        with connect(url) as probe:
            wait_listening(lambda: probe.execute("INSERT INTO latency_item (payload) VALUES ('warm-up')"), ours_log)
            wait_listening(lambda: probe.execute("INSERT INTO latency_raw (payload) VALUES ('warm-up')"), raw_log)
        # One short unreported round warms both paths (prepared statements, caches).
        for table, log in (("latency_item", ours_log), ("latency_raw", raw_log)):
            measure_paced_latency(url, table, log, settings.latency_rate, 0.3, settings.latency_writers,
                                  next_id, settings.drain_timeout)
            next_id += 10_000_000
        variants = [(OURS, "latency_item", ours_log), (raw, "latency_raw", raw_log)]
        for run in range(settings.runs):
            for variant, table, log in variants[run % 2:] + variants[:run % 2]:
                latencies, missing, achieved, round_trips = measure_paced_latency(
                    url, table, log, settings.latency_rate, settings.latency_seconds,
                    settings.latency_writers, next_id, settings.drain_timeout,
                )
                next_id += 10_000_000
                anchor = None if variant == raw else raw
                for label, q in (("p50", 50), ("p99", 99), ("max", 100)):
                    result.add(f"{label} latency", variant, "ms", anchor, "difference").values.append(
                        percentile(latencies, q) * 1e3)
                result.add("writer INSERT+commit p50", variant, "ms", anchor, "difference").values.append(
                    percentile(round_trips, 50) * 1e3)
                result.add("achieved write rate", variant, "rows/s").values.append(achieved)
                result.add("events not delivered", variant, "events").values.append(missing)
                pooled[variant].extend(latencies)
                logger.info("latency run %d %s: p50 %.2f ms p99 %.2f ms (%.0f rows/s, %d missing)",
                            run + 1, variant, percentile(latencies, 50) * 1e3,
                            percentile(latencies, 99) * 1e3, achieved, missing)
    finally:
        raw_listener.stop()
        pgevents.stop(timeout=10, app=app)
        server.drop_database(name)
    result.extra["latency_ms_percentiles"] = {
        variant: percentile_curve(sorted(samples), 1e3) for variant, samples in pooled.items()
    }
    result.extra["samples"] = {variant: len(samples) for variant, samples in pooled.items()}
    # Below zero: the event arrived before the writer thread got to read the
    # clock after its commit returned (GIL hand-off, CPU contention).
    result.extra["negative_fraction"] = {
        variant: round(sum(1 for s in samples if s < 0) / len(samples), 4) if samples else None
        for variant, samples in pooled.items()
    }
    return result

