"""``pgevents.suppressed()``: writes through the session that are not captured.

The capture functions skip a transaction's writes while the setting
``pgevents.suppress`` is on in it (``set_config(..., true)``, the function
form of ``SET LOCAL``): it ends with the transaction, and the block turns it
off again as it ends. The block sets it on the session's connection when
it starts, and on every connection the session begins while it is open: a
commit inside the block, or a write through another bind, stays suppressed.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator

import sqlalchemy as sa

from .errors import ConfigurationError
from .sql import quote_literal, render
from .triggers import SUPPRESS_SETTING

if TYPE_CHECKING:
    from .state import AppState

#: ``session.info`` key: how many suppressed() blocks are open on the session.
_DEPTH = "pgevents_suppressed"


def set_suppress(on: bool) -> sa.TextClause:
    """The statement that turns capture off (``on=True``) or on again for the transaction."""
    value = quote_literal("on" if on else "off")
    return sa.text(render("set_suppress", setting=quote_literal(SUPPRESS_SETTING), value=value))


@contextlib.contextmanager
def suppressed(state: AppState) -> Iterator[None]:
    """Don't capture the writes made through the app's ``db.session`` in the block."""
    if not state.enabled:
        yield
        return
    if state.db is None:
        raise ConfigurationError(
            "'pgevents.suppressed()' writes through Flask-SQLAlchemy's session, and this app"
            f" has none. In other clients, run \"SET LOCAL {SUPPRESS_SETTING} = on\" in the"
            " transaction whose writes should not be captured."
        )
    session = state.db.session()
    depth = session.info.get(_DEPTH, 0)
    if depth:  # the outermost block sets and resets
        session.info[_DEPTH] = depth + 1
        try:
            yield
        finally:
            session.info[_DEPTH] = depth
        return
    with Suppression(session):
        yield


class Suppression:
    """Capture turned off on each connection the session uses while it is entered."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.connections: list[sa.Connection] = []

    def __enter__(self) -> Suppression:
        self.session.flush()  # what was changed before the block is captured
        self.session.info[_DEPTH] = 1
        sa.event.listen(self.session, "after_begin", self._after_begin)
        try:
            connection = self.session.connection()
            if not any(known is connection for known in self.connections):
                self._suppress(connection)
        except BaseException:
            self._end(quietly=True)
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        quietly = exc_type is not None
        try:
            self.session.flush()  # what the block changed is written while capture is off
        except sa.exc.SQLAlchemyError:
            if not quietly:
                self._end(quietly=True)
                raise
            # The block's own error stands; the session awaits its rollback.
        self._end(quietly)

    def _after_begin(self, session: Any, transaction: Any, connection: sa.Connection) -> None:
        self._suppress(connection)

    def _suppress(self, connection: sa.Connection) -> None:
        connection.execute(set_suppress(True))
        self.connections.append(connection)

    def _end(self, quietly: bool) -> None:
        self.session.info.pop(_DEPTH, None)
        sa.event.remove(self.session, "after_begin", self._after_begin)
        # Later writes of the same transactions are captured again. Connections
        # whose transaction ended (a commit in the block) lost the setting already.
        for connection in self.connections:
            if connection.closed or not connection.in_transaction():
                continue
            try:
                connection.execute(set_suppress(False))
            except sa.exc.SQLAlchemyError:
                if not quietly:
                    raise
                # The block's error left the transaction failed: its rollback resets.
