"""Which processes run a listener, and what forks and interpreter exit do to it.

Pre-fork servers (gunicorn, uWSGI with preload) load the app, then fork
workers. The listener is stopped before a fork, so no thread or connection
crosses it, and each child starts its own. A parent that has never served a
request is a pre-fork master: it keeps its listener parked, so that workers
it forks later get one too, and handles no events itself.
"""
from __future__ import annotations

import atexit
import os
import weakref
from typing import TYPE_CHECKING, Any

from flask import Flask, request_started

if TYPE_CHECKING:
    from .config import Config
    from .listener import Listener

#: Every listener of this process.
_listeners: weakref.WeakSet[Listener] = weakref.WeakSet()
_served_requests = False


def track(listener: Listener) -> None:
    """Let the fork and exit hooks stop, park and restart ``listener``."""
    _listeners.add(listener)


def should_autostart(app: Flask, config: Config) -> bool:
    """Whether this process serves the app and so should run a listener thread."""
    if not config.autostart or app.testing:
        return False
    import click
    from flask.cli import run_command

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return True  # a WSGI server or a plain script
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
