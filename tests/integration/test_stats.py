"""Signals, stats(), ``status --json``, readiness and Prometheus metrics, on both drivers."""
from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from conftest import thing_app, wait_until
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flask_pgevents import (
    event_failed,
    event_gave_up,
    event_handled,
    listener_connection_lost,
    listener_reconnected,
    listener_started,
    listener_stopped,
)
from flask_pgevents.cli import pgevents_cli
from flask_pgevents.metrics import PGEventsCollector, instrument


class Received:
    """Records the signals sent to it: (signal name, sender, kwargs)."""

    def __init__(self, *signals: Any) -> None:
        self.calls: list[tuple[str, Any, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._signals = signals
        for signal in signals:
            signal.connect(self._receiver(signal.name), weak=False)

    def _receiver(self, name: str) -> Any:
        def receive(sender: Any, **kwargs: Any) -> None:
            with self._lock:
                self.calls.append((name, sender, kwargs))
        receive.signal_name = name  # type: ignore[attr-defined]
        return receive

    def of(self, name: str) -> list[tuple[Any, dict[str, Any]]]:
        with self._lock:
            return [(sender, kwargs) for signal, sender, kwargs in self.calls if signal == name]

    def disconnect(self) -> None:
        for signal in self._signals:
            for receiver in list(signal.receivers.values()):
                if getattr(receiver, "signal_name", None) == signal.name:
                    signal.disconnect(receiver)


@pytest.fixture
def received():
    made: list[Received] = []

    def connect(*signals: Any) -> Received:
        made.append(Received(*signals))
        return made[-1]

    yield connect
    for one in made:
        one.disconnect()


def picky_app(make_app, **config):
    app, _db, pgevents, Thing = thing_app(make_app, **config)

    @pgevents.listens_for(Thing, "after_insert")
    def picky(event):
        if event.new["name"] == "bad":
            raise ValueError("bad name")

    @pgevents.listens_for(Thing, "after_update")
    def touched(event):
        pass

    with app.app_context():
        pgevents.install_triggers()
    return app, pgevents, f"{picky.__module__}.{picky.__qualname__}"


def test_event_signals_and_counters_follow_handled_retried_and_given_up_events(make_app, other_service, received):
    app, pgevents, picky = picky_app(make_app, PGEVENTS_MAX_ATTEMPTS=2, PGEVENTS_RETRY_BACKOFF=0.01)
    got = received(event_handled, event_failed, event_gave_up)
    other_service.execute("INSERT INTO thing (name) VALUES ('good'), ('bad')")

    with app.app_context():
        assert pgevents.process_pending(timeout=30) == 2
        wait_until(lambda: pgevents.process_pending(timeout=30) or got.of("event-gave-up"))

    (sender, handled), = got.of("event-handled")
    assert sender is app and handled["event"].new["name"] == "good"
    failures = got.of("event-failed")
    assert [(kw["handler"], kw["event"].attempt, kw["will_retry"]) for _, kw in failures] == [
        (picky, 1, True), (picky, 2, False),
    ]
    assert all(sender is app and isinstance(kw["exception"], ValueError) for sender, kw in failures)
    (sender, gave_up), = got.of("event-gave-up")
    assert sender is app
    assert gave_up["event_id"] == gave_up["event"].id and gave_up["attempt"] == 2
    assert "bad name" in gave_up["errors"][picky]["error"]

    with app.app_context():
        process = pgevents.stats().process
    assert (process.events_handled, process.events_failed, process.events_retried, process.events_gave_up) == (
        1, 2, 1, 1,
    )
    counts = process.handlers[picky]
    assert (counts.handled, counts.failed, counts.retried) == (1, 2, 1)
    assert counts.buckets[-1] == 3 and counts.seconds > 0


def test_stats_and_status_json_report_triggers_backlog_per_table_failed_and_exit_code(make_app, other_service):
    app, pgevents, _picky = picky_app(make_app, PGEVENTS_MAX_ATTEMPTS=1)
    other_service.execute("INSERT INTO thing (name) VALUES ('bad')")
    with app.app_context():
        assert pgevents.process_pending(timeout=30) == 1
    other_service.execute("INSERT INTO thing (name) VALUES ('a'), ('b')")
    other_service.execute("UPDATE thing SET name = 'c' WHERE name = 'a'")
    other_service.execute("UPDATE pgevents.event SET created_at = now() - interval '90 seconds' WHERE op = 'insert'")

    with app.app_context():
        stats = pgevents.stats()
    assert stats.installed and stats.triggers_ok and stats.schema == "pgevents"
    assert {(t.table, t.op, t.state) for t in stats.triggers} == {
        ("public.thing", "insert", "installed"), ("public.thing", "update", "installed"),
    }
    assert (stats.pending, stats.failed) == (3, 1)
    assert 90 <= stats.oldest_pending_age < 120
    assert [(row.table, row.op, row.pending) for row in stats.backlog] == [
        ("public.thing", "insert", 2), ("public.thing", "update", 1),
    ]
    assert 90 <= stats.backlog[0].oldest_pending_age < 120 and stats.backlog[1].oldest_pending_age < 60
    assert stats.listeners == []
    assert not stats.process.ready

    result = app.test_cli_runner().invoke(pgevents_cli, ["status", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["pending"] == 3 and data["failed"] == 1 and data["installed"] is True
    assert data["backlog"] == [
        {"table": "public.thing", "op": "insert", "pending": 2, "oldest_pending_age": data["backlog"][0][
            "oldest_pending_age"]},
        {"table": "public.thing", "op": "update", "pending": 1, "oldest_pending_age": data["backlog"][1][
            "oldest_pending_age"]},
    ]
    assert data["collected_at"].startswith(str(stats.collected_at.year))
    assert set(data["process"]) >= {"pid", "events_handled", "handlers", "ready", "ready_reason"}

    # A missing trigger: exit 1, with the JSON still printed.
    pgevents.listen("thing", "after_delete", lambda event: None)
    result = app.test_cli_runner().invoke(pgevents_cli, ["status", "--json"])
    assert result.exit_code == 1
    assert {"table": "public.thing", "op": "delete", "state": "missing"} in json.loads(result.output)["triggers"]


def test_status_json_exits_1_when_the_schema_is_not_installed(make_app):
    app, _db, _pgevents, _Thing = thing_app(make_app)
    result = app.test_cli_runner().invoke(pgevents_cli, ["status", "--json"])
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["installed"] is False and data["backlog"] == [] and data["listeners"] == []


def test_listener_signals_readiness_and_live_listeners_through_a_lost_connection(
    make_app, other_service, received, recorder
):
    app, _db, pgevents, Thing = thing_app(make_app, PGEVENTS_RECONNECT_BACKOFF=0.05)
    pgevents.listen(Thing, "after_insert", recorder)
    with app.app_context():
        pgevents.install_triggers()
    got = received(listener_started, listener_stopped, listener_connection_lost, listener_reconnected)
    assert pgevents.ready(app) == (False, "The pgevents listener thread does not run in this process.")

    pgevents.start(app)
    wait_until(lambda: pgevents.ready(app).ready)
    assert pgevents.ready(app).reason == "Connected and listening."
    assert [sender for sender, _ in got.of("listener-started")] == [app]
    with app.app_context():
        stats = wait_until(lambda: pgevents.stats() if pgevents.stats().listeners else None)
    (listener,) = stats.listeners
    assert listener.application_name == "pgevents-listener" and listener.state in ("idle", "busy")
    assert listener.connected_seconds is not None and listener.connected_seconds >= 0
    assert stats.process.listener_running and stats.process.listener_connected and stats.process.ready

    other_service.execute("SELECT pg_terminate_backend(%s)", (listener.pid,))
    wait_until(lambda: got.of("listener-reconnected"))
    ((sender, lost),) = got.of("listener-connection-lost")
    assert sender is app and isinstance(lost["exception"], Exception)
    assert got.of("listener-reconnected")[0][1]["failures"] >= 1
    wait_until(lambda: pgevents.ready(app).ready)
    other_service.execute("INSERT INTO thing (name) VALUES ('after')")
    recorder.wait_for(1)

    assert pgevents.stop(timeout=10, app=app)
    assert [sender for sender, _ in got.of("listener-stopped")] == [app]
    assert not pgevents.ready(app).ready


def test_readiness_tells_a_busy_handler_from_a_wedged_one(make_app, other_service):
    app, _db, pgevents, Thing = thing_app(make_app)
    entered, release = threading.Event(), threading.Event()

    @pgevents.listens_for(Thing, "after_insert")
    def slow(event):
        entered.set()
        release.wait(20)

    with app.app_context():
        pgevents.install_triggers()
    pgevents.start(app)
    try:
        wait_until(lambda: pgevents.ready(app).ready)
        other_service.execute("INSERT INTO thing (name) VALUES ('slow')")
        assert entered.wait(10)
        busy = pgevents.ready(app, max_stall=0)
        assert busy.ready and busy.reason.startswith(f"Busy: handler {slow.__module__}.{slow.__qualname__} running for")
        _ready, reason = wait_until(lambda: (r := pgevents.ready(app, max_stall=0, max_handler_seconds=0.05)) and (
            not r.ready and r))
        assert f"handler {slow.__module__}.{slow.__qualname__} has been running for" in reason
    finally:
        release.set()
    wait_until(lambda: pgevents.ready(app).ready)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def test_prometheus_collector_exports_backlog_failed_counters_and_histogram(make_app, other_service):
    app, pgevents, picky = picky_app(make_app, PGEVENTS_MAX_ATTEMPTS=1)
    registry = CollectorRegistry()
    registry.register(PGEventsCollector(app, cache_seconds=0))
    other_service.execute("INSERT INTO thing (name) VALUES ('bad'), ('good')")
    with app.app_context():
        assert pgevents.process_pending(timeout=30) == 2
    other_service.execute("INSERT INTO thing (name) VALUES ('later')")

    samples = _samples(registry)
    name = (("app", app.name),)
    assert samples[("pgevents_stats_up", name)] == 1
    assert samples[("pgevents_pending_events", (("app", app.name), ("op", "insert"), ("table", "public.thing")))] == 1
    assert samples[("pgevents_oldest_pending_age_seconds", name)] >= 0
    assert samples[("pgevents_failed_events", name)] == 1
    assert samples[("pgevents_listeners", (("app", app.name), ("state", "idle")))] == 0
    assert samples[("pgevents_events_handled_total", name)] == 1
    assert samples[("pgevents_events_failed_total", name)] == 1
    assert samples[("pgevents_events_gave_up_total", name)] == 1
    handler = (("app", app.name), ("handler", picky))
    assert samples[("pgevents_handler_handled_total", handler)] == 1
    assert samples[("pgevents_handler_failed_total", handler)] == 1
    assert samples[("pgevents_handler_duration_seconds_count", handler)] == 2
    assert samples[("pgevents_handler_duration_seconds_bucket", (*handler, ("le", "+Inf")))] == 2


def test_prometheus_cache_reads_the_database_once_per_period_and_reports_it_down(make_app, other_service):
    app, _pgevents, _picky = picky_app(make_app)
    registry = CollectorRegistry()
    registry.register(PGEventsCollector(app, cache_seconds=3600, process=False))
    name = (("app", app.name),)
    assert _samples(registry)[("pgevents_stats_up", name)] == 1
    other_service.execute("INSERT INTO thing (name) VALUES ('a')")
    samples = _samples(registry)  # cached: the new event is not seen yet
    assert ("pgevents_pending_events", (("app", app.name), ("op", "insert"), ("table", "public.thing"))) not in samples
    assert not any(key[0].startswith("pgevents_handler") for key in samples)

    down = CollectorRegistry()
    broken_app, _db, _pg, _Thing = thing_app(
        make_app, PGEVENTS_DATABASE_URI="postgresql://nobody@127.0.0.1:1/none", PGEVENTS_CONNECT_TIMEOUT=1,
    )
    down.register(PGEventsCollector(broken_app, process=False))
    assert _samples(down)[("pgevents_stats_up", (("app", broken_app.name),))] == 0


def test_instrument_records_counters_and_durations_in_prometheus_client_metrics(make_app, other_service):
    app, pgevents, picky = picky_app(make_app, PGEVENTS_MAX_ATTEMPTS=1)
    registry = CollectorRegistry()
    instrument(app, registry)
    other_service.execute("INSERT INTO thing (name) VALUES ('bad'), ('good')")
    with app.app_context():
        assert pgevents.process_pending(timeout=30) == 2
    samples = _samples(registry)
    handler = (("app", app.name), ("handler", picky))
    assert samples[("pgevents_handler_handled_total", handler)] == 1
    assert samples[("pgevents_handler_failed_total", handler)] == 1
    assert samples[("pgevents_handler_duration_seconds_count", handler)] == 2
    assert samples[("pgevents_events_handled_total", (("app", app.name),))] == 1
    assert samples[("pgevents_events_gave_up_total", (("app", app.name),))] == 1


MULTIPROCESS_SCRIPT = """
import sys
from flask import Flask
from prometheus_client import generate_latest
from flask_pgevents import PGEvents
from flask_pgevents.metrics import PGEventsCollector, instrument, multiprocess_registry

app = Flask("mp")
app.config.update(PGEVENTS_DATABASE_URI=sys.argv[1], TESTING=True)
pgevents = PGEvents()
pgevents.listen("thing", "after_insert", lambda event: None)
pgevents.init_app(app)
instrument(app)
with app.app_context():
    pgevents.install_triggers()
    import psycopg
    with psycopg.connect(sys.argv[2], autocommit=True) as conn:
        conn.execute("INSERT INTO thing (name) VALUES ('a'), ('b')")
    assert pgevents.process_pending(timeout=30) == 2
print(generate_latest(multiprocess_registry(PGEventsCollector(app, process=False))).decode())
"""


def test_multiprocess_registry_adds_up_workers_counters_beside_the_database_gauges(
    make_app, database_url, libpq_url, tmp_path
):
    import os
    import subprocess
    import sys

    thing_app(make_app)  # creates the table
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    runs = [
        subprocess.run([sys.executable, "-c", MULTIPROCESS_SCRIPT, database_url, libpq_url],
                       env=env, capture_output=True, text=True, timeout=60)
        for _ in range(2)
    ]
    assert all(run.returncode == 0 for run in runs), runs[-1].stderr
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(runs[-1].stdout) for sample in family.samples
    }
    assert samples[("pgevents_events_handled_total", (("app", "mp"),))] == 4  # two processes, two each
    assert samples[("pgevents_stats_up", (("app", "mp"),))] == 1
