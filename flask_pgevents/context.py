"""``event.context``: who made a change, said by the writing transaction.

The capture functions store the transaction-local setting
``pgevents.context`` (JSON text) with every event the transaction writes,
read once per statement. Through Flask-SQLAlchemy's session it is set at
each transaction the session begins (``after_begin``), from:

- the Flask request being served, unless ``PGEVENTS_REQUEST_CONTEXT`` is
  ``False``: its ``endpoint``, its ``request_id`` (the ``X-Request-ID``
  header, or one made for the request) and what the app's
  :meth:`~flask_pgevents.PGEvents.context_provider` functions return;
- the open ``with pgevents.context(**values):`` blocks, innermost last.

A transaction begun with none of them sets nothing: no statement, no byte
per row. Other clients run ``SET LOCAL pgevents.context = '{...}'``.
"""
from __future__ import annotations

import json
import logging
import uuid
import weakref
from typing import TYPE_CHECKING, Any, Optional

import sqlalchemy as sa
from flask import current_app, has_app_context, has_request_context, request

from .errors import ConfigurationError
from .sql import quote_literal, render
from .triggers import CONTEXT_SETTING

if TYPE_CHECKING:
    from .state import AppState

logger = logging.getLogger("flask_pgevents")

#: ``session.info`` key: the values of the session's open context() blocks, outermost first.
_BLOCKS = "pgevents_context"

#: The request header whose value becomes ``request_id``, when present.
REQUEST_ID_HEADER = "X-Request-ID"

#: Session classes whose ``after_begin`` is watched (once per class, for every app).
_watched: weakref.WeakSet[type] = weakref.WeakSet()


def set_context(values: Optional[dict[str, Any]]) -> sa.TextClause:
    """The statement that sets the context for the rest of the transaction (``None``: unset)."""
    text = json.dumps(values, default=str, separators=(",", ":")) if values else ""
    return sa.text(render("set_context", setting=quote_literal(CONTEXT_SETTING))).bindparams(value=text)


def _session_class(db: Any) -> Optional[type]:
    """The class of ``db.session``'s sessions: its sessionmaker's own subclass, one per ``db``."""
    return getattr(getattr(getattr(db, "session", None), "session_factory", None), "class_", None)


def watch_sessions(db: Any) -> None:
    """Set the context at every transaction a session of ``db``'s kind begins."""
    session_class = _session_class(db)
    if session_class is None or session_class in _watched:
        return
    sa.event.listen(session_class, "after_begin", _after_begin)
    _watched.add(session_class)


def _after_begin(session: Any, transaction: Any, connection: sa.Connection) -> None:
    # Every app's sessions share the class: find this session's app, if any.
    if not has_app_context():
        return
    state: Optional[AppState] = current_app.extensions.get("pgevents")
    if state is None or not state.enabled:
        return
    session_class = _session_class(state.db)
    if session_class is None or not isinstance(session, session_class):
        return
    values = current_values(state, session)
    if values:
        connection.execute(set_context(values))


def current_values(state: AppState, session: Any) -> dict[str, Any]:
    """The context a transaction the session begins now gets; empty for none."""
    values: dict[str, Any] = {}
    if state.config.request_context and has_request_context():
        values.update(request_values(state))
    for block in session.info.get(_BLOCKS, ()):
        values.update(block)
    return values


def request_values(state: AppState) -> dict[str, Any]:
    """``endpoint``, ``request_id`` and the app's context providers' values."""
    # One id per request, kept in its environ (g may outlive the request).
    request_id = request.headers.get(REQUEST_ID_HEADER) or request.environ.setdefault(
        "pgevents.request_id", uuid.uuid4().hex
    )
    values: dict[str, Any] = {"endpoint": request.endpoint, "request_id": request_id}
    for provider in state.extension.context_providers:
        try:
            values.update(provider() or {})
        except Exception:
            # Capture never makes the application's write fail.
            logger.exception("The context provider %r failed; the change is stored without its values.", provider)
    trace = trace_values()
    if trace:
        values.update(trace)
    return values


def trace_values() -> Optional[dict[str, str]]:
    """The active span's ``traceparent``, when OpenTelemetry is installed (else ``None``)."""
    from . import tracing

    return tracing.current_traceparent()


class Context:
    """Adds ``values`` to the context of the session's work while it is entered."""

    def __init__(self, state: AppState, values: dict[str, Any]) -> None:
        self.state = state
        self.values = values
        self.session: Any = None

    def __enter__(self) -> Context:
        state = self.state
        if not state.enabled:
            return self
        if state.db is None:
            raise ConfigurationError(
                "'pgevents.context()' sets the context of Flask-SQLAlchemy's session, and this app"
                f" has none. In other clients, run \"SET LOCAL {CONTEXT_SETTING} = '{{...}}'\" (a JSON"
                " object) in the transaction whose writes it describes."
            )
        session = self.session = state.db.session()
        session.flush()  # what was changed before the block keeps the context it had
        session.info.setdefault(_BLOCKS, []).append(self.values)
        try:
            self._apply()
        except BaseException:
            self._pop()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.session is None:
            return
        quietly = exc_type is not None
        try:
            self.session.flush()  # what the block changed is written with its context
        except sa.exc.SQLAlchemyError:
            if not quietly:
                self._pop()
                raise
        self._pop()
        try:
            self._apply()
        except sa.exc.SQLAlchemyError:
            if not quietly:
                raise
            # The block's error left the transaction failed: its rollback resets.

    def _apply(self) -> None:
        """Set the context of the transaction in progress, if any; a new one gets it at begin."""
        if self.session.in_transaction():
            values = current_values(self.state, self.session)
            self.session.connection().execute(set_context(values or None))
        # Otherwise no transaction is open: after_begin sets it on the next one.

    def _pop(self) -> None:
        blocks = self.session.info.get(_BLOCKS, [])
        if blocks and blocks[-1] is self.values:
            blocks.pop()
        if not blocks:
            self.session.info.pop(_BLOCKS, None)

