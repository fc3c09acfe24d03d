"""What several benchmark scenarios share: sizes, statistics, result records, server, load and listeners."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import select
import threading
import time
from typing import Any, Callable, Optional, Sequence

import psycopg
import psycopg2
import psycopg2.extensions
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.engine import make_url

from flask_pgevents import Event, PGEvents
from flask_pgevents.config import DEFAULTS
from flask_pgevents.embedded import EmbeddedPostgres
from flask_pgevents.sql import quote_ident

logger = logging.getLogger("benchmarks")

#: The event schema: the library's default, which the benchmarks keep.
SCHEMA: str = DEFAULTS["PGEVENTS_SCHEMA"]
#: The event table in it, named as the library's SQL names it.
EVENT_TABLE = f'{quote_ident(SCHEMA)}."event"'

OURS = "flask-pgevents"
PAYLOAD = "benchmark payload " + "x" * 46  # 64 characters, a short realistic text column


# Settings -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark run.

    :data:`FULL` takes about 8-10 minutes on 2 cores (one full-size run of
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
    """The ``q``-th percentile (0-100) of already sorted values, linearly interpolated."""
    if not sorted_values:
        return math.nan
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    fraction = position - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


def median(values: Sequence[float]) -> float:
    """The median of unsorted values."""
    return percentile(sorted(values), 50)


#: The percentiles kept of a latency distribution, enough to draw its CDF.
CURVE_PERCENTILES = [float(q) for q in range(100)] + [99.5, 99.9, 100.0]


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
        """The median over the runs (NaN before the first)."""
        return median(self.values) if self.values else math.nan

    def as_json(self, comparison: Optional[float]) -> dict[str, Any]:
        """The JSON record of this measurement, with its comparison to the anchor."""
        return {
            "metric": self.metric,
            "variant": self.variant,
            "unit": self.unit,
            "median": round_value(self.median),
            "min": round_value(min(self.values)) if self.values else None,
            "max": round_value(max(self.values)) if self.values else None,
            "runs": [round_value(v) for v in self.values],
            "anchor": self.anchor,
            f"{self.compare}_to_anchor": round_value(comparison) if comparison is not None else None,
        }


def round_value(value: Optional[float]) -> Optional[float]:
    """``value`` to five significant digits (whole numbers from 10,000); None, NaN and 0 unchanged."""
    if value is None or not math.isfinite(value) or value == 0:
        return value
    digits = max(0, 4 - math.floor(math.log10(abs(value))))
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
        """Drop a database made by :meth:`create_database`, closing its connections."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    @property
    def embedded(self) -> bool:
        """Whether the server is the embedded one started here."""
        return self._embedded is not None

    def stop(self) -> None:
        """Stop and delete the embedded server, if any (idempotent)."""
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
    """How many events of the event table are pending (claimed ones included)."""
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
        """Forget every arrival; with ``keep_times``, record each one's time by key."""
        with self._cond:
            self.times = {}
            self.keep_times = keep_times
            self.count = 0
            self.first = self.last = None

    def record(self, key: Optional[int] = None) -> None:
        """Count one arrival now, and keep its time under ``key`` if times are kept."""
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


def create_anchor_tables(url: str, ours: str, raw: str) -> None:
    """Create the table flask-pgevents watches and the raw anchor's, whose rows NOTIFY :data:`RAW_CHANNEL`."""
    with connect(url) as conn:
        conn.execute(ITEM_DDL.format(name=ours))
        conn.execute(ITEM_DDL.format(name=raw))
        conn.execute(RAW_NOTIFY_DDL)
        conn.execute(RAW_NOTIFY_TRIGGER.format(table=raw, channel=RAW_CHANNEL))


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
        """Start the loop and wait until it listens."""
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("The raw LISTEN loop did not connect within 10 s.")

    def stop(self) -> None:
        """Stop the loop and wait up to 10 s for its thread."""
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

