"""PGEvents: the Flask extension. Registration, and thin per-app operations."""
from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar, Union

from flask import Flask, current_app, has_app_context

from . import dispatch, lifecycle
from .cli import pgevents_cli
from .config import DEFAULTS
from .errors import AlreadyRegisteredError
from .registry import Handler, Registry, Target
from .state import AppState
from .store import Backlog, Store
from .triggers import TriggerStatus

logger = logging.getLogger("flask_pgevents")

F = TypeVar("F", bound=Callable[..., Any])


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
        self._apps: weakref.WeakSet[Flask] = weakref.WeakSet()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read the app's config, add the ``flask pgevents`` commands, and start
        the listener thread if this process serves the app.

        Config keys, each optional (see the README's *Configuration*):

        - ``PGEVENTS_DATABASE_URI``: the database; defaults to Flask-SQLAlchemy's.
        - ``PGEVENTS_SCHEMA``: schema of the event table and capture functions.
        - ``PGEVENTS_AUTOSTART``: start the listener thread in serving processes.
        - ``PGEVENTS_BATCH_SIZE``, ``PGEVENTS_BATCH_BYTES``: events and bytes per claim.
        - ``PGEVENTS_POLL_INTERVAL``: seconds between safety polls.
        - ``PGEVENTS_MAX_ATTEMPTS``, ``PGEVENTS_RETRY_BACKOFF``,
          ``PGEVENTS_RETRY_BACKOFF_MAX``: retries of failing handlers.
        - ``PGEVENTS_RECONNECT_BACKOFF``, ``PGEVENTS_RECONNECT_BACKOFF_MAX``: reconnects.
        - ``PGEVENTS_RETENTION``, ``PGEVENTS_FAILED_RETENTION``: how long handled
          and failed events are kept.
        - ``PGEVENTS_STOP_TIMEOUT``: how long ``stop()`` and SIGTERM wait.
        - ``PGEVENTS_CAPTURE_ROLE``: the NOLOGIN role owning the capture functions.
        - ``PGEVENTS_UNPICKLE``: load ``PickleType`` values in events.

        :raises AlreadyRegisteredError: if this app is already set up.
        :raises ConfigurationError: if a key is invalid or no PostgreSQL
            database is configured.
        """
        if "pgevents" in app.extensions:
            raise AlreadyRegisteredError(
                "flask-pgevents is already set up on this Flask app. Call 'init_app'"
                " once per app, and register every handler on that one 'PGEvents' instance."
            )
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        db = self._db if self._db is not None else app.extensions.get("sqlalchemy")
        state = AppState(self, app, db)
        app.extensions["pgevents"] = state
        self._apps.add(app)
        app.cli.add_command(pgevents_cli)
        if lifecycle.should_autostart(app, state.config):
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
        state: Optional[AppState] = app.extensions.get("pgevents")
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
        with state.connect() as store:
            state.triggers.check_tables(self.registry.needed_triggers(), store.table_columns)
            statements = self._install_statements(state, store)
            store.run_script(statements)
        return statements

    def install_sql(self, app: Optional[Flask] = None) -> list[str]:
        """The statements :meth:`install_triggers` would run, without running them."""
        state = self._state(app)
        with state.connect() as store:
            return self._install_statements(state, store)

    def _install_statements(self, state: AppState, store: Store) -> list[str]:
        owner = state.triggers.capture_owner(store.capture_role_state(state.config.capture_role))
        for warning in owner.warnings:
            logger.warning("%s", warning)
        installed = state.triggers.installed(store.installed_triggers())
        return state.triggers.install_sql(self.registry.needed_triggers(), installed, owner)

    def grant_listener(self, role: str, app: Optional[Flask] = None) -> list[str]:
        """Grant ``role`` exactly what a process that only listens needs; return the SQL.

        Its earlier privileges on the event tables are revoked first.

        :raises UnknownRoleError: if the role does not exist.
        :raises MissingTableError: if the triggers were never installed.
        """
        state = self._state(app)
        with state.connect() as store:
            statements = self._grant_statements(state, store, role)
            store.run_script(statements)
        return statements

    def grant_listener_sql(self, role: str, app: Optional[Flask] = None) -> list[str]:
        """The statements :meth:`grant_listener` would run, without running them."""
        state = self._state(app)
        with state.connect() as store:
            return self._grant_statements(state, store, role)

    def _grant_statements(self, state: AppState, store: Store, role: str) -> list[str]:
        role_exists, server_version = store.role_state(role)
        return state.triggers.listener_grants_sql(
            role, role_exists=role_exists, schema_exists=store.schema_exists(),
            server_version=server_version, broadcast=self.registry.has_broadcast(),
        )

    def uninstall_triggers(self, app: Optional[Flask] = None, *, drop_schema: bool = False) -> int:
        """Drop every capture trigger; return how many there were (idempotent).

        :param drop_schema: also drop the event schema with every stored event.
            Without it, pending events stay and are handled after a reinstall.
        """
        state = self._state(app)
        with state.connect() as store:
            installed = state.triggers.installed(store.installed_triggers())
            store.run_script(state.triggers.uninstall_sql(installed, drop_schema=drop_schema))
        return len(installed)

    def failed_events(self, app: Optional[Flask] = None, *, limit: int = 50) -> list[dict[str, Any]]:
        """Events kept as failed after their last attempt, with each handler's error."""
        with self._state(app).connect() as store:
            return [dataclasses.asdict(failed) for failed in store.failed_events(limit)]

    def retry_failed(self, app: Optional[Flask] = None, event_ids: Optional[Sequence[int]] = None) -> int:
        """Queue failed events again (all of them when ``event_ids`` is None)."""
        with self._state(app).connect() as store:
            return store.retry_failed(event_ids)

    def trigger_status(self, app: Optional[Flask] = None) -> tuple[list[TriggerStatus], Optional[Backlog]]:
        """Triggers per table and operation, and the backlog of the event table."""
        state = self._state(app)
        with state.connect() as store:
            installed = state.triggers.installed(store.installed_triggers())
            return state.triggers.status(self.registry.needed_triggers(), installed), store.backlog()

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
        return dispatch.process_pending(self._state(app), timeout)
