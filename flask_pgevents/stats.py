"""What ``pgevents.stats()`` reports: the event schema's state and this process's counters.

:class:`Counters` is kept per app and process; the dispatcher records each
handler call in it. :class:`Stats` joins a snapshot of it to what the
database says (triggers, backlog, failed events, live listeners), as plain
data that ``flask pgevents status --json`` prints with :meth:`Stats.to_dict`.
"""
from __future__ import annotations

import bisect
import dataclasses
import datetime
import os
import threading
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Protocol

if TYPE_CHECKING:
    from .state import AppState
    from .store import Store

#: Upper bounds, in seconds, of the handler-duration histogram's buckets
#: (those of ``prometheus_client``'s default histogram).
HANDLER_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)


class Readiness(NamedTuple):
    """Whether this process's listener is connected and not wedged, and why not.

    Example::

        ready, reason = pgevents.ready()
    """

    ready: bool
    reason: str


@dataclasses.dataclass(frozen=True)
class HandlerStats:
    """Calls of one handler in this process since it started."""

    #: Calls that returned.
    handled: int
    #: Calls that raised.
    failed: int
    #: Calls that raised and whose event will be delivered again.
    retried: int
    #: Time spent in the handler, in seconds, over all calls.
    seconds: float
    #: Calls that took at most each bound of :data:`HANDLER_BUCKETS`, then all
    #: calls (cumulative, as Prometheus histograms count).
    buckets: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ProcessStats:
    """This process: its counters and its listener thread."""

    pid: int
    #: Queued events whose handlers all succeeded.
    events_handled: int
    #: Failed attempts at queued events: retried plus gave up.
    events_failed: int
    #: Failed attempts that will be retried after a backoff.
    events_retried: int
    #: Events kept as failed after their last attempt.
    events_gave_up: int
    #: By handler name (``module.function``); broadcast handlers included.
    handlers: dict[str, HandlerStats]
    #: The listener thread runs in this process.
    listener_running: bool
    #: It is connected to the database.
    listener_connected: bool
    #: :meth:`~flask_pgevents.PGEvents.ready`, with its default limits.
    ready: bool
    ready_reason: str


@dataclasses.dataclass(frozen=True)
class TriggerState:
    """A trigger that the registered handlers need, and whether it is there."""

    table: str
    #: The trigger's kind: its op, or ``broadcast_<op>`` for broadcast handlers
    #: (named ``op`` in the JSON that ``status --json`` prints).
    op: str
    #: ``installed``, ``outdated``, ``missing`` or ``unneeded``.
    state: str


@dataclasses.dataclass(frozen=True)
class PendingEvents:
    """The pending events of one table and operation."""

    table: str
    op: str
    pending: int
    #: Seconds since the oldest of them was written.
    oldest_pending_age: Optional[float]


@dataclasses.dataclass(frozen=True)
class LiveListener:
    """A listening connection, in any process, as the ``listener`` table and ``pg_stat_activity`` show it."""

    #: The server process of its connection (``pg_terminate_backend`` takes it).
    pid: int
    #: The client's address; ``None`` over a Unix socket, or when the role
    #: reading it may not see other roles' sessions (``pg_read_all_stats``).
    host: Optional[str]
    application_name: str
    #: ``idle`` (asleep, waiting for a wake-up) or ``busy`` (claiming and handling).
    state: str
    #: When it became idle or busy.
    since: datetime.datetime
    #: Seconds since it connected.
    connected_seconds: Optional[float]


@dataclasses.dataclass(frozen=True)
class Stats:
    """The state of event delivery for one app, as :meth:`~flask_pgevents.PGEvents.stats` returns it."""

    #: The database's clock when it was read.
    collected_at: datetime.datetime
    schema: str
    #: The event schema exists; without it the rest is empty.
    installed: bool
    triggers: list[TriggerState]
    #: Pending events, due now or later (retries waiting for their backoff).
    pending: int
    #: Seconds since the oldest pending event was written.
    oldest_pending_age: Optional[float]
    #: Events kept as failed.
    failed: int
    #: Pending events by table and operation, largest first.
    backlog: list[PendingEvents]
    listeners: list[LiveListener]
    process: ProcessStats

    @property
    def triggers_ok(self) -> bool:
        """The schema is installed and no needed trigger is missing or outdated
        (``flask pgevents status`` then exits with 0)."""
        return self.installed and not any(t.state in ("missing", "outdated") for t in self.triggers)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: timestamps as ISO 8601 strings."""
        data: dict[str, Any] = _jsonable(dataclasses.asdict(self))
        return data


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    return value


class CounterSink(Protocol):
    """Receives what :class:`Counters` records, as it is recorded (Prometheus multiprocess mode)."""

    def handler_call(self, handler: str, seconds: float, failed: bool) -> None: ...

    def events_handled(self, count: int) -> None: ...

    def event_failed(self, retried: bool) -> None: ...


class Counters:
    """Handled, failed and retried counts and handler times of one app in this process.

    Thread-safe: the listener thread and callers of ``process_pending()`` record
    into the same counters.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # name -> [handled, failed, retried, seconds, count per bucket..., count above the last]
        self._handlers: dict[str, list[Any]] = {}
        self._events = [0, 0, 0]  # handled, retried, gave up
        #: Also given every record, if set (see :mod:`flask_pgevents.metrics`).
        self.sink: Optional[CounterSink] = None

    def handler_call(self, handler: str, seconds: float, failed: bool = False, retried: bool = False) -> None:
        """Count one call of ``handler`` that took ``seconds``."""
        bucket = 4 + bisect.bisect_left(HANDLER_BUCKETS, seconds)
        with self._lock:
            counts = self._handlers.get(handler)
            if counts is None:
                counts = self._handlers[handler] = [0, 0, 0, 0.0] + [0] * (len(HANDLER_BUCKETS) + 1)
            counts[1 if failed else 0] += 1
            if retried:
                counts[2] += 1
            counts[3] += seconds
            counts[bucket] += 1
        sink = self.sink
        if sink is not None:
            sink.handler_call(handler, seconds, failed)

    def events_handled(self, count: int) -> None:
        """Count queued events whose handlers all succeeded."""
        with self._lock:
            self._events[0] += count
        sink = self.sink
        if sink is not None:
            sink.events_handled(count)

    def event_failed(self, retried: bool) -> None:
        """Count a failed attempt at a queued event: retried later, or kept as failed."""
        with self._lock:
            self._events[1 if retried else 2] += 1
        sink = self.sink
        if sink is not None:
            sink.event_failed(retried)

    def snapshot(self) -> tuple[tuple[int, int, int], dict[str, HandlerStats]]:
        """(events handled, retried, gave up), and each handler's :class:`HandlerStats`."""
        with self._lock:
            handled, retried, gave_up = self._events
            rows = {name: list(counts) for name, counts in self._handlers.items()}
        handlers = {}
        for name, counts in sorted(rows.items()):
            cumulative, total = [], 0
            for count in counts[4:]:
                total += count
                cumulative.append(total)
            handlers[name] = HandlerStats(counts[0], counts[1], counts[2], counts[3], tuple(cumulative))
        return (handled, retried, gave_up), handlers


def default_max_stall(poll_interval: float) -> float:
    """How long the listener may go without beginning a claim before it counts as wedged."""
    return max(30.0, 3 * poll_interval)


def process_stats(state: AppState) -> ProcessStats:
    """This process's counters and listener, for one app."""
    (handled, retried, gave_up), handlers = state.counters.snapshot()
    listener = state.listener
    readiness = listener.readiness(default_max_stall(state.config.poll_interval))
    return ProcessStats(
        pid=os.getpid(), events_handled=handled, events_failed=retried + gave_up, events_retried=retried,
        events_gave_up=gave_up, handlers=handlers, listener_running=listener.running,
        listener_connected=listener.running and listener.connected_at is not None,
        ready=readiness.ready, ready_reason=readiness.reason,
    )


def collect(state: AppState, store: Store) -> Stats:
    """The :class:`Stats` of one app, read on ``store``'s connection (a few admin queries)."""
    installed = state.triggers.installed(store.installed_triggers())
    triggers = [
        TriggerState(str(t.table), t.kind, t.state)
        for t in state.triggers.status(state.registry.needed_triggers(), installed)
    ]
    backlog = store.backlog()
    listeners = [
        LiveListener(
            pid=session.pid, host=session.client_addr, application_name=session.application_name,
            state="idle" if session.idle else "busy", since=session.since,
            connected_seconds=session.connected_for.total_seconds() if session.connected_for is not None else None,
        )
        for session in store.live_listeners()
    ]
    return Stats(
        collected_at=store.database_now(),
        schema=state.config.schema,
        installed=backlog is not None,
        triggers=triggers,
        pending=backlog.pending if backlog is not None else 0,
        oldest_pending_age=(
            backlog.oldest_pending_age.total_seconds()
            if backlog is not None and backlog.oldest_pending_age is not None else None
        ),
        failed=backlog.failed if backlog is not None else 0,
        backlog=store.pending_by_table(),
        listeners=listeners,
        process=process_stats(state),
    )
