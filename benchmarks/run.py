#!/usr/bin/env python
"""Benchmarks for flask-pgevents, each scenario beside its anchor on the same server.

Usage::

    python benchmarks/run.py [--dsn DSN] [--runs N] [--quick] [--only SCENARIO[,...]]
                             [--json PATH] [--driver psycopg|psycopg2] [-v]

Without ``--dsn`` an embedded PostgreSQL is started (the ``embedded`` extra) and
deleted afterwards. With ``--dsn``, its role must be allowed to create databases:
every scenario runs in a fresh database ``pgevents_bench_<scenario>`` that is
dropped at the end. Each measurement is repeated ``--runs`` times (default 5,
3 with ``--quick``), variants interleaved within each run so that noise from a
shared machine hits them alike; the table shows the median and the min–max
spread over the runs, and the JSON (default ``benchmarks/results/latest.json``)
holds the per-run values, percentile curves and the machine description.

Scenarios: latency, throughput, write_cost, writers, memory.
``benchmarks/plot.py`` turns the JSON into ``docs/latency.png`` and ``docs/writers.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import resource
import select
import subprocess
import sys
import threading
import time
from importlib import metadata
from typing import Any, Callable, Iterable, Optional, Sequence

import psycopg
import psycopg2
import psycopg2.extensions
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.engine import make_url

import flask_pgevents
from flask_pgevents import Event, PGEvents
from flask_pgevents.embedded import EmbeddedPostgres

logger = logging.getLogger("benchmarks")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_JSON = os.path.join(ROOT, "benchmarks", "results", "latest.json")

#: The event table under the library's default schema, which the benchmarks keep.
EVENT_TABLE = '"pgevents"."event"'

OURS = "flask-pgevents"
PAYLOAD = "benchmark payload " + "x" * 46  # 64 characters, a short realistic text column


# Settings -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark run.

    :data:`FULL` takes about 8–10 minutes on 2 cores (one full-size run of
    every scenario took 161 s, memory included, which runs once); :data:`QUICK`
    about 2 minutes.
    """

    runs: int
    driver: str = "psycopg"
    latency_rate: float = 1000.0
    latency_seconds: float = 3.0
    #: Two paced writers, so one slow commit does not hold back the schedule.
    latency_writers: int = 2
    bulk_rows: int = 100_000
    steady_writers: int = 4
    steady_seconds: float = 3.0
    write_rows: int = 100_000
    writer_counts: tuple[int, ...] = (1, 4, 16, 64)
    writer_seconds: float = 3.0
    writer_processes: int = 4
    memory_events: int = 1_000_000
    memory_chunks: int = 10
    drain_timeout: float = 120.0


FULL = Settings(runs=5)
QUICK = dataclasses.replace(
    FULL,
    runs=3,
    latency_seconds=1.0,
    bulk_rows=10_000,
    steady_seconds=1.0,
    write_rows=10_000,
    writer_seconds=1.0,
    memory_events=50_000,
    memory_chunks=5,
    drain_timeout=30.0,
)


# Statistics -------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) of already sorted values, linearly interpolated."""
    if not sorted_values:
        return math.nan
    position = (len(sorted_values) - 1) * q / 100.0
    low = int(math.floor(position))
    high = min(low + 1, len(sorted_values) - 1)
    fraction = position - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


def median(values: Sequence[float]) -> float:
    return percentile(sorted(values), 50)


#: The percentiles kept of a latency distribution, enough to draw its CDF.
CURVE_PERCENTILES = [float(q) for q in range(0, 100)] + [99.5, 99.9, 100.0]


def percentile_curve(sorted_values: Sequence[float], scale: float = 1.0) -> list[list[float]]:
    """``[q, value]`` pairs for :data:`CURVE_PERCENTILES`: a small stand-in for all samples."""
    return [[q, round(percentile(sorted_values, q) * scale, 4)] for q in CURVE_PERCENTILES]


@dataclasses.dataclass
class Measurement:
    """One quantity of one variant, measured once per run."""

    metric: str
    variant: str
    unit: str
    values: list[float]
    #: The variant this one is compared with (same metric), if any.
    anchor: Optional[str] = None
    #: How to compare with the anchor: "ratio" of medians, or "difference"
    #: (for latencies, where the anchor can be about zero).
    compare: str = "ratio"

    @property
    def median(self) -> float:
        return median(self.values) if self.values else math.nan

    def as_json(self, comparison: Optional[float]) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "variant": self.variant,
            "unit": self.unit,
            "median": _round(self.median),
            "min": _round(min(self.values)) if self.values else None,
            "max": _round(max(self.values)) if self.values else None,
            "runs": [_round(v) for v in self.values],
            "anchor": self.anchor,
            f"{self.compare}_to_anchor": _round(comparison) if comparison is not None else None,
        }


def _round(value: float) -> float:
    if value is None or not math.isfinite(value) or value == 0:
        return value
    digits = max(0, 4 - int(math.floor(math.log10(abs(value)))))
    return round(value, digits)


@dataclasses.dataclass
class ScenarioResult:
    """What one scenario returns: its measurements and any extra data for plots."""

    params: dict[str, Any]
    measurements: list[Measurement]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def add(
        self, metric: str, variant: str, unit: str, anchor: Optional[str] = None, compare: str = "ratio"
    ) -> Measurement:
        """The measurement for (metric, variant), created on first use."""
        for existing in self.measurements:
            if existing.metric == metric and existing.variant == variant:
                return existing
        measurement = Measurement(metric, variant, unit, [], anchor, compare)
        self.measurements.append(measurement)
        return measurement

    def comparison(self, measurement: Measurement) -> Optional[float]:
        """Ratio of medians to the anchor's (or their difference), if it has an anchor."""
        if measurement.anchor is None:
            return None
        for other in self.measurements:
            if other.metric == measurement.metric and other.variant == measurement.anchor:
                if measurement.compare == "difference":
                    return measurement.median - other.median
                if other.median and math.isfinite(other.median):
                    return measurement.median / other.median
        return None

    def sorted_measurements(self) -> list[Measurement]:
        """Grouped by metric in order of first use; within a metric, anchors first."""
        metric_order: dict[str, int] = {}
        for m in self.measurements:
            metric_order.setdefault(m.metric, len(metric_order))
        return sorted(
            self.measurements,
            key=lambda m: (metric_order[m.metric], m.anchor is not None, self.measurements.index(m)),
        )


# Server and connections ---------------------------------------------------------


class BenchServer:
    """The PostgreSQL server of a run: embedded unless a DSN is given.

    :param dsn: a libpq or SQLAlchemy URI of a role that may create databases.
    """

    def __init__(self, dsn: Optional[str]) -> None:
        self._embedded: Optional[EmbeddedPostgres] = None
        if dsn:
            url = make_url(dsn).set(drivername="postgresql")
        else:
            logger.info("Starting an embedded PostgreSQL server.")
            self._embedded = EmbeddedPostgres()
            url = make_url(self._embedded.url())
        self.admin_url = url.render_as_string(hide_password=False)
        self._url = url

    def create_database(self, name: str) -> str:
        """A fresh, empty database; returns its libpq URI."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self._url.set(database=name).render_as_string(hide_password=False)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    @property
    def embedded(self) -> bool:
        return self._embedded is not None

    def stop(self) -> None:
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None


def sqlalchemy_url(libpq_url: str, driver: str) -> str:
    """The same database as a SQLAlchemy URI for ``driver``, as an app would configure it."""
    return make_url(libpq_url).set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)


def connect(url: str) -> psycopg.Connection[Any]:
    """An autocommit psycopg 3 connection: every statement commits on return."""
    return psycopg.connect(url, autocommit=True)


def timed_statement(conn: psycopg.Connection[Any], sql: str, params: Optional[Sequence[Any]] = None) -> float:
    """Seconds to run one autocommit statement, commit included."""
    started = time.perf_counter()
    conn.execute(sql, params)
    return time.perf_counter() - started


def scalar(conn: psycopg.Connection[Any], sql: str, params: Optional[Sequence[Any]] = None) -> Any:
    """The first column of the first row of a query."""
    row = conn.execute(sql, params).fetchone()
    if row is None:
        raise RuntimeError(f"No row from {sql!r}.")
    return row[0]


def pending_events(conn: psycopg.Connection[Any]) -> int:
    return int(scalar(conn, f"SELECT count(*) FROM {EVENT_TABLE} WHERE status = 'pending'"))


def wait_drained(conn: psycopg.Connection[Any], timeout: float) -> bool:
    """Poll until no event is pending (and none is claimed); False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while pending_events(conn):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# Handler-side recording -----------------------------------------------------------


class ArrivalLog:
    """Records when a handler (or a raw LISTEN loop) saw each event.

    ``record`` takes ``time.perf_counter()`` first; waiters are woken when the
    count they wait for is reached.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.times: dict[int, float] = {}
        self.keep_times = False
        self.count = 0
        self.first: Optional[float] = None
        self.last: Optional[float] = None
        self._target: Optional[int] = None

    def reset(self, keep_times: bool = False) -> None:
        with self._cond:
            self.times = {}
            self.keep_times = keep_times
            self.count = 0
            self.first = self.last = None

    def record(self, key: Optional[int] = None) -> None:
        now = time.perf_counter()
        with self._cond:
            if self.keep_times and key is not None:
                self.times[key] = now
            self.count += 1
            if self.first is None:
                self.first = now
            self.last = now
            if self._target is not None and self.count >= self._target:
                self._cond.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        """Block until ``count`` events were recorded; False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._target = count
            try:
                while self.count < count:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._cond.wait(remaining)
                return True
            finally:
                self._target = None


def build_app(
    url: str,
    tables: Sequence[sa.Table],
    identifiers: Sequence[str],
    handler: Callable[[Event], None],
) -> tuple[Flask, PGEvents]:
    """A minimal app (no Flask-SQLAlchemy) with ``handler`` on ``tables``; triggers installed."""
    app = Flask("pgevents_bench")
    app.config.update(PGEVENTS_DATABASE_URI=url, PGEVENTS_AUTOSTART=False)
    pgevents = PGEvents()
    for table in tables:
        pgevents.listen(table, list(identifiers), handler)
    pgevents.init_app(app)
    pgevents.install_triggers(app)
    return app, pgevents


def item_table(name: str, metadata: Optional[sa.MetaData] = None) -> sa.Table:
    """The SQLAlchemy description of a benchmark table (``ITEM_DDL``)."""
    return sa.Table(
        name,
        metadata or sa.MetaData(),
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column("n", sa.Integer),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


# A row of about 120 bytes with the types a typical app table has.
ITEM_DDL = """
CREATE TABLE {name} (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    n integer NOT NULL DEFAULT 0,
    payload text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""

# The anchor of the raw LISTEN loops: one NOTIFY per row with the row as payload.
RAW_NOTIFY_DDL = """
CREATE FUNCTION bench_notify_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], row_to_json(NEW)::text);
    RETURN NULL;
END
$$;
"""
RAW_NOTIFY_TRIGGER = (
    "CREATE TRIGGER bench_notify_row AFTER INSERT ON {table}"
    " FOR EACH ROW EXECUTE FUNCTION bench_notify_row('{channel}')"
)
RAW_CHANNEL = "bench_raw"

BULK_INSERT = (
    "INSERT INTO {table} (n, payload) SELECT g, md5(g::text) || %s FROM generate_series(1, %s) AS g"
)
SINGLE_INSERT = "INSERT INTO {table} (n, payload) VALUES (%s, %s)"
SINGLE_INSERT_WITH_ID = "INSERT INTO {table} (id, n, payload) VALUES (%s, %s, %s)"


class RawListener:
    """The anchor: a plain LISTEN loop in a thread, recording each notification.

    :param driver: ``"psycopg"`` (psycopg 3 ``notifies()``) or ``"psycopg2"``
        (``select()`` + ``poll()``, the classic loop).

    Each payload is parsed as JSON and its ``id`` recorded, the least a real
    consumer of row notifications does.
    """

    def __init__(self, url: str, channel: str, log: ArrivalLog, driver: str) -> None:
        self.url = url
        self.channel = channel
        self.log = log
        self.driver = driver
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"bench-raw-{driver}", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("The raw LISTEN loop did not connect within 10 s.")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        if self.driver == "psycopg":
            self._run_psycopg()
        else:
            self._run_psycopg2()

    def _handle(self, payload: str) -> None:
        self.log.record(json.loads(payload)["id"])

    def _run_psycopg(self) -> None:
        with connect(self.url) as conn:
            conn.execute(f'LISTEN "{self.channel}"')
            self._ready.set()
            while not self._stop.is_set():
                for notification in conn.notifies(timeout=0.2):
                    self._handle(notification.payload)

    def _run_psycopg2(self) -> None:
        conn = psycopg2.connect(self.url)
        try:
            conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
            conn.cursor().execute(f'LISTEN "{self.channel}"')
            self._ready.set()
            while not self._stop.is_set():
                if select.select([conn], [], [], 0.2)[0]:
                    conn.poll()
                    notifications = conn.notifies[:]
                    del conn.notifies[:]
                    for notification in notifications:
                        self._handle(notification.payload)
        finally:
            conn.close()


def wait_listening(insert_probe: Callable[[], Any], log: ArrivalLog, timeout: float = 15.0) -> None:
    """Insert probe rows until one comes through: the listener is connected and warm."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log.reset()
        insert_probe()
        if log.wait_for(1, 1.0):
            return
    raise RuntimeError(f"No event reached the listener within {timeout} s.")


# Writer loops ----------------------------------------------------------------------


@dataclasses.dataclass
class InsertRun:
    """What a set of single-row writers did in a fixed window."""

    commits: int
    seconds: float
    latencies: list[float]


def run_insert_threads(conns: Sequence[psycopg.Connection[Any]], table: str, seconds: float) -> InsertRun:
    """Single-row autocommit INSERTs as fast as possible, one thread per connection."""
    sql = SINGLE_INSERT.format(table=table)
    barrier = threading.Barrier(len(conns) + 1)
    results: list[tuple[int, list[float]]] = []
    lock = threading.Lock()
    window: dict[str, float] = {}

    def insert_loop(conn: psycopg.Connection[Any]) -> None:
        latencies: list[float] = []
        barrier.wait()
        deadline = window["end"]
        count = 0
        while True:
            started = time.perf_counter()
            if started >= deadline:
                break
            conn.execute(sql, (count, PAYLOAD))
            latencies.append(time.perf_counter() - started)
            count += 1
        with lock:
            results.append((count, latencies))

    threads = [
        threading.Thread(target=insert_loop, args=(conn,), name=f"bench-writer-{i}", daemon=True)
        for i, conn in enumerate(conns)
    ]
    for thread in threads:
        thread.start()
    window["start"] = time.perf_counter()
    window["end"] = window["start"] + seconds
    barrier.wait()
    for thread in threads:
        thread.join()
    elapsed = max(seconds, time.perf_counter() - window["start"])
    latencies = [lat for _, lats in results for lat in lats]
    return InsertRun(sum(count for count, _ in results), elapsed, latencies)


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
        for pipe in self._pipes:
            try:
                pipe.send(None)
            except OSError:
                pass
        for process in self._processes:
            process.join(10)
            if process.is_alive():
                process.terminate()


# Scenario 1: latency ---------------------------------------------------------------


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
    with connect(url) as conn:
        conn.execute(ITEM_DDL.format(name="latency_item"))
        conn.execute(ITEM_DDL.format(name="latency_raw"))
        conn.execute(RAW_NOTIFY_DDL)
        conn.execute(RAW_NOTIFY_TRIGGER.format(table="latency_raw", channel=RAW_CHANNEL))

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


# Scenario 2: throughput -------------------------------------------------------------


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
    with connect(url) as conn:
        conn.execute(ITEM_DDL.format(name="tp_item"))
        conn.execute(ITEM_DDL.format(name="tp_raw"))
        conn.execute(RAW_NOTIFY_DDL)
        conn.execute(RAW_NOTIFY_TRIGGER.format(table="tp_raw", channel=RAW_CHANNEL))

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
            committed = time.perf_counter()
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


# Scenario 3: write cost of capture -------------------------------------------------------

def capture_function_header(schema: str, function: str) -> str:
    """``CREATE FUNCTION ... AS $pgevents$`` exactly as the library writes its own.

    The variant functions below share the library's header (SECURITY DEFINER
    and the pinned settings, which PostgreSQL sets and restores on every
    call) so that only what they compare differs.
    """
    from flask_pgevents import triggers

    header = getattr(triggers, "FUNCTION_HEADER", None)
    if header is None:  # the library renamed it: the header of version 0.1.0
        header = (
            "CREATE OR REPLACE FUNCTION {schema}.{function}() RETURNS trigger\n"
            "LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp\n"
            "AS $pgevents$"
        )
    return str(header.format(schema=schema, function=function))


# The same event table, written once per row instead of once per statement.
PER_ROW_CAPTURE_DDL = """{header}
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO "pgevents"."event" (table_schema, table_name, op, new)
        VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, 'insert', to_json(NEW));
    ELSIF TG_OP = 'UPDATE' THEN
        IF OLD IS NOT DISTINCT FROM NEW THEN
            RETURN NULL;
        END IF;
        INSERT INTO "pgevents"."event" (table_schema, table_name, op, old, new)
        VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, 'update', to_json(OLD), to_json(NEW));
    ELSE
        INSERT INTO "pgevents"."event" (table_schema, table_name, op, old)
        VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, 'delete', to_json(OLD));
    END IF;
    PERFORM pg_notify('pgevents', '');
    RETURN NULL;
END
$pgevents$;
CREATE TRIGGER bench_capture_row AFTER INSERT OR UPDATE OR DELETE ON wc_row
FOR EACH ROW EXECUTE FUNCTION public.bench_capture_row();
"""

# Statement-level insert capture like the library's, storing the row as
# ``json`` or as the row's text form in a copy of the event table.
FORMAT_SCHEMA_DDL = "CREATE SCHEMA bench_fmt"
FORMAT_CAPTURE_DDL = """
CREATE TABLE bench_fmt.event_{kind} (LIKE "pgevents"."event" INCLUDING ALL);
ALTER TABLE bench_fmt.event_{kind} ALTER COLUMN old TYPE {column_type} USING old::text::{column_type},
                                   ALTER COLUMN new TYPE {column_type} USING new::text::{column_type};
{header}
BEGIN
    INSERT INTO bench_fmt.event_{kind} (table_schema, table_name, op, new)
    SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME, 'insert', {expression}
    FROM pgevents_new AS n;
    IF FOUND THEN
        PERFORM pg_notify('bench_fmt', '');
    END IF;
    RETURN NULL;
END
$pgevents$;
CREATE TRIGGER bench_capture_{kind} AFTER INSERT ON wc_{kind}
REFERENCING NEW TABLE AS pgevents_new
FOR EACH STATEMENT EXECUTE FUNCTION bench_fmt.capture_insert_{kind}();
"""
FORMATS = {
    # kind: (column type, expression, label)
    "jsonb": ("jsonb", "to_jsonb(n)", "to_jsonb"),
    "text": ("text", "n::text", "row::text"),
}


def scenario_write_cost(server: BenchServer, settings: Settings) -> ScenarioResult:
    """What capture costs the writer: bulk INSERT, UPDATE, DELETE with and without triggers.

    Each of ``write_rows`` rows is inserted by one ``INSERT ... SELECT``, then
    updated by one ``UPDATE`` (every row changes), then deleted by one
    ``DELETE``; each statement is timed with its commit, after a CHECKPOINT and
    with the event tables emptied. Variants: flask-pgevents' statement-level
    triggers (listener not running, events accumulate); no triggers (the
    anchor); a per-row trigger (FOR EACH ROW) writing the same event table.

    Also the stored format of the statement-level insert capture: the
    library's ``to_json`` against ``to_jsonb`` and ``row::text`` (temporary
    copies of the event table and function, created here only), with the
    event table's size per row.
    """
    name = "pgevents_bench_write_cost"
    url = server.create_database(name)
    rows = settings.write_rows
    plain, ours, per_row = "no triggers", f"{OURS} (statement-level)", "per-row trigger"
    result = ScenarioResult(params={"rows": rows}, measurements=[])
    with connect(url) as conn:
        for table in ("wc_plain", "wc_stmt", "wc_row", "wc_jsonb", "wc_text"):
            conn.execute(ITEM_DDL.format(name=table))
    app, pgevents = build_app(
        sqlalchemy_url(url, settings.driver), [item_table("wc_stmt")],
        ["after_insert", "after_update", "after_delete"], lambda event: None,
    )
    with connect(url) as conn:
        conn.execute(PER_ROW_CAPTURE_DDL.format(header=capture_function_header("public", "bench_capture_row")))
        conn.execute(FORMAT_SCHEMA_DDL)
        for kind, (column_type, expression, _) in FORMATS.items():
            conn.execute(FORMAT_CAPTURE_DDL.format(
                kind=kind, column_type=column_type, expression=expression,
                header=capture_function_header("bench_fmt", f"capture_insert_{kind}"),
            ))

    event_tables = [EVENT_TABLE] + [f"bench_fmt.event_{kind}" for kind in FORMATS]
    # The format variants also go in the table under their own labels.
    format_label = {"wc_stmt": f"to_json ({OURS})", "wc_jsonb": "to_jsonb", "wc_text": "row::text"}
    format_event_table = {"wc_stmt": EVENT_TABLE, "wc_jsonb": "bench_fmt.event_jsonb",
                          "wc_text": "bench_fmt.event_text"}
    variant_of = {"wc_plain": plain, "wc_stmt": ours, "wc_row": per_row}
    bulk_insert = BULK_INSERT

    def reset(conn: psycopg.Connection[Any], table: Optional[str] = None) -> None:
        if table:
            conn.execute(f"TRUNCATE {table}")
        conn.execute(f"TRUNCATE {', '.join(event_tables)}")
        conn.execute("CHECKPOINT")

    def measure(conn: psycopg.Connection[Any], table: str) -> None:
        reset(conn, table)
        insert = timed_statement(conn, bulk_insert.format(table=table), ("", rows))
        if table in format_event_table:
            size = scalar(conn, "SELECT pg_total_relation_size(%s)", (format_event_table[table],))
            anchor_label = format_label["wc_stmt"]
            label = format_label[table]
            result.add(f"format: INSERT {rows:,} rows", label, "s",
                       None if table == "wc_stmt" else anchor_label).values.append(insert)
            result.add("format: event table size", label, "bytes/row",
                       None if table == "wc_stmt" else anchor_label).values.append(size / rows)
        if table not in variant_of:
            return
        variant = variant_of[table]
        anchor = None if variant == plain else plain
        result.add(f"INSERT {rows:,} rows", variant, "s", anchor).values.append(insert)
        reset(conn)
        update = timed_statement(conn, f"UPDATE {table} SET n = n + 1")
        result.add(f"UPDATE {rows:,} rows", variant, "s", anchor).values.append(update)
        reset(conn)
        delete = timed_statement(conn, f"DELETE FROM {table}")
        result.add(f"DELETE {rows:,} rows", variant, "s", anchor).values.append(delete)
        logger.info("write cost %s: insert %.3f s, update %.3f s, delete %.3f s",
                    variant, insert, update, delete)

    tables = ["wc_plain", "wc_stmt", "wc_row", "wc_jsonb", "wc_text"]
    try:
        with connect(url) as conn:
            for table in tables:  # warm-up: caches, plans, file extension
                conn.execute(bulk_insert.format(table=table), ("", min(rows, 10_000)))
                reset(conn, table)
            for run in range(settings.runs):
                shift = run % len(tables)
                for table in tables[shift:] + tables[:shift]:
                    measure(conn, table)
        # Per-row over statement-level, from the same runs.
        for op in ("INSERT", "UPDATE", "DELETE"):
            metric = f"{op} {rows:,} rows"
            stmt = next(m for m in result.measurements if m.metric == metric and m.variant == ours)
            row = next(m for m in result.measurements if m.metric == metric and m.variant == per_row)
            result.extra.setdefault("per_row_over_statement", {})[op] = _round(row.median / stmt.median)
    finally:
        server.drop_database(name)
    return result


# Scenario 4: concurrent writers ---------------------------------------------------------


# The library's statement-level insert capture into a copy of the event table,
# without the pg_notify: isolates what NOTIFY costs concurrent writers.
NO_NOTIFY_CAPTURE_DDL = """
CREATE SCHEMA bench_diag;
CREATE TABLE bench_diag.event (LIKE "pgevents"."event" INCLUDING ALL);
{header}
BEGIN
    INSERT INTO bench_diag.event (table_schema, table_name, op, new)
    SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME, 'insert', to_jsonb(n)
    FROM pgevents_new AS n;
    RETURN NULL;
END
$pgevents$;
CREATE TRIGGER bench_capture AFTER INSERT ON cw_nonotify
REFERENCING NEW TABLE AS pgevents_new
FOR EACH STATEMENT EXECUTE FUNCTION bench_diag.capture_insert();
"""


def writers_label(writers: int) -> str:
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
    admin.execute(NO_NOTIFY_CAPTURE_DDL.format(header=capture_function_header("bench_diag", "capture_insert")))
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
                admin.execute("TRUNCATE bench_diag.event")
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
    result.extra["tps"] = {
        variant: {
            str(writers): next(
                m.as_json(None) for m in result.measurements
                if m.metric == f"TPS, {writers_label(writers)}" and m.variant == variant
            )
            for writers in settings.writer_counts
        }
        for variant in variants
    }
    return result


# Scenario 5: memory ---------------------------------------------------------------------


def memory_child_main(pipe: multiprocessing.connection.Connection, url: str) -> None:
    """The listener process of the memory scenario: handles events, reports its RSS on request."""
    import psutil

    logging.basicConfig(level=logging.WARNING)
    log = ArrivalLog()

    def handler(event: Event) -> None:
        log.record(len((event.new or {})["payload"]))  # a handler reads the row

    app, pgevents = build_app(url, [item_table("mem_item")], ["after_insert"], handler)
    pgevents.start(app)
    process = psutil.Process()
    pipe.send("ready")
    while True:
        command = pipe.recv()
        if command[0] == "stop":
            pgevents.stop(timeout=10, app=app)
            pipe.send("stopped")
            return
        _, count, timeout = command
        complete = log.wait_for(count, timeout)
        gc.collect()
        pipe.send({
            "complete": complete,
            "handled": log.count,
            "rss": process.memory_info().rss,
            "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "time": time.perf_counter(),
        })


def scenario_memory(server: BenchServer, settings: Settings) -> ScenarioResult:
    """Listener RSS before and after handling many events: does it leak or grow with volume?

    A spawned process runs only the app and its listener thread (handler
    reads ``event.new``). After 1,000 warm-up events and a ``gc.collect()``
    its RSS (psutil) is the baseline; then ``memory_events`` events arrive in
    ``memory_chunks`` equal chunks (bulk INSERTs of at most 50,000 rows), each
    chunk handled completely before RSS is read again. Reports the total
    growth, and the growth per chunk as the repeated measurement (median and
    spread over the chunks after the first). No anchor: the expectation is a
    flat line.
    """
    import psutil  # noqa: F401 - fail early if the bench extra is missing

    name = "pgevents_bench_memory"
    url = server.create_database(name)
    chunk = max(1, settings.memory_events // settings.memory_chunks)
    result = ScenarioResult(
        params={"events": chunk * settings.memory_chunks, "chunks": settings.memory_chunks,
                "driver": settings.driver},
        measurements=[],
    )
    with connect(url) as conn:
        conn.execute(ITEM_DDL.format(name="mem_item"))
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    child = context.Process(target=memory_child_main, args=(child_end, sqlalchemy_url(url, settings.driver)),
                            name="bench-memory-listener", daemon=True)
    child.start()
    series: list[dict[str, Any]] = []
    try:
        if not parent_end.poll(60) or parent_end.recv() != "ready":
            raise RuntimeError("The memory benchmark's listener process did not start.")
        total = 0
        with connect(url) as conn:

            def insert_and_wait(count: int) -> dict[str, Any]:
                nonlocal total
                remaining = count
                while remaining:
                    step = min(remaining, 50_000)
                    conn.execute(BULK_INSERT.format(table="mem_item"), ("", step))
                    remaining -= step
                total += count
                parent_end.send(("wait", total, settings.drain_timeout + count / 1000))
                report: dict[str, Any] = parent_end.recv()
                if not report["complete"]:
                    raise RuntimeError(f"The listener handled {report['handled']} of {total} events in time.")
                report["events"] = total
                return report

            baseline = insert_and_wait(1_000)
            series.append(baseline)
            logger.info("memory: baseline RSS %.1f MB", baseline["rss"] / 2**20)
            started = baseline["time"]
            for index in range(settings.memory_chunks):
                report = insert_and_wait(chunk)
                series.append(report)
                logger.info("memory: %d events, RSS %.1f MB", report["events"], report["rss"] / 2**20)
                if index > 0:
                    result.add("RSS growth per chunk", OURS, "MB").values.append(
                        (report["rss"] - series[-2]["rss"]) / 2**20)
        last = series[-1]
        handled = last["events"] - baseline["events"]
        result.add("RSS baseline", OURS, "MB").values.append(baseline["rss"] / 2**20)
        result.add(f"RSS after {handled:,} events", OURS, "MB").values.append(last["rss"] / 2**20)
        result.add("RSS growth", OURS, "MB").values.append((last["rss"] - baseline["rss"]) / 2**20)
        result.add("peak RSS", OURS, "MB").values.append(last["max_rss"] / 2**20)
        result.add("events/s (insert, then handle)", OURS, "events/s").values.append(
            handled / (last["time"] - started))
        result.extra["rss_series_mb"] = [[s["events"], round(s["rss"] / 2**20, 2)] for s in series]
        parent_end.send(("stop",))
        parent_end.poll(15)
    finally:
        child.join(15)
        if child.is_alive():
            child.terminate()
        server.drop_database(name)
    return result


# Machine description and reporting -------------------------------------------------------

SCENARIOS: dict[str, Callable[[BenchServer, Settings], ScenarioResult]] = {
    "latency": scenario_latency,
    "throughput": scenario_throughput,
    "write_cost": scenario_write_cost,
    "writers": scenario_writers,
    "memory": scenario_memory,
}


def _version(distribution: str) -> Optional[str]:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_state() -> dict[str, Any]:
    def git(*args: str) -> Optional[str]:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--", "flask_pgevents")
    return {"commit": git("rev-parse", "HEAD"), "library_modified": bool(status) if status is not None else None}


def machine_info(server: BenchServer) -> dict[str, Any]:
    """CPU, Python, PostgreSQL and driver versions: what a number depends on."""
    import psutil

    with connect(server.admin_url) as conn:
        version = scalar(conn, "SELECT version()")
        settings = {
            name: scalar(conn, f"SHOW {name}")
            for name in ("shared_buffers", "synchronous_commit", "fsync", "max_connections", "wal_level")
        }
    return {
        "cpu_model": _cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "postgres": version,
        "postgres_settings": settings,
        "embedded_postgres": server.embedded,
        "drivers": {
            "psycopg": psycopg.__version__,
            "libpq (psycopg)": psycopg.pq.version(),
            "psycopg2": psycopg2.__version__.split()[0],
            "libpq (psycopg2)": psycopg2.__libpq_version__,
        },
        "packages": {
            "flask-pgevents": flask_pgevents.__version__,
            "Flask": _version("flask"),
            "SQLAlchemy": _version("sqlalchemy"),
            "embedded-postgres": _version("embedded-postgres"),
        },
        "git": _git_state(),
    }


def _format_number(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def render_table(report: dict[str, Any]) -> str:
    """The results as a fixed-width text table: median, min–max, ratio to the anchor."""
    header = ("scenario", "metric", "variant", "median", "min–max", "unit", "vs anchor")
    lines: list[tuple[str, ...]] = []
    for scenario, data in report["scenarios"].items():
        if "error" in data:
            lines.append((scenario, "ERROR", data["error"][:60], "", "", "", ""))
            continue
        for m in data["measurements"]:
            spread = f"{_format_number(m['min'])}–{_format_number(m['max'])}"
            versus = ""
            if m.get("ratio_to_anchor") is not None:
                versus = f"{m['ratio_to_anchor']:.2f}x"
            elif m.get("difference_to_anchor") is not None:
                versus = f"{m['difference_to_anchor']:+.2f} {m['unit']}"
            lines.append((scenario, m["metric"], m["variant"], _format_number(m["median"]), spread, m["unit"], versus))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    out = []
    for index, row in enumerate([header, *lines]):
        cells = [cell.rjust(widths[i]) if i in (3, 4, 6) else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        out.append("  ".join(cells).rstrip())
        if index == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def run_benchmarks(args: argparse.Namespace) -> dict[str, Any]:
    base = QUICK if args.quick else FULL
    settings = dataclasses.replace(base, runs=args.runs or base.runs, driver=args.driver)
    names = list(SCENARIOS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"Unknown scenario {unknown[0]!r}. Expected one of {', '.join(map(repr, SCENARIOS))}.")
    server = BenchServer(args.dsn)
    report: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "settings": dataclasses.asdict(settings),
        "scenarios": {},
    }
    try:
        report["machine"] = machine_info(server)
        report["machine"]["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
        for name in names:
            logger.info("Scenario %s ...", name)
            function = SCENARIOS[name]
            load_before = os.getloadavg()[0]
            started = time.perf_counter()
            try:
                result = function(server, settings)
            except Exception as exc:  # noqa: BLE001 - one broken scenario must not lose the others
                logger.exception("Scenario %s failed.", name)
                report["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            report["scenarios"][name] = {
                "description": " ".join((function.__doc__ or "").split()),
                "params": result.params,
                "seconds": round(time.perf_counter() - started, 1),
                "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "measurements": [m.as_json(result.comparison(m)) for m in result.sorted_measurements()],
                "extra": result.extra,
            }
            logger.info("Scenario %s done in %.0f s.", name, time.perf_counter() - started)
        report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        server.stop()
    report["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return report


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--dsn", help="PostgreSQL URI of a role that may create databases"
                        " (default: start an embedded server)")
    parser.add_argument("--runs", type=int, help="repetitions of each measurement (default 5, quick 3)")
    parser.add_argument("--quick", action="store_true", help="fewer and smaller measurements (about 2 min)")
    parser.add_argument("--only", help=f"comma-separated scenarios: {', '.join(SCENARIOS)}")
    parser.add_argument("--json", default=DEFAULT_JSON, help="where to write the results (default: %(default)s)")
    parser.add_argument("--driver", choices=("psycopg", "psycopg2"), default="psycopg",
                        help="the driver flask-pgevents uses (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every measurement")
    return parser.parse_args(argv)


def main(argv: Optional[Iterable[str]] = None) -> int:
    args = parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logger.setLevel(logging.INFO)  # scenario progress, always
    report = run_benchmarks(args)
    directory = os.path.dirname(os.path.abspath(args.json))
    os.makedirs(directory, exist_ok=True)
    with open(args.json, "w") as output:
        json.dump(report, output, indent=1)
    print(render_table(report))
    print(f"\nResults: {args.json}")
    return 1 if any("error" in s for s in report["scenarios"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
