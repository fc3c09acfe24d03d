"""The listener thread: connect, LISTEN, claim and dispatch, sleep, reconnect.

The event table is the source of truth; NOTIFY only wakes listeners up. The
loop holds no SQL and few rules: :class:`~flask_pgevents.pacing.Pacer`
decides when to claim and sleep, :class:`~flask_pgevents.dispatch.Dispatcher`
handles a batch, and :class:`Housekeeping` purges and vacuums.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Callable, Optional

from . import signals
from .connection import (
    CONNECTION_ERRORS,
    PERMANENT_FAILURES,
    Connection,
    classify,
    connect_error,
    error_reason,
    sqlstate,
)
from .dispatch import BROADCAST_RETENTION_SECONDS, Dispatcher
from .errors import DatabaseAccessError, DatabaseUnavailableError
from .pacing import Backoff, Pacer, Step
from .stats import Readiness
from .store import RESCAN, Store

if TYPE_CHECKING:
    from .config import Config
    from .state import AppState

logger = logging.getLogger("flask_pgevents")

#: The listener vacuums the event table after settling this many events,
#: at most every VACUUM_SECONDS.
VACUUM_EVERY_EVENTS = 20_000
VACUUM_SECONDS = 2.0


class Housekeeping:
    """Purges old rows and vacuums the event table, each when due."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._last_purge = 0.0
        self._last_vacuum = time.monotonic()
        #: The listener's role may purge broadcast rows (assumed until refused).
        self.may_purge_broadcast = True

    def vacuum_if_due(self, store: Store, dispatcher: Dispatcher) -> None:
        """Autovacuum visits once a minute: at thousands of events a second the
        table would grow by a minute of deleted rows between its visits."""
        if dispatcher.settled < VACUUM_EVERY_EVENTS or time.monotonic() - self._last_vacuum < VACUUM_SECONDS:
            return
        store.vacuum_events()
        dispatcher.settled = 0
        self._last_vacuum = time.monotonic()

    def purge_if_due(self, store: Store) -> None:
        """Remove handled and failed events older than their retention, and old broadcasts.

        At most once a minute (or once per retention period, if shorter).
        Broadcast rows are purged by every listener whose role may, whether
        or not it has broadcast handlers itself.
        """
        config = self.config
        periods = [r for r in (config.retention, config.failed_retention) if r > 0]
        if time.monotonic() - self._last_purge < min([60.0, *periods]):
            return
        if config.retention > 0:
            store.purge_handled(config.retention)
        if config.failed_retention > 0:
            store.purge_failed(config.failed_retention)
        if self.may_purge_broadcast:
            try:
                store.purge_broadcast(BROADCAST_RETENTION_SECONDS)
            except Exception as exc:
                if sqlstate(exc) != "42501":  # insufficient_privilege: another app's business
                    raise
                self.may_purge_broadcast = False
        self._last_purge = time.monotonic()


class Listener:
    """The listener of one app in this process: a thread, or the caller's loop.

    Example::

        listener = Listener(state)
        listener.start()
        ...
        listener.stop(timeout=10)
    """

    def __init__(self, state: AppState) -> None:
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
        #: Why a loop started with ``fail_fast`` ended on its own, if it did.
        self.failure: Optional[DatabaseAccessError] = None
        # A thread that did not stop in time: stop() waits for it only once.
        self._abandoned: Optional[threading.Thread] = None
        #: Monotonic time since which the loop is connected; None while not.
        self.connected_at: Optional[float] = None
        #: Monotonic time at which the loop last began a claim.
        self.heartbeat: Optional[float] = None
        # The running loop's dispatcher: which handler runs now, since when.
        self._dispatcher: Optional[Dispatcher] = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._pid == os.getpid()

    def on_current_thread(self) -> bool:
        return self._thread is not None and self._thread is threading.current_thread()

    def start(self, *, fail_fast: bool = False, on_connect: Optional[Callable[[], None]] = None) -> None:
        """Start the listener thread; does nothing if it already runs.

        :param fail_fast: end the thread on a permanent failure (see
            :meth:`run`) instead of retrying; :attr:`failure` then says why.
        :param on_connect: called in the thread after each successful
            connection, before the first claim.
        """
        with self._lock:
            if self.running:
                return
            self._stop.clear()
            self._thread = threading.Thread(
                target=self.run, kwargs={"fail_fast": fail_fast, "on_connect": on_connect},
                name="pgevents-listener", daemon=True,
            )
            self._thread.start()

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the thread to end."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Stop the thread after the handler in progress; True if it ended in time."""
        if timeout is None:
            timeout = self.state.config.stop_timeout
        with self._lock:
            thread = self._thread
            self.request_stop()
            if thread is None or self._pid != os.getpid():
                return True
            if thread is self._abandoned:  # already waited for once (atexit after SIGTERM)
                return not thread.is_alive()
        # Joined outside the lock: the thread may need it to finish.
        if thread is not threading.current_thread():
            thread.join(timeout)
        if thread.is_alive():
            self._abandoned = thread
            logger.warning("The pgevents listener did not stop within %.1f s.", timeout)
            return False
        with self._lock:
            if self._thread is thread:
                self._thread = None
        return True

    def request_stop(self) -> None:
        """Ask the loop to stop soon; safe from signal handlers."""
        self._stop.set()
        wake = self._wake
        if wake is not None:
            with contextlib.suppress(OSError):
                os.write(wake[1], b"x")

    def run(self, fail_fast: bool = False, on_connect: Optional[Callable[[], None]] = None) -> None:
        """Listen and dispatch until stopped; reconnect after connection loss.

        Transient failures (no answer, refused, server restarting, dropped
        connection) are logged as warnings and retried with backoff.
        Permanent ones (authentication, no such database, no privilege on
        the event schema) are logged as errors and retried the same way,
        or, with ``fail_fast``, end the loop and are kept in :attr:`failure`.
        """
        config = self.state.config
        reconnect = Backoff(config.reconnect_backoff, config.reconnect_backoff_max)
        dispatcher = Dispatcher(self.state)
        housekeeping = Housekeeping(config)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        self._wake = (wake_r, wake_w)
        self.failure = None
        self._dispatcher = dispatcher
        if signals.listener_started.receivers:
            signals.send(signals.listener_started, self.state.app)
        try:
            while not self._stop.is_set():
                failure = self._connect_and_serve(dispatcher, housekeeping, reconnect, fail_fast, on_connect)
                if failure is not None:
                    self.failure = failure
                    break
        finally:
            dispatcher.close()
            self._wake = None
            os.close(wake_r)
            os.close(wake_w)
        logger.info("pgevents listener stopped (pid %s).", os.getpid())
        if signals.listener_stopped.receivers:
            signals.send(signals.listener_stopped, self.state.app)

    def _connect_and_serve(
        self,
        dispatcher: Dispatcher,
        housekeeping: Housekeeping,
        reconnect: Backoff,
        fail_fast: bool,
        on_connect: Optional[Callable[[], None]],
    ) -> Optional[DatabaseAccessError]:
        """One connection's life; returns the permanent failure that ends a ``fail_fast`` loop."""
        conn: Optional[Connection] = None
        try:
            conn = Connection(
                self.state.url, application_name="pgevents-listener", keepalives=True,
                connect_timeout=self.state.config.connect_timeout,
            )
            store = Store(conn, self.state.config.schema)
            store.skip_commit_flush()
            store.claim_in_id_order()
            store.listen()  # before the catch-up read, so no event falls in between
            self._log_connected(reconnect)
            self.connected_at = self.heartbeat = time.monotonic()
            if reconnect.failures and signals.listener_reconnected.receivers:
                signals.send(signals.listener_reconnected, self.state.app, failures=reconnect.failures)
            if on_connect is not None:
                on_connect()
            self._serve(store, dispatcher, housekeeping, reconnect)
        except Exception as exc:  # noqa: BLE001 - the loop logs and never dies
            if self.connected_at is not None:
                self.connected_at = None
                if signals.listener_connection_lost.receivers:
                    signals.send(signals.listener_connection_lost, self.state.app, exception=exc)
            failure = self._permanent_failure(exc)
            if failure is not None and fail_fast:
                return failure
            delay = reconnect.next_delay()
            if failure is not None:
                logger.error("pgevents listener: %s Retrying in %.2f s.", failure, delay)
            elif isinstance(exc, DatabaseUnavailableError):
                logger.warning("pgevents listener: %s Retrying in %.2f s.", exc, delay)
            elif isinstance(exc, CONNECTION_ERRORS):
                logger.warning(
                    "pgevents listener lost its database connection (%s); reconnecting in %.2f s.",
                    error_reason(exc), delay,
                )
            else:
                self._log_failure(exc, delay)
            self._stop.wait(delay)
        finally:
            self.connected_at = None
            if conn is not None:
                conn.close()
        return None

    def _log_connected(self, reconnect: Backoff) -> None:
        shown = self.state.url.render_as_string(hide_password=True)
        if reconnect.failures:
            # At the level of the failures it ends: whoever saw those sees this.
            logger.warning(
                "pgevents listener connected to %s again after %d failure(s) (pid %s).",
                shown, reconnect.failures, os.getpid(),
            )
        else:
            logger.info("pgevents listener connected to %s (pid %s).", shown, os.getpid())

    def _permanent_failure(self, exc: Exception) -> Optional[DatabaseAccessError]:
        """``exc`` as a :class:`DatabaseAccessError` if retrying cannot fix it, else None."""
        if isinstance(exc, DatabaseAccessError):
            return exc
        failure = classify(exc)
        if failure not in PERMANENT_FAILURES:
            return None
        url = self.state.url
        if failure != "privilege":
            error = connect_error(exc, url)
            return error if isinstance(error, DatabaseAccessError) else None
        role = url.username or "ROLE"
        return DatabaseAccessError(
            f"The role {role!r} may not use the event schema {self.state.config.schema!r} of"
            f" {url.render_as_string(hide_password=True)}: {error_reason(exc)}. Grant it what it"
            f" needs with 'flask pgevents grant-listener {role}'."
        )

    def _serve(self, store: Store, dispatcher: Dispatcher, housekeeping: Housekeeping, reconnect: Backoff) -> None:
        store.register_listener()
        dispatcher.start_broadcasts(store)
        pacer = Pacer(self.state.config.batch_size)
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            handled = dispatcher.run_batch(store, self._stop) + dispatcher.run_broadcasts(store)
            reconnect.reset()  # only a working claim proves the set-up right
            housekeeping.vacuum_if_due(store, dispatcher)
            if not handled:
                housekeeping.purge_if_due(store)
            step = pacer.after_claim(handled, dispatcher.in_flight, dispatcher.idle_timeout)
            woken = self._take(store, step)
            if RESCAN in woken:
                dispatcher.cursor.request_full_scan()
            if woken and step.sleeping:
                self._take(store, pacer.woken())
        if not store.conn.closed:
            store.unregister_listener()

    def readiness(self, max_stall: float, max_handler_seconds: Optional[float] = None) -> Readiness:
        """Whether the loop runs here, is connected, and is not wedged.

        Wedged: no claim began for ``max_stall`` seconds while no handler ran
        (a query or the server hangs). A handler running long keeps it ready
        ("busy"), unless it runs longer than ``max_handler_seconds``.
        """
        if not self.running:
            return Readiness(False, "The pgevents listener thread does not run in this process.")
        if self.connected_at is None:
            return Readiness(False, "The pgevents listener is not connected to the database; it is reconnecting.")
        dispatcher = self._dispatcher
        started = dispatcher.handler_started if dispatcher is not None else None
        if started is not None and dispatcher is not None:
            running = time.perf_counter() - started
            if max_handler_seconds is not None and running > max_handler_seconds:
                return Readiness(False, (
                    f"The pgevents handler {dispatcher.handler_name} has been running for {running:.0f} s,"
                    f" longer than {max_handler_seconds:g} s."
                ))
            return Readiness(True, f"Busy: handler {dispatcher.handler_name} running for {running:.1f} s.")
        stalled = time.monotonic() - (self.heartbeat or time.monotonic())
        if stalled > max_stall:
            return Readiness(False, (
                f"The pgevents listener began no claim for {stalled:.0f} s (more than {max_stall:g} s):"
                " a query or the database server hangs."
            ))
        return Readiness(True, "Connected and listening.")

    def _take(self, store: Store, step: Step) -> list[str]:
        """Publish the step's idle flag, then wait as it says; return the wake-ups' payloads."""
        if step.idle is not None:
            store.set_listener_idle(step.idle)
        if step.wait is None or self._stop.is_set() or self._wake is None:
            return []
        return store.conn.wait(step.wait, self._wake[0])

    def _log_failure(self, exc: Exception, delay: float) -> None:
        schema = self.state.config.schema
        code = sqlstate(exc)
        if code == "42P01":  # undefined_table
            logger.warning(
                "The event table %s.event does not exist; run 'flask pgevents"
                " install-triggers'. Checking again in %.2f s.", schema, delay,
            )
        else:
            logger.exception("pgevents listener error; restarting in %.2f s.", delay)

    def abandon_after_fork(self) -> None:
        """In a forked child: forget the parent's thread without touching its connection."""
        self._thread = None
        self._wake = None
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._lock = threading.Lock()
