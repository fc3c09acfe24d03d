"""Scenario pgbench: TPC-B throughput with capture triggers and a listener, beside other ways to see changes."""
from __future__ import annotations

import contextlib
import logging
import re
import signal
import subprocess
import time
from typing import Any, Optional

from .common import (
    EVENT_TABLE,
    OURS,
    RAW_CHANNEL,
    RAW_NOTIFY_DDL,
    RAW_NOTIFY_TRIGGER,
    ArrivalLog,
    BenchServer,
    RawListener,
    ScenarioResult,
    Settings,
    build_app,
    connect,
    postgres_program,
    scalar,
    sqlalchemy_url,
    wait_drained,
    wait_listening,
)

logger = logging.getLogger("benchmarks.pgbench")

TPS_LINE = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
#: The tables TPC-B writes that the benchmark watches, and how.
WATCHED = {"pgbench_history": "INSERT", "pgbench_accounts": "UPDATE"}
#: Each TPC-B transaction inserts one history row and changes one balance by
#: its delta (unchanged when the delta is 0: no update event then).
EXPECTED_EVENTS = "SELECT count(*) + count(*) FILTER (WHERE delta <> 0) FROM pgbench_history"
PROBE = "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 0, now())"
SLOT = "pgevents_bench"
SLOT_STATE = "SELECT active, confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s"


class PgBench:
    """Runs ``pgbench`` against one database.

    :param url: a libpq URI, which pgbench takes as its database name.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.program = postgres_program("pgbench")

    def _run(self, args: list[str], timeout: float) -> str:
        done = subprocess.run([self.program, *args, self.url], capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise RuntimeError(f"pgbench {' '.join(args)} failed (exit {done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def initialise(self, scale: int) -> None:
        """``pgbench -i -s scale``: the TPC-B tables, 100,000 accounts per unit of scale."""
        self._run(["-i", "-s", str(scale), "-q"], timeout=600)

    def tpc_b(self, clients: int, seconds: float) -> float:
        """Run TPC-B with ``clients`` connections for ``seconds``; return its TPS."""
        output = self._run(
            ["-c", str(clients), "-j", str(min(2, clients)), "-T", str(max(1, round(seconds))), "-n"],
            timeout=seconds + 120,
        )
        match = TPS_LINE.search(output)
        if match is None:
            raise RuntimeError(f"No TPS in pgbench's output: {output!r}")
        return float(match.group(1))


class LogicalDrain:
    """A logical replication slot (``test_decoding``) drained live by ``pg_recvlogical``, for one run.

    Use in a ``with`` block: the slot is created and streamed on entry,
    and the process stopped and the slot dropped on exit.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._process: Optional[subprocess.Popen[str]] = None

    def __enter__(self) -> LogicalDrain:
        with connect(self.url) as conn:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (SLOT,))
            self._process = subprocess.Popen(
                # -F 0: no fsync of the output, progress still reported; -s 1: report every second.
                [postgres_program("pg_recvlogical"), "-d", self.url, "--slot", SLOT, "--start",
                 "-f", "-", "-F", "0", "-s", "1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )
            deadline = time.monotonic() + 15
            while not (conn.execute(SLOT_STATE, (SLOT,)).fetchone() or (False,))[0]:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"pg_recvlogical did not start streaming: {self._stop()}")
                time.sleep(0.05)
        return self

    def catch_up(self, timeout: float) -> tuple[float, float]:
        """Wait until the slot confirmed everything written so far.

        :returns: the bytes of WAL not yet confirmed when called, and the
            seconds until they were (progress is reported every second).
        """
        started = time.monotonic()
        with connect(self.url) as conn:
            end = scalar(conn, "SELECT pg_current_wal_lsn()")
            lag = float(scalar(conn, "SELECT pg_wal_lsn_diff(%s, (SELECT confirmed_flush_lsn FROM"
                                     " pg_replication_slots WHERE slot_name = %s))", (end, SLOT)))
            while not scalar(conn, "SELECT confirmed_flush_lsn >= %s FROM pg_replication_slots"
                                   " WHERE slot_name = %s", (end, SLOT)):
                if time.monotonic() - started > timeout:
                    logger.warning("pg_recvlogical did not catch up within %.0f s.", timeout)
                    break
                time.sleep(0.05)
        return lag, time.monotonic() - started

    def _stop(self) -> str:
        """Stop pg_recvlogical (SIGINT, then kill); return what it wrote to stderr."""
        process, self._process = self._process, None
        if process is None:
            return ""
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        return (process.stderr.read() if process.stderr else "").strip()

    def __exit__(self, *exc_info: Any) -> None:
        self._stop()
        drop_slot(self.url)


def drop_slot(url: str) -> None:
    """Drop the benchmark's slot if it exists, once its walsender let go of it (up to 15 s)."""
    with connect(url) as conn:
        deadline = time.monotonic() + 15
        while True:
            state = conn.execute(SLOT_STATE, (SLOT,)).fetchone()
            if state is None:
                return
            if not state[0] or time.monotonic() > deadline:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (SLOT,))
                return
            time.sleep(0.05)


def scenario_pgbench(server: BenchServer, settings: Settings) -> ScenarioResult:
    """TPC-B (``pgbench``) TPS with capture, as a ratio to the same database without triggers.

    ``pgbench -i -s pgbench_scale``, then ``pgbench -c C -j 2 -T
    pgbench_seconds -n`` for each client count of ``pgbench_clients``; before
    each run ``pgbench_history`` and the event table are emptied, branches
    and tellers vacuumed, and a CHECKPOINT taken. Watched: inserts into
    ``pgbench_history`` and updates of ``pgbench_accounts`` (2 events per
    transaction, 1 when the delta is 0). Variants, interleaved in each run:

    * no triggers (the anchor);
    * flask-pgevents capture only: triggers installed, no listener (events pile up);
    * capture and the listener thread in this process (no-op handler); after
      each run the listener drains, and every event's deliveries are counted
      against the events TPC-B made (from ``pgbench_history``): no loss, no
      duplicate (``exactly_once`` in the extra data);
    * per-row AFTER triggers calling ``pg_notify`` with the row as JSON, a raw
      psycopg 3 LISTEN loop in this process receiving them;
    * logical decoding: no triggers, ``wal_level = logical`` (the embedded
      server is restarted for it, last, and restored after), a
      ``test_decoding`` slot streamed live by ``pg_recvlogical`` during the
      run; beside it, no triggers at ``wal_level = logical`` without a slot.
      Also the WAL the slot had not confirmed when pgbench ended, and how long
      it took to catch up.
    """
    name = "pgevents_bench_pgbench"
    url = server.create_database(name)
    plain, capture, listening = "no triggers", f"{OURS} capture, no listener", f"{OURS} capture + listener thread"
    notify = "per-row pg_notify + raw LISTEN (psycopg)"
    logical_plain, logical = "no triggers, wal_level=logical", "logical decoding (test_decoding, pg_recvlogical)"
    seconds = settings.pgbench_seconds
    result = ScenarioResult(
        params={"scale": settings.pgbench_scale, "clients": list(settings.pgbench_clients), "seconds": seconds,
                "jobs": 2, "driver": settings.driver},
        measurements=[],
    )
    bench = PgBench(url)
    started = time.monotonic()
    bench.initialise(settings.pgbench_scale)
    result.extra["initialise_seconds"] = round(time.monotonic() - started, 1)
    log = ArrivalLog()
    raw_log = ArrivalLog()
    app, pgevents = build_app(
        sqlalchemy_url(url, settings.driver), ["pgbench_history"], ["after_insert"],
        lambda event: log.record(event.id), install=False,
    )
    pgevents.listen("pgbench_accounts", ["after_update"], lambda event: log.record(event.id))
    pgevents.install_triggers(app)
    triggers: Optional[str] = "capture"
    admin = connect(url)
    admin.execute(RAW_NOTIFY_DDL)
    restarted = False

    def use_triggers(kind: Optional[str]) -> None:
        """Install exactly the triggers of ``kind``: "capture", "notify" or None."""
        nonlocal triggers
        if kind == triggers:
            return
        if triggers == "capture":
            pgevents.uninstall_triggers(app)
        elif triggers == "notify":
            for table in WATCHED:
                admin.execute(f"DROP TRIGGER bench_notify_row ON {table}")
        if kind == "capture":
            pgevents.install_triggers(app)
        elif kind == "notify":
            for table, operation in WATCHED.items():
                admin.execute(RAW_NOTIFY_TRIGGER.format(operation=operation, table=table, channel=RAW_CHANNEL))
        triggers = kind

    def prepare() -> None:
        admin.execute(f"TRUNCATE pgbench_history, {EVENT_TABLE}")
        admin.execute("VACUUM pgbench_branches, pgbench_tellers")
        admin.execute("CHECKPOINT")

    def check_delivery(clients: int) -> None:
        """After a run with the listener: wait for the drain, count every event's deliveries."""
        expected = int(scalar(admin, EXPECTED_EVENTS))
        backlog = expected - log.count
        drained_from = time.monotonic()
        if not log.wait_for(expected, settings.drain_timeout):
            logger.warning("The listener handled %d of %d events within %.0f s.",
                           log.count, expected, settings.drain_timeout)
        drain_seconds = time.monotonic() - drained_from
        wait_drained(admin, 5)  # the last batch's settle commits after its handler calls
        distinct = len(log.times)
        check = {
            "clients": clients, "expected": expected, "handler_calls": log.count, "distinct_events": distinct,
            "lost": expected - distinct, "duplicates": log.count - distinct,
            "left_in_event_table": int(scalar(admin, f"SELECT count(*) FROM {EVENT_TABLE}")),
        }
        result.extra.setdefault("exactly_once", []).append(check)
        result.add(f"listener backlog at end, {clients} clients", listening, "events").values.append(backlog)
        result.add(f"drain after end, {clients} clients", listening, "s").values.append(drain_seconds)
        result.add(f"events lost, {clients} clients", listening, "events").values.append(check["lost"])
        result.add(f"duplicate deliveries, {clients} clients", listening, "events").values.append(check["duplicates"])
        if check["lost"] or check["duplicates"] or check["left_in_event_table"]:
            logger.warning("Delivery check failed: %s", check)

    def measure(variant: str, clients: int) -> None:
        use_triggers({capture: "capture", listening: "capture", notify: "notify"}.get(variant))
        raw_listener: Optional[RawListener] = None
        if variant == listening:
            pgevents.start(app)
            wait_listening(lambda: admin.execute(PROBE), log)
        elif variant == notify:
            raw_listener = RawListener(url, RAW_CHANNEL, raw_log, "psycopg")
            raw_listener.start()
        prepare()
        log.reset(keep_times=True)
        try:
            if variant == logical:
                with LogicalDrain(url) as drain:
                    tps = bench.tpc_b(clients, seconds)
                    lag, catch_up = drain.catch_up(settings.drain_timeout)
                result.add(f"logical: WAL not decoded at end, {clients} clients", variant, "MB").values.append(
                    lag / 2**20)
                result.add(f"logical: catch-up after end, {clients} clients", variant, "s").values.append(catch_up)
            else:
                tps = bench.tpc_b(clients, seconds)
            if variant == listening:
                check_delivery(clients)
            elif variant == capture:
                captured = int(scalar(admin, f"SELECT count(*) FROM {EVENT_TABLE}"))
                result.extra.setdefault("capture_check", []).append(
                    {"clients": clients, "expected": int(scalar(admin, EXPECTED_EVENTS)), "captured": captured})
        finally:
            if raw_listener is not None:
                raw_listener.stop()
            pgevents.stop(timeout=10, app=app)
        result.add(f"TPS, {clients} clients", variant, "tps", None if variant == plain else plain).values.append(tps)
        logger.info("pgbench %d clients, %s: %.0f tps", clients, variant, tps)

    def measure_all(variants: list[str], runs: int) -> None:
        for run in range(runs):
            for index, clients in enumerate(settings.pgbench_clients):
                shift = (run + index) % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    measure(variant, clients)

    try:
        wal_level = scalar(admin, "SHOW wal_level")
        result.params["wal_level"] = wal_level
        measure_all([plain, capture, listening, notify], settings.pgbench_runs)
        use_triggers(None)
        if wal_level != "logical" and not server.embedded:
            result.extra["logical"] = f"skipped: wal_level is {wal_level} and a server given by DSN is not restarted"
        else:
            if wal_level != "logical":
                admin.close()
                server.restart_with({"wal_level": "logical"})
                restarted = True
                admin = connect(url)
            measure_all([logical_plain, logical], settings.pgbench_runs)
    finally:
        pgevents.stop(timeout=10, app=app)
        admin.close()
        with contextlib.suppress(Exception):  # a slot left behind would stop the restart below
            drop_slot(url)
        if restarted:
            server.restart_with({"wal_level": None})
        server.drop_database(name)
    checks = result.extra.get("exactly_once", [])
    result.extra["exactly_once_ok"] = bool(checks) and all(
        not (c["lost"] or c["duplicates"] or c["left_in_event_table"]) for c in checks)
    return result
