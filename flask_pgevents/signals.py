"""Signals sent by flask-pgevents, with the app as sender (the Flask convention).

They use `blinker <https://blinker.readthedocs.io>`_, as Flask's own signals
do. Each is sent only when a receiver is connected: with none, sending costs
one check of an empty dict. Receivers run in the thread that handles the
event (the listener thread, or the caller of ``process_pending()``), while
the batch's transaction is open: keep them short. One that raises is logged
and changes nothing for the event.

Example::

    from flask_pgevents import event_gave_up

    @event_gave_up.connect_via(app)
    def page_someone(app, event_id, errors, **extra):
        alert(f"event {event_id} failed for good: {sorted(errors)}")
"""
from __future__ import annotations

import logging
from typing import Any

from blinker import NamedSignal, Namespace

logger = logging.getLogger("flask_pgevents")

_signals = Namespace()

#: Sent after every handler of a queued event succeeded, before its batch
#: commits. Keyword arguments: ``event`` (the :class:`~flask_pgevents.Event`).
event_handled = _signals.signal("event-handled")

#: Sent after a handler raised. Keyword arguments: ``event``, ``handler``
#: (its name), ``exception``, and ``will_retry``: whether the event will be
#: delivered again (``False`` on the last attempt and for broadcast handlers).
event_failed = _signals.signal("event-failed")

#: Sent when an event failed its last attempt and is kept as failed.
#: Keyword arguments: ``event_id``, ``attempt`` (attempts so far), ``errors``
#: (``{handler name: {"error": ..., "traceback": ...}}``) and ``event`` (the
#: :class:`~flask_pgevents.Event`, or ``None`` if the row could not be decoded
#: or its batch could not be settled).
event_gave_up = _signals.signal("event-gave-up")

#: Sent from the listener thread when it starts, before it connects.
listener_started = _signals.signal("listener-started")

#: Sent from the listener thread when it ends, after it closed its connection.
listener_stopped = _signals.signal("listener-stopped")

#: Sent when the listener's established connection fails (the server went
#: away, a network failure, a query error). Keyword argument: ``exception``.
#: The listener reconnects with backoff.
listener_connection_lost = _signals.signal("listener-connection-lost")

#: Sent when the listener connects after one or more failed attempts or a
#: lost connection. Keyword argument: ``failures`` (attempts that failed).
listener_reconnected = _signals.signal("listener-reconnected")



def send(signal: NamedSignal, app: Any, **kwargs: Any) -> None:
    """Send ``signal`` from ``app``; a receiver that raises is logged, not propagated.

    Callers check ``signal.receivers`` first, so that nothing is built when
    no one listens.
    """
    try:
        signal.send(app, **kwargs)
    except Exception:
        logger.exception("A receiver of the pgevents signal %r raised.", signal.name)


__all__ = [
    "event_failed",
    "event_gave_up",
    "event_handled",
    "listener_connection_lost",
    "listener_reconnected",
    "listener_started",
    "listener_stopped",
]
