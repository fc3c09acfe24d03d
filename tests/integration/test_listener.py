"""The listener thread: wake-ups, catch-up, order, failing handlers, stop."""
from __future__ import annotations

from conftest import thing_app, wait_until


def test_thread_handles_events_in_commit_order_inside_app_context(make_app, other_service, recorder):
    from flask import current_app

    app, db, pgevents, Thing = thing_app(make_app)
    seen_apps = []

    @pgevents.listens_for(Thing, "after_insert")
    def on_insert(event):
        seen_apps.append(current_app.name)
        recorder(event)

    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
    pgevents.start(app)
    for i in range(20):
        other_service.execute("INSERT INTO thing (name) VALUES (%s)", (f"n{i}",))
    events = recorder.wait_for(20)
    assert [e.new["name"] for e in events] == [f"n{i}" for i in range(20)]
    assert seen_apps == [app.name] * 20
    assert pgevents.stop(timeout=5, app=app)


def test_events_committed_while_no_listener_runs_are_handled_on_start(make_app, other_service, recorder):
    app, db, pgevents, Thing = thing_app(make_app)
    pgevents.listen(Thing, "after_insert", recorder)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
    other_service.execute("INSERT INTO thing (name) SELECT 'x' || g FROM generate_series(1, 1200) g")
    pgevents.start(app)
    events = recorder.wait_for(1200)
    assert sorted(e.new["id"] for e in events) == list(range(1, 1201))


def test_rolled_back_change_is_never_delivered(make_app, other_service, recorder):
    app, db, pgevents, Thing = thing_app(make_app)
    pgevents.listen(Thing, "after_insert", recorder)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
    with other_service.transaction(force_rollback=True):
        other_service.execute("INSERT INTO thing (name) VALUES ('gone')")
    other_service.execute("INSERT INTO thing (name) VALUES ('kept')")
    with app.app_context():
        assert pgevents.process_pending() == 1
    assert [e.new["name"] for e in recorder.events] == ["kept"]


def test_a_raising_handler_stops_neither_the_loop_nor_other_handlers(make_app, other_service, recorder, caplog):
    app, db, pgevents, Thing = thing_app(make_app, PGEVENTS_MAX_ATTEMPTS=1)

    @pgevents.listens_for(Thing, "after_insert")
    def broken(event):
        raise RuntimeError(f"boom {event.new['name']}")

    pgevents.listen(Thing, "after_insert", recorder)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
    pgevents.start(app)
    other_service.execute("INSERT INTO thing (name) VALUES ('a')")
    other_service.execute("INSERT INTO thing (name) VALUES ('b')")
    events = recorder.wait_for(2)
    assert [e.new["name"] for e in events] == ["a", "b"]
    wait_until(lambda: "boom b" in caplog.text)
    assert "Traceback" in caplog.text and "test_listener.py" in caplog.text
    with app.app_context():
        # The batch commits just after the log line: wait for both records.
        failed = wait_until(lambda: len(pgevents.failed_events()) == 2 and pgevents.failed_events())
    assert [f["errors"][next(iter(f["errors"]))]["error"] for f in failed] == [
        "RuntimeError: boom a", "RuntimeError: boom b"
    ]
