"""Wake-ups: writers NOTIFY only while a listener sleeps, and no commit waits for the safety poll."""
from __future__ import annotations

import threading
import time

import psycopg
from conftest import thing_app, wait_until


def _sleeping_listeners(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM pgevents.listener WHERE idle").fetchone()[0]


def test_writers_notify_only_while_a_listener_sleeps(make_app, other_service, libpq_url, recorder):
    app, _db, pgevents, Thing = thing_app(make_app)
    pgevents.listen(Thing, "after_insert", recorder)
    with app.app_context():
        pgevents.install_triggers()
    with psycopg.connect(libpq_url, autocommit=True) as spy:
        spy.execute("LISTEN pgevents")
        # No listener runs: nobody to wake, no NOTIFY.
        other_service.execute("INSERT INTO thing (name) VALUES ('unheard')")
        assert list(spy.notifies(timeout=0.3)) == []
        pgevents.start(app)
        recorder.wait_for(1)  # caught up from the table, not from a NOTIFY
        wait_until(lambda: _sleeping_listeners(other_service) == 1)
        other_service.execute("INSERT INTO thing (name) VALUES ('heard')")
        assert [n.payload for n in spy.notifies(timeout=5, stop_after=1)] == [""]
    assert [e.new["name"] for e in recorder.wait_for(2)] == ["unheard", "heard"]


def test_a_commit_racing_the_listener_into_sleep_is_not_left_to_the_safety_poll(make_app, other_service, libpq_url):
    # A safety poll so long that only the in-flight recheck can deliver in time.
    app, _db, pgevents, Thing = thing_app(make_app, PGEVENTS_POLL_INTERVAL=60)
    writer_inserted = threading.Event()
    handled: dict[str, float] = {}

    @pgevents.listens_for(Thing, "after_insert")
    def on_insert(event):
        if event.new["name"] == "first":
            # Keep the listener busy until the racing writer has inserted.
            assert writer_inserted.wait(10)
        handled[event.new["name"]] = time.monotonic()

    with app.app_context():
        pgevents.install_triggers()
    pgevents.start(app)
    wait_until(lambda: _sleeping_listeners(other_service) == 1)
    # A burst makes the listener busy: it stops asking for NOTIFYs, and the
    # last event of the burst keeps it working until the racing writer wrote.
    other_service.execute(
        "INSERT INTO thing (name) SELECT CASE WHEN g = 1000 THEN 'first' ELSE 'burst' END"
        " FROM generate_series(1, 1000) AS g"
    )
    wait_until(lambda: _sleeping_listeners(other_service) == 0)
    with psycopg.connect(libpq_url) as racing:  # a transaction, committed later
        racing.execute("INSERT INTO thing (name) VALUES ('racing')")
        writer_inserted.set()
        # The listener finishes 'first', lingers and goes to sleep meanwhile.
        wait_until(lambda: _sleeping_listeners(other_service) == 1)
        racing.commit()
        committed = time.monotonic()
    wait_until(lambda: "racing" in handled, timeout=5)
    assert handled["racing"] - committed < 2.0


def test_an_event_committed_after_a_later_one_was_handled_is_not_left_to_the_safety_poll(
    make_app, other_service, libpq_url
):
    # Claims start after the last handled id. A transaction that took its
    # event id first but commits last is still handled at once, without
    # waiting for the full scan of the safety poll (30 s here): whether the
    # listener slept when its trigger ran (it is woken) or was busy (no
    # NOTIFY: it rechecks while transactions are in flight).
    app, _db, pgevents, Thing = thing_app(make_app, PGEVENTS_POLL_INTERVAL=30)
    names: list[str] = []
    in_handler, release = threading.Event(), threading.Event()

    @pgevents.listens_for(Thing, "after_insert")
    def record(event):
        if event.new["name"] == "blocker":
            in_handler.set()
            release.wait(10)
        names.append(event.new["name"])

    with app.app_context():
        pgevents.install_triggers()
    pgevents.start(app)
    for busy_listener in (False, True):
        wait_until(lambda: _sleeping_listeners(other_service) == 1)
        names.clear()
        in_handler.clear()
        release.clear()
        if busy_listener:
            other_service.execute("INSERT INTO thing (name) VALUES ('blocker')")
            assert in_handler.wait(5)
        with psycopg.connect(libpq_url) as slow:
            slow.execute("INSERT INTO thing (name) VALUES ('first id, committed last')")
            other_service.execute("INSERT INTO thing (name) VALUES ('second id, committed first')")
            release.set()
            wait_until(lambda: "second id, committed first" in names, timeout=5)
            slow.commit()
        started = time.monotonic()
        wait_until(lambda: "first id, committed last" in names, timeout=5)
        assert time.monotonic() - started < 2
        assert names[-2:] == ["second id, committed first", "first id, committed last"]


def test_retried_events_behind_a_listeners_cursor_are_handled_at_once(make_app, other_service):
    # 'flask pgevents retry' queues events whose ids the running listener
    # has passed: its wake-up asks for a claim from the first id, so they do
    # not wait for the next full scan of the safety poll (30 s here).
    app, _db, pgevents, Thing = thing_app(make_app, PGEVENTS_POLL_INTERVAL=30, PGEVENTS_MAX_ATTEMPTS=1)
    calls: list[str] = []
    healthy = threading.Event()

    @pgevents.listens_for(Thing, "after_insert")
    def flaky(event):
        calls.append(event.new["name"])
        if not healthy.is_set():
            raise RuntimeError("down")

    with app.app_context():
        pgevents.install_triggers()
    pgevents.start(app)
    other_service.execute("INSERT INTO thing (name) VALUES ('a'), ('b')")
    wait_until(lambda: other_service.execute(
        "SELECT count(*) FROM pgevents.event WHERE status = 'failed'").fetchone()[0] == 2)
    healthy.set()
    other_service.execute("INSERT INTO thing (name) VALUES ('c')")  # moves the cursor past them
    wait_until(lambda: calls.count("c") == 1)
    with app.app_context():
        assert pgevents.retry_failed() == 2
    started = time.monotonic()
    wait_until(lambda: calls.count("a") == 2 and calls.count("b") == 2, timeout=5)
    assert time.monotonic() - started < 2
