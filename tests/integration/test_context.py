"""event.context and event.txid: who made a change and in which transaction, from the
Flask request, pgevents.context() and other clients' SET LOCAL pgevents.context."""
from __future__ import annotations

import logging
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import thing_app
from flask import session

OPS = ["after_insert", "after_update", "after_delete"]


@pytest.fixture
def things(make_app, recorder) -> Any:
    """app, db, pgevents and Thing of an app whose handler records every change."""
    app, db, pgevents, Thing = thing_app(make_app, SECRET_KEY="test")
    pgevents.listen(Thing, OPS, recorder)

    @app.post("/things/<name>")
    def create(name: str) -> str:
        db.session.add(Thing(name=name))
        db.session.commit()
        db.session.add(Thing(name=name + "-2"))  # a second transaction of the request
        db.session.commit()
        return "ok"

    with app.app_context():
        pgevents.install_triggers()
        yield app, db, pgevents, Thing
        db.session.remove()


def contexts(recorder) -> list[tuple[str, dict[str, Any]]]:
    return [((event.new or event.old)["name"], event.context) for event in recorder.events]


def test_a_request_gives_its_endpoint_and_request_id(things, recorder):
    app, _, pgevents, _ = things
    response = app.test_client().post("/things/a", headers={"X-Request-ID": "req-42"})
    assert response.status_code == 200
    assert pgevents.process_pending() == 2
    expected = {"endpoint": "create", "request_id": "req-42"}
    assert contexts(recorder) == [("a", expected), ("a-2", expected)]


def test_a_request_without_an_id_gets_one_shared_by_its_transactions(things, recorder):
    app, _, pgevents, _ = things
    app.test_client().post("/things/a")
    app.test_client().post("/things/b")
    assert pgevents.process_pending() == 4
    ids = [event.context["request_id"] for event in recorder.events]
    assert ids[0] == ids[1] != ids[2] == ids[3]
    assert len(ids[0]) == 32


def test_context_providers_add_the_user(things, recorder, caplog):
    app, _, pgevents, _ = things

    @app.post("/login/<user>")
    def login(user: str) -> str:
        session["user_id"] = user
        return "ok"

    @pgevents.context_provider
    def who() -> dict[str, Any]:
        return {"user_id": session.get("user_id")}

    @pgevents.context_provider
    def broken() -> dict[str, Any]:
        raise LookupError("no tenant")

    client = app.test_client()
    client.post("/login/ada")
    with caplog.at_level(logging.ERROR, logger="flask_pgevents"):
        client.post("/things/a", headers={"X-Request-ID": "r1"})
    assert pgevents.process_pending() == 2
    assert recorder.events[0].context == {"endpoint": "create", "request_id": "r1", "user_id": "ada"}
    assert "The context provider" in caplog.text and "no tenant" in caplog.text


def test_the_request_default_can_be_turned_off(make_app, recorder):
    app, db, pgevents, Thing = thing_app(make_app, PGEVENTS_REQUEST_CONTEXT=False)
    pgevents.listen(Thing, "after_insert", recorder)

    @app.post("/")
    def create() -> str:
        db.session.add(Thing(name="a"))
        db.session.commit()
        return "ok"

    with app.app_context():
        pgevents.install_triggers()
        app.test_client().post("/")
        assert pgevents.process_pending() == 1
        db.session.remove()
    assert recorder.events[0].context == {}


def test_context_blocks_set_values_for_the_sessions_work(things, recorder):
    _, db, pgevents, Thing = things
    db.session.add(Thing(name="before"))  # flushed as the block starts: no context
    with pgevents.context(actor="cron", job="nightly"):
        db.session.add(Thing(name="cron"))
        db.session.commit()  # the next transaction keeps the values
        with pgevents.context(job="inner", run=3):
            db.session.execute(sa.update(Thing).where(Thing.name == "cron").values(name="inner"))
        db.session.add(Thing(name="outer"))  # flushed as the outer block ends
    db.session.add(Thing(name="after"))
    db.session.commit()
    assert pgevents.process_pending() == 5
    assert contexts(recorder) == [
        ("before", {}),
        ("cron", {"actor": "cron", "job": "nightly"}),
        ("inner", {"actor": "cron", "job": "inner", "run": 3}),
        ("outer", {"actor": "cron", "job": "nightly"}),
        ("after", {}),
    ]


def test_a_context_block_inside_a_request_adds_to_its_values(things, recorder):
    app, db, pgevents, Thing = things

    @app.post("/import")
    def import_() -> str:
        with pgevents.context(source="csv"):
            db.session.add(Thing(name="imported"))
            db.session.commit()
        return "ok"

    app.test_client().post("/import", headers={"X-Request-ID": "r2"})
    assert pgevents.process_pending() == 1
    assert recorder.events[0].context == {"endpoint": "import_", "request_id": "r2", "source": "csv"}


@pytest.mark.parametrize(("setting", "expected"), [
    ("""SET LOCAL pgevents.context = '{"actor": "psql", "ticket": 7}'""", {"actor": "psql", "ticket": 7}),
    ("SELECT set_config('pgevents.context', '{\"actor\": \"psql\"}', true)", {"actor": "psql"}),
    ("SET LOCAL pgevents.context = 'cron'", {"value": "cron"}),  # not JSON: never fails the write
    ("SET LOCAL pgevents.context = '[1, 2]'", {"value": [1, 2]}),
    ("SET LOCAL pgevents.context = ''", {}),
])
def test_other_clients_set_the_context_with_set_local(things, other_service, recorder, setting, expected):
    _, _, pgevents, _ = things
    with other_service.transaction():
        other_service.execute(setting)
        other_service.execute("INSERT INTO thing (name) VALUES ('a'), ('b')")
        other_service.execute("UPDATE thing SET name = name || '!'")
        other_service.execute("DELETE FROM thing WHERE name = 'b!'")
    other_service.execute("INSERT INTO thing (name) VALUES ('later')")  # the setting ended
    assert pgevents.process_pending() == 6
    assert [event.context for event in recorder.events] == [expected] * 5 + [{}]


def test_writes_without_a_context_store_null(things, other_service):
    _, db, _, Thing = things
    db.session.add(Thing(name="a"))
    db.session.commit()
    other_service.execute("INSERT INTO thing (name) VALUES ('b')")
    assert other_service.execute("SELECT count(*) FROM pgevents.event WHERE context IS NULL").fetchone() == (2,)


def test_events_of_one_transaction_share_its_txid_in_id_order(things, other_service, recorder):
    _, db, pgevents, Thing = things
    with other_service.transaction():
        other_service.execute("INSERT INTO thing (name) VALUES ('a'), ('b')")
        other_service.execute("UPDATE thing SET name = 'c' WHERE name = 'a'")
        writer = int(other_service.execute("SELECT pg_current_xact_id()::text").fetchone()[0])
    db.session.add(Thing(name="other"))
    db.session.commit()
    assert pgevents.process_pending() == 4
    first, second, third, fourth = recorder.events
    assert first.txid == second.txid == third.txid == writer
    assert fourth.txid is not None and fourth.txid > writer
    assert first.id < second.id < third.id
    assert [first.op, second.op, third.op] == ["insert", "insert", "update"]
    assert not any(event.backfill for event in recorder.events)


def test_broadcast_events_carry_the_context_and_txid(make_app, recorder):
    app, db, pgevents, Thing = thing_app(make_app)
    pgevents.listen(Thing, "after_insert", recorder, broadcast=True)
    with app.app_context():
        pgevents.install_triggers()
        pgevents.start()
        try:
            from conftest import wait_until

            wait_until(lambda: db.session.scalar(sa.text("SELECT count(*) FROM pgevents.listener")))
            db.session.remove()
            with pgevents.context(actor="cron"):
                db.session.add(Thing(name="a"))
                db.session.commit()
            [event] = recorder.wait_for(1)
        finally:
            pgevents.stop(timeout=10)
            db.session.remove()
    assert event.context == {"actor": "cron"}
