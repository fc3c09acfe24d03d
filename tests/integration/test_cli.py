"""The ``flask pgevents`` commands: output, exit codes and what they do to the database.

Administration commands run in-process through ``app.test_cli_runner()``;
``flask pgevents listen`` runs as a real subprocess and is stopped by signals.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg
import pytest
from conftest import thing_app, wait_until, wait_while_running
from psycopg import sql
from sqlalchemy.engine import make_url

from flask_pgevents.cli import pgevents_cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "gunicorn_app.py"
SECRET = "Pw0rdNotForOutput7c1e"
_roles = itertools.count()


# Helpers ---------------------------------------------------------------------


def invoke(app: Any, *args: str, input: str | None = None) -> Any:
    """Run ``flask pgevents ARGS`` against ``app`` in this process, ``input`` on stdin."""
    return app.test_cli_runner().invoke(pgevents_cli, list(args), input=input)


def ignore(event: Any) -> None:
    """A handler that does nothing."""


def also_ignore(event: Any) -> None:
    """Another handler that does nothing."""




def triggers_on(conn: psycopg.Connection, table: str) -> list[str]:
    rows = conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND NOT tgisinternal"
        " ORDER BY tgname",
        (table,),
    ).fetchall()
    return [name for (name,) in rows]


def schema_exists(conn: psycopg.Connection, schema: str = "pgevents") -> bool:
    return conn.execute("SELECT to_regnamespace(%s) IS NOT NULL", (schema,)).fetchone()[0]


def trigger_states(output: str) -> dict[tuple[str, str], str]:
    """``status`` lines ``  public.thing  insert  installed`` as a dict."""
    states = {}
    for line in output.splitlines():
        match = re.fullmatch(r"  (\S+)\s+(insert|update|delete)\s+(\w+)", line)
        if match:
            states[(match[1], match[2])] = match[3]
    return states


def drain(app: Any, pgevents: Any) -> int:
    with app.app_context():
        return pgevents.process_pending(timeout=30)


@pytest.fixture
def password_url(server_url: str, libpq_url: str, database_url: str) -> Iterator[str]:
    """The test database as a role with a password (the server trusts any password)."""
    role = f"pgevents_cli_{os.getpid()}_{next(_roles)}"
    database = make_url(libpq_url).database
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(SECRET)))
        conn.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
            sql.Identifier(database), sql.Identifier(role)))
    with psycopg.connect(libpq_url, autocommit=True) as conn:
        conn.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(role)))
    yield make_url(database_url).set(username=role, password=SECRET).render_as_string(hide_password=False)
    with psycopg.connect(libpq_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


# install-triggers / uninstall-triggers --------------------------------------


def test_install_triggers_prints_its_plan_and_a_rerun_changes_nothing(make_app, other_service):
    app, _db, pgevents, Thing = thing_app(make_app)
    pgevents.listen(Thing, "after_insert", ignore)
    pgevents.listen(Thing, "after_update", ignore, columns=["name"])

    result = invoke(app, "install-triggers")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1:] == [
        "create   public.thing  insert",
        "create   public.thing  update            (columns: name)",
        "3 changes in schema 'pgevents'.",
    ]
    assert result.output.startswith("create   event schema 'pgevents'")
    assert triggers_on(other_service, "public.thing") == ["pgevents_insert", "pgevents_update"]
    trigger_oids = other_service.execute(
        "SELECT array_agg(oid ORDER BY oid) FROM pg_trigger WHERE tgrelid = 'thing'::regclass"
    ).fetchone()

    # Nothing to change: no DDL at all, so the triggers are the very same objects.
    result = invoke(app, "install-triggers")
    assert (result.exit_code, result.output.splitlines()) == (0, [
        "keep     public.thing  insert",
        "keep     public.thing  update            (columns: name)",
        "0 changes in schema 'pgevents'.",
    ])
    assert other_service.execute(
        "SELECT array_agg(oid ORDER BY oid) FROM pg_trigger WHERE tgrelid = 'thing'::regclass"
    ).fetchone() == trigger_oids
    result = invoke(app, "install-triggers", "--sql")
    assert result.output == "-- 0 changes: the event schema and the triggers are up to date.\n"

    other_service.execute("INSERT INTO thing (name) VALUES ('a')")
    assert drain(app, pgevents) == 1


def test_install_triggers_leaves_unneeded_triggers_unless_pruned(make_app, other_service):
    app, _db, pgevents, Thing = thing_app(make_app)
    pgevents.listen(Thing, ["after_insert", "after_delete"], ignore)
    assert invoke(app, "install-triggers").exit_code == 0
    pgevents.remove(Thing, "after_delete", ignore)

    result = invoke(app, "install-triggers")
    assert (result.exit_code, result.output.splitlines()) == (0, [
        "leave    public.thing  delete            (no handler needs it; --prune drops it)",
        "keep     public.thing  insert",
        "0 changes in schema 'pgevents'.",
    ])
    assert triggers_on(other_service, "public.thing") == ["pgevents_delete", "pgevents_insert"]
    result = invoke(app, "install-triggers", "--prune")
    assert (result.exit_code, result.output.splitlines()) == (0, [
        "drop     public.thing  delete            (no handler needs it)",
        "keep     public.thing  insert",
        "1 change in schema 'pgevents'.",
    ])
    assert triggers_on(other_service, "public.thing") == ["pgevents_insert"]


def test_install_triggers_sql_prints_the_sql_and_runs_nothing(make_app, other_service):
    app, _db, pgevents, Thing = thing_app(make_app)
    pgevents.listen(Thing, ["after_insert", "after_delete"], ignore)

    result = invoke(app, "install-triggers", "--sql")
    assert result.exit_code == 0, result.output
    # No transaction control: it goes into a migration's transaction.
    assert not re.search(r"^\s*(BEGIN|COMMIT|START TRANSACTION)\s*;", result.output, re.MULTILINE | re.IGNORECASE)
    assert 'CREATE TRIGGER "pgevents_insert" AFTER INSERT ON "public"."thing"' in result.output
    assert 'CREATE TRIGGER "pgevents_delete" AFTER DELETE ON "public"."thing"' in result.output
    assert not schema_exists(other_service)
    assert triggers_on(other_service, "public.thing") == []
    assert invoke(app, "status").exit_code == 1

    # What it printed is the whole installation, run inside the caller's transaction.
    with other_service.transaction():
        other_service.execute(result.output)
    status = invoke(app, "status")
    assert status.exit_code == 0, status.output
    assert trigger_states(status.output) == {
        ("public.thing", "delete"): "installed",
        ("public.thing", "insert"): "installed",
    }

    # And its reverse: what uninstall-triggers --sql prints, rolled back with a failing migration.
    reverse = invoke(app, "uninstall-triggers", "--sql")
    assert reverse.output.splitlines() == [
        'DROP TRIGGER IF EXISTS "pgevents_delete" ON "public"."thing";',
        'DROP TRIGGER IF EXISTS "pgevents_insert" ON "public"."thing";',
    ]
    with pytest.raises(psycopg.errors.DivisionByZero), other_service.transaction():
        other_service.execute(reverse.output)
        other_service.execute("SELECT 1 / 0")
    assert triggers_on(other_service, "public.thing") == ["pgevents_delete", "pgevents_insert"]


def test_uninstall_triggers_keeps_pending_events_unless_the_schema_is_dropped(make_app, other_service):
    app, _db, pgevents, Thing = thing_app(make_app)
    pgevents.listen(Thing, ["after_insert", "after_update"], ignore)
    assert invoke(app, "install-triggers").exit_code == 0
    other_service.execute("INSERT INTO thing (name) VALUES ('a')")

    result = invoke(app, "uninstall-triggers")
    assert (result.exit_code, result.output) == (0, "2 trigger(s) removed.\n")
    assert triggers_on(other_service, "public.thing") == []
    status = invoke(app, "status")
    assert status.exit_code == 1
    assert "Backlog: 1 pending" in status.output
    other_service.execute("INSERT INTO thing (name) VALUES ('not captured')")

    result = invoke(app, "uninstall-triggers")
    assert (result.exit_code, result.output) == (0, "0 trigger(s) removed.\n")
    assert drain(app, pgevents) == 1  # the event from before, and only that one

    assert invoke(app, "install-triggers").exit_code == 0
    other_service.execute("INSERT INTO thing (name) VALUES ('b')")
    # Dropping the schema asks first, saying what it deletes; no is no.
    result = invoke(app, "uninstall-triggers", "--drop-schema", input="n\n")
    assert (result.exit_code, result.output) == (1, (
        "Dropping schema 'pgevents' deletes 1 pending and 0 failed event(s), and the triggers"
        " of every app that shares it.\nDrop it? [y/N]: n\nError: Nothing was dropped.\n"
    ))
    assert schema_exists(other_service)
    assert triggers_on(other_service, "public.thing") == ["pgevents_insert", "pgevents_update"]
    result = invoke(app, "uninstall-triggers", "--drop-schema", input="y\n")
    assert result.exit_code == 0, result.output
    assert result.output.endswith("Drop it? [y/N]: y\n2 trigger(s) removed.\nSchema 'pgevents' dropped.\n")
    assert not schema_exists(other_service)
    assert triggers_on(other_service, "public.thing") == []

    assert invoke(app, "install-triggers").exit_code == 0
    result = invoke(app, "uninstall-triggers", "--drop-schema", "--yes")
    assert (result.exit_code, result.output) == (0, "2 trigger(s) removed.\nSchema 'pgevents' dropped.\n")
    assert not schema_exists(other_service)


# status ----------------------------------------------------------------------


def test_status_reports_each_table_and_operation_and_exits_1_when_missing(make_app, other_service):
    app, _db, pgevents, Thing = thing_app(make_app)
    result = invoke(app, "status")
    assert result.exit_code == 1
    assert "Backlog: event table missing; run 'flask pgevents install-triggers'." in result.output

    pgevents.listen(Thing, "after_insert", ignore)
    pgevents.listen(Thing, "after_update", ignore, columns=["name"])
    assert invoke(app, "install-triggers").exit_code == 0
    result = invoke(app, "status")
    assert result.exit_code == 0, result.output
    assert trigger_states(result.output) == {
        ("public.thing", "insert"): "installed",
        ("public.thing", "update"): "installed",
    }
    assert "Backlog: 0 pending, oldest -" in result.output
    assert "Failed: 0" in result.output

    # An update handler for every column makes the column-filtered trigger outdated;
    # a delete handler and a table without triggers are missing.
    other_service.execute("CREATE TABLE audit (id int)")
    pgevents.listen(Thing, "after_update", also_ignore)
    pgevents.listen(Thing, "after_delete", ignore)
    pgevents.listen("audit", "after_insert", ignore)
    result = invoke(app, "status")
    assert result.exit_code == 1
    assert trigger_states(result.output) == {
        ("public.audit", "insert"): "missing",
        ("public.thing", "delete"): "missing",
        ("public.thing", "insert"): "installed",
        ("public.thing", "update"): "outdated",
    }

    assert invoke(app, "install-triggers").exit_code == 0
    other_service.execute("ALTER TABLE thing DISABLE TRIGGER pgevents_insert")
    result = invoke(app, "status")
    assert result.exit_code == 1
    assert trigger_states(result.output)[("public.thing", "insert")] == "outdated"
    assert invoke(app, "install-triggers").exit_code == 0
    result = invoke(app, "status")
    assert result.exit_code == 0, result.output
    assert set(trigger_states(result.output).values()) == {"installed"}


def test_status_shows_backlog_oldest_age_and_failed_count(make_app, other_service):
    app, _db, pgevents, Thing = thing_app(make_app, PGEVENTS_MAX_ATTEMPTS=1)

    @pgevents.listens_for(Thing, "after_insert")
    def picky(event):
        if event.new["name"] == "bad":
            raise ValueError("bad name")

    assert invoke(app, "install-triggers").exit_code == 0
    other_service.execute("INSERT INTO thing (name) VALUES ('bad')")
    assert drain(app, pgevents) == 1
    other_service.execute("INSERT INTO thing (name) VALUES ('a'), ('b'), ('c')")

    result = invoke(app, "status")
    assert result.exit_code == 0, result.output
    assert re.search(r"^Backlog: 3 pending, oldest \d+\.\d s$", result.output, re.M), result.output
    assert "Failed: 1" in result.output

    for age, shown in [("5 minutes", "5.0 min"), ("3 hours", "3.0 h")]:
        other_service.execute(
            "UPDATE pgevents.event SET created_at = now() - %s::interval WHERE status = 'pending'",
            (age,),
        )
        result = invoke(app, "status")
        assert f"Backlog: 3 pending, oldest {shown}\n" in result.output


# failed / retry --------------------------------------------------------------


def test_failed_lists_errors_and_retry_reruns_only_the_handlers_that_failed(make_app, other_service):
    app, _db, pgevents, Thing = thing_app(make_app, PGEVENTS_MAX_ATTEMPTS=1)
    calls: list[tuple[str, int]] = []
    broken = {"mail"}

    def handler_for(label: str) -> Callable[[Any], None]:
        # One factory, so both handlers have the same qualified name.
        def handler(event: Any) -> None:
            calls.append((label, event.new["id"]))
            if label in broken:
                raise RuntimeError(f"{label} is down")
        return handler

    pgevents.listen(Thing, "after_insert", handler_for("audit"))
    pgevents.listen(Thing, "after_insert", handler_for("mail"))
    assert invoke(app, "install-triggers").exit_code == 0
    other_service.execute("INSERT INTO thing (name) VALUES ('a'), ('b')")
    assert drain(app, pgevents) == 2
    assert sorted(calls) == [("audit", 1), ("audit", 2), ("mail", 1), ("mail", 2)]
    first, second = [id_ for (id_,) in other_service.execute(
        "SELECT id FROM pgevents.event WHERE status = 'failed' ORDER BY id").fetchall()]

    result = invoke(app, "failed")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 4, result.output
    assert re.fullmatch(rf"event {first}: insert on public\.thing, 1 attempt\(s\), at \S+", lines[0])
    assert re.fullmatch(r"  integration\.test_cli\.\S*handler#2: RuntimeError: mail is down", lines[1])
    assert lines[2].startswith(f"event {second}: insert on public.thing")
    assert "Failed: 2" in invoke(app, "status").output

    broken.clear()
    calls.clear()
    result = invoke(app, "retry", str(first))
    assert (result.exit_code, result.output) == (0, "1 event(s) queued again.\n")
    assert drain(app, pgevents) == 1
    assert calls == [("mail", 1)]  # audit succeeded on the first attempt
    result = invoke(app, "failed")
    assert f"event {first}:" not in result.output and f"event {second}:" in result.output

    calls.clear()
    result = invoke(app, "retry", "--all")
    assert (result.exit_code, result.output) == (0, "1 event(s) queued again.\n")
    assert drain(app, pgevents) == 1
    assert calls == [("mail", 2)]
    assert invoke(app, "failed").output == "No failed events.\n"
    assert "Failed: 0" in invoke(app, "status").output
    assert other_service.execute("SELECT count(*) FROM pgevents.event").fetchone()[0] == 0


def test_failed_traceback_shows_the_traceback_and_the_row_and_attempts_count_across_retries(
    make_app, other_service
):
    app, _db, pgevents, Thing = thing_app(make_app, PGEVENTS_MAX_ATTEMPTS=3, PGEVENTS_RETRY_BACKOFF=0)

    def charge(event: Any) -> None:
        raise ValueError(f"card declined for {event.new['name']}")

    pgevents.listen(Thing, "after_insert", charge)
    result = invoke(app, "failed")
    assert (result.exit_code, result.output) == (1, (
        "Error: The event schema 'pgevents' is not installed in this database; run"
        " 'flask pgevents install-triggers'.\n"
    ))
    assert invoke(app, "install-triggers").exit_code == 0
    other_service.execute("INSERT INTO thing (name) VALUES ('ada')")
    wait_until(lambda: drain(app, pgevents) == 0 and "1 failed" in status_line(app))
    (event_id,) = other_service.execute("SELECT id FROM pgevents.event").fetchone()

    result = invoke(app, "failed", "--traceback")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert re.fullmatch(rf"event {event_id}: insert on public\.thing, 3 attempt\(s\), at \S+", lines[0])
    assert re.fullmatch(r"  integration\.test_cli\.\S*charge: ValueError: card declined for ada", lines[1])
    assert lines[2] == "    Traceback (most recent call last):"
    assert "    ValueError: card declined for ada" in lines
    assert lines[-1] == f'  new: {{"id":{1},"name":"ada"}}'
    assert "Traceback" not in invoke(app, "failed").output

    # Three more attempts after a retry: six in all.
    assert invoke(app, "retry", "--all").output == "1 event(s) queued again.\n"
    wait_until(lambda: drain(app, pgevents) == 0 and "1 failed" in status_line(app))
    assert ", 6 attempt(s), at " in invoke(app, "failed").output.splitlines()[0]


def status_line(app: Any) -> str:
    """The backlog as ``N pending, M failed``, from ``flask pgevents status``."""
    output = invoke(app, "status").output
    pending = re.search(r"Backlog: (\d+) pending", output)
    failed = re.search(r"Failed: (\d+)", output)
    return f"{pending and pending[1]} pending, {failed and failed[1]} failed"


def test_retry_needs_ids_or_all_and_reports_ids_that_are_not_failed(make_app, other_service):
    app, _db, pgevents, Thing = thing_app(make_app)
    pgevents.listen(Thing, "after_insert", ignore)
    assert invoke(app, "install-triggers").exit_code == 0

    result = invoke(app, "retry")
    assert result.exit_code == 2
    assert "Name the event ids to retry, or pass --all." in result.output

    result = invoke(app, "retry", "999")
    assert result.exit_code == 1
    assert "0 event(s) queued again." in result.output
    assert "1 of the given event ids name no failed event." in result.output

    result = invoke(app, "retry", "--all")
    assert (result.exit_code, result.output) == (0, "0 event(s) queued again.\n")
    assert invoke(app, "failed").output == "No failed events.\n"


def test_discard_deletes_the_named_failed_events_or_all_after_asking_and_never_a_pending_one(
    make_app, other_service
):
    app, _db, pgevents, Thing = thing_app(make_app, PGEVENTS_MAX_ATTEMPTS=1)

    def fails(event: Any) -> None:
        raise RuntimeError("down")

    pgevents.listen(Thing, "after_insert", fails)
    assert invoke(app, "install-triggers").exit_code == 0
    other_service.execute("INSERT INTO thing (name) VALUES ('a'), ('b'), ('c')")
    assert drain(app, pgevents) == 3
    first, second, third = [id_ for (id_,) in other_service.execute(
        "SELECT id FROM pgevents.event WHERE status = 'failed' ORDER BY id").fetchall()]
    assert invoke(app, "retry", str(third)).exit_code == 0  # pending again

    result = invoke(app, "discard")
    assert result.exit_code == 2 and "Name the event ids to discard, or pass --all." in result.output
    result = invoke(app, "discard", "--all", str(first))
    assert result.exit_code == 2 and "Pass either event ids or --all, not both." in result.output

    result = invoke(app, "discard", str(first), str(third), "999")
    assert result.exit_code == 1
    assert result.output.startswith("1 event(s) discarded.\n")
    assert "2 of the given event ids name no failed event." in result.output
    assert invoke(app, "failed").output.startswith(f"event {second}: ")

    result = invoke(app, "discard", "--all", input="n\n")
    assert result.exit_code == 1
    assert result.output == (
        "Discard all 1 failed event(s) for good? [y/N]: n\nError: Nothing was discarded.\n"
    )
    result = invoke(app, "discard", "--all", "--yes")
    assert (result.exit_code, result.output) == (0, "1 event(s) discarded.\n")
    assert invoke(app, "failed").output == "No failed events.\n"
    # The retried event was pending, and is still there to be handled.
    assert other_service.execute("SELECT id, status FROM pgevents.event").fetchall() == [(third, "pending")]


# Passwords -------------------------------------------------------------------


def test_no_command_shows_the_password_of_the_database_url(make_app, password_url, other_service):
    app, _db, pgevents, Thing = thing_app(make_app, SQLALCHEMY_DATABASE_URI=password_url)
    user = make_url(password_url).username
    pgevents.listen(Thing, "after_insert", ignore)

    outputs = []
    for args in [
        ["status"], ["install-triggers", "--sql"], ["install-triggers"], ["status"],
        ["failed"], ["retry", "--all"], ["retry", "1"], ["uninstall-triggers", "--drop-schema"],
    ]:
        result = invoke(app, *args)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.output
        outputs.append(result.output)
    assert all(SECRET not in output for output in outputs)
    assert f"Database: {make_url(password_url).drivername}://{user}:***@" in outputs[3]
    assert other_service.execute(
        "SELECT tableowner FROM pg_tables WHERE tablename = 'thing'").fetchone()[0] == user

    # An unreachable server: a one-line error that names it, password hidden.
    unreachable = make_url(password_url).set(host="127.0.0.1", port=1, query={})
    app2, _, pgevents2 = make_app(PGEVENTS_DATABASE_URI=unreachable.render_as_string(hide_password=False))
    pgevents2.init_app(app2)
    for args in [["status"], ["install-triggers"], ["failed"]]:
        result = invoke(app2, *args)
        assert result.exit_code == 1
        assert f"Error: Could not connect to the database {unreachable.drivername}://{user}:***@127.0.0.1:1/" \
            in result.output
        assert SECRET not in result.output


# listen, as its own process -------------------------------------------------


def example_env(database_url: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("FLASK_", "WERKZEUG_", "PGEVENTS_")) and k != "DATABASE_URL"
    }
    env.update(DATABASE_URL=database_url, FLASK_APP=str(EXAMPLE), PYTHONUNBUFFERED="1")
    return env


def init_example(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Create the example's tables and triggers, as ``gunicorn_app.py init`` does."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    spec = importlib.util.spec_from_file_location("pgevents_gunicorn_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.init_database()



def listener_backends(conn: psycopg.Connection) -> int:
    return conn.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = 'pgevents-listener'"
    ).fetchone()[0]


def test_listen_keeps_its_ready_file_while_connected_and_removes_it_while_it_cannot_reconnect_and_on_exit(
    password_url, server_url, other_service, tmp_path, monkeypatch
):
    init_example(password_url, monkeypatch)
    ready = tmp_path / "ready"
    log = tmp_path / "listen.log"
    database = other_service.info.dbname
    admin = psycopg.connect(server_url, autocommit=True)  # ALTER DATABASE runs from another one
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-W", "error", "-m", "flask", "pgevents", "listen", "--ready-file", str(ready)],
            env=example_env(password_url), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_while_running(proc, log, ready.exists)
        assert ready.read_text() == "Connected and listening.\n"
        written = ready.stat().st_mtime_ns
        # Rewritten while ready, so that its age tells a frozen process too.
        wait_while_running(proc, log, lambda: ready.exists() and ready.stat().st_mtime_ns > written)

        # The database drops the listener's connection and takes no new one.
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        other_service.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'pgevents-listener'"
        )
        wait_while_running(proc, log, lambda: not ready.exists())
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        wait_while_running(proc, log, ready.exists)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, log.read_text()
    finally:
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        admin.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert not ready.exists()
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize(
    "driver, stop_signal",
    [("psycopg", signal.SIGTERM), ("psycopg2", signal.SIGINT)],
    ids=["psycopg-SIGTERM", "psycopg2-SIGINT"],
)
def test_listen_handles_events_from_other_clients_and_stops_cleanly_on_signal(
    password_url, other_service, tmp_path, monkeypatch, stop_signal
):
    init_example(password_url, monkeypatch)
    log = tmp_path / "listen.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-W", "error", "-m", "flask", "pgevents", "listen"],
            env=example_env(password_url), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_while_running(proc, log, lambda: listener_backends(other_service) == 1)
        other_service.execute("INSERT INTO item (name) SELECT 'i' || g FROM generate_series(1, 50) g")
        for i in range(10):
            other_service.execute("INSERT INTO item (name) VALUES (%s)", (f"single {i}",))
        wait_while_running(
            proc, log,
            lambda: other_service.execute("SELECT count(*) FROM handled").fetchone()[0] >= 60,
        )
        per_item = other_service.execute(
            "SELECT item_id, count(*), min(pid), max(pid) FROM handled GROUP BY item_id"
        ).fetchall()
        assert len(per_item) == 60 and {(n, lo, hi) for _, n, lo, hi in per_item} == {(1, proc.pid, proc.pid)}

        signalled = time.monotonic()
        proc.send_signal(stop_signal)
        assert proc.wait(timeout=10) == 0, log.read_text()
        assert time.monotonic() - signalled < 5
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    output = log.read_text()
    assert "Listening for events in schema 'pgevents' on" in output
    assert ":***@" in output and SECRET not in output
    assert output.rstrip().endswith("Listener stopped."), output
    assert "Traceback" not in output, output
    wait_until(lambda: listener_backends(other_service) == 0)
