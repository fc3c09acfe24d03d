"""The listening loop: connection, wake-up, claim, dispatch, reconnect.

The event table is the source of truth; NOTIFY only wakes listeners up.
Each batch is claimed with ``FOR UPDATE SKIP LOCKED`` inside a transaction
that stays open while its handlers run, so no other process can take those
events, and a process that dies releases them at once with its connection.
"""
from __future__ import annotations

import json
import logging
import os
import random
import select
import threading
import time
import traceback
import weakref
from typing import TYPE_CHECKING, Any, Optional

from .connection import Connection
from .events import Event, load_row
from .registry import BROADCAST_PREFIX, TableKey
from .triggers import (
    BROADCAST_RETENTION_SECONDS,
    BROADCAST_START,
    CLAIM_BATCH,
    PURGE_BROADCAST,
    READ_BROADCAST,
    DELETE_HANDLED,
    MARK_HANDLED,
    PURGE_FAILED,
    PURGE_HANDLED,
    RECORD_FAILURE,
    REGISTER_LISTENER,
    SET_LISTENER_IDLE,
    UNREGISTER_LISTENER,
    VACUUM_EVENTS,
    channel_for,
    subscription_key,
    quote_ident,
)

if TYPE_CHECKING:
    from .extension import AppState

logger = logging.getLogger("flask_pgevents")

#: Exceptions that mean the connection is gone, for both drivers.
def _connection_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]
    try:
        import psycopg

        errors += [psycopg.OperationalError, psycopg.InterfaceError]
    except ImportError:  # pragma: no cover - psycopg 3 is an optional extra
        pass
    import psycopg2

    errors += [psycopg2.OperationalError, psycopg2.InterfaceError]
    return tuple(errors)


CONNECTION_ERRORS = _connection_errors()

#: Above this rate a listener polls every LINGER_SECONDS instead of asking
#: writers to wake it, and sleeps after LINGER_POLLS empty polls. This
#: coalesces wake-ups under load (see the triggers' idle check).
BUSY_EVENTS_PER_SECOND = 2000.0
LINGER_SECONDS = 0.005
LINGER_POLLS = 5
#: Busy listeners poll at most this far apart: enough for batches of about
#: LINGER_BATCH events, which cost one claim and one DELETE between them.
MAX_LINGER_SECONDS = 0.02
LINGER_BATCH = 100
#: First recheck while writers that may have missed the idle flag are in flight.
RECHECK_SECONDS = 0.001


class RateMeter:
    """Events per second over the last ~100 ms, cheap enough to update per batch."""

    WINDOW = 0.1

    def __init__(self) -> None:
        self._start = time.monotonic()
        self._count = 0
        self._last_rate = 0.0

    def add(self, count: int) -> None:
        now = time.monotonic()
        elapsed = now - self._start
        self._count += count
        if elapsed >= self.WINDOW:
            self._last_rate = self._count / elapsed
            self._start, self._count = now, 0

    def rate(self) -> float:
        elapsed = time.monotonic() - self._start
        return max(self._last_rate, self._count / max(elapsed, self.WINDOW))

    def linger(self) -> float:
        """How long a busy listener waits between polls at the current rate."""
        return min(MAX_LINGER_SECONDS, max(LINGER_SECONDS, LINGER_BATCH / max(self.rate(), 1.0)))

    def busy(self) -> bool:
        return self.rate() >= BUSY_EVENTS_PER_SECOND

#: The listener vacuums the event table after settling this many events.
VACUUM_EVERY_EVENTS = 20_000

#: A batch whose handlers run longer than this settles early and releases
#: the events it has not reached, so that other processes can take them.
MAX_BATCH_SECONDS = 1.0


#: The name under which a row that cannot be decoded is recorded as failed.
DECODE_STEP = "<decoding the row>"
#: The name under which an event is recorded whose batch could not be settled.
SETTLE_STEP = "<settling the event>"
#: The name under which a handler's error is recorded when its own record could not be.
RECORD_STEP = "<recording the failure>"


def storable(text: str) -> str:
    """``text`` without what jsonb refuses: NUL characters, and lone surrogates
    (escaped as ``\\udxxx``)."""
    return text.replace("\x00", "").encode("utf-8", "backslashreplace").decode("utf-8")


def _error_record(exc: BaseException) -> dict[str, str]:
    return {
        "error": storable(f"{type(exc).__name__}: {exc}"),
        "traceback": storable(traceback.format_exc()),
    }


def _errors_json(errors: dict[str, dict[str, str]]) -> str:
    return json.dumps({storable(step): record for step, record in errors.items()})


def sqlstate(exc: BaseException) -> Optional[str]:
    """The SQLSTATE of a psycopg or psycopg2 error, if it has one."""
    return getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)


class Backoff:
    """Exponential backoff with full jitter, bounded.

    :param initial: the first delay's upper bound, in seconds.
    :param maximum: the largest delay.
    """

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * (2 ** self.failures))
        self.failures += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


def retry_delay(state: "AppState", attempt: int) -> float:
    """Seconds to wait before the next attempt after ``attempt`` failed ones."""
    base = state.config.retry_backoff * (2 ** (attempt - 1))
    return min(state.config.retry_backoff_max, base) * random.uniform(0.75, 1.0)


class Dispatcher:
    """Claims one batch of events, runs their handlers and records the outcome."""

    def __init__(self, state: "AppState") -> None:
        self.state = state
        schema = quote_ident(state.config.schema)
        self.claim_sql = CLAIM_BATCH.format(schema=schema)
        self.delete_sql = DELETE_HANDLED.format(schema=schema)
        self.mark_sql = MARK_HANDLED.format(schema=schema)
        self.purge_sql = PURGE_HANDLED.format(schema=schema)
        self.failure_sql = RECORD_FAILURE.format(schema=schema)
        self.purge_failed_sql = PURGE_FAILED.format(schema=schema)
        #: Events left to claim one by one, after a batch that could not be settled.
        self.isolating = 0
        #: Bytes per event seen lately, which sizes the claim's LIMIT.
        self.bytes_per_event = 0.0
        #: The listener's role may purge broadcast rows (assumed until refused).
        self.may_purge_broadcast = True
        #: Monotonic time at which a retried event becomes due, if any.
        self.next_retry_at: Optional[float] = None
        #: Transactions in progress at the last claim's snapshot.
        self.in_flight = 0
        self.read_broadcast_sql = READ_BROADCAST.format(schema=schema)
        self.purge_broadcast_sql = PURGE_BROADCAST.format(schema=schema)
        self.vacuum_sql = VACUUM_EVENTS.format(schema=schema)
        self._settled_since_vacuum = 0
        self._last_vacuum = time.monotonic()
        #: (txid, id) of the last broadcast row read by this process.
        self.broadcast_position: tuple[str, int] = ("0", 0)
        self._last_purge = 0.0

    def run_batch(self, conn: Connection, stop: Optional[threading.Event] = None) -> int:
        """Claim, handle and settle up to one batch; return how many were handled.

        Also sets :attr:`in_flight`: how many transactions were in progress
        when the claim looked, any of which may still commit new events.

        A batch that cannot be settled (a database error in the middle of
        it) is rolled back and its events are claimed again one by one: the
        one that fails alone is counted as a failed attempt, so that it ends
        up in ``failed`` instead of stalling the queue.
        """
        config = self.state.config
        keys = [subscription_key(table, op) for table, op in self.state.registry.subscribed()]
        rows: list[Any] = []
        conn.execute("BEGIN")
        try:
            result = conn.execute(self.claim_sql, (keys, self._claim_limit(), config.batch_bytes)).fetchall()
            self.in_flight = result[0][0]
            rows = [row[1:-1] for row in result if row[1] is not None]
            if not rows:
                conn.execute("COMMIT")
                return 0
            self._measure([row[-1] for row in result])
            handled, failures = self._dispatch(rows, stop)
            self._settle(conn, handled, failures)
            conn.execute("COMMIT")
        except CONNECTION_ERRORS:
            self._rollback(conn)
            raise
        except Exception as exc:
            self._rollback(conn)
            if not rows:
                raise
            return self._unsettled(conn, rows, exc, stop)
        except BaseException:
            self._rollback(conn)
            raise
        self.isolating = max(0, self.isolating - len(rows))
        self._settled_since_vacuum += len(handled) + len(failures)
        return len(handled) + len(failures)

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
    def _rollback(conn: Connection) -> None:
        if not conn.closed:
            try:
                conn.execute("ROLLBACK")
            except CONNECTION_ERRORS:
                pass

    def _unsettled(self, conn: Connection, rows: list[Any], exc: Exception, stop: Optional[threading.Event]) -> int:
        if len(rows) > 1:
            logger.exception(
                "A batch of %s events could not be settled; claiming them one by one to find"
                " the one that fails.", len(rows),
            )
            self.isolating = len(rows)
            return self.run_batch(conn, stop)
        event_id, _schema, _table, _op, _old, _new, _created_at, attempt, done = rows[0]
        logger.exception("Event %s could not be settled; it is retried like a failed handler.", event_id)
        self.isolating = max(0, self.isolating - 1)
        self._record_failure(conn, event_id, attempt + 1, sorted(done or ()), {SETTLE_STEP: _error_record(exc)})
        return 1

    def start_broadcasts(self, conn: Connection) -> None:
        """Read broadcast changes from now on: those committed from this moment."""
        self.broadcast_position = (conn.execute(BROADCAST_START).fetchone()[0], 0)

    def run_broadcasts(self, conn: Connection) -> int:
        """Call broadcast handlers for changes committed since the last call; at most once."""
        state = self.state
        if not state.registry.has_broadcast():
            return 0
        rows = conn.execute(
            self.read_broadcast_sql,
            (*self.broadcast_position, state.config.batch_size, state.config.batch_bytes),
        ).fetchall()
        if not rows:
            return 0
        self.broadcast_position = (rows[-1][0], rows[-1][1])
        with state.app.app_context():
            for _txid, event_id, schema, table, op, old, new, created_at in rows:
                key = TableKey(schema, table)
                subscriptions = state.registry.handlers_for(key, BROADCAST_PREFIX + op)
                if not subscriptions:
                    continue
                try:
                    event = self._event(key, event_id, op, old, new, created_at, 1)
                except Exception:  # noqa: BLE001 - broadcast is at most once: log and go on
                    logger.exception("Broadcast event %s (%s on %s) could not be decoded.", event_id, op, key)
                    continue
                for sub in subscriptions:
                    if sub.columns is not None and not (sub.columns & event.changed):
                        continue
                    try:
                        sub.handler(event)
                    except Exception:  # noqa: BLE001 - broadcast handlers are not retried
                        logger.exception(
                            "Broadcast handler %s failed for event %s (%s on %s); broadcast"
                            " events are not retried.", sub.name, event_id, op, key,
                        )
                        state.rollback_session()
        return len(rows)

    def _event(self, key: TableKey, event_id: int, op: str, old: Any, new: Any, created_at: Any, attempt: int) -> Event:
        info = self.state.table_info(key)
        return Event(
            id=event_id,
            op=op,
            table=str(key),
            model=info.model,
            new=info.decoder.decode(load_row(new)),
            old=info.decoder.decode(load_row(old)),
            timestamp=created_at,
            attempt=attempt,
        )

    def _dispatch(self, rows: list[Any], stop: Optional[threading.Event]) -> tuple[list[int], list[tuple[Any, ...]]]:
        state = self.state
        handled: list[int] = []
        failures: list[tuple[Any, ...]] = []
        started = time.monotonic()
        with state.app.app_context():
            for event_id, schema, table, op, old, new, created_at, attempt, done in rows:
                if stop is not None and stop.is_set():
                    break  # the rest is released when the batch commits
                if time.monotonic() - started > MAX_BATCH_SECONDS:
                    break  # slow handlers: let other processes take the rest
                key = TableKey(schema, table)
                subscriptions = state.registry.handlers_for(key, op)
                already_done = set(done or ())
                errors: dict[str, dict[str, str]] = {}
                try:
                    event = self._event(key, event_id, op, old, new, created_at, attempt + 1)
                except Exception as exc:  # noqa: BLE001 - one bad row must not block the queue
                    logger.exception(
                        "Event %s (%s on %s) could not be decoded; it is retried like a failed handler.",
                        event_id, op, key,
                    )
                    errors[DECODE_STEP] = _error_record(exc)
                    failures.append((event_id, attempt + 1, sorted(already_done), errors))
                    continue
                for sub in subscriptions:
                    if sub.name in already_done:
                        continue
                    if sub.columns is not None and not (sub.columns & event.changed):
                        continue
                    try:
                        sub.handler(event)
                    except Exception as exc:  # noqa: BLE001 - any handler error is recorded
                        logger.exception(
                            "Handler %s failed for event %s (%s on %s, attempt %s).",
                            sub.name, event_id, op, key, event.attempt,
                        )
                        errors[sub.name] = _error_record(exc)
                        state.rollback_session()
                    else:
                        already_done.add(sub.name)
                if errors:
                    failures.append((event_id, event.attempt, sorted(already_done), errors))
                else:
                    handled.append(event_id)
        return handled, failures

    def _settle(self, conn: Connection, handled: list[int], failures: list[tuple[Any, ...]]) -> None:
        config = self.state.config
        if handled:
            if config.retention > 0:
                conn.execute(self.mark_sql, (handled,))
            else:
                conn.execute(self.delete_sql, (handled,))
        for event_id, attempt, done, errors in failures:
            # Under a savepoint: a record the database refuses must not roll
            # back the batch, or its other events would run again and again.
            conn.execute("SAVEPOINT pgevents_failure")
            try:
                self._record_failure(conn, event_id, attempt, done, errors)
            except CONNECTION_ERRORS:
                raise
            except Exception as exc:  # noqa: BLE001 - recorded in a form that always stores
                conn.execute("ROLLBACK TO SAVEPOINT pgevents_failure")
                logger.exception("The failure of event %s could not be recorded as it was.", event_id)
                record = {"error": f"{type(exc).__name__}: the handlers' errors could not be stored", "traceback": ""}
                self._record_failure(conn, event_id, attempt, done, {RECORD_STEP: record, **{
                    storable(step): {"error": "(not stored)", "traceback": ""} for step in errors
                }})
            conn.execute("RELEASE SAVEPOINT pgevents_failure")

    def _record_failure(
        self, conn: Connection, event_id: int, attempt: int, done: list[str], errors: dict[str, dict[str, str]]
    ) -> None:
        """Count a failed attempt: retried after a backoff, or kept as failed after the last."""
        if attempt >= self.state.config.max_attempts:
            status, delay = "failed", 0.0
            logger.error(
                "Event %s failed %s times and is kept as failed; retry it with"
                " 'flask pgevents retry %s'.", event_id, attempt, event_id,
            )
        else:
            status, delay = "pending", retry_delay(self.state, attempt)
            due = time.monotonic() + delay
            self.next_retry_at = min(self.next_retry_at or due, due)
        conn.execute(self.failure_sql, {
            "attempt": attempt, "done": done, "errors": _errors_json(errors),
            "status": status, "delay": delay, "id": event_id,
        })

    def purge_if_due(self, conn: Connection) -> None:
        """Remove handled and failed events older than their retention, and old broadcasts.

        At most once a minute (or once per retention period, if shorter).
        Broadcast rows are purged by every listener whose role may, whether
        or not it has broadcast handlers itself.
        """
        config = self.state.config
        periods = [r for r in (config.retention, config.failed_retention) if r > 0]
        if time.monotonic() - self._last_purge < min([60.0, *periods]):
            return
        if config.retention > 0:
            conn.execute(self.purge_sql, (config.retention,))
        if config.failed_retention > 0:
            conn.execute(self.purge_failed_sql, (config.failed_retention,))
        if self.may_purge_broadcast:
            try:
                conn.execute(self.purge_broadcast_sql, (BROADCAST_RETENTION_SECONDS,))
            except Exception as exc:
                if sqlstate(exc) != "42501":  # insufficient_privilege: another app's business
                    raise
                self.may_purge_broadcast = False
        self._last_purge = time.monotonic()

    def vacuum_if_due(self, conn: Connection) -> None:
        """Vacuum the event table after many settled events, at most every 2 s."""
        if self._settled_since_vacuum < VACUUM_EVERY_EVENTS or time.monotonic() - self._last_vacuum < 2.0:
            return
        conn.execute(self.vacuum_sql)
        self._settled_since_vacuum = 0
        self._last_vacuum = time.monotonic()

    def idle_timeout(self) -> float:
        """How long to sleep when nothing is pending: the safety poll, or less."""
        timeout = self.state.config.poll_interval
        if self.next_retry_at is not None:
            wait = self.next_retry_at - time.monotonic()
            if wait <= 0:
                self.next_retry_at = None
                return 0.0
            timeout = min(timeout, wait)
        return timeout


_live_listeners: "weakref.WeakSet[Listener]" = weakref.WeakSet()


class Listener:
    """The listener of one app in this process: a thread, or the caller's loop.

    Example::

        listener = Listener(state)
        listener.start()
        ...
        listener.stop(timeout=10)
    """

    def __init__(self, state: "AppState") -> None:
        self.state = state
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        # A pipe that wakes the loop from select() when stop is requested;
        # open only while the loop runs, so idle apps hold no descriptors.
        self._wake: Optional[tuple[int, int]] = None
        self._pid = os.getpid()
        #: Set by the fork hooks: the listener ran when this process forked.
        self.resume_after_fork = False
        #: In a pre-fork master: not running here, but wanted in each child.
        self.parked = False
        _live_listeners.add(self)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._pid == os.getpid()

    def on_current_thread(self) -> bool:
        return self._thread is not None and self._thread is threading.current_thread()

    def start(self) -> None:
        """Start the listener thread; does nothing if it already runs."""
        with self._lock:
            if self.running:
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self.run, name="pgevents-listener", daemon=True)
            self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Stop the thread after the handler in progress; True if it ended in time."""
        if timeout is None:
            timeout = self.state.config.stop_timeout
        with self._lock:
            thread = self._thread
            self.request_stop()
            if thread is None or self._pid != os.getpid():
                return True
            if thread is not threading.current_thread():
                thread.join(timeout)
            stopped = not thread.is_alive()
            if stopped:
                self._thread = None
            else:
                logger.warning("The pgevents listener did not stop within %.1f s.", timeout)
            return stopped

    def request_stop(self) -> None:
        """Ask the loop to stop soon; safe from signal handlers."""
        self._stop.set()
        wake = self._wake
        if wake is not None:
            try:
                os.write(wake[1], b"x")
            except OSError:
                pass

    def run(self) -> None:
        """Listen and dispatch until stopped; reconnect after connection loss."""
        state = self.state
        reconnect = Backoff(state.config.reconnect_backoff, state.config.reconnect_backoff_max)
        dispatcher = Dispatcher(state)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        self._wake = (wake_r, wake_w)
        try:
            self._run(dispatcher, reconnect)
        finally:
            self._wake = None
            os.close(wake_r)
            os.close(wake_w)
        logger.info("pgevents listener stopped (pid %s).", os.getpid())

    def _run(self, dispatcher: Dispatcher, reconnect: Backoff) -> None:
        state = self.state
        while not self._stop.is_set():
            conn: Optional[Connection] = None
            try:
                conn = Connection(state.url, application_name="pgevents-listener", keepalives=True)
                # Losing the commit of a settled batch in a server crash only
                # means redelivery, which at-least-once allows: skip the flush.
                conn.execute("SET synchronous_commit = off")
                # LISTEN before the catch-up read, so no event falls in between.
                conn.execute(f"LISTEN {quote_ident(channel_for(state.config.schema))}")
                logger.info("pgevents listener connected (pid %s).", os.getpid())
                self._loop(conn, dispatcher, reconnect)
            except CONNECTION_ERRORS as exc:
                delay = reconnect.next_delay()
                logger.warning(
                    "pgevents listener lost its database connection (%s); reconnecting in %.2f s.",
                    str(exc).strip() or type(exc).__name__, delay,
                )
                self._stop.wait(delay)
            except Exception as exc:  # noqa: BLE001 - the loop logs and never dies
                delay = reconnect.next_delay()
                self._log_failure(exc, delay)
                self._stop.wait(delay)
            finally:
                if conn is not None:
                    conn.close()

    def _log_failure(self, exc: Exception, delay: float) -> None:
        schema = self.state.config.schema
        code = sqlstate(exc)
        if code == "42P01":  # undefined_table
            logger.warning(
                "The event table %s.event does not exist; run 'flask pgevents"
                " install-triggers'. Checking again in %.2f s.", schema, delay,
            )
        elif code == "42501":  # insufficient_privilege
            logger.error(
                "The listener's role may not use the event schema (%s). Grant it what it"
                " needs with 'flask pgevents grant-listener ROLE'. Retrying in %.2f s.",
                str(exc).strip(), delay,
            )
        else:
            logger.exception("pgevents listener error; restarting in %.2f s.", delay)

    def _loop(self, conn: Connection, dispatcher: Dispatcher, reconnect: Backoff) -> None:
        # Quiet: after each batch the listener publishes that it sleeps, so the
        # next writer NOTIFYs it at once (lowest latency). Busy (more than
        # BUSY_EVENTS_PER_SECOND): it polls every LINGER_SECONDS instead, so
        # batches gather and writers send no NOTIFY at all (NOTIFY serializes
        # every notifying commit in the cluster).
        schema = quote_ident(self.state.config.schema)
        set_idle = SET_LISTENER_IDLE.format(schema=schema)
        batch_size = self.state.config.batch_size
        conn.execute(REGISTER_LISTENER.format(schema=schema))
        dispatcher.start_broadcasts(conn)
        rate = RateMeter()
        empty_polls = 0
        idle = False
        recheck = RECHECK_SECONDS
        while not self._stop.is_set():
            handled = dispatcher.run_batch(conn, self._stop) + dispatcher.run_broadcasts(conn)
            reconnect.reset()  # only a working claim proves the set-up right
            rate.add(handled)
            dispatcher.vacuum_if_due(conn)
            if handled:
                empty_polls = 0
                if handled >= batch_size or rate.busy():
                    if idle:
                        conn.execute(set_idle, (False,))
                        idle = False
                    if handled < batch_size:
                        self._wait(conn, rate.linger())
                    continue
            else:
                dispatcher.purge_if_due(conn)
                if not idle and rate.busy() and empty_polls < LINGER_POLLS:
                    empty_polls += 1
                    self._wait(conn, rate.linger())
                    continue
            if not idle:
                logger.debug("pgevents listener goes idle (%.0f events/s).", rate.rate())
                conn.execute(set_idle, (True,))
                idle = True
                recheck = RECHECK_SECONDS
                continue  # claim again: what committed before writers could see the flag
            if handled:
                continue
            timeout = dispatcher.idle_timeout()
            if dispatcher.in_flight:
                timeout = min(timeout, recheck)
                recheck *= 2
            else:
                recheck = RECHECK_SECONDS
            if self._wait(conn, timeout):
                # Woken for work: stop asking writers for NOTIFYs at once, or
                # a burst of concurrent writers would all queue on NOTIFY's lock.
                conn.execute(set_idle, (False,))
                idle = False
        if not conn.closed:
            conn.execute(UNREGISTER_LISTENER.format(schema=schema))

    def _wait(self, conn: Connection, timeout: float) -> bool:
        """Sleep until a NOTIFY, a stop request or the timeout; True if notified."""
        if conn.take_notifications():
            return True
        if self._stop.is_set() or self._wake is None or timeout <= 0:
            return False
        select.select([conn.raw, self._wake[0]], [], [], timeout)
        return conn.take_notifications() > 0

    def abandon_after_fork(self) -> None:
        """In a forked child: forget the parent's thread without touching its connection."""
        self._thread = None
        self._wake = None
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._lock = threading.Lock()


def process_pending(state: "AppState", timeout: Optional[float] = None) -> int:
    """Handle every due event in the caller's thread; return how many."""
    deadline = None if timeout is None else time.monotonic() + timeout
    dispatcher = Dispatcher(state)
    total = 0
    with Connection(state.url, application_name="pgevents-process-pending") as conn:
        while deadline is None or time.monotonic() < deadline:
            count = dispatcher.run_batch(conn)
            if not count:
                break
            total += count
    return total
