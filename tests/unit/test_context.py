"""context.py: the values a transaction's events carry as event.context, without a database.

What reaches handlers runs in tests/integration/test_context.py."""
from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_pgevents import PGEvents
from flask_pgevents.context import REQUEST_ID_HEADER, current_values, set_context

#: PGEvents never connects to it here.
UNUSED_URI = "postgresql://pgevents@localhost/never_connected"


def make_app(**config: Any) -> tuple[Flask, SQLAlchemy, PGEvents]:
    app = Flask("context")
    app.config.update({"TESTING": True, "SQLALCHEMY_DATABASE_URI": UNUSED_URI, **config})
    db = SQLAlchemy(app)
    return app, db, PGEvents(app, db=db)


def test_the_setting_is_local_to_the_transaction_and_its_value_a_parameter():
    statement = set_context({"actor": "cron", "at": 3})
    assert str(statement) == "SELECT pg_catalog.set_config('pgevents.context', :value, true)"
    assert json.loads(statement.compile().params["value"]) == {"actor": "cron", "at": 3}
    assert set_context(None).compile().params["value"] == ""  # unset: the capture stores NULL


def test_a_request_gives_endpoint_and_request_id_and_inner_blocks_win():
    app, db, pgevents = make_app()
    app.add_url_rule("/orders", "orders", lambda: "")
    state = app.extensions["pgevents"]
    with app.test_request_context("/orders", headers={REQUEST_ID_HEADER: "req-1"}):
        with pgevents.context(actor="api", job="a"), pgevents.context(job="b"):
            values = current_values(state, db.session())
        after = current_values(state, db.session())
    assert values == {"endpoint": "orders", "request_id": "req-1", "actor": "api", "job": "b"}
    assert after == {"endpoint": "orders", "request_id": "req-1"}


def test_a_request_without_an_id_gets_one_for_all_its_transactions():
    app, db, _ = make_app()
    state = app.extensions["pgevents"]
    with app.test_request_context("/"):
        first = current_values(state, db.session())["request_id"]
        assert current_values(state, db.session())["request_id"] == first
    with app.test_request_context("/"):
        assert current_values(state, db.session())["request_id"] != first


def test_a_failing_provider_is_logged_and_leaves_only_its_values_out(caplog):
    app, db, pgevents = make_app()
    pgevents.context_provider(lambda: {"user_id": 7})

    @pgevents.context_provider
    def broken() -> dict[str, Any]:
        raise RuntimeError("no session")

    state = app.extensions["pgevents"]
    with app.test_request_context("/"), caplog.at_level(logging.ERROR, "flask_pgevents"):
        values = current_values(state, db.session())
    assert values["user_id"] == 7
    assert "failed; the change is stored without its values" in caplog.text


@pytest.mark.parametrize("in_request", [False, True])
def test_without_the_request_default_only_blocks_count(in_request):
    app, db, pgevents = make_app(PGEVENTS_REQUEST_CONTEXT=False)
    pgevents.context_provider(lambda: {"user_id": 7})
    state = app.extensions["pgevents"]
    with app.test_request_context("/") if in_request else app.app_context():
        assert current_values(state, db.session()) == {}
        with pgevents.context(job="nightly"):
            assert current_values(state, db.session()) == {"job": "nightly"}
