"""A database that never answers, refuses the credentials, does not exist or
withholds privileges: the CLI and ``listen`` fail fast and clearly, the
listener thread logs and retries, and SIGTERM stops ``listen`` in time.

``flask pgevents listen`` runs as a real subprocess; the other commands and
the listener thread run in this process.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg
import pytest
from conftest import role_url, wait_until, wait_while_running
from psycopg import sql
from sqlalchemy.engine import make_url

from flask_pgevents.cli import pgevents_cli

SECRET = "Pw0rdNotForOutput9d2f"

#: The app ``flask pgevents listen`` serves: its PGEVENTS_* keys come from
#: FLASK_PGEVENTS_* variables, and its handler of public.thing inserts may block.
APP = textwrap.dedent('''
    import os
    import time

    from flask import Flask
    from flask_pgevents import PGEvents

    app = Flask(__name__)
    app.config.update(PGEVENTS_AUTOSTART=False, PGEVENTS_RECONNECT_BACKOFF=0.05)
    app.config.from_prefixed_env()
    pgevents = PGEvents(app)


    @pgevents.listens_for("public.thing", "after_insert")
    def slow(event):
        with open(os.environ["HANDLER_STARTED"], "w") as started:
            started.write(str(event.id))
        time.sleep(float(os.environ.get("HANDLER_SECONDS", "0")))
''')


# Helpers ---------------------------------------------------------------------


class HungServer:
    """A TCP server that accepts connections and never answers, like a
    PostgreSQL server that is stuck or a proxy with nothing behind it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._accept, name="hung-server", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            readable, _, _ = select.select([self.sock, self._stop_r], [], [])
            if self._stop_r in readable:
                return
            conn, _ = self.sock.accept()
            self.accepted.append(conn)

    def url(self, driver: str) -> str:
        return f"postgresql+{driver}://app:{SECRET}@127.0.0.1:{self.port}/appdb"

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(10)
        for conn in [*self.accepted, self.sock]:
            conn.close()
        os.close(self._stop_r)
        os.close(self._stop_w)


@pytest.fixture
def hung_server() -> Iterator[HungServer]:
    server = HungServer()
    yield server
    server.close()


def invoke(app: Any, *args: str) -> Any:
    return app.test_cli_runner().invoke(pgevents_cli, list(args))


class Listen:
    """``flask pgevents listen`` in a subprocess of its own session, killed at the end."""

    def __init__(self, tmp_path: Path, database_url: str, **config: Any) -> None:
        app_file = tmp_path / "listen_app.py"
        app_file.write_text(APP)
        self.log = tmp_path / "listen.log"
        self.handler_started = tmp_path / "handler_started"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "PGEVENTS_"))}
        env.update(
            FLASK_APP=str(app_file), PYTHONUNBUFFERED="1", HANDLER_STARTED=str(self.handler_started),
            FLASK_PGEVENTS_DATABASE_URI=database_url,
        )
        for key, value in config.items():
            env[key if key == "HANDLER_SECONDS" else f"FLASK_PGEVENTS_{key}"] = str(value)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-W", "error", "-m", "flask", "pgevents", "listen"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text()

    def wait_for_exit(self, timeout: float) -> tuple[int, float]:
        """The exit status, and how long the process took to exit."""
        began = time.monotonic()
        try:
            status = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"listen still runs after {timeout} s:\n{self.output()}") from None
        return status, time.monotonic() - began

    def stop(self) -> tuple[int, float]:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait_for_exit(timeout=30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def listen(tmp_path: Path) -> Iterator[Callable[..., Listen]]:
    started: list[Listen] = []

    def start(database_url: str, **config: Any) -> Listen:
        started.append(Listen(tmp_path, database_url, **config))
        return started[-1]

    yield start
    for proc in started:
        proc.kill()


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def password_required(server_url: str) -> Iterator[Callable[[str], None]]:
    """Make the server check passwords of the given roles (it trusts everyone
    else), by prepending lines to its pg_hba.conf; restored afterwards."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        hba_file = conn.execute("SHOW hba_file").fetchone()[0]
        original = conn.execute("SELECT pg_read_file(%s)", (hba_file,)).fetchone()[0]

    def write(conn: psycopg.Connection, content: str) -> None:
        # lo_export writes the bytes as they are, with the server's own rights.
        oid = conn.execute("SELECT lo_from_bytea(0, convert_to(%s, 'UTF8'))", (content,)).fetchone()[0]
        conn.execute("SELECT lo_export(%s, %s)", (oid, hba_file))
        conn.execute("SELECT lo_unlink(%s)", (oid,))
        conn.execute("SELECT pg_reload_conf()")

    def require(role: str) -> None:
        quoted = '"' + role + '"'
        lines = f"local all {quoted} scram-sha-256\nhost all {quoted} all scram-sha-256\n"
        with psycopg.connect(server_url, autocommit=True) as conn:
            write(conn, lines + original)
        # The postmaster reloads in the background: wait until it asks.
        wrong = make_url(server_url).set(username=role, password="wrong")

        def refused() -> bool:
            try:
                psycopg.connect(wrong.render_as_string(hide_password=False)).close()
            except psycopg.OperationalError as exc:
                return "password authentication failed" in str(exc)
            return False

        wait_until(refused)

    yield require
    with psycopg.connect(server_url, autocommit=True) as conn:
        write(conn, original)


@pytest.fixture
def wrong_password_url(database_url: str, make_role, other_service, password_required) -> str:
    """The test database as a role whose password is not the one in the URL."""
    role = make_role()
    other_service.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal("right")))
    password_required(role)
    return make_url(role_url(database_url, role)).set(password=SECRET).render_as_string(hide_password=False)


def shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


# A server that never answers ---------------------------------------------------


@pytest.mark.parametrize("args", [["status"], ["install-triggers"], ["failed"]])
def test_admin_commands_give_up_on_a_server_that_never_answers_after_the_connect_timeout(
    make_app, driver, hung_server, args
):
    app, _db, pgevents = make_app(PGEVENTS_DATABASE_URI=hung_server.url(driver), PGEVENTS_CONNECT_TIMEOUT=2)
    pgevents.init_app(app)

    began = time.monotonic()
    result = invoke(app, *args)
    assert time.monotonic() - began < 8
    assert result.exit_code == 1
    assert result.output == (
        f"Error: Could not connect to the database {shown(hung_server.url(driver))}:"
        " no answer within 2 s (PGEVENTS_CONNECT_TIMEOUT).\n"
    )
    assert SECRET not in result.output


def test_admin_commands_give_up_on_a_statement_after_the_statement_timeout(make_app, libpq_url, other_service):
    app, _db, pgevents = make_app(PGEVENTS_STATEMENT_TIMEOUT=1)
    pgevents.listen("public.thing", "after_insert", lambda event: None)
    pgevents.init_app(app)
    other_service.execute("CREATE TABLE thing (id serial PRIMARY KEY)")
    assert invoke(app, "install-triggers").exit_code == 0

    with psycopg.connect(libpq_url) as locker:  # a migration holding the event table
        locker.execute("LOCK TABLE pgevents.event IN ACCESS EXCLUSIVE MODE")
        began = time.monotonic()
        result = invoke(app, "status")
        assert time.monotonic() - began < 6
    assert result.exit_code == 1
    assert result.output == (
        f"Error: The database {shown(app.config['SQLALCHEMY_DATABASE_URI'])} canceled a statement:"
        " canceling statement due to statement timeout. PGEVENTS_STATEMENT_TIMEOUT is 1 s.\n"
    )


def test_the_listener_thread_warns_when_it_cannot_connect(make_app, driver, hung_server, caplog):
    app, _db, pgevents = make_app(
        PGEVENTS_DATABASE_URI=hung_server.url(driver), PGEVENTS_CONNECT_TIMEOUT=2,
        PGEVENTS_RECONNECT_BACKOFF=0.01,
    )
    pgevents.listen("public.thing", "after_insert", lambda event: None)
    pgevents.init_app(app)
    pgevents.start(app)
    warning = (
        f"pgevents listener: Could not connect to the database {shown(hung_server.url(driver))}:"
        " no answer within 2 s (PGEVENTS_CONNECT_TIMEOUT). Retrying in"
    )
    wait_until(lambda: warning in caplog.text, timeout=8)
    assert pgevents.stop(timeout=5, app=app)
    assert SECRET not in caplog.text


def test_listen_stops_within_the_stop_timeout_while_its_connection_hangs(driver, hung_server, listen):
    worker = listen(hung_server.url(driver), CONNECT_TIMEOUT=0, STOP_TIMEOUT=2)
    wait_while_running(worker.proc, worker.log, lambda: hung_server.accepted)

    status, took = worker.stop()
    assert took < 2 + 3, worker.output()
    assert status == 1
    output = worker.output()
    assert "The listener did not stop within 2.0 s (PGEVENTS_STOP_TIMEOUT); exiting anyway." in output
    assert "Listening for events" not in output and "Traceback" not in output
    assert SECRET not in output


def test_listen_stops_within_the_stop_timeout_while_a_handler_runs_on(
    database_url, listen, make_app, other_service
):
    app, _db, pgevents = make_app()
    pgevents.listen("public.thing", "after_insert", lambda event: None)
    pgevents.init_app(app)
    other_service.execute("CREATE TABLE thing (id serial PRIMARY KEY)")
    assert invoke(app, "install-triggers").exit_code == 0
    worker = listen(database_url, STOP_TIMEOUT=2, HANDLER_SECONDS=600)
    other_service.execute("INSERT INTO thing DEFAULT VALUES")
    wait_while_running(worker.proc, worker.log, worker.handler_started.exists)

    status, took = worker.stop()
    assert took < 2 + 3, worker.output()
    assert status == 1
    assert "The listener did not stop within 2.0 s (PGEVENTS_STOP_TIMEOUT); exiting anyway." in worker.output()
    # The claim died with the process: the event waits for the next listener.
    wait_until(lambda: other_service.execute(
        "SELECT count(*) FROM (SELECT 1 FROM pgevents.event WHERE status = 'pending'"
        " FOR UPDATE SKIP LOCKED) AS free"
    ).fetchone()[0] == 1)


# Misconfigured workers ---------------------------------------------------------


def test_listen_exits_at_once_when_authentication_fails(wrong_password_url, listen):
    worker = listen(wrong_password_url)
    status, _ = worker.wait_for_exit(timeout=15)
    output = worker.output()
    user = make_url(wrong_password_url).username
    assert status == 1, output
    assert (
        f"Error: Authentication failed for the database {shown(wrong_password_url)}:"
        f' password authentication failed for user "{user}".'
    ) in output
    assert "Listening for events" not in output and "lost its database connection" not in output
    assert "Traceback" not in output and SECRET not in output


def test_listen_exits_at_once_when_the_database_does_not_exist(database_url, listen):
    missing = make_url(database_url).set(database="pgevents_no_such_database").render_as_string(hide_password=False)
    worker = listen(missing)
    status, _ = worker.wait_for_exit(timeout=15)
    output = worker.output()
    assert status == 1, output
    assert (
        f"Error: The database {shown(missing)} does not exist. Create it, or correct the"
        " database name in the URI."
    ) in output
    assert "Listening for events" not in output and "Traceback" not in output


def test_listen_exits_at_once_when_its_role_may_not_use_the_event_schema(
    database_url, listen, make_app, make_role, other_service
):
    app, _db, pgevents = make_app()
    pgevents.listen("public.thing", "after_insert", lambda event: None)
    pgevents.init_app(app)
    other_service.execute("CREATE TABLE thing (id serial PRIMARY KEY)")
    assert invoke(app, "install-triggers").exit_code == 0
    role = make_role()

    worker = listen(role_url(database_url, role))
    status, _ = worker.wait_for_exit(timeout=15)
    output = worker.output()
    assert status == 1, output
    assert (
        f"Error: The role '{role}' may not use the event schema 'pgevents' of"
        f" {shown(role_url(database_url, role))}: permission denied for schema pgevents."
        f" Grant it what it needs with 'flask pgevents grant-listener {role}'."
    ) in output
    assert "Traceback" not in output


def test_the_listener_thread_logs_a_permanent_error_retries_and_logs_its_recovery(
    make_app, wrong_password_url, other_service, caplog
):
    caplog.set_level("INFO", logger="flask_pgevents")
    app, _db, pgevents = make_app(
        SQLALCHEMY_DATABASE_URI=wrong_password_url, PGEVENTS_RECONNECT_BACKOFF=0.01,
        PGEVENTS_RECONNECT_BACKOFF_MAX=0.2,
    )
    pgevents.listen("public.thing", "after_insert", lambda event: None)
    pgevents.init_app(app)
    pgevents.start(app)
    user = make_url(wrong_password_url).username
    error = (
        f"pgevents listener: Authentication failed for the database {shown(wrong_password_url)}:"
        f' password authentication failed for user "{user}". Check the user name and password'
    )
    wait_until(lambda: caplog.text.count(error) >= 2)
    assert [r.levelname for r in caplog.records if error in r.getMessage()][:2] == ["ERROR", "ERROR"]

    other_service.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(user), sql.Literal(SECRET)))
    wait_until(lambda: f"pgevents listener connected to {shown(wrong_password_url)} again after" in caplog.text)
    assert pgevents.stop(timeout=5, app=app)
    assert SECRET not in caplog.text
