"""The ``flask pgevents`` command group: thin wrappers over PGEvents methods.

Imports nothing from the extension: each command finds the app's state in
``current_app.extensions["pgevents"]``.
"""
from __future__ import annotations

import datetime
import functools
import logging
import signal
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

import click
from flask import current_app
from flask.cli import with_appcontext

from .connection import CONNECTION_ERRORS
from .errors import PGEventsError

if TYPE_CHECKING:
    from .state import AppState

F = TypeVar("F", bound=Callable[..., Any])


def _state() -> AppState:
    state: Optional[AppState] = current_app.extensions.get("pgevents")
    if state is None:
        raise click.ClickException(
            "flask-pgevents is not set up on this app. Call 'PGEvents(app)' or"
            " 'pgevents.init_app(app)' in your app factory."
        )
    return state


def _database_errors(fn: F) -> F:
    """Report an unreachable database as a one-line error naming it, password hidden."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CONNECTION_ERRORS as exc:
            url = _state().url.render_as_string(hide_password=True)
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise click.ClickException(f"Could not reach the database {url}: {reason}") from None
        except PGEventsError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper  # type: ignore[return-value]


def _age(delta: Optional[datetime.timedelta]) -> str:
    if delta is None:
        return "-"
    seconds = max(delta.total_seconds(), 0.0)
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@click.group("pgevents")
def pgevents_cli() -> None:
    """Install capture triggers and run the row-change event listener."""


@pgevents_cli.command("install-triggers")
@click.option("--sql", "print_sql", is_flag=True, help="Print the SQL instead of running it.")
@with_appcontext
@_database_errors
def install_triggers(print_sql: bool) -> None:
    """Create the event schema and the triggers the handlers need."""
    state = _state()
    if print_sql:
        # One transaction, as install-triggers runs it: safe to pipe into psql.
        statements = state.extension.install_sql(current_app)
        click.echo("BEGIN;")
        for statement in statements:
            click.echo(statement.strip())
        click.echo("COMMIT;")
        return
    state.extension.install_triggers(current_app)
    needed = state.registry.needed_triggers()
    for (table, op), columns in sorted(needed.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        watched = f" (columns: {', '.join(sorted(columns))})" if columns else ""
        click.echo(f"installed {op} trigger on {table}{watched}")
    click.echo(f"{len(needed)} trigger(s) installed in schema {state.config.schema!r}.")


@pgevents_cli.command("grant-listener")
@click.argument("role")
@click.option("--sql", "print_sql", is_flag=True, help="Print the SQL instead of running it.")
@with_appcontext
@_database_errors
def grant_listener(role: str, print_sql: bool) -> None:
    """Grant ROLE exactly what a process that only listens needs."""
    state = _state()
    if print_sql:
        for statement in state.extension.grant_listener_sql(role, current_app):
            click.echo(statement.strip())
        return
    state.extension.grant_listener(role, current_app)
    click.echo(f"Role {role!r} may now listen in schema {state.config.schema!r}, and do nothing more there.")


@pgevents_cli.command("uninstall-triggers")
@click.option("--drop-schema", is_flag=True, help="Also drop the event schema and every stored event.")
@with_appcontext
@_database_errors
def uninstall_triggers(drop_schema: bool) -> None:
    """Drop the capture triggers (and, with --drop-schema, the stored events)."""
    state = _state()
    removed = state.extension.uninstall_triggers(current_app, drop_schema=drop_schema)
    click.echo(f"{removed} trigger(s) removed.")
    if drop_schema:
        click.echo(f"Schema {state.config.schema!r} dropped.")


@pgevents_cli.command("status")
@with_appcontext
@_database_errors
def status() -> None:
    """Show triggers per table and operation, the backlog and failed events.

    Exits with status 1 when a needed trigger is missing or outdated.
    """
    state = _state()
    report, backlog = state.extension.trigger_status(current_app)
    click.echo(f"Database: {state.url.render_as_string(hide_password=True)}")
    click.echo(f"Schema: {state.config.schema}")
    click.echo("Triggers:")
    if not report:
        click.echo("  (no handlers registered)")
    width = max((len(str(t.table)) for t in report), default=0)
    for trig in report:
        click.echo(f"  {trig.table!s:<{width}}  {trig.kind:<6}  {trig.state}")
    if backlog is None:
        click.echo("Backlog: event table missing; run 'flask pgevents install-triggers'.")
    else:
        click.echo(f"Backlog: {backlog.pending} pending, oldest {_age(backlog.oldest_pending_age)}")
        click.echo(f"Failed: {backlog.failed}")
    if backlog is None or any(t.state in ("missing", "outdated") for t in report):
        raise SystemExit(1)


@pgevents_cli.command("failed")
@click.option("--limit", default=50, show_default=True, help="Show at most this many.")
@with_appcontext
@_database_errors
def failed(limit: int) -> None:
    """List events whose handlers failed on every attempt."""
    state = _state()
    rows = state.extension.failed_events(current_app, limit=limit)
    if not rows:
        click.echo("No failed events.")
        return
    for row in rows:
        click.echo(
            f"event {row['id']}: {row['op']} on {row['table']}, {row['attempt']} attempt(s),"
            f" at {row['timestamp'].isoformat()}"
        )
        for handler, error in sorted(row["errors"].items()):
            click.echo(f"  {handler}: {error['error']}")


@pgevents_cli.command("retry")
@click.option("--all", "retry_all", is_flag=True, help="Retry every failed event.")
@click.argument("event_ids", nargs=-1, type=int)
@with_appcontext
@_database_errors
def retry(retry_all: bool, event_ids: tuple[int, ...]) -> None:
    """Queue failed events again; handlers that succeeded are not run again."""
    if not retry_all and not event_ids:
        raise click.UsageError("Name the event ids to retry, or pass --all.")
    state = _state()
    count = state.extension.retry_failed(current_app, None if retry_all else list(event_ids))
    click.echo(f"{count} event(s) queued again.")
    unknown = 0 if retry_all else len(set(event_ids)) - count
    if unknown > 0:
        raise click.ClickException(
            f"{unknown} of the given event ids name no failed event."
            " 'flask pgevents failed' lists the failed events."
        )


@pgevents_cli.command("listen")
@with_appcontext
def listen() -> None:
    """Run the listener in the foreground until SIGTERM or Ctrl-C."""
    state = _state()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("flask_pgevents").setLevel(logging.INFO)
    listener = state.listener
    if listener.running:  # PGEVENTS_AUTOSTART in a process that also serves
        listener.stop()

    def request_stop(signum: int, frame: Any) -> None:
        listener.request_stop()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    click.echo(
        f"Listening for events in schema {state.config.schema!r} on"
        f" {state.url.render_as_string(hide_password=True)}; SIGTERM or Ctrl-C stops."
    )
    try:
        listener.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # Handlers may have used the app's engines: close their pooled
        # connections now rather than leave them to garbage collection.
        for engine in getattr(state.db, "engines", {}).values():
            engine.dispose()
    click.echo("Listener stopped.")
