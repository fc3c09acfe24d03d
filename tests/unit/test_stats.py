"""flask_pgevents.stats: counters, histogram buckets, and the JSON form of Stats."""
from __future__ import annotations

import datetime
import json
import threading

from flask_pgevents.stats import (
    HANDLER_BUCKETS,
    Counters,
    LiveListener,
    PendingEvents,
    ProcessStats,
    Stats,
    TriggerState,
    default_max_stall,
)


def test_counters_count_calls_failures_retries_and_cumulative_buckets():
    counters = Counters()
    counters.handler_call("app.welcome", 0.001)
    counters.handler_call("app.welcome", 0.3)
    counters.handler_call("app.welcome", 60.0, failed=True, retried=True)
    counters.handler_call("app.audit", 0.01, failed=True)
    counters.events_handled(2)
    counters.event_failed(retried=True)
    counters.event_failed(retried=False)

    (handled, retried, gave_up), handlers = counters.snapshot()
    assert (handled, retried, gave_up) == (2, 1, 1)
    assert list(handlers) == ["app.audit", "app.welcome"]
    welcome = handlers["app.welcome"]
    assert (welcome.handled, welcome.failed, welcome.retried) == (2, 1, 1)
    assert abs(welcome.seconds - 60.301) < 1e-9
    assert len(welcome.buckets) == len(HANDLER_BUCKETS) + 1
    bounds = dict(zip([*HANDLER_BUCKETS, float("inf")], welcome.buckets))
    assert bounds[0.005] == 1 and bounds[0.25] == 1 and bounds[0.5] == 2 and bounds[10.0] == 2
    assert bounds[float("inf")] == 3
    audit = handlers["app.audit"]
    assert (audit.handled, audit.failed, audit.retried) == (0, 1, 0)
    assert dict(zip(HANDLER_BUCKETS, audit.buckets))[0.01] == 1  # a bound is inclusive (le)


def test_counters_pass_each_record_to_a_sink():
    records = []

    class Sink:
        def handler_call(self, handler, seconds, failed):
            records.append(("call", handler, seconds, failed))

        def events_handled(self, count):
            records.append(("handled", count))

        def event_failed(self, retried):
            records.append(("failed", retried))

    counters = Counters()
    counters.sink = Sink()
    counters.handler_call("h", 0.5, failed=True)
    counters.events_handled(3)
    counters.event_failed(retried=False)
    assert records == [("call", "h", 0.5, True), ("handled", 3), ("failed", False)]


def test_counters_are_safe_across_threads():
    counters = Counters()

    def work():
        for _ in range(2000):
            counters.handler_call("h", 0.001)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert counters.snapshot()[1]["h"].handled == 8000


def _stats(**changes):
    now = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.timezone.utc)
    values = {
        "collected_at": now, "schema": "pgevents", "installed": True,
        "triggers": [TriggerState("public.thing", "insert", "installed")],
        "pending": 3, "oldest_pending_age": 1.5, "failed": 1,
        "backlog": [PendingEvents("public.thing", "insert", 3, 1.5)],
        "listeners": [LiveListener(4242, "10.0.0.7", "pgevents-listener", "idle", now, 30.0)],
        "process": ProcessStats(
            pid=1, events_handled=0, events_failed=0, events_retried=0, events_gave_up=0, handlers={},
            listener_running=False, listener_connected=False, ready=False, ready_reason="not running",
        ),
    }
    values.update(changes)
    return Stats(**values)


def test_stats_to_dict_is_plain_json_with_iso_timestamps():
    data = _stats().to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["collected_at"] == "2024-05-01T12:00:00+00:00"
    assert data["listeners"][0] == {
        "pid": 4242, "host": "10.0.0.7", "application_name": "pgevents-listener", "state": "idle",
        "since": "2024-05-01T12:00:00+00:00", "connected_seconds": 30.0,
    }
    assert data["backlog"] == [{"table": "public.thing", "op": "insert", "pending": 3, "oldest_pending_age": 1.5}]


def test_triggers_ok_needs_the_schema_and_no_missing_or_outdated_trigger():
    assert _stats().triggers_ok
    assert not _stats(installed=False).triggers_ok
    assert not _stats(triggers=[TriggerState("public.thing", "update", "outdated")]).triggers_ok
    assert _stats(triggers=[TriggerState("public.thing", "update", "unneeded")]).triggers_ok


def test_a_listener_counts_as_wedged_after_30_s_or_three_safety_polls():
    assert default_max_stall(0.5) == 30.0
    assert default_max_stall(20.0) == 60.0
