"""Through HTTP, with pytest-flask's ``client``: a view writes, then the handler runs.

The ``app`` fixture pytest-flask asks for is defined here, for this module only.
"""
from __future__ import annotations

from typing import Any

import pytest
from conftest import Recorder, thing_app
from flask import Flask, abort, request


@pytest.fixture
def parts(make_app: Any, recorder: Recorder) -> tuple[Flask, Any, Any, Any]:
    """An app with views over ``Thing``, a handler that records, and its triggers installed."""
    app, db, pgevents, Thing = thing_app(make_app)
    pgevents.listen(Thing, "after_insert", recorder)
    pgevents.listen(Thing, "after_update", recorder, columns=["name"])

    @app.post("/things")
    def create_thing() -> tuple[dict[str, Any], int]:
        thing = Thing(name=request.get_json()["name"])
        db.session.add(thing)
        db.session.flush()
        if not thing.name.strip():
            db.session.rollback()
            abort(422)
        db.session.commit()
        return {"id": thing.id}, 201

    @app.patch("/things/<int:thing_id>")
    def rename_thing(thing_id: int) -> tuple[str, int]:
        db.session.get(Thing, thing_id).name = request.get_json()["name"]
        db.session.commit()
        return "", 204

    with app.app_context():
        pgevents.install_triggers()
    return app, db, pgevents, Thing


@pytest.fixture
def app(parts: tuple[Flask, Any, Any, Any]) -> Flask:
    return parts[0]


def test_a_view_commits_then_process_pending_runs_the_handler(client, parts, recorder):
    app, _, pgevents, Thing = parts
    response = client.post("/things", json={"name": "widget"})
    assert response.status_code == 201
    assert recorder.events == []  # nothing runs until asked

    assert pgevents.process_pending(app=app) == 1
    [event] = recorder.events
    assert (event.op, event.table, event.model) == ("insert", "public.thing", Thing)
    assert event.new == {"id": response.json["id"], "name": "widget"}
    assert event.target.name == "widget"


def test_an_update_through_a_view_reaches_the_handler_with_old_and_new(client, parts, recorder):
    app, _, pgevents, _ = parts
    thing_id = client.post("/things", json={"name": "widget"}).json["id"]
    assert client.patch(f"/things/{thing_id}", json={"name": "gadget"}).status_code == 204

    assert pgevents.process_pending(app=app) == 2
    update = recorder.events[1]
    assert (update.op, update.old["name"], update.new["name"], update.changed) == (
        "update", "widget", "gadget", frozenset({"name"})
    )


def test_a_view_that_rolls_back_makes_no_event(client, parts, recorder):
    app, _, pgevents, _ = parts
    assert client.post("/things", json={"name": "  "}).status_code == 422
    assert pgevents.process_pending(app=app) == 0
    assert recorder.events == []


def test_the_plugin_drains_after_a_request_and_records_what_was_handled(client, parts, recorder, pgevents_handled):
    _, _, _, Thing = parts
    client.post("/things", json={"name": "widget"})
    client.post("/things", json={"name": "gizmo"})

    assert pgevents_handled.drain() == 2
    [event] = pgevents_handled.assert_handled(Thing, "after_insert", values={"name": "gizmo"})
    assert event.new["id"] == 2
    assert pgevents_handled.ops == [("public.thing", "insert"), ("public.thing", "insert")]
    assert [e.id for e in recorder.events] == [e.id for e in pgevents_handled.events]
