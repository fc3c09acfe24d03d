"""The dashboard's data and actions against a real PostgreSQL, through Flask's test client.

The browser test (``tests/acceptance/test_dashboard_browser.py``) clicks
through the page; these cover what a browser need not: discarding leaves
pending events alone, a database without the event schema, and one that
cannot be reached.
"""
from __future__ import annotations

from typing import Any

from conftest import thing_app
from flask.testing import FlaskClient

from flask_pgevents.dashboard import CSRF_SESSION_KEY

TOKEN = "token"


def operator_client(app: Any) -> FlaskClient:
    client = app.test_client()
    with client.session_transaction() as session:
        session[CSRF_SESSION_KEY] = TOKEN
    return client


def two_failed_events(make_app: Any, other_service: Any) -> tuple[Any, Any, list[bool]]:
    """An app with the dashboard at /events and two failed events; ``failing[0] = False`` mends its handler."""
    app, _db, pgevents, Thing = thing_app(make_app, SECRET_KEY="test", PGEVENTS_MAX_ATTEMPTS=1)
    failing = [True]

    @pgevents.listens_for(Thing, "after_insert")
    def handler(event: Any) -> None:
        if failing[0]:
            raise RuntimeError("down")

    app.register_blueprint(pgevents.dashboard_blueprint(authorize=lambda request: True), url_prefix="/events")
    with app.app_context():
        pgevents.install_triggers()
    other_service.execute("INSERT INTO thing (name) VALUES ('a'), ('b')")
    assert pgevents.process_pending(app=app) == 2
    return app, pgevents, failing


def test_discard_deletes_only_failed_events(make_app, other_service):
    app, pgevents, _failing = two_failed_events(make_app, other_service)
    other_service.execute("INSERT INTO thing (name) VALUES ('c')")  # stays pending
    ids = [row[0] for row in other_service.execute("SELECT id FROM pgevents.event ORDER BY id").fetchall()]

    client = operator_client(app)
    response = client.post("/events/discard", data={"csrf_token": TOKEN, "event_id": [str(i) for i in ids]})
    assert (response.status_code, response.headers["Location"]) == (303, "/events/?discarded=2")
    assert other_service.execute("SELECT id, status FROM pgevents.event").fetchall() == [(ids[2], "pending")]
    assert "2 event(s) discarded." in client.get(response.headers["Location"]).get_data(as_text=True)
    with app.app_context():
        assert pgevents.discard_failed(ids) == 0


def test_retry_all_queues_every_failed_event(make_app, other_service):
    app, pgevents, failing = two_failed_events(make_app, other_service)
    failing[0] = False

    response = operator_client(app).post("/events/retry", data={"csrf_token": TOKEN, "all": "1"})
    assert response.headers["Location"] == "/events/?retried=2"
    assert pgevents.process_pending(app=app) == 2
    assert other_service.execute("SELECT count(*) FROM pgevents.event").fetchone()[0] == 0


def test_a_database_without_the_event_schema_says_how_to_install_it(make_app):
    app, _db, pgevents, Thing = thing_app(make_app, SECRET_KEY="test")
    pgevents.listen(Thing, "after_insert", lambda event: None)
    app.register_blueprint(pgevents.dashboard_blueprint(authorize=lambda request: True))
    response = app.test_client().get("/")
    html = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "The event table is missing in schema pgevents" in html
    assert "<td>public.thing</td><td>insert</td><td class=\"missing\">missing</td>" in html


def test_an_unreachable_database_answers_503_with_the_reason(make_app):
    unreachable_app, _db2, unreachable = make_app(
        SECRET_KEY="test", PGEVENTS_DATABASE_URI="postgresql://nobody@127.0.0.1:1/none", PGEVENTS_CONNECT_TIMEOUT=2
    )
    unreachable.init_app(unreachable_app)
    unreachable_app.register_blueprint(unreachable.dashboard_blueprint(authorize=lambda request: True))
    response = unreachable_app.test_client().get("/")
    assert response.status_code == 503
    assert "Could not connect to the database" in response.get_data(as_text=True)
