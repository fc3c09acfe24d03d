"""PGEvents: the Flask extension. Registration, and thin per-app operations."""
from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
import time
import weakref
from typing import Any, Callable, ContextManager, Iterable, Optional, Sequence, TypeVar, Union

import click
from flask import Blueprint, Flask, Request, current_app, has_app_context

from . import backfill as backfills
from . import context as contexts
from . import dispatch, lifecycle, suppression
from .cli import pgevents_cli
from .config import DEFAULTS
from .errors import AlreadyRegisteredError, CommandLineConfigurationError, ConfigurationError, InstallLockError
from .filters import Where
from .pacing import Backoff
from .registry import Handler, Registry, Target
from .state import AppState
from .stats import Readiness, Stats, collect, default_max_stall
from .store import Backlog, LockHolder, LockTimeout, Store
from .triggers import InstallPlan, TriggerStatus, qualified

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
        #: Functions whose values join the context of transactions begun in a request.
        self.context_providers: list[Callable[[], Optional[dict[str, Any]]]] = []
        self._db = db
        self._apps: weakref.WeakSet[Flask] = weakref.WeakSet()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read the app's config, add the ``flask pgevents`` commands, and start
        the listener thread if this process serves the app (at once, or on its
        first request; see the README's *Deployment*).

        Config keys, each optional (see the README's *Configuration*):

        - ``PGEVENTS_ENABLED``: ``False`` makes the extension inert: no database
          is read or opened, handlers may still be registered.
        - ``PGEVENTS_DATABASE_URI``: the database; defaults to Flask-SQLAlchemy's.
        - ``PGEVENTS_SCHEMA``: schema of the event table and capture functions.
        - ``PGEVENTS_AUTOSTART``: ``True`` starts the listener thread in serving
          processes, ``False`` never, ``"always"`` in every process.
        - ``PGEVENTS_BATCH_SIZE``, ``PGEVENTS_BATCH_BYTES``: events and bytes per claim.
        - ``PGEVENTS_POLL_INTERVAL``: seconds between safety polls.
        - ``PGEVENTS_MAX_ATTEMPTS``, ``PGEVENTS_RETRY_BACKOFF``,
          ``PGEVENTS_RETRY_BACKOFF_MAX``: retries of failing handlers.
        - ``PGEVENTS_RECONNECT_BACKOFF``, ``PGEVENTS_RECONNECT_BACKOFF_MAX``: reconnects.
        - ``PGEVENTS_RETENTION``, ``PGEVENTS_FAILED_RETENTION``: how long handled
          and failed events are kept.
        - ``PGEVENTS_STOP_TIMEOUT``: how long ``stop()`` and SIGTERM wait.
        - ``PGEVENTS_CONNECT_TIMEOUT``: how long connecting waits for the server.
        - ``PGEVENTS_STATEMENT_TIMEOUT``: how long the server lets a statement of
          the CLI and of administration methods run.
        - ``PGEVENTS_ATOMIC_HANDLERS``: handlers' ``db.session`` work commits
          with their event's claim (exactly once); ``False``: on its own.
        - ``PGEVENTS_CAPTURE_ROLE``: the NOLOGIN role owning the capture functions.
        - ``PGEVENTS_UNPICKLE``: load ``PickleType`` values in events.
        - ``PGEVENTS_APP_NAME``: the name install writes on this app's triggers
          (default: ``app.name``); another app's install leaves them alone.
        - ``PGEVENTS_LOCK_TIMEOUT``: seconds install and uninstall wait for a
          table's lock before they roll back and try again.
        - ``PGEVENTS_REQUEST_CONTEXT``: transactions the session begins in a
          request carry its endpoint and request id (``event.context``).

        :raises AlreadyRegisteredError: if this app is already set up.
        :raises ConfigurationError: if a key is invalid or no PostgreSQL
            database is configured (while the ``flask`` command loads the app,
            a :class:`CommandLineConfigurationError`, shown as one line).
        """
        if "pgevents" in app.extensions:
            raise AlreadyRegisteredError(
                "flask-pgevents is already set up on this Flask app. Call 'init_app'"
                " once per app, and register every handler on that one 'PGEvents' instance."
            )
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        db = self._db if self._db is not None else app.extensions.get("sqlalchemy")
        try:
            state = AppState(self, app, db)
        except ConfigurationError as exc:
            if click.get_current_context(silent=True) is None:
                raise
            raise CommandLineConfigurationError(str(exc)) from None
        app.extensions["pgevents"] = state
        self._apps.add(app)
        if state.enabled and state.db is not None:
            contexts.watch_sessions(state.db)
        app.cli.add_command(pgevents_cli)
        lifecycle.autostart(app, state.listener)
        if "alembic" in sys.modules:
            # Flask-Migrate has loaded Alembic: give it the trigger operations,
            # and keep autogenerate off the event schema (README: *Migrations*).
            importlib.import_module("flask_pgevents.migrations")

    # Registration ----------------------------------------------------------

    def listens_for(
        self,
        target: Target,
        identifier: Union[str, Sequence[str]],
        *,
        columns: Optional[Iterable[str]] = None,
        broadcast: bool = False,
        where: Optional[Where] = None,
    ) -> Callable[[F], F]:
        """Decorate a handler for row changes of ``target``; returns it unchanged.

        :param target: a mapped class, a ``sqlalchemy.Table``, or ``"schema.table"``.
        :param identifier: ``"after_insert"``, ``"after_update"``, ``"after_delete"``,
            ``"after_truncate"`` or a list of them.
        :param columns: for updates only: fire only when one of these changed.
        :param where: capture only the rows that match this SQLAlchemy
            expression, tested in the database (``Order.status == "paid"``);
            for updates, also a function of the old and new rows,
            ``lambda old, new: (old.status != "paid") & (new.status == "paid")``.
        :param broadcast: run in every listening process instead of once, at
            most once per process and only while it listens; never retried.
            For cache invalidation and pushing to connected clients.

        Example::

            @pgevents.listens_for(User, "after_update", columns=["email"])
            def email_changed(event):
                ...
        """

        def decorate(fn: F) -> F:
            self.listen(target, identifier, fn, columns=columns, broadcast=broadcast, where=where)
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
        where: Optional[Where] = None,
    ) -> None:
        """Register ``fn`` for row changes of ``target``; see :meth:`listens_for`."""
        self.registry.add(target, identifier, fn, columns=columns, broadcast=broadcast, where=where)
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

    def install_triggers(self, app: Optional[Flask] = None, *, prune: bool = False) -> InstallPlan:
        """Create the event schema and the triggers the handlers need; return the plan run.

        Idempotent: current triggers are kept and nothing is altered when
        nothing changed (``plan.changes == 0``). Outdated triggers are
        replaced. Triggers no handler needs are left unless ``prune``;
        triggers another app installed in the schema are always left. Each
        table's lock is awaited at most ``PGEVENTS_LOCK_TIMEOUT`` seconds,
        in up to 5 attempts, so that writers never queue behind the install.

        :param prune: also drop this app's triggers that no handler needs.
        :raises MissingTableError: naming every handler table that does not exist.
        :raises UnknownColumnError: if ``columns=`` names a column it lacks
            (checked here for string targets, which registration cannot check).
        :raises TriggerOwnershipError: if another app installed a trigger this
            app needs in the same schema.
        :raises InstallLockError: if a table stayed locked by another
            transaction; nothing was changed.
        """
        state = self._state(app)
        with state.connect() as store:
            state.triggers.check_tables(self.registry.needed_triggers(), store.table_columns)
            plans: list[InstallPlan] = []

            def plan() -> InstallPlan:
                plans.append(self._plan(state, store, prune=prune))
                return plans[-1]

            run_locked_ddl(state, store, plan)
        return plans[-1]

    def install_sql(self, app: Optional[Flask] = None, *, prune: bool = False) -> InstallPlan:
        """The plan :meth:`install_triggers` would run, without running it.

        Its ``statements`` carry no transaction control: run them in one
        transaction (a migration's, or ``psql --single-transaction``).
        """
        state = self._state(app)
        with state.connect() as store:
            store.begin()  # the filters are checked under a savepoint
            try:
                return self._plan(state, store, prune=prune)
            finally:
                store.rollback()

    def _plan(self, state: AppState, store: Store, *, prune: bool) -> InstallPlan:
        return state.install_plan(store, self.registry.needed_triggers(), prune=prune)

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
        role_state = store.role_state(role)
        return state.triggers.listener_grants_sql(
            role, role_exists=role_state.role_exists, schema_exists=store.schema_exists(),
            server_version=role_state.server_version, broadcast=self.registry.has_broadcast(),
        )

    def uninstall_triggers(self, app: Optional[Flask] = None, *, drop_schema: bool = False) -> int:
        """Drop this app's capture triggers; return how many there were (idempotent).

        Triggers another app installed in the same schema are left, unless
        ``drop_schema`` drops the schema with everything in it.

        :param drop_schema: also drop the event schema with every stored event.
            Without it, pending events stay and are handled after a reinstall.
        :raises InstallLockError: if a table stayed locked by another transaction.
        """
        state = self._state(app)
        with state.connect() as store:
            dropped: list[int] = []

            def plan() -> InstallPlan:
                installed = state.triggers.own(state.triggers.installed(store.installed_triggers()))
                dropped.append(len(installed))
                return state.triggers.uninstall_plan(installed, drop_schema=drop_schema)

            run_locked_ddl(state, store, plan)
        return dropped[-1]

    def uninstall_sql(self, app: Optional[Flask] = None, *, drop_schema: bool = False) -> list[str]:
        """The statements :meth:`uninstall_triggers` would run, without transaction control."""
        state = self._state(app)
        with state.connect() as store:
            installed = state.triggers.installed(store.installed_triggers())
            return list(state.triggers.uninstall_plan(installed, drop_schema=drop_schema).statements)

    def drop_schema_contents(self, app: Optional[Flask] = None) -> Optional[Backlog]:
        """The pending and failed events ``uninstall_triggers(drop_schema=True)`` would delete."""
        with self._state(app).connect() as store:
            return store.backlog()

    def schema_installed(self, app: Optional[Flask] = None) -> bool:
        """Whether the event schema is installed in the app's database."""
        with self._state(app).connect() as store:
            return store.schema_exists()

    def failed_events(self, app: Optional[Flask] = None, *, limit: int = 50) -> list[dict[str, Any]]:
        """Events kept as failed after their last attempt, with each handler's error."""
        with self._state(app).connect() as store:
            return [dataclasses.asdict(failed) for failed in store.failed_events(limit)]

    def retry_failed(self, app: Optional[Flask] = None, event_ids: Optional[Sequence[int]] = None) -> int:
        """Queue failed events again (all of them when ``event_ids`` is None)."""
        with self._state(app).connect() as store:
            return store.retry_failed(event_ids)

    def discard_failed(self, event_ids: Optional[Sequence[int]], app: Optional[Flask] = None) -> int:
        """Delete failed events for good (all of them when ``event_ids`` is None);
        return how many there were.

        Pending events are never deleted, so an id retried meanwhile is left alone.
        """
        with self._state(app).connect() as store:
            return store.discard_failed(event_ids)

    def dashboard_blueprint(
        self,
        authorize: Optional[Callable[[Request], bool]] = None,
        *,
        name: str = "pgevents_dashboard",
        url_prefix: Optional[str] = None,
    ) -> Blueprint:
        """A blueprint of the operator's dashboard: triggers, backlog, listeners, failed events.

        Nothing is served until you register it. ``authorize(request)`` is
        called before every view; a false result answers 403. Its forms post
        with a CSRF token kept in Flask's ``session``, so the app needs a
        ``SECRET_KEY``.

        :param authorize: required; who may see events and retry or discard them.
        :param name: the blueprint's name, for ``url_for(f"{name}.index")``.
        :param url_prefix: where it is served, unless ``register_blueprint`` says.
        :raises MissingAuthorizationError: without ``authorize``.

        Example::

            app.register_blueprint(
                pgevents.dashboard_blueprint(authorize=lambda request: current_user.is_admin),
                url_prefix="/admin/events",
            )
        """
        from .dashboard import create_blueprint  # only apps that serve the dashboard load it

        return create_blueprint(self, authorize, name=name, url_prefix=url_prefix)

    def trigger_status(self, app: Optional[Flask] = None) -> tuple[list[TriggerStatus], Optional[Backlog]]:
        """Triggers per table and operation, and the backlog of the event table."""
        state = self._state(app)
        with state.connect() as store:
            installed = state.triggers.installed(store.installed_triggers())
            return state.triggers.status(self.registry.needed_triggers(), installed), store.backlog()

    def stats(self, app: Optional[Flask] = None) -> Stats:
        """Triggers, backlog per table and operation, failed events, live listeners,
        and this process's counters: what ``flask pgevents status --json`` prints.

        It runs a few administration queries on a new connection; counting the
        backlog reads every pending event (about a second per million).

        :raises DisabledError: with ``PGEVENTS_ENABLED = False``.

        Example::

            stats = pgevents.stats()
            print(stats.pending, stats.oldest_pending_age, stats.failed)
            print(stats.process.handlers["myapp.handlers.welcome"].handled)
            json.dumps(stats.to_dict())
        """
        state = self._state(app)
        with state.connect() as store:
            return collect(state, store)

    def ready(
        self,
        app: Optional[Flask] = None,
        *,
        max_stall: Optional[float] = None,
        max_handler_seconds: Optional[float] = None,
    ) -> Readiness:
        """Whether this process's listener thread runs, is connected and is not
        wedged, and why not: for a readiness probe. Runs no query.

        :param max_stall: seconds without beginning a claim, while no handler
            runs, after which the listener counts as wedged; default
            ``max(30, 3 * PGEVENTS_POLL_INTERVAL)``.
        :param max_handler_seconds: a handler running longer counts as
            wedged; by default a long handler only makes it busy.

        Example::

            @app.get("/ready")
            def ready():
                ok, reason = pgevents.ready()
                return {"ready": ok, "reason": reason}, 200 if ok else 503
        """
        state = self._state(app)
        stall = default_max_stall(state.config.poll_interval) if max_stall is None else max_stall
        return state.listener.readiness(stall, max_handler_seconds)

    def start(self, app: Optional[Flask] = None) -> None:
        """Start this process's listener thread for the app (idempotent).

        Serving processes start it by themselves; call this in a process that
        only creates the app and should handle events too (a script, a worker).
        With ``PGEVENTS_ENABLED = False`` it logs that and starts nothing.
        """
        state = self._state(app)
        if not state.enabled:
            logger.info("flask-pgevents is disabled (PGEVENTS_ENABLED is False): no listener started.")
            return
        state.listener.start()

    def stop(self, timeout: Optional[float] = None, app: Optional[Flask] = None) -> bool:
        """Stop the listener thread after its handler in progress; True if it ended.

        A start still waiting for the app's first request is cancelled too.
        """
        state = self._state(app)
        lifecycle.cancel_autostart(state.app)
        return state.listener.stop(timeout)

    def suppressed(self, app: Optional[Flask] = None) -> ContextManager[None]:
        """A block whose writes through ``db.session`` are not captured.

        The setting lasts as long as the session's transaction, inside the
        block: changes still unflushed are flushed as the block starts (so
        they are captured) and as it ends (so they are not). Use it in a
        handler that writes to a table it listens to, and for backfills.
        Other clients run ``SET LOCAL pgevents.suppress = on`` instead.

        :raises ConfigurationError: if the app has no Flask-SQLAlchemy session.

        Example::

            with pgevents.suppressed():
                db.session.execute(sa.update(User).values(active=True))
            db.session.commit()
        """
        return suppression.suppressed(self._state(app))

    def context(self, **values: Any) -> ContextManager[Any]:
        """A block whose writes through ``db.session`` carry ``values`` in ``event.context``.

        The values join the request's (``endpoint``, ``request_id``) and those
        of enclosing blocks, and last as long as the block, for every
        transaction the session begins in it; changes still unflushed are
        flushed as the block starts and ends, like :meth:`suppressed`. Other
        clients run ``SET LOCAL pgevents.context = '{"actor": "cron"}'``.
        Values must be JSON-serializable (others are stored as ``str()``).

        :raises ConfigurationError: if the app has no Flask-SQLAlchemy session.

        Example::

            with pgevents.context(actor="cron", job="nightly-cleanup"):
                db.session.execute(sa.delete(User).where(User.active.is_(False)))
            db.session.commit()
        """
        return contexts.Context(self._state(), values)

    def context_provider(self, fn: F) -> F:
        """Decorate a function whose dict joins the context of every transaction
        begun while a request is served: the place for the user's id.

        Called once per transaction begun in a request, in it; an exception
        is logged and leaves its values out.

        Example::

            @pgevents.context_provider
            def who() -> dict[str, object]:
                return {"user_id": session.get("user_id")}
        """
        self.context_providers.append(fn)
        return fn

    def backfill(
        self,
        target: Union[Target, str],
        *,
        where: Optional[str] = None,
        handler: Union[Handler, str, None] = None,
        batch_size: int = backfills.DEFAULT_BATCH_SIZE,
        progress: Optional[Callable[[backfills.BackfillProgress], Any]] = None,
        app: Optional[Flask] = None,
    ) -> backfills.BackfillProgress:
        """Emit an ``insert`` event, with ``event.backfill`` true, for every row
        that exists in ``target``, so that its ``after_insert`` handlers process history.

        Runs in batches of ``batch_size`` rows, one transaction each, in
        primary-key order, while writes go on: rows changed meanwhile also get
        their normal events, and the backfill emits each row once. Interrupted,
        the same call (same target, handler and ``where``) resumes after the
        last batch. A finished backfill called again starts a new run.

        :param target: a mapped class, its name, a ``Table`` or ``"schema.table"``.
        :param where: a SQL condition on the table's columns, **put in the
            statement verbatim**: pass only trusted text, never user input.
        :param handler: the one handler (function, or its recorded name) the
            events are for; default: every ``after_insert`` handler of the table.
        :param progress: called with a :class:`~flask_pgevents.backfill.BackfillProgress`
            when the run starts and after each batch.
        :raises UnknownHandlerError: if the table has no ``after_insert``
            handler, or ``handler`` is not one of them.
        :raises MissingTableError: if the table, its primary key or the event
            schema is missing.

        Example::

            pgevents.backfill(User, where="created_at > now() - interval '30 days'", handler=welcome)
        """
        return backfills.backfill(
            self._state(app), target, where=where, handler=handler, batch_size=batch_size, progress=progress,
        )

    def process_pending(self, timeout: Optional[float] = None, app: Optional[Flask] = None) -> int:
        """Handle every committed event pending now in this thread; return how many.

        Example::

            db.session.add(User(email="a@example.com"))
            db.session.commit()
            assert pgevents.process_pending() == 1

        With ``PGEVENTS_ENABLED = False`` it opens nothing and returns 0.
        """
        return dispatch.process_pending(self._state(app), timeout)


#: Install and uninstall try this many times to take their tables' locks.
LOCK_ATTEMPTS = 5


def run_locked_ddl(state: AppState, store: Store, plan: Callable[[], InstallPlan]) -> None:
    """Plan and run DDL in one transaction, under the schema's install lock.

    Each table's lock is awaited at most ``PGEVENTS_LOCK_TIMEOUT``: a
    transaction holding one makes the install roll back (so that writers
    never queue behind it), back off and plan again, up to
    :data:`LOCK_ATTEMPTS` times. A plan without statements runs no DDL.

    :raises InstallLockError: naming the table and who holds it.
    """
    backoff = Backoff(0.5, 4.0)
    for attempt in range(1, LOCK_ATTEMPTS + 1):
        current: Optional[InstallPlan] = None
        store.begin()
        try:
            # Concurrent installs wait for each other here, without a timeout.
            store.run_ddl([state.triggers.lock_sql()])
            # Planning checks new where= filters on their tables: it waits no
            # longer than the DDL would.
            store.set_lock_timeout(state.config.lock_timeout)
            current = plan()
            if current.statements:
                store.run_ddl(current.statements)
        except LockTimeout as exc:
            store.rollback()
            table = exc.table or (current.tables[exc.index] if current is not None else None)
            name = qualified(table) if table is not None else store.event_table
            shown = str(table) if table is not None else f"{state.config.schema}.event"
            holders = store.lock_holders(name)
            if attempt == LOCK_ATTEMPTS:
                raise InstallLockError(
                    f"Could not lock table {shown!r} within {state.config.lock_timeout:g} s, in"
                    f" {LOCK_ATTEMPTS} attempts: {_describe(holders)}. Nothing was changed and the"
                    " installed triggers keep working. End that transaction, or raise"
                    " PGEVENTS_LOCK_TIMEOUT, and run the command again."
                ) from None
            delay = backoff.next_delay()
            logger.warning(
                "Table %s is locked, %s; trying again in %.1f s (attempt %s of %s).",
                shown, _describe(holders), delay, attempt, LOCK_ATTEMPTS,
            )
            time.sleep(delay)
            continue
        except BaseException:
            store.rollback()
            raise
        store.commit()
        return


def _describe(holders: list[LockHolder]) -> str:
    if not holders:
        return "another transaction holds it"
    described = []
    for holder in holders:
        parts = [f"pid {holder.pid}"]
        if holder.application_name:
            parts.append(f"application {holder.application_name!r}")
        if holder.state:
            age = f" for {holder.transaction_seconds:.0f} s" if holder.transaction_seconds is not None else ""
            parts.append(f"{holder.state}{age}")
        described.append(", ".join(parts))
    return "held by " + "; ".join(described)
