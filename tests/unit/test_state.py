"""state.py: which database an app's events are captured in and listened on."""
from __future__ import annotations

from typing import Any, Iterator

import pytest
from conftest import raises
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_pgevents import ConfigurationError
from flask_pgevents.state import database_url

APP_DB = "postgresql+psycopg2://app@127.0.0.1:1/app"
EVENTS_DB = "postgresql+psycopg://events:pw@127.0.0.1:1/events"


@pytest.fixture
def apps() -> Iterator[list[tuple[Flask, SQLAlchemy]]]:
    """Apps with Flask-SQLAlchemy; their engines (never connected) are disposed of."""
    made: list[tuple[Flask, SQLAlchemy]] = []
    yield made
    for app, db in made:
        with app.app_context():
            for engine in db.engines.values():
                engine.dispose()


def app_with_db(apps: list[tuple[Flask, SQLAlchemy]], **config: Any) -> tuple[Flask, SQLAlchemy]:
    app = Flask("state")
    app.config.update(config)
    db = SQLAlchemy(app)
    apps.append((app, db))
    return app, db


def test_pgevents_database_uri_comes_first(apps):
    app, db = app_with_db(apps, SQLALCHEMY_DATABASE_URI=APP_DB, PGEVENTS_DATABASE_URI=EVENTS_DB)
    assert database_url(app, db).render_as_string(hide_password=False) == EVENTS_DB


def test_otherwise_the_default_engine_of_flask_sqlalchemy(apps):
    app, db = app_with_db(apps, SQLALCHEMY_DATABASE_URI=APP_DB,
                          SQLALCHEMY_BINDS={"events": EVENTS_DB})
    assert database_url(app, db).render_as_string() == APP_DB


def test_without_flask_sqlalchemy_its_config_key_is_read():
    app = Flask("state")
    app.config["SQLALCHEMY_DATABASE_URI"] = APP_DB
    assert database_url(app, None).render_as_string() == APP_DB


def test_a_db_set_up_on_another_app_is_not_used(apps):
    _, other_db = app_with_db(apps, SQLALCHEMY_DATABASE_URI=EVENTS_DB)
    app = Flask("state")
    app.config["SQLALCHEMY_DATABASE_URI"] = APP_DB
    assert database_url(app, other_db).render_as_string() == APP_DB


def test_the_source_of_a_bad_uri_is_named():
    app = Flask("state")
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://"
    with raises(
        ConfigurationError,
        "flask-pgevents needs PostgreSQL, but SQLALCHEMY_DATABASE_URI is a 'sqlite' URI (sqlite://)."
        " Set it to a 'postgresql://' URI.",
    ):
        database_url(app, None)


def test_no_database_at_all_is_refused():
    with raises(
        ConfigurationError,
        "No database configured for flask-pgevents. Set PGEVENTS_DATABASE_URI, or"
        " SQLALCHEMY_DATABASE_URI for Flask-SQLAlchemy, to a 'postgresql://' URI.",
    ):
        database_url(Flask("state"), None)
