"""Which processes run a listener, and what forks and interpreter exit do to it.

A process that serves the app runs a listener; one that only creates it (a
script, a Celery or RQ worker, a notebook, ``flask shell``) runs none unless
asked (``PGEVENTS_AUTOSTART = "always"`` or ``pgevents.start()``). ``flask
run`` and the servers known by the modules they load start it as the app is
set up; any other WSGI server starts it on the app's first request.

Pre-fork servers (gunicorn, uWSGI with preload) load the app, then fork
workers. The listener is stopped before a fork, so no thread or connection
crosses it, and each child starts its own. A parent that has never served a
request is a pre-fork master: it keeps its listener parked, so that workers
it forks later get one too, and handles no events itself.
"""
from __future__ import annotations

import atexit
import os
import sys
import weakref
from typing import TYPE_CHECKING, Any, Literal

from flask import Flask, request_started

if TYPE_CHECKING:
    from .config import Config
    from .listener import Listener

#: Every listener of this process.
_listeners: weakref.WeakSet[Listener] = weakref.WeakSet()
_served_requests = False
#: Listeners to start when their app serves its first request; empty after it.
_start_on_first_request: weakref.WeakKeyDictionary[Flask, Listener] = weakref.WeakKeyDictionary()

#: Modules loaded only in a process that serves: gunicorn's arbiter (master and
#: workers), uWSGI's and mod_wsgi's embedded modules, waitress-serve's runner.
SERVER_MODULES = ("gunicorn.arbiter", "uwsgi", "mod_wsgi", "waitress.runner")

#: When a process starts its listener by itself: as the app is set up, on
#: the app's first request, or never.
When = Literal["now", "first request", "never"]
NOW: When = "now"
FIRST_REQUEST: When = "first request"
NEVER: When = "never"


def track(listener: Listener) -> None:
    """Let the fork and exit hooks stop, park and restart ``listener``."""
    _listeners.add(listener)


def autostart(app: Flask, listener: Listener) -> None:
    """Start ``listener`` now, or on the app's first request, if this process serves the app."""
    when = when_to_start(app, listener.state.config)
    if when == NOW:
        listener.start()
    elif when == FIRST_REQUEST:
        _start_on_first_request[app] = listener


def cancel_autostart(app: Flask) -> None:
    """Forget a start still waiting for the app's first request."""
    _start_on_first_request.pop(app, None)


def when_to_start(app: Flask, config: Config) -> When:
    """:data:`NOW`, :data:`FIRST_REQUEST` or :data:`NEVER`: when this process should
    start the app's listener thread by itself."""
    if not config.enabled or not config.autostart or app.testing:
        return NEVER
    if config.autostart == "always":
        return NOW
    import click

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        if any(name in sys.modules for name in SERVER_MODULES):
            return NOW  # idle workers listen too
        # Another WSGI server, or a process that only creates the app: a
        # script, a Celery or RQ worker, a notebook. Only a server serves.
        return FIRST_REQUEST
    return NOW if serves_in_flask_run(ctx) else NEVER


def serves_in_flask_run(ctx: Any) -> bool:
    """Whether the click command running is ``flask run`` in its serving process."""
    from flask.cli import run_command

    if ctx.command is not run_command:
        return False  # flask shell, flask db upgrade, flask pgevents ...
    reload = ctx.params.get("reload")
    if reload is None:
        from flask.helpers import get_debug_flag

        reload = get_debug_flag()
    # With the reloader, the first process only watches files: its child serves.
    return not reload or os.environ.get("WERKZEUG_RUN_MAIN") == "true"


def _note_request(sender: Any, **extra: Any) -> None:
    global _served_requests
    _served_requests = True
    if _start_on_first_request:  # one check per request once every app has started
        listener = _start_on_first_request.pop(sender, None)
        if listener is not None:
            listener.start()


def _forking_listeners() -> list[Listener]:
    # A handler that forks runs on the listener thread: leave that listener be.
    return [listener for listener in list(_listeners) if not listener.on_current_thread()]


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
    for listener in list(_listeners):
        if listener.running:
            listener.stop()


request_started.connect(_note_request)
atexit.register(_stop_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
