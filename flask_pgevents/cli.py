"""The ``flask pgevents`` command group: thin wrappers over PGEvents methods.

Imports nothing from the extension: each command finds the app's state in
``current_app.extensions["pgevents"]``.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import os
import signal
import textwrap
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

import click
from flask import current_app
from flask.cli import with_appcontext

from .backfill import DEFAULT_BATCH_SIZE
from .connection import CONNECTION_ERRORS, as_sentence, classify, error_reason, sqlstate
from .errors import PGEventsError

if TYPE_CHECKING:
    from .state import AppState
    from .triggers import InstallPlan

F = TypeVar("F", bound=Callable[..., Any])


def _state() -> AppState:
    state: Optional[AppState] = current_app.extensions.get("pgevents")
    if state is None:
        raise click.ClickException(
            "flask-pgevents is not set up on this app. Call 'PGEvents(app)' or"
            " 'pgevents.init_app(app)' in your app factory."
        )
    if not state.enabled:
        raise click.ClickException(
            "flask-pgevents is disabled on this app (PGEVENTS_ENABLED is False). Set"
            " PGEVENTS_ENABLED to True, with a PostgreSQL database configured, to use"
            " 'flask pgevents'."
        )
    return state


def _database_errors(fn: F) -> F:
    """Report database failures as one-line errors naming the database, password hidden.

    Failures to connect come worded by the connection ("Could not connect
    to ...", "Authentication failed for ..."); this words what fails later.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PGEventsError as exc:
            raise click.ClickException(str(exc)) from None
        except Exception as exc:
            message = _database_failure(exc)
            if message is None:
                raise
            raise click.ClickException(message) from None

    return wrapper  # type: ignore[return-value]


def _database_failure(exc: Exception) -> Optional[str]:
    """The one-line message for a database failure in the middle of a command, if it is one."""
    state = _state()
    url = state.url.render_as_string(hide_password=True)
    reason = error_reason(exc)
    if sqlstate(exc) == "57014":  # query_canceled: the statement timeout, or an operator
        return (
            f"The database {url} canceled a statement: {reason}. PGEVENTS_STATEMENT_TIMEOUT"
            f" is {state.config.statement_timeout:g} s."
        )
    failure = classify(exc)
    if failure == "privilege":
        return (
            f"The role {state.url.username!r} may not do this on the database {url}: {reason}."
            " Run the command as the role that installed the triggers, or grant what is missing."
        )
    if failure is not None or isinstance(exc, CONNECTION_ERRORS):
        return f"Lost the connection to the database {url}: {as_sentence(reason)}"
    return None


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
@click.option("--prune", is_flag=True, help="Also drop this app's triggers that no handler needs.")
@with_appcontext
@_database_errors
def install_triggers(print_sql: bool, prune: bool) -> None:
    """Create the event schema and the needed triggers; print the plan."""
    state = _state()
    if print_sql:
        # No transaction control: paste it into a migration, or pipe it to
        # 'psql --single-transaction'.
        plan = state.extension.install_sql(current_app, prune=prune)
        for statement in plan.statements:
            click.echo(statement.strip())
        if not plan.statements:
            click.echo("-- 0 changes: the event schema and the triggers are up to date.")
        return
    plan = state.extension.install_triggers(current_app, prune=prune)
    _echo_plan(plan, state.config.schema)


def _echo_plan(plan: InstallPlan, schema: str) -> None:
    width = max((len(str(step.table)) for step in plan.steps if step.table is not None), default=0)
    for step in plan.steps:
        detail = f"  ({step.detail})" if step.detail else ""
        if step.table is None:
            click.echo(f"{step.action:<8} {step.kind} {schema!r}{detail}")
        else:
            click.echo(f"{step.action:<8} {step.table!s:<{width}}  {step.kind:<16}{detail}".rstrip())
    changes = plan.changes
    click.echo(f"{changes} change{'' if changes == 1 else 's'} in schema {schema!r}.")


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
@click.option("--yes", is_flag=True, help="Drop the schema without asking.")
@click.option("--sql", "print_sql", is_flag=True, help="Print the SQL instead of running it.")
@with_appcontext
@_database_errors
def uninstall_triggers(drop_schema: bool, yes: bool, print_sql: bool) -> None:
    """Drop this app's capture triggers (and, with --drop-schema, the stored events)."""
    state = _state()
    if print_sql:
        for statement in state.extension.uninstall_sql(current_app, drop_schema=drop_schema):
            click.echo(statement.strip())
        return
    if drop_schema and not yes:
        backlog = state.extension.drop_schema_contents(current_app)
        if backlog is not None:
            click.echo(
                f"Dropping schema {state.config.schema!r} deletes {backlog.pending} pending and"
                f" {backlog.failed} failed event(s), and the triggers of every app that shares it."
            )
            if not click.confirm("Drop it?", default=False):
                raise click.ClickException("Nothing was dropped.")
    removed = state.extension.uninstall_triggers(current_app, drop_schema=drop_schema)
    click.echo(f"{removed} trigger(s) removed.")
    if drop_schema:
        click.echo(f"Schema {state.config.schema!r} dropped.")


@pgevents_cli.command("status")
@click.option(
    "--json", "as_json", is_flag=True,
    help="Print pgevents.stats() as JSON, with listeners and counters.",
)
@with_appcontext
@_database_errors
def status(as_json: bool) -> None:
    """Show triggers per table and operation, the backlog and failed events.

    Exits with status 1 when a needed trigger is missing or outdated, or the
    event schema is not installed (with --json too).
    """
    state = _state()
    if as_json:
        stats = state.extension.stats(current_app)
        click.echo(json.dumps(stats.to_dict(), indent=2, default=str))
        if not stats.triggers_ok:
            raise SystemExit(1)
        return
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
@click.option("--traceback", "show_traceback", is_flag=True, help="Also show each traceback and the row.")
@with_appcontext
@_database_errors
def failed(limit: int, show_traceback: bool) -> None:
    """List events whose handlers failed on every attempt."""
    state = _state()
    if not state.extension.schema_installed(current_app):
        raise click.ClickException(
            f"The event schema {state.config.schema!r} is not installed in this database;"
            " run 'flask pgevents install-triggers'."
        )
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
            click.echo(f"  {handler}: {error.get('error', '')}")
            if show_traceback and error.get("traceback"):
                click.echo(textwrap.indent(error["traceback"].rstrip("\n"), "    "))
        if show_traceback:
            for side in ("old", "new"):
                if row[side] is not None:
                    click.echo(f"  {side}: {row[side]}")


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
    _fail_for_ids_not_failed(() if retry_all else event_ids, count)


@pgevents_cli.command("discard")
@click.option("--all", "discard_all", is_flag=True, help="Discard every failed event.")
@click.option("--yes", is_flag=True, help="Discard every failed event without asking.")
@click.argument("event_ids", nargs=-1, type=int)
@with_appcontext
@_database_errors
def discard(discard_all: bool, yes: bool, event_ids: tuple[int, ...]) -> None:
    """Delete failed events for good; pending events are never deleted."""
    if not discard_all and not event_ids:
        raise click.UsageError("Name the event ids to discard, or pass --all.")
    if discard_all and event_ids:
        raise click.UsageError("Pass either event ids or --all, not both.")
    state = _state()
    if discard_all and not yes:
        failed = state.extension.stats(current_app).failed
        if not click.confirm(f"Discard all {failed} failed event(s) for good?", default=False):
            raise click.ClickException("Nothing was discarded.")
    count = state.extension.discard_failed(None if discard_all else list(event_ids), current_app)
    click.echo(f"{count} event(s) discarded.")
    _fail_for_ids_not_failed(event_ids, count)


def _fail_for_ids_not_failed(event_ids: tuple[int, ...], count: int) -> None:
    """Exit 1 when fewer events than the ``event_ids`` given were failed ones."""
    unknown = len(set(event_ids)) - count if event_ids else 0
    if unknown > 0:
        raise click.ClickException(
            f"{unknown} of the given event ids name no failed event."
            " 'flask pgevents failed' lists the failed events."
        )


@pgevents_cli.command("backfill")
@click.argument("target", metavar="MODEL_OR_TABLE")
@click.option("--where", "where", metavar="SQL", help="Only the rows this SQL condition selects (trusted text).")
@click.option("--handler", metavar="NAME", help="Only for this after_insert handler (default: all of them).")
@click.option(
    "--batch-size", default=DEFAULT_BATCH_SIZE, show_default=True, type=click.IntRange(min=1),
    help="Rows per transaction.",
)
@with_appcontext
@_database_errors
def backfill(target: str, where: Optional[str], handler: Optional[str], batch_size: int) -> None:
    """Emit an insert event, marked as backfill, for every existing row of MODEL_OR_TABLE.

    Safe while writes go on; run it again after an interruption to resume.
    """
    state = _state()
    bars: list[Any] = []

    def progress(report: Any) -> None:
        if not bars:
            verb = "Resuming" if report.resumed else "Starting"
            click.echo(
                f"{verb} backfill {report.run} of {report.table}"
                f"{f' for {report.handler}' if report.handler else ''} ({report.emitted} rows emitted so far)."
            )
            bar = click.progressbar(length=max(report.estimate, report.emitted, 1), label="Backfilling")
            bar.__enter__()
            bar.update(report.emitted)
            bars.append(bar)
        bars[0].update(report.batch)

    try:
        result = state.extension.backfill(
            target, where=where, handler=handler, batch_size=batch_size, progress=progress, app=current_app,
        )
    finally:
        for bar in bars:
            bar.__exit__(None, None, None)
    click.echo(f"Backfill {result.run} of {result.table} done: {result.emitted} row(s) emitted.")


#: How often ``listen --ready-file`` asks the listener whether it is ready.
READY_FILE_INTERVAL = 2.0


class ReadyFile:
    """A file that exists, freshly written, while the listener is ready.

    For an exec probe of a process that serves no HTTP: the file holds
    :meth:`PGEvents.ready`'s reason, is rewritten every
    :data:`READY_FILE_INTERVAL` seconds (so its age also tells a frozen
    process), and is removed as soon as the listener is not ready, and on exit.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def update(self, ready: bool, reason: str) -> None:
        if not ready:
            self.remove()
            return
        partial = f"{self.path}.{os.getpid()}.tmp"
        with open(partial, "w", encoding="utf-8") as out:
            out.write(reason + "\n")
        os.replace(partial, self.path)  # a probe never reads half a file

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


@pgevents_cli.command("listen")
@click.option(
    "--ready-file", metavar="PATH", type=click.Path(dir_okay=False),
    help="Keep PATH written while the listener is ready, for a readiness probe; removed when it is not.",
)
@with_appcontext
def listen(ready_file: Optional[str]) -> None:
    """Run the listener in the foreground until SIGTERM or Ctrl-C.

    Exits with status 1 at once if the database refuses the role or does not
    exist, and if the listener does not stop within PGEVENTS_STOP_TIMEOUT.
    """
    state = _state()
    readiness = ReadyFile(ready_file) if ready_file else None
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("flask_pgevents").setLevel(logging.INFO)
    listener = state.listener
    if listener.running:  # PGEVENTS_AUTOSTART in a process that also serves
        listener.stop()

    def request_stop(signum: int, frame: Any) -> None:
        listener.request_stop()

    announced = False

    def announce() -> None:  # in the listener thread, before its first claim
        nonlocal announced
        if not announced:
            announced = True
            click.echo(
                f"Listening for events in schema {state.config.schema!r} on"
                f" {state.url.render_as_string(hide_password=True)}; SIGTERM or Ctrl-C stops."
            )

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # The loop runs in its thread, so that this one stays free to give
        # up on it: a query to a server that stopped answering cannot be
        # interrupted.
        listener.start(fail_fast=True, on_connect=announce)
        checked = 0.0
        while listener.running and not listener.stop_requested:
            listener.join(0.1)
            if readiness is not None and time.monotonic() - checked >= READY_FILE_INTERVAL:
                checked = time.monotonic()
                readiness.update(*state.extension.ready(current_app))
        if readiness is not None:
            readiness.remove()  # stopping: not ready any more
        ended_alone = not listener.stop_requested
        stopped = listener.stop(state.config.stop_timeout)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if readiness is not None:
            readiness.remove()
    if listener.failure is not None:
        raise click.ClickException(str(listener.failure))
    if not stopped:
        raise click.ClickException(
            f"The listener did not stop within {state.config.stop_timeout:.1f} s"
            " (PGEVENTS_STOP_TIMEOUT); exiting anyway. Events it had not settled are"
            " handled again by the next listener."
        )
    # Handlers may have used the app's engines: close their pooled
    # connections now rather than leave them to garbage collection.
    for engine in getattr(state.db, "engines", {}).values():
        engine.dispose()
    if ended_alone:  # pragma: no cover - the loop ends only when asked or on a failure
        raise click.ClickException("The listener ended unexpectedly; see the log above.")
    click.echo("Listener stopped.")
