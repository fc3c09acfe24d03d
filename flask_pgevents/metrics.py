"""Prometheus metrics for flask-pgevents: ``pip install flask-pgevents[prometheus]``.

Imported only by apps that use it. Two parts:

- :class:`PGEventsCollector`, a ``prometheus_client`` collector that reads
  :meth:`~flask_pgevents.PGEvents.stats` when scraped (cached briefly, so
  several scrapes at once run its queries once): the backlog per table and
  operation, the oldest pending event's age, failed events and live
  listeners; and, unless ``process=False``, this process's counters and
  handler-duration histogram.
- :func:`instrument`, for ``prometheus_client``'s multiprocess mode (gunicorn
  workers): each process then writes its counters and durations to
  ``PROMETHEUS_MULTIPROC_DIR``, where ``MultiProcessCollector`` adds them up.

Metric names (label ``app`` is the Flask app's name)::

    pgevents_pending_events{table, op}          gauge
    pgevents_oldest_pending_age_seconds         gauge
    pgevents_failed_events                      gauge
    pgevents_listeners{state="idle"|"busy"}     gauge
    pgevents_stats_up                           gauge: 0 when the database could not be read
    pgevents_events_handled_total               counter
    pgevents_events_failed_total                counter: failed attempts
    pgevents_events_gave_up_total               counter: kept as failed
    pgevents_handler_handled_total{handler}     counter
    pgevents_handler_failed_total{handler}      counter
    pgevents_handler_duration_seconds{handler}  histogram

Example, one process::

    from prometheus_client import REGISTRY, make_wsgi_app
    from flask_pgevents.metrics import PGEventsCollector

    REGISTRY.register(PGEventsCollector(app))
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterable, Optional

from flask import Flask
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .stats import HANDLER_BUCKETS, Stats

logger = logging.getLogger("flask_pgevents")

__all__ = ["PGEventsCollector", "instrument", "multiprocess_registry"]


def _state(app: Flask) -> Any:
    state = app.extensions.get("pgevents")
    if state is None:
        raise RuntimeError(
            "flask-pgevents is not set up on this app. Call 'pgevents.init_app(app)' before"
            " creating its metrics."
        )
    return state


class PGEventsCollector(Collector):
    """Exports the stats of one app when scraped.

    :param app: the Flask app set up with flask-pgevents.
    :param cache_seconds: a scrape within this long of the last one reuses
        its database reading.
    :param process: also export this process's counters and histogram; pass
        ``False`` in multiprocess mode, where :func:`instrument` and
        ``MultiProcessCollector`` export them for every worker.
    """

    def __init__(self, app: Flask, *, cache_seconds: float = 1.0, process: bool = True) -> None:
        self._state = _state(app)
        self.app_name = app.name
        self.cache_seconds = cache_seconds
        self.process = process
        self._lock = threading.Lock()
        self._cached: Optional[Stats] = None
        self._cached_at = float("-inf")

    def describe(self) -> Iterable[Metric]:
        # Registration calls this instead of collect(): no query at start-up.
        return list(self._families(None, describe=True))

    def collect(self) -> Iterable[Metric]:
        return self._families(self._stats())

    def _stats(self) -> Optional[Stats]:
        with self._lock:
            if time.monotonic() - self._cached_at >= self.cache_seconds:
                try:
                    self._cached = self._state.extension.stats(self._state.app)
                except Exception:
                    logger.warning("pgevents metrics: reading the stats failed.", exc_info=True)
                    self._cached = None
                self._cached_at = time.monotonic()
            return self._cached

    def _families(self, stats: Optional[Stats], describe: bool = False) -> Iterable[Metric]:
        app = [self.app_name]
        up = GaugeMetricFamily("pgevents_stats_up", "Whether the event schema could be read.", labels=["app"])
        pending = GaugeMetricFamily(
            "pgevents_pending_events", "Pending events by table and operation.", labels=["app", "table", "op"]
        )
        oldest = GaugeMetricFamily(
            "pgevents_oldest_pending_age_seconds", "Age of the oldest pending event.", labels=["app"]
        )
        failed = GaugeMetricFamily("pgevents_failed_events", "Events kept as failed.", labels=["app"])
        listeners = GaugeMetricFamily(
            "pgevents_listeners", "Live listeners in every process, idle or busy.", labels=["app", "state"]
        )
        families: list[Metric] = [up, pending, oldest, failed, listeners]
        if not describe:
            up.add_metric(app, 1 if stats is not None else 0)
        if stats is not None:
            for row in stats.backlog:
                pending.add_metric([*app, row.table, row.op], row.pending)
            oldest.add_metric(app, stats.oldest_pending_age or 0.0)
            failed.add_metric(app, stats.failed)
            for state in ("idle", "busy"):
                listeners.add_metric([*app, state], sum(1 for lst in stats.listeners if lst.state == state))
        if self.process:
            families.extend(self._process_families(describe))
        return families

    def _process_families(self, describe: bool) -> list[Metric]:
        app = [self.app_name]
        handled = CounterMetricFamily(
            "pgevents_events_handled", "Queued events whose handlers all succeeded.", labels=["app"]
        )
        failed = CounterMetricFamily("pgevents_events_failed", "Failed attempts at queued events.", labels=["app"])
        gave_up = CounterMetricFamily(
            "pgevents_events_gave_up", "Events kept as failed after their last attempt.", labels=["app"]
        )
        handler_handled = CounterMetricFamily(
            "pgevents_handler_handled", "Handler calls that returned.", labels=["app", "handler"]
        )
        handler_failed = CounterMetricFamily(
            "pgevents_handler_failed", "Handler calls that raised.", labels=["app", "handler"]
        )
        duration = HistogramMetricFamily(
            "pgevents_handler_duration_seconds", "Time spent in each handler call.", labels=["app", "handler"]
        )
        families: list[Metric] = [handled, failed, gave_up, handler_handled, handler_failed, duration]
        if describe:
            return families
        (events_handled, retried, events_gave_up), handlers = self._state.counters.snapshot()
        handled.add_metric(app, events_handled)
        failed.add_metric(app, retried + events_gave_up)
        gave_up.add_metric(app, events_gave_up)
        bounds = [repr(bound) for bound in HANDLER_BUCKETS] + ["+Inf"]
        for name, counts in handlers.items():
            labels = [*app, name]
            handler_handled.add_metric(labels, counts.handled)
            handler_failed.add_metric(labels, counts.failed)
            duration.add_metric(labels, list(zip(bounds, counts.buckets)), sum_value=counts.seconds)
        return families


class _PrometheusSink:
    """Records an app's counters in ``prometheus_client`` metrics as they happen."""

    def __init__(self, app_name: str, registry: Optional[CollectorRegistry]) -> None:
        labels = ["app", "handler"]
        self.app_name = app_name
        self.events_handled_total = Counter(
            "pgevents_events_handled", "Queued events whose handlers all succeeded.", ["app"], registry=registry
        )
        self.events_failed_total = Counter(
            "pgevents_events_failed", "Failed attempts at queued events.", ["app"], registry=registry
        )
        self.events_gave_up_total = Counter(
            "pgevents_events_gave_up", "Events kept as failed after their last attempt.", ["app"], registry=registry
        )
        self.handler_handled = Counter(
            "pgevents_handler_handled", "Handler calls that returned.", labels, registry=registry
        )
        self.handler_failed = Counter(
            "pgevents_handler_failed", "Handler calls that raised.", labels, registry=registry
        )
        self.duration = Histogram(
            "pgevents_handler_duration_seconds", "Time spent in each handler call.", labels,
            buckets=HANDLER_BUCKETS, registry=registry,
        )

    def handler_call(self, handler: str, seconds: float, failed: bool) -> None:
        (self.handler_failed if failed else self.handler_handled).labels(self.app_name, handler).inc()
        self.duration.labels(self.app_name, handler).observe(seconds)

    def events_handled(self, count: int) -> None:
        self.events_handled_total.labels(self.app_name).inc(count)

    def event_failed(self, retried: bool) -> None:
        self.events_failed_total.labels(self.app_name).inc()
        if not retried:
            self.events_gave_up_total.labels(self.app_name).inc()


def instrument(app: Flask, registry: Optional[CollectorRegistry] = None) -> None:
    """Record this process's handled and failed counts and handler durations in
    ``prometheus_client`` metrics, for its multiprocess mode.

    With ``PROMETHEUS_MULTIPROC_DIR`` set, each worker writes them there and
    ``MultiProcessCollector`` adds them up; export the database's gauges with
    ``PGEventsCollector(app, process=False)`` beside it. Call it once per app,
    in the app factory (before or after the fork).

    :param registry: where to register the metrics; by default none, as
        multiprocess mode wants.
    """
    state = _state(app)
    state.counters.sink = _PrometheusSink(app.name, registry)


def multiprocess_registry(database: PGEventsCollector) -> CollectorRegistry:
    """A registry for one scrape in multiprocess mode: every worker's counters
    (``MultiProcessCollector``) and ``database``'s gauges.

    Build one per scrape, as ``prometheus_client`` recommends; ``database`` is
    made once (``PGEventsCollector(app, process=False)``) and keeps its cache.
    """
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(database)
    return registry
