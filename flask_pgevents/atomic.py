"""Handlers' ``db.session`` work, committed with the claim of their event.

While a batch's handlers run, the Flask-SQLAlchemy session of the app is
bound to the connection that claimed the batch, inside its transaction
(SQLAlchemy's "join an external transaction" recipe, with
``join_transaction_mode="create_savepoint"``). A handler's ``commit()``
releases a savepoint; the claim's ``COMMIT``, which also deletes the
handled events, makes it durable, or its ``ROLLBACK`` undoes it with the
claim. Each handler runs under a savepoint of its own, taken just before
its first statement, so that one that raises takes only its own writes
back. A handler that never touches the session costs no round trip.
"""
from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Optional

import sqlalchemy as sa
from sqlalchemy.pool import StaticPool

from .sql import render

if TYPE_CHECKING:
    from .connection import Connection
    from .state import AppState

logger = logging.getLogger("flask_pgevents")


def _same_database(a: sa.engine.URL, b: sa.engine.URL) -> bool:
    return (a.host, a.port, a.database, a.username) == (b.host, b.port, b.database, b.username)


class JoinedSession:
    """Binds the app's session to the claiming connection ``conn`` while handlers run.

    Made once per connection, outside any transaction (SQLAlchemy sets the
    connection up on first use), by :meth:`for_connection`.
    """

    def __init__(self, state: AppState, conn: Connection, engine: sa.engine.Engine) -> None:
        self.state = state
        self.conn = conn
        self.app_engine = engine
        raw = conn.raw
        # The claiming connection, as SQLAlchemy sees it: autocommit at the
        # driver (the claim's BEGIN and COMMIT are ours), never reset when
        # returned, never closed by SQLAlchemy.
        self.engine = sa.create_engine(
            state.url, creator=lambda: raw, poolclass=StaticPool, pool_reset_on_return=None,
            isolation_level="AUTOCOMMIT",
        )
        self.connection = self.engine.connect()
        sa.event.listen(self.connection, "before_cursor_execute", self._before_statement)
        self._session_class = _joined_session_class(state.db, engine, self.connection)
        self._outer: Optional[sa.engine.Transaction] = None
        self._session: Any = None
        self._in_handler = False
        self._savepoint = False
        self._app_search_path = False

    @classmethod
    def for_connection(cls, state: AppState, conn: Connection) -> Optional[JoinedSession]:
        """A joined session for ``conn``, or ``None`` when handlers' writes commit on their own.

        That is when ``PGEVENTS_ATOMIC_HANDLERS`` is off, the app has no
        Flask-SQLAlchemy, or its default engine is another database than the
        event table's.
        """
        db: Any = state.db
        if not state.config.atomic_handlers or state.app.extensions.get("sqlalchemy") is not db or not db:
            return None
        with state.app.app_context():
            engine = db.engines.get(None)
        if engine is None or not _same_database(engine.url, state.url):
            return None
        return cls(state, conn, engine)

    # A batch -------------------------------------------------------------------------------

    def begin(self) -> None:
        """In the claim's transaction, inside the app context: give ``db.session`` to the batch."""
        self._outer = self.connection.begin()  # no BEGIN is sent: the claim's is in effect
        options = dict(self.state.db.session.session_factory.kw)
        options.update(bind=self.connection, join_transaction_mode="create_savepoint")
        self._session = self._session_class(**options)
        self.state.db.session.registry.set(self._session)

    def before_handler(self) -> None:
        self._in_handler = True

    def after_handler(self, succeeded: bool) -> None:
        """Keep the handler's committed writes, or take back all of them; drop what it left uncommitted."""
        self._in_handler = False
        session = self._session
        try:
            # Only the work it did not commit; nothing to do (and no cost)
            # for a handler that left the session untouched.
            if session is not None and (self._savepoint or session.in_transaction() or session.new):
                session.rollback()
        finally:
            if self._savepoint:
                self._savepoint = False
                if not succeeded:
                    self.conn.execute(render("rollback_to_handler_savepoint"))
                self.conn.execute(render("release_handler_savepoint"))

    def before_settle(self) -> None:
        """Back to the safe search_path for the claim's own statements, and the next claims'.

        A session-level ``SET``, not ``SET LOCAL``: a handler that set the
        connection's own search_path (``SET search_path TO tenant, public``)
        and committed would otherwise leave it to every later claim, whose
        operators a role with ``CREATE`` on those schemas could then replace.
        """
        if self._app_search_path:
            self._app_search_path = False
            self.conn.execute(render("safe_search_path"))

    def end(self) -> None:
        """After the claim's COMMIT or ROLLBACK: nothing is left to send."""
        self._in_handler = self._savepoint = self._app_search_path = False
        self._session = None
        outer, self._outer = self._outer, None
        if outer is not None and outer.is_active:
            # The server's transaction has ended: the driver sends nothing,
            # unless the connection is broken, which the claim reports itself.
            with contextlib.suppress(Exception):
                outer.rollback()

    def close(self) -> None:
        self.connection.close()
        self.engine.dispose(close=False)

    # -----------------------------------------------------------------------------------

    def _before_statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # The handler's first statement: take its savepoint first, and give it
        # the app's search_path (the claim's is pinned to pg_catalog).
        if not self._in_handler or self._savepoint:
            return
        if not self._app_search_path:
            self._app_search_path = True
            self.conn.execute(render("default_search_path_local"))
        self._savepoint = True
        self.conn.execute(render("handler_savepoint"))


def _joined_session_class(db: Any, app_engine: sa.engine.Engine, connection: sa.engine.Connection) -> type:
    """The app's session class, sending what would go to ``app_engine`` to ``connection``.

    Flask-SQLAlchemy's session picks an engine by the models' bind keys and
    ignores ``bind=``: the default database's work must go to the claiming
    connection, other binds' to their engines.
    """
    base: type = db.session.session_factory.class_

    class JoinedFlaskSession(base):  # type: ignore[misc]
        def get_bind(self, *args: Any, **kwargs: Any) -> Any:
            bind = super().get_bind(*args, **kwargs)
            return connection if bind is app_engine else bind

    return JoinedFlaskSession
