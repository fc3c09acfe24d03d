"""What flask-pgevents keeps for one app: ``app.extensions["pgevents"]``."""
from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any, Optional

import sqlalchemy as sa
from flask import Flask
from sqlalchemy.engine import URL, Dialect

from . import lifecycle
from .config import Config
from .connection import Connection, parse_database_url
from .errors import ConfigurationError, DisabledError
from .events import RowDecoder
from .listener import Listener
from .registry import Registry, TableKey, TriggerSet
from .sql import render
from .stats import Counters
from .store import Store
from .triggers import InstallPlan, TriggerManager

if TYPE_CHECKING:
    from .extension import PGEvents

logger = logging.getLogger("flask_pgevents")

DISABLED_MESSAGE = (
    "flask-pgevents is disabled on this app (PGEVENTS_ENABLED is False): it reads no"
    " database and handles no events. Set PGEVENTS_ENABLED to True, with a PostgreSQL"
    " database configured, to use it."
)


@dataclasses.dataclass(frozen=True)
class TableInfo:
    """What decoding needs to know of one table."""

    model: Optional[type]
    table: Optional[sa.Table]
    decoder: RowDecoder


class AppState:
    """Everything flask-pgevents keeps for one app.

    :param extension: the :class:`~flask_pgevents.PGEvents` that owns the handlers.
    :param db: the app's Flask-SQLAlchemy instance, or ``None``.
    """

    def __init__(self, extension: PGEvents, app: Flask, db: Any) -> None:
        self.extension = extension
        self.registry: Registry = extension.registry
        self._app_ref = weakref.ref(app)
        self.db: Any = db
        self.config = Config.from_mapping(app.config)
        #: ``PGEVENTS_ENABLED``: when False, no database URL is read nor opened.
        self.enabled = self.config.enabled
        self._url = database_url(app, db) if self.enabled else None
        self.triggers = TriggerManager(
            self.config.schema, self.config.capture_role, self.config.app_name or app.name
        )
        self._dialect = self._url.get_dialect()() if self._url is not None else None
        self._tables: dict[TableKey, TableInfo] = {}
        self._tables_lock = threading.Lock()
        #: Handled, failed and retried counts and handler times in this process.
        self.counters = Counters()
        self.listener = Listener(self)
        lifecycle.track(self.listener)

    @property
    def app(self) -> Flask:
        app = self._app_ref()
        if app is None:  # pragma: no cover - the app owns this state
            raise RuntimeError("The Flask app of this pgevents state no longer exists.")
        return app

    @property
    def url(self) -> URL:
        """The database captured and listened to.

        :raises DisabledError: with ``PGEVENTS_ENABLED = False``.
        """
        if self._url is None:
            raise DisabledError(DISABLED_MESSAGE)
        return self._url

    @property
    def dialect(self) -> Dialect:
        if self._dialect is None:
            raise DisabledError(DISABLED_MESSAGE)
        return self._dialect

    def connect(self) -> Store:
        """A store on a new connection, for administration (triggers, status, retries).

        Close it with ``store.conn.close()``, or use it in a ``with`` block.
        Connecting waits at most ``PGEVENTS_CONNECT_TIMEOUT``, and each
        statement at most ``PGEVENTS_STATEMENT_TIMEOUT``.

        :raises DatabaseUnavailableError: the server cannot be reached or does not answer.
        :raises DatabaseAccessError: the server refuses the login or the database.
        """
        config = self.config
        conn = Connection(
            self.url, application_name="pgevents-admin", keepalives=True,
            connect_timeout=config.connect_timeout, statement_timeout=config.statement_timeout,
        )
        return Store(conn, config.schema)

    def install_plan(self, store: Store, needed: TriggerSet, *, prune: bool = False) -> InstallPlan:
        """The plan that installs ``needed`` as the database stands, its new
        ``where=`` filters checked by PostgreSQL; warns about the capture
        functions' owner when the plan changes something.

        :raises InvalidFilterError: for a filter its capture function could not run.
        """
        triggers = self.triggers
        owner = triggers.capture_owner(store.capture_role_state(self.config.capture_role))
        installed = triggers.installed(store.installed_triggers())
        plan = triggers.plan(needed, installed, store.schema_objects(), owner, prune=prune)
        triggers.check_filters(needed, plan, store.filter_error)
        if plan.statements:
            for warning in owner.warnings:
                logger.warning("%s", warning)
        return plan

    def dispose_inherited_engines(self) -> None:
        """After a fork: drop the parent's pooled connections without closing them."""
        if _has_engines(self.app, self.db):
            with self.app.app_context():
                for engine in self.db.engines.values():
                    engine.dispose(close=False)

    def rollback_session(self) -> None:
        """Leave the Flask-SQLAlchemy session clean after a handler raised."""
        if self.db is not None:
            try:
                self.db.session.rollback()
            except Exception:
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
        cursor.execute(render("safe_search_path"))
    dbapi_connection.autocommit = autocommit


def _has_engines(app: Flask, db: Any) -> bool:
    """Whether ``db`` is the Flask-SQLAlchemy instance set up on ``app``."""
    return db is not None and app.extensions.get("sqlalchemy") is db


def _find_model(db: Any, key: TableKey) -> Optional[type]:
    registry = getattr(getattr(db, "Model", None), "registry", None)
    for mapper in getattr(registry, "mappers", ()):
        table = mapper.local_table
        if isinstance(table, sa.Table) and (table.schema or "public", table.name) == (key.schema, key.name):
            model: type = mapper.class_
            return model
    return None


def database_url(app: Flask, db: Any) -> URL:
    """The PostgreSQL database to capture and listen on, from the app's config.

    :raises ConfigurationError: when none is configured, or it is not PostgreSQL.
    """
    uri = app.config.get("PGEVENTS_DATABASE_URI")
    if uri:
        return parse_database_url(uri, "PGEVENTS_DATABASE_URI")
    if _has_engines(app, db):
        with app.app_context():
            engine = db.engines.get(None)
        if engine is not None:
            return parse_database_url(engine.url, "SQLALCHEMY_DATABASE_URI")
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
