"""Where listener threads run: gunicorn workers (with and without --preload),
``flask run`` with and without the reloader, any other WSGI server from its
first request, and nowhere in a script that only creates the app, during other
CLI commands, under ``app.testing`` or with ``PGEVENTS_AUTOSTART = False``.
Scripts also suppress capture, and misconfigured apps fail in one line.

Servers run as real subprocesses serving ``examples/gunicorn_app.py``; each is
stopped, with its whole process group, when its test ends.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import click
import psycopg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from conftest import wait_until, wait_while_running
from flask import Flask
from flask.cli import FlaskGroup
from flask_sqlalchemy import SQLAlchemy

from flask_pgevents import PGEvents

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "gunicorn_app.py"
LISTENER = "pgevents-listener"


# Helpers ---------------------------------------------------------------------


def listener_backends(conn: psycopg.Connection) -> int:
    """Listener connections to the test database, as PostgreSQL sees them."""
    return conn.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = %s",
        (LISTENER,),
    ).fetchone()[0]


def listener_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == LISTENER]


def handled_by_item(conn: psycopg.Connection) -> dict[int, list[int]]:
    """item id -> pids of the processes whose handler recorded it."""
    handled: dict[int, list[int]] = {}
    for item_id, pid in conn.execute("SELECT item_id, pid FROM handled ORDER BY id").fetchall():
        handled.setdefault(item_id, []).append(pid)
    return handled


def settled(conn: psycopg.Connection, count: int) -> bool:
    """Whether ``count`` handler calls are recorded and no event is left to handle.

    Handlers commit before their event is settled, so once the event table is
    empty no handler call is still to come.
    """
    recorded = conn.execute("SELECT count(*) FROM handled").fetchone()[0]
    left = conn.execute("SELECT count(*) FROM pgevents.event").fetchone()[0]
    return recorded >= count and left == 0


def insert_items(conn: psycopg.Connection, count: int) -> None:
    """Half in one statement, half one transaction each, as other services write."""
    bulk = count // 2
    conn.execute("INSERT INTO item (name) SELECT 'bulk ' || g FROM generate_series(1, %s) AS g", (bulk,))
    for i in range(count - bulk):
        conn.execute("INSERT INTO item (name) VALUES (%s)", (f"single {i}",))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_status(port: int) -> Optional[dict[str, Any]]:
    """The example's ``GET /``: serving pid and whether its listener thread runs."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
            return json.load(response)
    except OSError:  # refused, reset or timed out: not serving (yet, or any more)
        return None


def gunicorn_quiet_args() -> list[str]:
    """No control socket (gunicorn 25.1+ puts one in $HOME): tests run side by side."""
    from gunicorn.config import KNOWN_SETTINGS

    if any(setting.name == "control_socket_disable" for setting in KNOWN_SETTINGS):
        return ["--no-control-socket"]
    return []


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("pgevents_gunicorn_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def example_db(database_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The example's tables and triggers in the test database; its DATABASE_URL."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    load_example().init_database()
    return database_url


class Processes:
    """Subprocesses of one test, each in its own process group, logged to files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(
        self, args: list[str], database_url: str, **extra_env: str
    ) -> tuple[subprocess.Popen[bytes], Path]:
        env = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("FLASK_", "WERKZEUG_", "PGEVENTS_")) and k != "DATABASE_URL"
        }
        env.update(DATABASE_URL=database_url, FLASK_APP=str(EXAMPLE), PYTHONUNBUFFERED="1", **extra_env)
        log = self.directory / f"process{len(self.started)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append((proc, log))
        return proc, log

    def stop_all(self) -> None:
        for proc, _ in reversed(self.started):
            _signal_group(proc, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            # Whatever is left of the group, a reloader's child for one.
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=10)


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signum)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


# (a) gunicorn -----------------------------------------------------------------


@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_gunicorn_workers_each_run_one_listener_and_handle_each_event_once(
    example_db, other_service, processes, preload
):
    port = free_port()
    master, log = processes.start(
        [
            sys.executable, "-m", "gunicorn", "--workers", "2", "--worker-class", "sync",
            "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "5", *gunicorn_quiet_args(),
            # Both ways the example documents: from the project, and --chdir.
            *(["--preload", "--chdir", "examples", "gunicorn_app:create_app()"] if preload
              else ["examples.gunicorn_app:create_app()"]),
        ],
        example_db,
    )
    listening: dict[int, bool] = {}

    def both_workers_report_a_listener() -> bool:
        status = get_status(port)
        if status is not None:
            listening[status["pid"]] = status["listener"]
        return len(listening) == 2 and all(listening.values())

    wait_while_running(master, log, both_workers_report_a_listener)
    workers = set(listening)
    assert master.pid not in workers
    wait_while_running(master, log, lambda: listener_backends(other_service) >= 2)

    insert_items(other_service, 200)
    wait_while_running(master, log, lambda: settled(other_service, 200))
    handled = handled_by_item(other_service)
    assert sorted(handled) == list(range(1, 201))
    assert {item: pids for item, pids in handled.items() if len(pids) != 1} == {}
    # Only workers handle events: the master serves nothing and listens to nothing.
    handlers = {pid for pids in handled.values() for pid in pids}
    assert handlers <= workers, f"events handled outside the workers {workers}; master: {master.pid}"
    assert listener_backends(other_service) == 2


# (b) flask run ----------------------------------------------------------------


@pytest.mark.parametrize(
    "flask_args",
    [["run", "--reload"], ["--debug", "run"], ["run", "--no-reload"]],
    ids=["reload", "debug", "no-reload"],
)
def test_flask_run_has_exactly_one_listener_in_the_serving_process(
    example_db, other_service, processes, tmp_path, flask_args
):
    watched = tmp_path / "watched.txt"
    watched.write_text("1")
    port = free_port()
    reloader = "--no-reload" not in flask_args  # --debug turns it on
    server, log = processes.start(
        [
            sys.executable, "-m", "flask", *flask_args, "--port", str(port),
            *(["--extra-files", str(watched)] if reloader else []),
        ],
        example_db,
    )
    status = wait_while_running(server, log, lambda: get_status(port))
    serving = status["pid"]
    assert status["listener"] is True
    assert (serving != server.pid) is reloader  # with the reloader, its child serves
    wait_while_running(server, log, lambda: listener_backends(other_service) >= 1)

    insert_items(other_service, 20)
    wait_while_running(server, log, lambda: settled(other_service, 20))
    assert handled_by_item(other_service) == {item: [serving] for item in range(1, 21)}
    assert listener_backends(other_service) == 1

    if "--reload" in flask_args:
        # A reload replaces the serving process: still exactly one listener.
        os.utime(watched, (time.time() + 5, time.time() + 5))
        status = wait_while_running(
            server, log, lambda: (s := get_status(port)) is not None and s["pid"] != serving and s
        )
        serving = status["pid"]
        wait_while_running(server, log, lambda: listener_backends(other_service) == 1)
        insert_items(other_service, 20)
        wait_while_running(server, log, lambda: settled(other_service, 40))
        handled = handled_by_item(other_service)
        assert {item: handled[item] for item in range(21, 41)} == {item: [serving] for item in range(21, 41)}
        assert listener_backends(other_service) == 1


# (c) no listener where nothing serves ---------------------------------------


@pytest.fixture
def app_factory(database_url: str) -> Iterator[Callable[..., Flask]]:
    """Build apps as a factory would, each with a probe command; cleans up after."""
    made: list[tuple[Flask, PGEvents]] = []

    def factory(**config: Any) -> Flask:
        app = Flask(f"lifecycle{len(made)}")
        app.config.update(SQLALCHEMY_DATABASE_URI=database_url, PGEVENTS_POLL_INTERVAL=0.2)
        app.config.update(config)
        db = SQLAlchemy()

        class Note(db.Model):
            __tablename__ = "note"
            id = sa.Column(sa.Integer, primary_key=True)

        db.init_app(app)
        pgevents = PGEvents(app, db=db)
        pgevents.listen(Note, "after_insert", lambda event: None)
        made.append((app, pgevents))

        @app.cli.command("probe")
        def probe() -> None:
            """Report listener threads seen while an app command runs."""
            click.echo(f"listener threads: {len(listener_threads())}")

        with app.app_context():
            db.create_all()
        return app

    yield factory
    for app, pgevents in made:
        pgevents.stop(timeout=10, app=app)
        with app.app_context():
            for engine in app.extensions["sqlalchemy"].engines.values():
                engine.dispose()


def test_a_server_building_the_app_starts_a_listener(app_factory, other_service, monkeypatch):
    # The control for the tests below: outside any CLI command, as under a
    # WSGI server, the app's first request starts the listener thread (a
    # known server's modules start it as the app is built).
    app = app_factory()
    assert listener_threads() == []
    app.test_client().get("/")
    assert len(listener_threads()) == 1
    wait_until(lambda: listener_backends(other_service) == 1)
    app.extensions["pgevents"].extension.stop(timeout=10, app=app)
    assert listener_threads() == []
    monkeypatch.setitem(sys.modules, "uwsgi", types.ModuleType("uwsgi"))
    app = app_factory()
    assert len(listener_threads()) == 1
    app.extensions["pgevents"].extension.stop(timeout=10, app=app)


def test_other_cli_commands_start_no_listener(app_factory, other_service):
    cli = FlaskGroup(create_app=app_factory, load_dotenv=False)
    count_in_shell = (
        "import threading\n"
        f"print('listener threads:', sum(t.name == {LISTENER!r} for t in threading.enumerate()))\n"
    )
    for args, stdin, expected in [
        (["shell"], count_in_shell, "listener threads: 0"),
        (["probe"], None, "listener threads: 0"),  # a command of the app
        (["routes"], None, "/static/<path:filename>"),
        (["pgevents", "install-triggers"], None, "changes in schema 'pgevents'."),
        (["pgevents", "status"], None, "Backlog: 0 pending"),
    ]:
        result = CliRunner().invoke(cli, args, input=stdin, catch_exceptions=False)
        assert expected in result.output, (args, result.output)
        assert listener_threads() == [], args
        assert listener_backends(other_service) == 0, args


@pytest.mark.parametrize(
    "config", [{"TESTING": True}, {"PGEVENTS_AUTOSTART": False}], ids=["testing", "autostart-off"]
)
def test_testing_or_autostart_off_starts_no_listener(app_factory, other_service, config):
    app = app_factory(**config)
    assert listener_threads() == []
    assert listener_backends(other_service) == 0
    app.extensions["pgevents"].extension.start(app)  # still possible by hand
    assert len(listener_threads()) == 1
    wait_until(lambda: listener_backends(other_service) == 1)


# (d) scripts, other WSGI servers, misconfigured apps -------------------------------

EXAMPLES = ROOT / "examples"

#: A one-off report: creates the app, does its work, exits.
REPORT_SCRIPT = """
import threading
from gunicorn_app import Item, create_app, db
app = create_app()
with app.app_context():
    print("items:", db.session.scalar(db.select(db.func.count()).select_from(Item)))
print("listener threads:", sum(t.name == "pgevents-listener" for t in threading.enumerate()))
"""

#: A backfill: its inserts are not events; the one after the block is.
BACKFILL_SCRIPT = """
from gunicorn_app import Item, create_app, db, pgevents
app = create_app()
with app.app_context():
    with pgevents.suppressed():
        db.session.add_all([Item(name=f"old {i}") for i in range(50)])
    db.session.add(Item(name="new"))
    db.session.commit()
"""

#: A WSGI server that flask-pgevents does not know: werkzeug's, from a script.
SERVE_SCRIPT = """
import sys, threading
sys.path.insert(0, "examples")
from werkzeug.serving import run_simple
from gunicorn_app import create_app
app = create_app()
print("listener threads before serving:", sum(t.name == "pgevents-listener" for t in threading.enumerate()))
run_simple("127.0.0.1", int(sys.argv[1]), app)
"""

#: An app configured from MYAPP_* environment variables.
CONFIGURED_APP = """
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from flask_pgevents import PGEvents

def create_app():
    app = Flask(__name__)
    app.config.from_prefixed_env("MYAPP")
    SQLAlchemy(app)
    PGEvents(app)
    return app
"""


def run_script(code: str, database_url: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code`` from the examples directory, as a user's script would run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "PGEVENTS_"))}
    env.update(DATABASE_URL=database_url)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=60,
    )


def pending_events(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM pgevents.event WHERE status = 'pending'").fetchone()[0]


def test_a_script_that_creates_the_app_handles_no_events(example_db, other_service):
    insert_items(other_service, 200)
    result = run_script(REPORT_SCRIPT, example_db)
    assert (result.returncode, result.stdout, result.stderr) == (0, "items: 200\nlistener threads: 0\n", "")
    assert other_service.execute("SELECT count(*) FROM handled").fetchone()[0] == 0
    assert pending_events(other_service) == 200


def test_a_backfill_script_suppresses_capture_of_its_writes(example_db, other_service):
    result = run_script(BACKFILL_SCRIPT, example_db)
    assert (result.returncode, result.stderr) == (0, "")
    assert other_service.execute("SELECT count(*) FROM item").fetchone()[0] == 51
    assert other_service.execute("SELECT new->>'name' FROM pgevents.event").fetchall() == [("new",)]


def test_another_wsgi_server_listens_from_its_first_request(example_db, other_service, processes):
    insert_items(other_service, 20)
    port = free_port()
    server, log = processes.start([sys.executable, "-c", SERVE_SCRIPT, str(port)], example_db)
    status = wait_while_running(server, log, lambda: get_status(port))
    assert status["listener"] is True
    assert "listener threads before serving: 0" in log.read_text()
    wait_while_running(server, log, lambda: settled(other_service, 20))
    assert handled_by_item(other_service) == {item: [status["pid"]] for item in range(1, 21)}


@pytest.mark.parametrize("args", [["pgevents", "status"], ["pgevents", "install-triggers"], ["shell"]])
@pytest.mark.parametrize("case", ["sqlite", "disabled"])
def test_cli_errors_of_a_misconfigured_or_disabled_app_are_one_line(database_url, tmp_path, args, case):
    (tmp_path / "myapp.py").write_text(CONFIGURED_APP)
    env = (
        {"MYAPP_SQLALCHEMY_DATABASE_URI": "sqlite://"} if case == "sqlite"
        else {"MYAPP_SQLALCHEMY_DATABASE_URI": database_url, "MYAPP_PGEVENTS_ENABLED": "false"}
    )
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "myapp:create_app", *args],
        cwd=tmp_path, env={**{k: v for k, v in os.environ.items() if not k.startswith("FLASK_")}, **env},
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    expected = {
        "sqlite": "Error: flask-pgevents needs PostgreSQL, but SQLALCHEMY_DATABASE_URI is a 'sqlite'"
                  " URI (sqlite://). Set it to a 'postgresql://' URI.\n",
        "disabled": "Error: flask-pgevents is disabled on this app (PGEVENTS_ENABLED is False). Set"
                    " PGEVENTS_ENABLED to True, with a PostgreSQL database configured, to use"
                    " 'flask pgevents'.\n",
    }[case]
    if case == "disabled" and args == ["shell"]:
        assert result.returncode == 0, result.stderr  # the app itself works
        return
    assert (result.returncode, result.stderr) == (1, expected)
