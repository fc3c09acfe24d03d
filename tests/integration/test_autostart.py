"""Which processes handle events by themselves: one that only creates the app
handles none until it serves a request; PGEVENTS_AUTOSTART = "always" and
start() are the ways to ask; PGEVENTS_ENABLED = False opens nothing at all.

Real servers and scripts run in tests/acceptance/test_lifecycle.py.
"""
from __future__ import annotations

import sys
import threading

import pytest
from conftest import thing_app, wait_until

from flask_pgevents.lifecycle import SERVER_MODULES


def listener_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "pgevents-listener"]


def pgevents_backends(conn) -> int:
    return conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name LIKE 'pgevents-%%'"
    ).fetchone()[0]


def pending(conn) -> int:
    return conn.execute("SELECT count(*) FROM pgevents.event WHERE status = 'pending'").fetchone()[0]


@pytest.fixture(autouse=True)
def plain_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as a script sees it: no server's modules loaded."""
    for name in SERVER_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)


@pytest.fixture
def installed(make_app, other_service):
    """The triggers of a Thing app, and two pending inserts."""
    app, _, pgevents, Thing = thing_app(make_app)
    pgevents.listen(Thing, "after_insert", lambda event: None)
    with app.app_context():
        pgevents.install_triggers()
    other_service.execute("INSERT INTO thing (name) VALUES ('a'), ('b')")
    assert pending(other_service) == 2


def test_creating_the_app_handles_nothing_until_it_serves_a_request(installed, make_app, other_service, recorder):
    app, db, pgevents, Thing = thing_app(make_app, TESTING=False)
    pgevents.listen(Thing, "after_insert", recorder)
    assert listener_threads() == []
    with app.app_context():
        db.session.scalar(db.select(db.func.count()).select_from(Thing))  # a script's work
    assert listener_threads() == []
    assert pending(other_service) == 2
    # The first request is a server's: from then on this process listens.
    assert app.test_client().get("/").status_code == 404
    assert len(listener_threads()) == 1
    recorder.wait_for(2)
    app.test_client().get("/")
    assert len(listener_threads()) == 1


def test_autostart_always_listens_as_the_app_is_created(installed, make_app, recorder):
    _, _, pgevents, Thing = thing_app(make_app, TESTING=False, PGEVENTS_AUTOSTART="always")
    pgevents.listen(Thing, "after_insert", recorder)
    assert len(listener_threads()) == 1
    recorder.wait_for(2)


def test_start_is_the_way_to_ask_in_a_script(installed, make_app, recorder):
    _, _, pgevents, Thing = thing_app(make_app, TESTING=False)
    pgevents.listen(Thing, "after_insert", recorder)
    pgevents.start()
    recorder.wait_for(2)


def test_stop_before_the_first_request_cancels_the_start(installed, make_app, other_service):
    app, _, pgevents, _ = thing_app(make_app, TESTING=False)
    assert pgevents.stop(timeout=1) is True
    app.test_client().get("/")
    assert listener_threads() == []
    assert pending(other_service) == 2


def test_a_disabled_app_on_postgresql_opens_nothing_and_handles_nothing(installed, make_app, other_service, recorder):
    app, db, pgevents, Thing = thing_app(make_app, TESTING=False, PGEVENTS_ENABLED=False)
    pgevents.listen(Thing, "after_insert", recorder)
    with app.app_context():
        assert pgevents.process_pending() == 0
        with pgevents.suppressed():
            db.session.add(Thing(name="c"))  # the app's own work goes on, captured as usual
        db.session.commit()
        pgevents.start()
    app.test_client().get("/")
    assert listener_threads() == []
    wait_until(lambda: pgevents_backends(other_service) == 0)
    assert pending(other_service) == 3
    assert recorder.events == []
