"""Faults: dropped connections, server restarts, kill -9, concurrency, failing handlers, stop."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from typing import Any, Iterator

import psycopg
import pytest
from conftest import thing_app, wait_until

from flask_pgevents.embedded import EmbeddedPostgres

from . import reliability_app

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: The reliability app, as `flask --app` takes it from ROOT.
RELIABILITY_APP = "tests/acceptance/reliability_app.py:create_app"


def listener_backends(conn: psycopg.Connection) -> list[int]:
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgevents-listener'"
        " AND datname = current_database()"
    ).fetchall()
    return [pid for (pid,) in rows]


class Listeners:
    """`flask pgevents listen` subprocesses on the reliability app; always cleaned up."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.procs: list[tuple[subprocess.Popen[str], Any]] = []

    def start(self, **env: str) -> subprocess.Popen[str]:
        log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed with its process in close()
        proc = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", RELIABILITY_APP, "pgevents", "listen"],
            cwd=ROOT,
            env={**os.environ, "DATABASE_URL": self.database_url, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.procs.append((proc, log))
        return proc

    def output(self, proc: subprocess.Popen[str]) -> str:
        for candidate, log in self.procs:
            if candidate is proc:
                log.seek(0)
                return log.read()
        raise KeyError(proc)

    def close(self) -> None:
        for proc, log in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            log.close()


@pytest.fixture
def listeners(database_url: str) -> Iterator[Listeners]:
    group = Listeners(database_url)
    yield group
    group.close()


@pytest.fixture
def reliability_db(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The reliability app's tables and triggers in the test database."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    app = reliability_app.create_app()
    with app.app_context():
        reliability_app.db.create_all()
        reliability_app.pgevents.install_triggers()
    yield app
    with app.app_context():
        reliability_app.db.engine.dispose()


def handled_by(conn: psycopg.Connection) -> dict[int, list[int]]:
    rows = conn.execute("SELECT item_id, pid FROM handled WHERE stage = 'done' ORDER BY id").fetchall()
    result: dict[int, list[int]] = {}
    for item_id, pid in rows:
        result.setdefault(item_id, []).append(pid)
    return result




def start_slow_then_fast(listeners: Listeners, other_service: psycopg.Connection, insert: str) -> tuple[Any, Any]:
    """A listener busy in a 300 s handler with what ``insert`` wrote, then a second one idle."""
    slow = listeners.start(SLOW_SECONDS="300")
    wait_until(lambda: len(listener_backends(other_service)) == 1)
    other_service.execute(insert)
    wait_until(lambda: other_service.execute("SELECT count(*) FROM handled WHERE stage = 'started'").fetchone()[0])
    fast = listeners.start()
    wait_until(lambda: len(listener_backends(other_service)) == 2)
    return slow, fast


def test_terminated_backend_is_replaced_and_next_event_handled_within_2s(make_app, other_service, recorder):
    app, _db, pgevents, Thing = thing_app(make_app)
    pgevents.listen(Thing, "after_insert", recorder)
    with app.app_context():
        pgevents.install_triggers()
    pgevents.start(app)
    (old_pid,) = wait_until(lambda: listener_backends(other_service))
    other_service.execute("SELECT pg_terminate_backend(%s)", (old_pid,))
    started = time.monotonic()
    other_service.execute("INSERT INTO thing (name) VALUES ('after')")
    recorder.wait_for(1, timeout=2.0)
    assert time.monotonic() - started < 2.0
    assert [e.new["name"] for e in recorder.events] == ["after"]
    (new_pid,) = wait_until(lambda: listener_backends(other_service))
    assert new_pid != old_pid


@pytest.fixture
def own_server() -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres()
    yield server
    server.stop()


def test_server_restart_mid_stream_loses_nothing(own_server, driver, make_app, recorder):
    # A dedicated server: restarting it must not disturb the other tests' one.
    url = own_server.url(driver=driver)
    libpq = own_server.url()
    app, db, pgevents, Thing = thing_app(
        make_app, SQLALCHEMY_DATABASE_URI=url, PGEVENTS_RECONNECT_BACKOFF_MAX=0.5
    )
    pgevents.listen(Thing, "after_insert", recorder)
    with app.app_context():
        pgevents.install_triggers()
    pgevents.start(app)
    committed: list[int] = []
    stop_writing = threading.Event()

    def write() -> None:
        i = 0
        while not stop_writing.is_set():
            try:
                with psycopg.connect(libpq, autocommit=True) as conn:
                    while not stop_writing.is_set():
                        i += 1
                        conn.execute("INSERT INTO thing (id, name) VALUES (%s, 'x')", (i,))
                        committed.append(i)
            except psycopg.OperationalError:
                stop_writing.wait(0.05)  # the server is restarting

    writer = threading.Thread(target=write, name="test-writer")
    writer.start()
    try:
        wait_until(lambda: len(recorder.events) >= 50)
        own_server.restart()
        count = len(committed)
        wait_until(lambda: len(committed) > count + 50, timeout=20)
    finally:
        stop_writing.set()
        writer.join(10)
    wait_until(lambda: {e.new["id"] for e in recorder.events} >= set(committed), timeout=20)
    assert {e.new["id"] for e in recorder.events} == set(committed)
    pgevents.stop(timeout=5, app=app)
    with app.app_context():
        db.engine.dispose()


def test_events_of_a_killed_listener_are_handled_by_another_within_a_second(
    reliability_db, listeners, other_service
):
    slow, fast = start_slow_then_fast(
        listeners, other_service, "INSERT INTO item (name) VALUES ('slow'), ('a'), ('b'), ('c')"
    )
    assert handled_by(other_service) == {}  # the slow process holds all four
    os.kill(slow.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    handled = wait_until(lambda: len(handled_by(other_service)) == 4 and handled_by(other_service), timeout=5)
    assert time.monotonic() - killed_at < 2.0
    assert {pids[0] for pids in handled.values()} == {fast.pid}
    assert all(len(pids) == 1 for pids in handled.values())


def test_four_listeners_four_writers_handle_every_event_exactly_once(
    reliability_db, listeners, other_service, libpq_url
):
    total, writers = 20_000, 4
    for _ in range(4):
        listeners.start()
    wait_until(lambda: len(listener_backends(other_service)) == 4, timeout=20)

    def write(offset: int) -> None:
        with psycopg.connect(libpq_url, autocommit=True) as conn:
            per_writer = total // writers
            for start in range(0, per_writer, 50):
                # Mix single-row and multi-row statements.
                ids = range(offset + start, offset + start + 50)
                if start % 100:
                    conn.execute("INSERT INTO item (id, name) SELECT g, 'w' FROM unnest(%s::int[]) g", (list(ids),))
                else:
                    for i in ids:
                        conn.execute("INSERT INTO item (id, name) VALUES (%s, 'w')", (i,))

    threads = [threading.Thread(target=write, args=(w * total,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    wait_until(
        lambda: other_service.execute("SELECT count(*) FROM handled").fetchone()[0] >= total, timeout=120
    )
    count, distinct_events, distinct_items, processes = other_service.execute(
        "SELECT count(*), count(DISTINCT event_id), count(DISTINCT item_id), count(DISTINCT pid) FROM handled"
    ).fetchone()
    assert (count, distinct_events, distinct_items) == (total, total, total)
    assert processes >= 2
    assert other_service.execute("SELECT count(*) FROM pgevents.event").fetchone()[0] == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_finishes_the_handler_and_releases_the_rest(
    reliability_db, listeners, other_service, signum
):
    proc = listeners.start(SLOW_SECONDS="1.5")
    wait_until(lambda: listener_backends(other_service))
    other_service.execute("INSERT INTO item (name) VALUES ('slow'), ('a'), ('b')")
    wait_until(lambda: other_service.execute("SELECT count(*) FROM handled WHERE stage = 'started'").fetchone()[0])
    proc.send_signal(signum)
    assert proc.wait(timeout=15) == 0, listeners.output(proc)
    # The handler in progress finished; the two it had not reached are free.
    assert list(handled_by(other_service)) == [1]
    free = other_service.execute(
        "SELECT count(*) FROM (SELECT 1 FROM pgevents.event FOR UPDATE SKIP LOCKED) AS e"
    ).fetchone()[0]
    assert free == 2
    assert "Listener stopped." in listeners.output(proc)


def test_stop_waits_for_the_handler_in_progress(make_app, other_service):
    app, _db, pgevents, Thing = thing_app(make_app)
    started, finished = threading.Event(), threading.Event()

    @pgevents.listens_for(Thing, "after_insert")
    def slow(event):
        started.set()
        time.sleep(0.5)
        finished.set()

    with app.app_context():
        pgevents.install_triggers()
    pgevents.start(app)
    other_service.execute("INSERT INTO thing (name) VALUES ('a'), ('b')")
    assert started.wait(10)
    assert pgevents.stop(timeout=10, app=app)
    assert finished.is_set()
    pending = other_service.execute("SELECT count(*) FROM pgevents.event").fetchone()[0]
    assert pending == 1  # 'b' was released, not lost


def test_retries_are_per_handler_with_counted_attempts(make_app, other_service):
    app, _db, pgevents, Thing = thing_app(make_app, PGEVENTS_MAX_ATTEMPTS=5, PGEVENTS_RETRY_BACKOFF=0.01)
    calls: dict[str, list[int]] = {"steady": [], "flaky": []}

    @pgevents.listens_for(Thing, "after_insert")
    def steady(event):
        calls["steady"].append(event.attempt)

    @pgevents.listens_for(Thing, "after_insert")
    def flaky(event):
        calls["flaky"].append(event.attempt)
        if event.attempt < 3:
            raise ValueError("not yet")

    with app.app_context():
        pgevents.install_triggers()
    other_service.execute("INSERT INTO thing (name) VALUES ('a')")
    with app.app_context():
        wait_until(lambda: pgevents.process_pending() and not calls["flaky"][-1] < 3, timeout=10)
    assert calls == {"steady": [1], "flaky": [1, 2, 3]}
    assert other_service.execute("SELECT count(*) FROM pgevents.event").fetchone()[0] == 0


def test_last_failed_attempt_is_kept_with_error_and_traceback(make_app, other_service):
    app, _db, pgevents, Thing = thing_app(make_app, PGEVENTS_MAX_ATTEMPTS=2, PGEVENTS_RETRY_BACKOFF=0.01)
    attempts: list[int] = []

    @pgevents.listens_for(Thing, "after_insert")
    def broken(event):
        attempts.append(event.attempt)
        raise KeyError("missing thing")

    with app.app_context():
        pgevents.install_triggers()
    other_service.execute("INSERT INTO thing (name) VALUES ('a')")
    with app.app_context():
        wait_until(lambda: pgevents.process_pending() == 0 and pgevents.failed_events(), timeout=10)
        (failed,) = pgevents.failed_events()
        assert attempts == [1, 2]
        assert failed["attempt"] == 2
        (error,) = failed["errors"].values()
        assert error["error"] == "KeyError: 'missing thing'"
        assert 'raise KeyError("missing thing")' in error["traceback"]
        assert pgevents.retry_failed(event_ids=[failed["id"]]) == 1
        assert pgevents.process_pending() == 1
        assert attempts == [1, 2, 1]


def test_retention_keeps_handled_events_then_purges_them(make_app, other_service, recorder):
    app, _db, pgevents, Thing = thing_app(make_app, PGEVENTS_RETENTION=0.5)
    pgevents.listen(Thing, "after_insert", recorder)
    with app.app_context():
        pgevents.install_triggers()
    other_service.execute("INSERT INTO thing (name) VALUES ('a'), ('b')")
    pgevents.start(app)
    recorder.wait_for(2)
    # Kept a while after being handled (the batch commits just after the handlers ran).
    wait_until(
        lambda: other_service.execute("SELECT count(*) FROM pgevents.event WHERE status = 'done'").fetchone()[0] == 2
    )
    wait_until(lambda: other_service.execute("SELECT count(*) FROM pgevents.event").fetchone()[0] == 0, timeout=10)
    assert len(recorder.events) == 2


EXIT_SCRIPT = """
import os, sys, time
sys.path.insert(0, "tests")
from acceptance import reliability_app
app = reliability_app.create_app()
reliability_app.pgevents.start(app)
import psycopg
with psycopg.connect(os.environ["LIBPQ_URL"], autocommit=True) as conn:
    while conn.execute("SELECT count(*) FROM handled WHERE stage = 'done'").fetchone()[0] < 3:
        time.sleep(0.01)
sys.exit(0)  # while the listener thread is in the middle of a batch
"""


def test_interpreter_exit_settles_the_batch_in_progress(reliability_db, other_service, libpq_url, database_url):
    # Slow handlers, so the exit lands in the middle of one batch.
    other_service.execute("INSERT INTO item (name) SELECT 'slow' || g FROM generate_series(1, 20) g")
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url, "LIBPQ_URL": libpq_url, "SLOW_SECONDS": "0.1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    handled = handled_by(other_service)
    pending = other_service.execute("SELECT count(*) FROM pgevents.event").fetchone()[0]
    # Every handled event was settled (deleted); the rest are pending, none lost.
    assert all(len(pids) == 1 for pids in handled.values())
    assert len(handled) + pending == 20
    assert len(handled) < 20


def test_a_handler_that_forks_keeps_the_listener_running(make_app, other_service, recorder):
    app, _db, pgevents, Thing = thing_app(make_app)

    @pgevents.listens_for(Thing, "after_insert")
    def forks(event):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
            pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        recorder(event)

    with app.app_context():
        pgevents.install_triggers()
    pgevents.start(app)
    other_service.execute("INSERT INTO thing (name) VALUES ('a')")
    recorder.wait_for(1)
    other_service.execute("INSERT INTO thing (name) VALUES ('b')")
    events = recorder.wait_for(2)
    assert [e.new["name"] for e in events] == ["a", "b"]
    assert any(t.name == "pgevents-listener" for t in threading.enumerate())


def test_a_long_handler_keeps_its_event_while_other_processes_go_on(reliability_db, listeners, other_service):
    slow, fast = start_slow_then_fast(listeners, other_service, "INSERT INTO item (id, name) VALUES (1, 'slow')")
    other_service.execute("INSERT INTO item (id, name) VALUES (2, 'x'), (3, 'y')")
    handled = wait_until(lambda: len(handled_by(other_service)) == 2 and handled_by(other_service))
    assert handled == {2: [fast.pid], 3: [fast.pid]}
    # The slow event is still claimed by the slow process, never handed over.
    assert slow.poll() is None
    free = other_service.execute(
        "SELECT count(*) FROM (SELECT 1 FROM pgevents.event FOR UPDATE SKIP LOCKED) AS e"
    ).fetchone()[0]
    assert (free, other_service.execute("SELECT count(*) FROM pgevents.event").fetchone()[0]) == (0, 1)


def test_passwords_in_the_dsn_never_reach_the_logs(make_app, caplog):
    app, _db, pgevents = make_app(
        SQLALCHEMY_DATABASE_URI="postgresql+psycopg2://app:s3cret-pw@127.0.0.1:1/nowhere",
        PGEVENTS_RECONNECT_BACKOFF=0.01,
    )
    pgevents.listen("public.thing", "after_insert", lambda event: None)
    pgevents.init_app(app)
    pgevents.start(app)
    wait_until(lambda: caplog.text.count("Could not connect to the database") >= 2)
    pgevents.stop(timeout=5, app=app)
    assert "127.0.0.1" in caplog.text and "s3cret-pw" not in caplog.text


# Exactly-once database effects (PGEVENTS_ATOMIC_HANDLERS) ---------------------------------


def soak(listeners: Listeners, other_service: psycopg.Connection, libpq_url: str, total: int, **env: str) -> None:
    """Write ``total`` items while listeners are killed with SIGKILL and respawned, and
    one listener backend is terminated; wait until every event is settled."""
    procs = [listeners.start(**env) for _ in range(3)]
    wait_until(lambda: len(listener_backends(other_service)) == 3, timeout=20)
    written = threading.Event()

    def write() -> None:
        with psycopg.connect(libpq_url, autocommit=True) as conn:
            for start in range(0, total, 20):
                conn.execute(
                    "INSERT INTO item (id, name) SELECT g, 'w' FROM generate_series(%s::int, %s::int) AS g",
                    (start, min(start + 19, total - 1)),
                )
                time.sleep(0.002)
        written.set()

    writer = threading.Thread(target=write, name="soak-writer")
    writer.start()
    kills = 0
    terminated = False
    chance = random.Random(14)
    while not written.is_set() or kills < 6:
        time.sleep(chance.uniform(0.3, 0.8))
        victim = procs.pop(chance.randrange(len(procs)))
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        kills += 1
        procs.append(listeners.start(**env))
        if not terminated and kills == 3:
            terminated = True
            other_service.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'pgevents-listener' AND datname = current_database() LIMIT 1"
            )
    writer.join(60)
    wait_until(
        lambda: other_service.execute("SELECT count(*) FROM pgevents.event").fetchone()[0] == 0, timeout=60
    )


def test_handlers_session_writes_happen_exactly_once_through_kills_and_terminated_backends(
    reliability_db, listeners, other_service, libpq_url
):
    total = 3_000
    soak(listeners, other_service, libpq_url, total)
    count, events, items = other_service.execute(
        "SELECT count(*), count(DISTINCT event_id), count(DISTINCT item_id) FROM handled WHERE stage = 'done'"
    ).fetchone()
    assert (count, events, items) == (total, total, total)


def test_a_handler_failing_half_the_time_leaves_no_partial_writes_and_is_retried(
    reliability_db, listeners, other_service, libpq_url
):
    total = 1_000
    soak(listeners, other_service, libpq_url, total, FAIL_HALF="1")
    count, items, partial = other_service.execute(
        "SELECT count(*) FILTER (WHERE stage = 'done'), count(DISTINCT item_id) FILTER (WHERE stage = 'done'),"
        " count(*) FILTER (WHERE stage = 'partial') FROM handled"
    ).fetchone()
    assert (count, items, partial) == (total, total, 0)
    retried = other_service.execute("SELECT count(*) FROM handled_attempt WHERE attempt > 1").fetchone()[0]
    assert retried > 0
