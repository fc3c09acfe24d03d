"""A batch's handlers: claim, call them in the app context, record, settle.

Each batch is claimed with ``FOR UPDATE SKIP LOCKED`` inside a transaction
that stays open while its handlers run, so no other process can take those
events, and a process that dies releases them at once with its connection.
Handled events are deleted (or marked done) in that same transaction.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
import traceback
from typing import TYPE_CHECKING, Dict, Iterable, Iterator, Optional, Tuple

from . import signals, tracing
from .atomic import JoinedSession
from .connection import CONNECTION_ERRORS, Connection
from .events import Event, changed_in_json, load_context, load_row
from .pacing import Backoff
from .registry import Subscription, TableKey, broadcast_kind
from .store import Claim, Store, StoredEvent, subscription_key

if TYPE_CHECKING:
    from .state import AppState, TableInfo

logger = logging.getLogger("flask_pgevents")

#: A table's handlers of one kind, whether any has a filter, and the table's
#: decoder (``None`` without handlers): see :meth:`Dispatcher._route`.
Route = Tuple[Tuple[Subscription, ...], bool, Optional["TableInfo"]]
#: The routes of one batch, by schema, table and kind.
Routes = Dict[Tuple[str, str, str], Route]

#: A batch whose handlers run longer than this settles early and releases
#: the events it has not reached, so that other processes can take them.
MAX_BATCH_SECONDS = 1.0
#: Broadcast rows are kept this long: a listener further behind misses them.
BROADCAST_RETENTION_SECONDS = 60

#: The name under which a row that cannot be decoded is recorded as failed.
DECODE_STEP = "<decoding the row>"
#: The name under which an event is recorded whose batch could not be settled.
SETTLE_STEP = "<settling the event>"
#: The name under which a handler's error is recorded when its own record could not be.
RECORD_STEP = "<recording the failure>"

Errors = dict[str, dict[str, str]]


def storable(text: str) -> str:
    """``text`` without what jsonb refuses: NUL characters, and lone surrogates
    (escaped as ``\\udxxx``)."""
    return text.replace("\x00", "").encode("utf-8", "backslashreplace").decode("utf-8")


def error_record(exc: BaseException) -> dict[str, str]:
    """The error and traceback of the exception being handled, storable as jsonb."""
    return {
        "error": storable(f"{type(exc).__name__}: {exc}"),
        "traceback": storable(traceback.format_exc()),
    }


def matching_filters(subscriptions: tuple[Subscription, ...], matched: Optional[str]) -> tuple[Subscription, ...]:
    """The subscriptions whose ``where=`` filter the event's row matched, and
    those without one.

    The capture SQL tested each filter and stored the ids of those that
    matched: a handler gets exactly its rows, with no test in Python. An
    event without ids (captured before the handler's filter was installed)
    goes to unfiltered handlers only.
    """
    if not any(sub.filter is not None for sub in subscriptions):
        return subscriptions
    ids = set((matched or "").split())
    return tuple(sub for sub in subscriptions if sub.filter is None or sub.filter_id in ids)


def errors_json(errors: Errors) -> str:
    return json.dumps({storable(step): record for step, record in errors.items()})


@dataclasses.dataclass
class Failure:
    """A failed attempt at one event, to be recorded when the batch settles."""

    event_id: int
    attempt: int
    done: list[str]
    errors: Errors
    #: The event, for the ``event_gave_up`` signal; None if it could not be decoded.
    event: Optional[Event] = None


class ClaimCursor:
    """Where the next claim starts: after the events this listener has passed.

    Claiming ``id > position`` keeps a drain from walking the index entries
    of the events it has deleted: they stay until vacuum, and vacuum cannot
    remove them while an older snapshot lives anywhere on the server. What
    passing an id may miss, and how each is caught:

    - an event of a transaction in flight when the cursor passed its id,
      committed later: the passed region is rescanned once every transaction
      in flight then has ended (the claim's xmin has passed its newest xid).
      Capture runs after the user's write, so a transaction always has its
      xid before it takes an event id;
    - an event another process had locked and released, or a retry that is
      due: a scan from the start every ``full_scan_seconds``, and at once
      when a retry is due.

    A scan from the start walks every deleted entry vacuum could not yet
    remove (an old snapshot anywhere holds them): when one is slow, the next
    waits longer, so that such scans take at most about 1% of the time.

    :param full_scan_seconds: how often a claim starts from the first id.
    """

    #: Regions waiting for their transactions to end; more are merged.
    MAX_CHECKPOINTS = 32
    #: A scan from the start may take this share of the time, at most.
    FULL_SCAN_SHARE = 0.01

    def __init__(self, full_scan_seconds: float) -> None:
        self.full_scan_seconds = full_scan_seconds
        #: The claim starts after this id unless a rescan is due.
        self.position = 0
        # (rescan after this id, once the xmin is past this xid), oldest first.
        self._checkpoints: list[tuple[int, int]] = []
        self._xmin = 0
        self._last_full_scan = float("-inf")
        self._full_scan_gap = full_scan_seconds

    def start(self, now: float, retry_due: bool = False) -> int:
        """The id after which the next claim starts."""
        if retry_due or now - self._last_full_scan >= self._full_scan_gap:
            self._last_full_scan = now
            return self._rescan_from(0)
        ready = self._ready()
        return self._rescan_from(min(ready)) if ready else self.position

    def request_full_scan(self) -> None:
        """Start the next claim from the first id (events were queued behind the cursor)."""
        self._last_full_scan = float("-inf")

    def full_scan_took(self, seconds: float) -> None:
        """How long the last claim from the first id took: sets when the next one runs."""
        self._full_scan_gap = max(self.full_scan_seconds, seconds / self.FULL_SCAN_SHARE)

    def rescan_due(self) -> bool:
        """Whether a passed region's transactions have all ended since the last claim began."""
        return bool(self._ready())

    def _ready(self) -> list[int]:
        return [after_id for after_id, xid in self._checkpoints if xid < self._xmin]

    def _rescan_from(self, start: int) -> int:
        # A claim from `start` sees every event committed above it: the
        # regions above it whose transactions have all ended are covered.
        self._checkpoints = [
            (after_id, xid) for after_id, xid in self._checkpoints if after_id < start or xid >= self._xmin
        ]
        return start

    def advance(self, claim: Claim, last_handled: Optional[int], more: bool) -> None:
        """Move past what a claim handled.

        :param last_handled: the id of the last event handled or recorded as
            failed, in id order; ``None`` if none was.
        :param more: events may be pending right after ``last_handled``: the
            claim was full, or the batch stopped before its end.
        """
        self._xmin = claim.xmin
        previous = position = self.position
        if last_handled is not None:
            position = last_handled if more else max(previous, last_handled)
        if position > previous and claim.newest_in_flight is not None:
            self._checkpoints.append((previous, claim.newest_in_flight))
            if len(self._checkpoints) > self.MAX_CHECKPOINTS:
                (first, first_xid), (second, second_xid) = self._checkpoints[:2]
                self._checkpoints[:2] = [(min(first, second), max(first_xid, second_xid))]
        self.position = position


class Dispatcher:
    """Claims batches, runs their handlers and records the outcome, for one app."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        config = state.config
        self.retry_backoff = Backoff(config.retry_backoff, config.retry_backoff_max, jitter=0.75)
        #: Monotonic time at which a retried event becomes due, if any.
        self.next_retry_at: Optional[float] = None
        #: Transactions in progress at the last claim's snapshot.
        self.in_flight = 0
        #: Events left to claim one by one, after a batch that could not be settled.
        self.isolating = 0
        #: Where claims start: past the events this process has settled.
        self.cursor = ClaimCursor(config.poll_interval)
        #: Bytes per event seen lately, which sizes the claim's LIMIT.
        self.bytes_per_event = 0.0
        #: Events settled since the event table was last vacuumed.
        self.settled = 0
        #: (txid, id) of the last broadcast row read by this process.
        self.broadcast_position: tuple[str, int] = ("0", 0)
        #: perf_counter() when the handler running now started, and its name
        #: (readiness tells a busy listener from a wedged one).
        self.handler_started: Optional[float] = None
        self.handler_name = ""
        #: The app's session joined to the claiming connection, per connection.
        self._joined: Optional[JoinedSession] = None
        self._joined_conn: Optional[Connection] = None
        #: The joined session of the batch whose handlers run now, if any.
        self._joined_batch: Optional[JoinedSession] = None
        #: Handlers run in OpenTelemetry spans (asked once per batch).
        self._tracing = False

    # Queued events --------------------------------------------------------------

    def run_batch(self, store: Store, stop: Optional[threading.Event] = None) -> int:
        """Claim, handle and settle up to one batch; return how many were handled.

        Also sets :attr:`in_flight`: how many transactions were in progress
        when the claim looked, any of which may still commit new events.

        A batch that cannot be settled (a database error in the middle of
        it) is rolled back and its events are claimed again one by one: the
        one that fails alone is counted as a failed attempt, so that it ends
        up in ``failed`` instead of stalling the queue.
        """
        config = self.state.config
        subscriptions = [subscription_key(table, op) for table, op in self.state.registry.subscribed()]
        events: list[StoredEvent] = []
        limit = self._claim_limit()
        start = self.cursor.start(time.monotonic(), retry_due=self._retry_due())
        joined = self._joined_session(store)
        store.begin()
        try:
            began = time.monotonic()
            claim = store.claim_batch(subscriptions, start, limit, config.batch_bytes)
            if start == 0:
                self.cursor.full_scan_took(time.monotonic() - began)
            self.in_flight, events = claim.in_flight, claim.events
            if not events:
                store.commit()
                self.cursor.advance(claim, None, more=False)
                # This claim's snapshot may show that a late committer has
                # ended: look behind the cursor now rather than at the next scan.
                return self.run_batch(store, stop) if self.cursor.rescan_due() else 0
            self._measure([event.size for event in events])
            handled, failures = self._handle(events, stop, joined)
            if joined is not None:
                joined.before_settle()
            self._settle(store, handled, failures)
            store.commit()
        except CONNECTION_ERRORS:
            self._rollback(store)
            raise
        except Exception as exc:
            self._rollback(store)
            if joined is not None:
                joined.end()
            if not events:
                raise
            return self._unsettled(store, events, exc, stop)
        except BaseException:
            self._rollback(store)
            raise
        finally:
            if joined is not None:
                joined.end()
        self.isolating = max(0, self.isolating - len(events))
        settled = len(handled) + len(failures)
        last = events[settled - 1].id if settled else None  # events are handled in id order
        self.cursor.advance(claim, last, more=settled < len(events) or len(events) >= limit)
        self.settled += settled
        return settled

    def _joined_session(self, store: Store) -> Optional[JoinedSession]:
        """The app's session joined to ``store``'s connection, set up outside any transaction."""
        if self._joined_conn is not store.conn:
            if self._joined is not None:
                with contextlib.suppress(Exception):
                    self._joined.close()
            self._joined_conn = store.conn
            self._joined = JoinedSession.for_connection(self.state, store.conn)
        return self._joined

    def close(self) -> None:
        """Let go of the connection-bound session, if any."""
        if self._joined is not None:
            with contextlib.suppress(Exception):
                self._joined.close()
        self._joined = self._joined_conn = None

    def _retry_due(self) -> bool:
        """Whether a retried event is due now; the claim then starts from the first id."""
        if self.next_retry_at is None or self.next_retry_at > time.monotonic():
            return False
        self.next_retry_at = None
        return True

    def _measure(self, sizes: list[int]) -> None:
        average = sum(sizes) / len(sizes)
        self.bytes_per_event = average if not self.bytes_per_event else (self.bytes_per_event + average) / 2

    def _claim_limit(self) -> int:
        if self.isolating:
            return 1
        config = self.state.config
        if self.bytes_per_event <= 0:
            return config.batch_size
        return max(1, min(config.batch_size, int(config.batch_bytes / self.bytes_per_event)))

    @staticmethod
    def _rollback(store: Store) -> None:
        if not store.conn.closed:
            with contextlib.suppress(*CONNECTION_ERRORS):
                store.rollback()

    def _unsettled(
        self, store: Store, events: list[StoredEvent], exc: Exception, stop: Optional[threading.Event]
    ) -> int:
        if len(events) > 1:
            logger.exception(
                "A batch of %s events could not be settled; claiming them one by one to find"
                " the one that fails.", len(events),
            )
            self.isolating = len(events)
            return self.run_batch(store, stop)
        event = events[0]
        logger.exception("Event %s could not be settled; it is retried like a failed handler.", event.id)
        self.isolating = max(0, self.isolating - 1)
        self._record(store, Failure(event.id, event.attempt + 1, list(event.done_handlers), {
            SETTLE_STEP: error_record(exc),
        }))
        return 1

    def _handle(
        self, events: list[StoredEvent], stop: Optional[threading.Event], joined: Optional[JoinedSession] = None
    ) -> tuple[list[int], list[Failure]]:
        handled: list[int] = []
        failures: list[Failure] = []
        started = time.monotonic()
        self._tracing = tracing.enabled()
        routes: Routes = {}
        with self.state.app.app_context(), self._joined_handlers(joined):
            for stored in events:
                if stop is not None and stop.is_set():
                    break  # the rest is released when the batch commits
                if time.monotonic() - started > MAX_BATCH_SECONDS:
                    break  # slow handlers: let other processes take the rest
                attempt = stored.attempt + 1
                done = set(stored.done_handlers)
                try:
                    subscriptions, filtered, info = self._route(routes, stored.table, stored.op)
                    event = self.event(stored, attempt, info)
                except Exception as exc:
                    logger.exception(
                        "Event %s (%s on %s) could not be decoded; it is retried like a failed handler.",
                        stored.id, stored.op, stored.table,
                    )
                    failures.append(Failure(stored.id, attempt, sorted(done), {DECODE_STEP: error_record(exc)}))
                    continue
                if stored.handler is not None:  # a backfill for one handler
                    subscriptions = tuple(sub for sub in subscriptions if sub.name == stored.handler)
                if filtered:
                    subscriptions = matching_filters(subscriptions, stored.matched)
                errors = self.call_handlers(event, subscriptions, done)
                if errors:
                    failures.append(Failure(stored.id, attempt, sorted(done), errors, event))
                else:
                    handled.append(stored.id)
                    if signals.event_handled.receivers:
                        signals.send(signals.event_handled, self.state.app, event=event)
        if handled:
            self.state.counters.events_handled(len(handled))
        return handled, failures

    def _route(self, routes: Routes, table: TableKey, kind: str) -> Route:
        """A table's handlers of ``kind``, whether any has a filter, and the
        table's decoder when it has handlers: looked up once per batch (in
        ``routes``) rather than per event."""
        key = (table.schema, table.name, kind)
        route = routes.get(key)
        if route is None:
            subscriptions = self.state.registry.handlers_for(table, kind)
            route = routes[key] = (
                subscriptions,
                any(sub.filter is not None for sub in subscriptions),
                self.state.table_info(table) if subscriptions else None,
            )
        return route

    @contextlib.contextmanager
    def _joined_handlers(self, joined: Optional[JoinedSession]) -> Iterator[None]:
        """While the batch's handlers run, ``db.session`` works in the claim's transaction."""
        if joined is None:
            yield
            return
        joined.begin()
        self._joined_batch = joined
        try:
            yield
        finally:
            self._joined_batch = None

    def call_handlers(
        self, event: Event, subscriptions: Iterable[Subscription], done: Optional[set[str]] = None
    ) -> Errors:
        """Call each subscription that wants the event; return the errors by handler name.

        :param done: the handlers that already succeeded in an earlier attempt,
            which are skipped; it gets the name of each one that succeeds now.
        """
        errors: Errors = {}
        for sub in subscriptions:
            if done is not None and sub.name in done:
                continue
            if sub.columns is not None and not (sub.columns & event.changed):
                continue
            joined = self._joined_batch
            if joined is not None:
                joined.before_handler()
            self.handler_name = sub.name
            started = self.handler_started = time.perf_counter()
            try:
                if self._tracing:
                    with tracing.handler_span(event, sub.name):
                        sub.handler(event)
                else:
                    sub.handler(event)
            except Exception as exc:
                seconds = time.perf_counter() - started
                self.handler_started = None
                logger.exception(
                    "Handler %s failed for event %s (%s on %s, attempt %s).",
                    sub.name, event.id, event.op, event.table, event.attempt,
                )
                errors[sub.name] = error_record(exc)
                if joined is not None:
                    joined.after_handler(succeeded=False)
                else:
                    self.state.rollback_session()
                self._handler_failed(event, sub.name, exc, seconds, queued=done is not None)
            else:
                self.handler_started = None
                self.state.counters.handler_call(sub.name, time.perf_counter() - started)
                if joined is not None:
                    joined.after_handler(succeeded=True)
                if done is not None:
                    done.add(sub.name)
        return errors

    def _handler_failed(self, event: Event, handler: str, exc: Exception, seconds: float, *, queued: bool) -> None:
        """Count a handler's failure, and send ``event_failed``."""
        will_retry = queued and event.attempt < self.state.config.max_attempts
        self.state.counters.handler_call(handler, seconds, failed=True, retried=will_retry)
        if signals.event_failed.receivers:
            signals.send(
                signals.event_failed, self.state.app, event=event, handler=handler, exception=exc, will_retry=will_retry
            )

    def event(self, stored: StoredEvent, attempt: int, info: Optional[TableInfo] = None) -> Event:
        """The Event handlers receive for a stored row: values decoded by column type.

        :param info: the row's table, when the caller has looked it up.
        """
        if info is None:
            info = self.state.table_info(stored.table)
        old, new = load_row(stored.old), load_row(stored.new)
        changed = changed_in_json(old, new)  # before decoding, which works in place
        return Event(
            id=stored.id,
            op=stored.op,
            table=str(stored.table),
            model=info.model,
            new=info.decoder.decode(new),
            old=info.decoder.decode(old),
            timestamp=stored.created_at,
            attempt=attempt,
            changed=changed,
            context=load_context(stored.context),
            txid=None if stored.txid is None else int(stored.txid),
            backfill=stored.backfill,
        )

    def _settle(self, store: Store, handled: list[int], failures: list[Failure]) -> None:
        if handled:
            if self.state.config.retention > 0:
                store.mark_handled(handled)
            else:
                store.delete_handled(handled)
        for failure in failures:
            # Under a savepoint: a record the database refuses must not roll
            # back the batch, or its other events would run again and again.
            store.savepoint()
            try:
                self._record(store, failure)
            except CONNECTION_ERRORS:
                raise
            except Exception as exc:
                store.rollback_to_savepoint()
                logger.exception("The failure of event %s could not be recorded as it was.", failure.event_id)
                not_stored = {"error": "(not stored)", "traceback": ""}
                refused = f"{type(exc).__name__}: the handlers' errors could not be stored"
                self._record(store, dataclasses.replace(failure, errors={
                    RECORD_STEP: {"error": refused, "traceback": ""},
                    **{storable(step): not_stored for step in failure.errors},
                }))
            store.release_savepoint()

    def _record(self, store: Store, failure: Failure) -> None:
        """Count a failed attempt: retried after a backoff, or kept as failed after the last."""
        failed = failure.attempt >= self.state.config.max_attempts
        if failed:
            delay = 0.0
            logger.error(
                "Event %s failed %s times and is kept as failed; retry it with"
                " 'flask pgevents retry %s'.", failure.event_id, failure.attempt, failure.event_id,
            )
        else:
            delay = self.retry_backoff.delay(failure.attempt)
            due = time.monotonic() + delay
            self.next_retry_at = min(self.next_retry_at or due, due)
        store.record_failure(
            failure.event_id, attempt=failure.attempt, done=failure.done,
            errors_json=errors_json(failure.errors), failed=failed, delay=delay,
        )
        self.state.counters.event_failed(retried=not failed)
        if failed and signals.event_gave_up.receivers:
            signals.send(
                signals.event_gave_up, self.state.app, event=failure.event, event_id=failure.event_id,
                attempt=failure.attempt, errors=failure.errors,
            )

    def idle_timeout(self) -> float:
        """How long to sleep when nothing is pending: the safety poll, or less."""
        timeout = self.state.config.poll_interval
        if self.next_retry_at is not None:
            timeout = max(0.0, min(timeout, self.next_retry_at - time.monotonic()))
        return timeout

    # Broadcast ------------------------------------------------------------------

    def start_broadcasts(self, store: Store) -> None:
        """Read broadcast changes from now on: those committed from this moment."""
        self.broadcast_position = (store.broadcast_start(), 0)

    def run_broadcasts(self, store: Store) -> int:
        """Call broadcast handlers for changes committed since the last call; at most once."""
        state = self.state
        if not state.registry.has_broadcast():
            return 0
        config = state.config
        rows = store.read_broadcast(self.broadcast_position, config.batch_size, config.batch_bytes)
        if not rows:
            return 0
        self.broadcast_position = (rows[-1].txid or "0", rows[-1].id)
        self._tracing = tracing.enabled()
        routes: Routes = {}
        with state.app.app_context():
            for stored in rows:
                try:
                    subscriptions, _, info = self._route(routes, stored.table, broadcast_kind(stored.op))
                    if not subscriptions:
                        continue
                    event = self.event(stored, 1, info)
                except Exception:
                    logger.exception(
                        "Broadcast event %s (%s on %s) could not be decoded.", stored.id, stored.op, stored.table
                    )
                    continue
                # Broadcast handlers are not retried: their errors are only logged.
                self.call_handlers(event, subscriptions)
        return len(rows)


def process_pending(state: AppState, timeout: Optional[float] = None) -> int:
    """Handle every due event in the caller's thread; return how many (0 when disabled)."""
    if not state.enabled:
        return 0
    deadline = None if timeout is None else time.monotonic() + timeout
    dispatcher = Dispatcher(state)
    total = 0
    with Connection(
        state.url, application_name="pgevents-process-pending", keepalives=True,
        connect_timeout=state.config.connect_timeout,
    ) as conn:
        store = Store(conn, state.config.schema)
        store.claim_in_id_order()
        try:
            while deadline is None or time.monotonic() < deadline:
                count = dispatcher.run_batch(store)
                if not count:
                    break
                total += count
        finally:
            dispatcher.close()
    return total

