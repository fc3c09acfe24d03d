"""metrics.py: the metrics' names, in one process and in multiprocess mode, without a database.

Their values, read from a database, are in tests/integration/test_stats.py."""
from __future__ import annotations

import logging

import prometheus_client
import pytest
from flask import Flask

from flask_pgevents import PGEvents
from flask_pgevents.metrics import PGEventsCollector, instrument

#: Nothing listens there: a read of the database would fail, and be logged.
UNREACHABLE_URI = "postgresql://nobody@127.0.0.1:1/none"

DATABASE_METRICS = [
    "pgevents_stats_up", "pgevents_pending_events", "pgevents_oldest_pending_age_seconds",
    "pgevents_failed_events", "pgevents_listeners",
]
PROCESS_METRICS = [
    "pgevents_events_handled", "pgevents_events_failed", "pgevents_events_gave_up",
    "pgevents_handler_handled", "pgevents_handler_failed", "pgevents_handler_duration_seconds",
]


def make_app() -> Flask:
    app = Flask("metrics")
    app.config.update({"TESTING": True, "PGEVENTS_DATABASE_URI": UNREACHABLE_URI, "PGEVENTS_CONNECT_TIMEOUT": 1})
    PGEvents(app)
    return app


def families(collector: PGEventsCollector) -> dict[str, tuple[str, str]]:
    return {family.name: (family.type, family.documentation) for family in collector.describe()}


@pytest.mark.parametrize("process", [True, False])
def test_registering_the_collector_reads_no_database(caplog, process):
    registry = prometheus_client.CollectorRegistry()
    with caplog.at_level(logging.WARNING, "flask_pgevents"):
        collector = PGEventsCollector(make_app(), process=process)
        registry.register(collector)
    assert not caplog.records
    assert list(families(collector)) == DATABASE_METRICS + (PROCESS_METRICS if process else [])


def test_instrument_exports_the_process_metrics_the_collector_does():
    # Multiprocess mode (instrument) and one process (the collector) must
    # name, type and describe them alike: dashboards read either.
    app = make_app()
    registry = prometheus_client.CollectorRegistry()
    instrument(app, registry)
    instrumented = {family.name: (family.type, family.documentation) for family in registry.collect()}
    collected = families(PGEventsCollector(app))
    assert instrumented == {name: collected[name] for name in PROCESS_METRICS}
