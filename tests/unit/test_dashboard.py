"""dashboard.py: who may see it, CSRF on its forms, escaping of rows; no database.

The app is disabled (``PGEVENTS_ENABLED = False``), so a view that gets past
the checks meets ``DisabledError`` instead of a server. The browser test
(``tests/acceptance/test_dashboard_browser.py``) runs it against one.
"""
from __future__ import annotations

import datetime
import re
from typing import Any, Callable

import pytest
from conftest import raises
from flask import Flask, Request
from flask.testing import FlaskClient

from flask_pgevents import ConfigurationError, DisabledError, MissingAuthorizationError, PGEvents, PGEventsError
from flask_pgevents.dashboard import (
    CSRF_SESSION_KEY,
    DashboardData,
    FailedEventView,
    HandlerError,
    format_age,
    pretty_json,
    render_page,
)
from flask_pgevents.stats import LiveListener, PendingEvents, ProcessStats, Stats, TriggerState

TOKEN = "a-token-of-this-session"


def dashboard_app(authorize: Callable[[Request], bool] = lambda request: True, **config: Any) -> Flask:
    app = Flask("dashboard")
    app.config.update({"TESTING": True, "SECRET_KEY": "test", "PGEVENTS_ENABLED": False, **config})
    pgevents = PGEvents(app)
    app.register_blueprint(pgevents.dashboard_blueprint(authorize=authorize), url_prefix="/events")
    return app


def client_with_token(app: Flask) -> FlaskClient:
    client = app.test_client()
    with client.session_transaction() as session:
        session[CSRF_SESSION_KEY] = TOKEN
    return client


# Registration ---------------------------------------------------------------------


def test_a_dashboard_without_authorize_is_refused():
    pgevents = PGEvents()
    with pytest.raises(MissingAuthorizationError) as info:
        pgevents.dashboard_blueprint()
    assert "needs an 'authorize' callback" in str(info.value)
    assert isinstance(info.value, PGEventsError) and isinstance(info.value, TypeError)


def test_authorize_must_be_callable():
    with raises(
        MissingAuthorizationError,
        "The dashboard's 'authorize' must be a callable taking the request and returning a bool, not True.",
    ):
        PGEvents().dashboard_blueprint(authorize=True)  # type: ignore[arg-type]


def test_registering_it_needs_a_secret_key():
    app = Flask("dashboard")
    app.config["PGEVENTS_ENABLED"] = False
    pgevents = PGEvents(app)
    with pytest.raises(ConfigurationError, match=re.escape("needs a secret key. Set app.config['SECRET_KEY']")):
        app.register_blueprint(pgevents.dashboard_blueprint(authorize=lambda request: True))


def test_nothing_is_served_unless_registered():
    app = Flask("dashboard")
    app.config.update(SECRET_KEY="test", PGEVENTS_ENABLED=False)
    pgevents = PGEvents(app)
    pgevents.dashboard_blueprint(authorize=lambda request: True)
    assert app.test_client().get("/").status_code == 404


def test_url_prefix_and_name_are_the_callers():
    app = Flask("dashboard")
    app.config.update(SECRET_KEY="test", PGEVENTS_ENABLED=False)
    pgevents = PGEvents(app)
    app.register_blueprint(
        pgevents.dashboard_blueprint(authorize=lambda request: True, name="ops", url_prefix="/ops")
    )
    with app.test_request_context():
        from flask import url_for

        assert url_for("ops.index") == "/ops/"


# Authorization ----------------------------------------------------------------------


def test_authorize_sees_the_request_and_false_answers_403_on_every_view():
    seen: list[str] = []

    def authorize(request: Request) -> bool:
        seen.append(f"{request.method} {request.path}")
        return request.headers.get("X-Operator") == "yes"

    client = client_with_token(dashboard_app(authorize))
    assert client.get("/events/").status_code == 403
    for path in ("/events/retry", "/events/discard"):
        response = client.post(path, data={"csrf_token": TOKEN, "event_id": "1"})
        assert response.status_code == 403
    assert seen == ["GET /events/", "POST /events/retry", "POST /events/discard"]

    response = client.get("/events/", headers={"X-Operator": "yes"})
    assert response.status_code == 503  # past the check: the app is disabled
    assert "flask-pgevents is disabled" in response.get_data(as_text=True)


# CSRF -------------------------------------------------------------------------------


def test_a_post_without_the_sessions_token_is_refused():
    client = client_with_token(dashboard_app())
    for data in ({"event_id": "1"}, {"event_id": "1", "csrf_token": "forged"}, {"event_id": "1", "csrf_token": ""}):
        response = client.post("/events/retry", data=data)
        assert response.status_code == 400
        assert "CSRF token is missing or has expired" in response.get_data(as_text=True)


def test_a_session_without_a_token_refuses_every_post():
    client = dashboard_app().test_client()
    response = client.post("/events/discard", data={"event_id": "1", "csrf_token": ""})
    assert response.status_code == 400


def test_a_post_from_another_origin_is_refused_even_with_the_token():
    client = client_with_token(dashboard_app())
    for headers in (
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Referer": "https://evil.example/page"},
    ):
        response = client.post("/events/retry", data={"event_id": "1", "csrf_token": TOKEN}, headers=headers)
        assert response.status_code == 400, headers
        assert "posted from another site" in response.get_data(as_text=True)


def test_a_post_with_the_token_from_this_origin_reaches_the_database():
    client = client_with_token(dashboard_app())
    for headers in ({"Origin": "http://localhost"}, {"Referer": "http://localhost/events/"}, {}):
        with pytest.raises(DisabledError):
            client.post("/events/retry", data={"event_id": "1", "csrf_token": TOKEN}, headers=headers)
    with pytest.raises(DisabledError):
        client.post("/events/discard", data={"event_id": "1", "csrf_token": TOKEN})


def test_a_post_naming_no_event_is_refused():
    client = client_with_token(dashboard_app())
    response = client.post("/events/discard", data={"csrf_token": TOKEN, "event_id": "x"})
    assert response.status_code == 400


def test_the_page_puts_the_sessions_token_in_the_session_and_sends_strict_headers():
    client = dashboard_app().test_client()
    response = client.get("/events/")
    with client.session_transaction() as session:
        assert len(session[CSRF_SESSION_KEY]) >= 32
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src" not in policy and "frame-ancestors 'none'" in policy
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Frame-Options"] == "DENY"


# The page ---------------------------------------------------------------------------

HOSTILE = "<script>alert('pwned')</script>"


def hostile_data() -> DashboardData:
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    process = ProcessStats(
        pid=1, events_handled=0, events_failed=0, events_retried=0, events_gave_up=0, handlers={},
        listener_running=False, listener_connected=False, ready=False, ready_reason="not started",
    )
    stats = Stats(
        collected_at=when, schema="pgevents", installed=True,
        triggers=[TriggerState(HOSTILE, "insert", "installed")],
        pending=3, oldest_pending_age=90.0, failed=1,
        backlog=[PendingEvents(HOSTILE, "insert", 3, 90.0)],
        listeners=[LiveListener(42, None, HOSTILE, "busy", when, 300.0)],
        process=process,
    )
    failed = FailedEventView(
        id=7, table="public.thing", op="insert", timestamp=when, attempt=3,
        errors=[HandlerError("app.mail", f"RuntimeError: {HOSTILE}", f"Traceback ...\n{HOSTILE}\n")],
        old=None, new=pretty_json(f'{{"id": 1, "name": "{HOSTILE}"}}'),
    )
    return DashboardData(stats, [failed])


def test_rows_errors_and_names_are_escaped():
    app = dashboard_app()
    with app.test_request_context("/events/"):
        html = render_page(hostile_data(), notices=[])
    assert "<script" not in html
    # Trigger and backlog tables, listener, error, traceback and row.
    assert html.count("&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;") == 6
    assert "&#34;name&#34;: &#34;&lt;script&gt;" in html


def test_the_page_shows_the_backlog_and_a_form_per_action_with_the_token():
    app = dashboard_app()
    with app.test_request_context("/events/"):
        html = render_page(hostile_data(), notices=["1 event(s) queued again."])
        from flask import session

        token = session[CSRF_SESSION_KEY]
    assert '<b>3</b><span>pending</span>' in html
    assert "<b>90.0 s</b><span>oldest pending</span>" in html
    assert "1 event(s) queued again." in html
    assert html.count(f'name="csrf_token" value="{token}"') == 3  # retry all, retry, discard
    assert 'action="/events/retry"' in html and 'action="/events/discard"' in html


def test_notices_come_only_from_counts():
    client = dashboard_app().test_client()
    html = client.get("/events/?retried=2&discarded=<b>").get_data(as_text=True)
    assert "2 event(s) queued again." in html and "discarded" not in html


def test_format_age_and_pretty_json():
    assert [format_age(seconds) for seconds in (-1, 4.25, 150, 9000, 200000)] == [
        "0.0 s", "4.2 s", "2.5 min", "2.5 h", "2.3 d",
    ]
    assert format_age(None) == "-"
    assert pretty_json('{"a": [1, "é"]}') == '{\n  "a": [\n    1,\n    "é"\n  ]\n}'
    assert pretty_json("not json") == "not json"
    assert pretty_json(None) is None
