"""PGEvents: the Flask extension that owns set-up, config, handlers and the listener."""
from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import threading
import weakref
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar, Union

import sqlalchemy as sa
from flask import Flask, current_app, has_app_context, request_started
from sqlalchemy.engine import URL

from . import listener as listener_module
from .connection import SAFE_SEARCH_PATH, Connection, parse_database_url
from .errors import AlreadyRegisteredError, ConfigurationError
from .events import RowDecoder
from .registry import Handler, Registry, TableKey, Target
from .triggers import Backlog, TriggerManager, TriggerStatus

logger = logging.getLogger("flask_pgevents")

F = TypeVar("F", bound=Callable[..., Any])

#: Every configuration key with its default; see the README for each.
DEFAULTS: dict[str, Any] = {
    "PGEVENTS_DATABASE_URI": None,
    "PGEVENTS_SCHEMA": "pgevents",
    "PGEVENTS_AUTOSTART": True,
    "PGEVENTS_BATCH_SIZE": 500,
    "PGEVENTS_BATCH_BYTES": 32 * 1024 * 1024,
    "PGEVENTS_POLL_INTERVAL": 0.5,
    "PGEVENTS_MAX_ATTEMPTS": 5,
    "PGEVENTS_RETRY_BACKOFF": 1.0,
    "PGEVENTS_RETRY_BACKOFF_MAX": 300.0,
    "PGEVENTS_RECONNECT_BACKOFF": 0.1,
    "PGEVENTS_RECONNECT_BACKOFF_MAX": 10.0,
    "PGEVENTS_RETENTION": 0.0,
    "PGEVENTS_FAILED_RETENTION": 0.0,
    "PGEVENTS_STOP_TIMEOUT": 10.0,
    "PGEVENTS_CAPTURE_ROLE": None,
    "PGEVENTS_UNPICKLE": False,
}


@dataclasses.dataclass(frozen=True)
class Config:
    """The ``PGEVENTS_*`` settings of one app, read once by ``init_app``."""

    schema: str
    autostart: bool
    batch_size: int
    batch_bytes: int
    poll_interval: float
    max_attempts: int
    retry_backoff: float
    retry_backoff_max: float
    reconnect_backoff: float
    reconnect_backoff_max: float
    retention: float
    failed_retention: float
    stop_timeout: float
    capture_role: Optional[str]
    unpickle: bool

    @classmethod
    def from_app(cls, app: Flask) -> "Config":
        def get(key: str) -> Any:
            return app.config.get(key, DEFAULTS[key])

        def positive(key: str, kind: type, minimum: float) -> Any:
            value = get(key)
            noun = "an integer" if kind is int else "a number"
            if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
                bad = True
            else:
                try:
                    value = kind(value)
                    bad = False
                except (TypeError, ValueError):
                    bad = True
            if bad:
                raise ConfigurationError(
                    f"{key} must be {noun}, got {value!r}. Remove it to use the default"
                    f" {DEFAULTS[key]!r}."
                )
            if value < minimum:
                raise ConfigurationError(
                    f"{key} must be at least {minimum}, got {value!r}. Remove it to use"
                    f" the default {DEFAULTS[key]!r}."
                )
            return value

        def flag(key: str) -> bool:
            value = get(key)
            if isinstance(value, str):  # from the environment
                if value.strip().lower() in ("1", "true", "yes", "on"):
                    return True
                if value.strip().lower() in ("0", "false", "no", "off", ""):
                    return False
                raise ConfigurationError(
                    f"{key} must be true or false, got {value!r}. Use True or False."
                )
            return bool(value)

        schema = get("PGEVENTS_SCHEMA")
        if not isinstance(schema, str) or not schema or "$" in schema or "\x00" in schema:
            raise ConfigurationError(
                f"PGEVENTS_SCHEMA must be a non-empty schema name without '$', got"
                f" {schema!r}. Remove it to use the default 'pgevents'."
            )
        capture_role = get("PGEVENTS_CAPTURE_ROLE")
        if capture_role is not None and (
            not isinstance(capture_role, str) or not capture_role or "\x00" in capture_role
            or len(capture_role.encode()) > 63
        ):
            raise ConfigurationError(
                f"PGEVENTS_CAPTURE_ROLE must be a role name of 1 to 63 bytes, got"
                f" {capture_role!r}. Remove it to use '<PGEVENTS_SCHEMA>_capture'."
            )
        return cls(
            schema=schema,
            autostart=flag("PGEVENTS_AUTOSTART"),
            batch_size=positive("PGEVENTS_BATCH_SIZE", int, 1),
            batch_bytes=positive("PGEVENTS_BATCH_BYTES", int, 1),
            poll_interval=positive("PGEVENTS_POLL_INTERVAL", float, 0.01),
            max_attempts=positive("PGEVENTS_MAX_ATTEMPTS", int, 1),
            retry_backoff=positive("PGEVENTS_RETRY_BACKOFF", float, 0),
            retry_backoff_max=positive("PGEVENTS_RETRY_BACKOFF_MAX", float, 0),
            reconnect_backoff=positive("PGEVENTS_RECONNECT_BACKOFF", float, 0.001),
            reconnect_backoff_max=positive("PGEVENTS_RECONNECT_BACKOFF_MAX", float, 0.001),
            retention=positive("PGEVENTS_RETENTION", float, 0),
            failed_retention=positive("PGEVENTS_FAILED_RETENTION", float, 0),
            stop_timeout=positive("PGEVENTS_STOP_TIMEOUT", float, 0),
            capture_role=capture_role,
            unpickle=flag("PGEVENTS_UNPICKLE"),
        )


@dataclasses.dataclass(frozen=True)
class TableInfo:
    """What decoding needs to know of one table."""

    model: Optional[type]
    table: Optional[sa.Table]
    decoder: RowDecoder


class AppState:
    """Everything flask-pgevents keeps for one app: ``app.extensions["pgevents"]``."""

    def __init__(self, extension: "PGEvents", app: Flask, url: URL, db: Any) -> None:
        self.extension = extension
        self.registry = extension.registry
        self._app_ref = weakref.ref(app)
        self.url = url
        self.db = db
        self.config = Config.from_app(app)
        self.triggers = TriggerManager(self.config.schema, self.config.capture_role)
        self.dialect = url.get_dialect()()
        self._tables: dict[TableKey, TableInfo] = {}
        self._tables_lock = threading.Lock()
        self.listener = listener_module.Listener(self)

    @property
    def app(self) -> Flask:
        app = self._app_ref()
        if app is None:  # pragma: no cover - the app owns this state
            raise RuntimeError("The Flask app of this pgevents state no longer exists.")
        return app

    def connect(self) -> Connection:
        """A new connection for administration (triggers, status, retries)."""
        return Connection(self.url, application_name="pgevents-admin")

    def dispose_inherited_engines(self) -> None:
        """After a fork: drop the parent's pooled connections without closing them."""
        engines = getattr(self.db, "_app_engines", {}).get(self.app, {}) if self.db is not None else {}
        for engine in engines.values():
            engine.dispose(close=False)

    def rollback_session(self) -> None:
        """Leave the Flask-SQLAlchemy session clean after a handler raised."""
        if self.db is not None:
            try:
                self.db.session.rollback()
            except Exception:  # noqa: BLE001 - a broken session must not stop dispatch
                logger.debug("Rolling back the session after a handler error failed.", exc_info=True)

    def table_info(self, key: TableKey) -> TableInfo:
        """Model, Table and decoder for a table, found once and cached."""
        info = self._tables.get(key)
        if info is None:
            with self._tables_lock:
                info = self._tables.get(key) or self._find_table(key)
                self._tables[key] = info
        return info

    def forget_tables(self) -> None:
        self._tables.clear()

    def _find_table(self, key: TableKey) -> TableInfo:
        model, table = self.registry.model_for(key)
        if model is None and self.db is not None:
            model = _find_model(self.db, key)
        if table is None and model is not None:
            table = sa.inspect(model).local_table
        if table is None:
            table = self._reflect(key)
        return TableInfo(model, table, RowDecoder(table, self.dialect, unpickle=self.config.unpickle))

    def _reflect(self, key: TableKey) -> Optional[sa.Table]:
        engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
        sa.event.listen(engine, "connect", _safe_search_path, insert=True)
        try:
            return sa.Table(key.name, sa.MetaData(), schema=key.schema, autoload_with=engine)
        except sa.exc.SQLAlchemyError:
            logger.warning("Could not reflect table %s; its values are passed as JSON.", key)
            return None
        finally:
            engine.dispose()


def _safe_search_path(dbapi_connection: Any, connection_record: Any) -> None:
    # Before SQLAlchemy's own first queries on the connection.
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    with dbapi_connection.cursor() as cursor:
        cursor.execute(SAFE_SEARCH_PATH)
    dbapi_connection.autocommit = autocommit


def _find_model(db: Any, key: TableKey) -> Optional[type]:
    registry = getattr(getattr(db, "Model", None), "registry", None)
    for mapper in getattr(registry, "mappers", ()):
        table = mapper.local_table
        if isinstance(table, sa.Table) and (table.schema or "public", table.name) == (key.schema, key.name):
            return mapper.class_
    return None


def _database_url(app: Flask, db: Any) -> URL:
    uri = app.config.get("PGEVENTS_DATABASE_URI")
    if uri:
        return parse_database_url(uri, "PGEVENTS_DATABASE_URI")
    if db is not None and None in getattr(db, "_app_engines", {}).get(app, {}):
        with app.app_context():
            return parse_database_url(db.engine.url, "SQLALCHEMY_DATABASE_URI")
    uri = app.config.get("SQLALCHEMY_DATABASE_URI")
    if uri:
        return parse_database_url(uri, "SQLALCHEMY_DATABASE_URI")
    binds = app.config.get("SQLALCHEMY_BINDS") or {}
    if binds:
        raise ConfigurationError(
            "flask-pgevents needs the default database, but only SQLALCHEMY_BINDS is"
            f" configured ({', '.join(map(repr, binds))}). Set PGEVENTS_DATABASE_URI to"
            " the PostgreSQL database whose tables you listen to."
        )
    raise ConfigurationError(
        "No database configured for flask-pgevents. Set PGEVENTS_DATABASE_URI, or"
        " SQLALCHEMY_DATABASE_URI for Flask-SQLAlchemy, to a 'postgresql://' URI."
    )


def _should_autostart(app: Flask, config: Config) -> bool:
    """Whether this process serves the app and so should run a listener thread."""
    if not config.autostart or app.testing:
        return False
    try:
        import click
    except ImportError:  # pragma: no cover - Flask depends on click
        return True
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return True  # a WSGI server or a plain script
    from flask.cli import run_command

    if ctx.command is not run_command:
        return False  # flask shell, flask db upgrade, flask pgevents ...
    reload = ctx.params.get("reload")
    if reload is None:
        from flask.helpers import get_debug_flag

        reload = get_debug_flag()
    # With the reloader, the first process only watches files: its child serves.
    return not reload or os.environ.get("WERKZEUG_RUN_MAIN") == "true"


class PGEvents:
    """React to committed row changes in PostgreSQL tables inside a Flask app.

    :param app: the app to set up now, or ``None`` to call :meth:`init_app` later.
    :param db: the Flask-SQLAlchemy instance; defaults to the app's.

    Example::

        pgevents = PGEvents(app)

        @pgevents.listens_for(User, "after_insert")
        def welcome(event):
            send_welcome_mail(event.target.email)
    """

    def __init__(self, app: Optional[Flask] = None, *, db: Any = None) -> None:
        self.registry = Registry()
        self._db = db
        self._apps: "weakref.WeakSet[Flask]" = weakref.WeakSet()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read the app's config, register the CLI and start the listener if serving.

        :raises AlreadyRegisteredError: if this app is already set up.
        :raises ConfigurationError: if no PostgreSQL database is configured.
        """
        if "pgevents" in app.extensions:
            raise AlreadyRegisteredError(
                "flask-pgevents is already set up on this Flask app. Call 'init_app'"
                " once per app, and register every handler on that one 'PGEvents' instance."
            )
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        db = self._db if self._db is not None else app.extensions.get("sqlalchemy")
        state = AppState(self, app, _database_url(app, db), db)
        app.extensions["pgevents"] = state
        self._apps.add(app)
        if "pgevents" not in app.cli.commands:
            from .cli import pgevents_cli

            app.cli.add_command(pgevents_cli)
        if _should_autostart(app, state.config):
            state.listener.start()

    # Registration ----------------------------------------------------------

    def listens_for(
        self,
        target: Target,
        identifier: Union[str, Sequence[str]],
        *,
        columns: Optional[Iterable[str]] = None,
        broadcast: bool = False,
    ) -> Callable[[F], F]:
        """Decorate a handler for row changes of ``target``; returns it unchanged.

        :param target: a mapped class, a ``sqlalchemy.Table``, or ``"schema.table"``.
        :param identifier: ``"after_insert"``, ``"after_update"``, ``"after_delete"``
            or a list of them.
        :param columns: for updates only: fire only when one of these changed.
        :param broadcast: run in every listening process instead of once, at
            most once per process and only while it listens; never retried.
            For cache invalidation and pushing to connected clients.

        Example::

            @pgevents.listens_for(User, "after_update", columns=["email"])
            def email_changed(event):
                ...
        """

        def decorate(fn: F) -> F:
            self.listen(target, identifier, fn, columns=columns, broadcast=broadcast)
            return fn

        return decorate

    def listen(
        self,
        target: Target,
        identifier: Union[str, Sequence[str]],
        fn: Handler,
        *,
        columns: Optional[Iterable[str]] = None,
        broadcast: bool = False,
    ) -> None:
        """Register ``fn`` for row changes of ``target``; see :meth:`listens_for`."""
        self.registry.add(target, identifier, fn, columns=columns, broadcast=broadcast)
        for app in list(self._apps):
            app.extensions["pgevents"].forget_tables()

    def remove(self, target: Target, identifier: Union[str, Sequence[str]], fn: Handler) -> None:
        """Unregister a handler registered with :meth:`listen` or :meth:`listens_for`."""
        self.registry.remove(target, identifier, fn)

    # Per-app operations -----------------------------------------------------

    def _state(self, app: Optional[Flask] = None) -> AppState:
        if app is None:
            if has_app_context():
                app = current_app._get_current_object()  # type: ignore[attr-defined]
            elif len(self._apps) == 1:
                app = next(iter(self._apps))
            else:
                raise RuntimeError(
                    "Working outside of application context: pass app=..., or run"
                    " inside 'with app.app_context():'."
                )
        state = app.extensions.get("pgevents")
        if state is None or state.extension is not self:
            raise RuntimeError(
                "The current Flask app is not registered with this 'PGEvents' instance."
                " Did you forget to call 'init_app'?"
            )
        return state

    def install_triggers(self, app: Optional[Flask] = None) -> list[str]:
        """Create the event schema and exactly the triggers the handlers need.

        Idempotent: outdated triggers are replaced, unneeded ones dropped.
        Returns the statements it ran.

        :raises MissingTableError: if a handler's table does not exist.
        :raises UnknownColumnError: if ``columns=`` names a column it lacks
            (checked here for string targets, which registration cannot check).
        """
        state = self._state(app)
        needed = self.registry.needed_triggers()
        with state.connect() as conn:
            state.triggers.check_tables(conn.cursor, needed)
            statements = self._install_statements(state, conn)
            conn.run_script(statements)
        return statements

    def install_sql(self, app: Optional[Flask] = None) -> list[str]:
        """The statements :meth:`install_triggers` would run, without running them."""
        state = self._state(app)
        with state.connect() as conn:
            return self._install_statements(state, conn)

    def _install_statements(self, state: AppState, conn: Connection) -> list[str]:
        owner = state.triggers.capture_owner(conn.cursor)
        for warning in owner.warnings:
            logger.warning("%s", warning)
        installed = state.triggers.installed(conn.cursor)
        return state.triggers.install_sql(self.registry.needed_triggers(), installed, owner)

    def grant_listener(self, role: str, app: Optional[Flask] = None) -> list[str]:
        """Grant ``role`` exactly what a process that only listens needs; return the SQL.

        Its earlier privileges on the event tables are revoked first.

        :raises UnknownRoleError: if the role does not exist.
        :raises MissingTableError: if the triggers were never installed.
        """
        state = self._state(app)
        with state.connect() as conn:
            statements = self._grant_statements(state, conn, role)
            conn.run_script(statements)
        return statements

    def grant_listener_sql(self, role: str, app: Optional[Flask] = None) -> list[str]:
        """The statements :meth:`grant_listener` would run, without running them."""
        state = self._state(app)
        with state.connect() as conn:
            return self._grant_statements(state, conn, role)

    def _grant_statements(self, state: AppState, conn: Connection, role: str) -> list[str]:
        return state.triggers.listener_grants_sql(conn.cursor, role, broadcast=self.registry.has_broadcast())

    def uninstall_triggers(self, app: Optional[Flask] = None, *, drop_schema: bool = False) -> int:
        """Drop every capture trigger; return how many there were (idempotent).

        :param drop_schema: also drop the event schema with every stored event.
            Without it, pending events stay and are handled after a reinstall.
        """
        state = self._state(app)
        with state.connect() as conn:
            installed = state.triggers.installed(conn.cursor)
            conn.run_script(state.triggers.uninstall_sql(installed, drop_schema=drop_schema))
        return len(installed)

    def failed_events(self, app: Optional[Flask] = None, *, limit: int = 50) -> list[dict[str, Any]]:
        """Events kept as failed after their last attempt, with each handler's error."""
        state = self._state(app)
        with state.connect() as conn:
            return state.triggers.failed_events(conn.cursor, limit)

    def retry_failed(self, app: Optional[Flask] = None, event_ids: Optional[Sequence[int]] = None) -> int:
        """Queue failed events again (all of them when ``event_ids`` is None)."""
        state = self._state(app)
        with state.connect() as conn:
            return state.triggers.retry_failed(conn.cursor, event_ids)

    def trigger_status(self, app: Optional[Flask] = None) -> tuple[list[TriggerStatus], Optional[Backlog]]:
        """Triggers per table and operation, and the backlog of the event table."""
        state = self._state(app)
        with state.connect() as conn:
            return (
                state.triggers.status(conn.cursor, self.registry.needed_triggers()),
                state.triggers.backlog(conn.cursor),
            )

    def start(self, app: Optional[Flask] = None) -> None:
        """Start this process's listener thread for the app (idempotent)."""
        self._state(app).listener.start()

    def stop(self, timeout: Optional[float] = None, app: Optional[Flask] = None) -> bool:
        """Stop the listener thread after its handler in progress; True if it ended."""
        return self._state(app).listener.stop(timeout)

    def process_pending(self, timeout: Optional[float] = None, app: Optional[Flask] = None) -> int:
        """Handle every committed event pending now in this thread; return how many.

        Example::

            db.session.add(User(email="a@example.com"))
            db.session.commit()
            assert pgevents.process_pending() == 1
        """
        return listener_module.process_pending(self._state(app), timeout)


# Pre-fork servers (gunicorn, uWSGI with preload) load the app, then fork
# workers. The listener is stopped before a fork, so no thread or connection
# crosses it, and each child starts its own. A parent that has never served a
# request is a pre-fork master: it keeps its listener parked, so that workers
# it forks later get one too, and handles no events itself.
_served_requests = False


def _note_request(sender: Any, **extra: Any) -> None:
    global _served_requests
    _served_requests = True


request_started.connect(_note_request)


def _forking_listeners() -> list[listener_module.Listener]:
    # A handler that forks runs on the listener thread: leave that listener be.
    return [
        listener for listener in list(listener_module._live_listeners)
        if not listener.on_current_thread()
    ]


def _before_fork() -> None:
    for listener in _forking_listeners():
        listener.resume_after_fork = listener.running or listener.parked
        if listener.running:
            listener.stop()


def _after_fork_in_parent() -> None:
    for listener in _forking_listeners():
        if not listener.resume_after_fork:
            continue
        if _served_requests:
            listener.start()
        else:
            listener.parked = True


def _after_fork_in_child() -> None:
    for listener in _forking_listeners():
        listener.abandon_after_fork()
        listener.parked = False
        if listener.resume_after_fork:
            # Pooled connections of the parent must not be used here.
            listener.state.dispose_inherited_engines()
            listener.start()


def _stop_at_exit() -> None:
    # Daemon threads die without unwinding at exit: stop listeners first, so
    # that the batch in progress is settled instead of handled again later.
    for listener in list(listener_module._live_listeners):
        if listener.running:
            listener.stop()


atexit.register(_stop_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
