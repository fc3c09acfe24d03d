"""extension.py: setting PGEvents up on an app, and what it refuses, without a database."""
from __future__ import annotations

import threading
from typing import Any

import pytest
from conftest import raises
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_pgevents import AlreadyRegisteredError, ConfigurationError, DisabledError, PGEvents
from flask_pgevents.config import DEFAULTS

#: Validation needs no server: PGEvents never connects to this one.
UNUSED_URI = "postgresql://pgevents@localhost/never_connected"

db = SQLAlchemy()


class User(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "user"
    id = db.Column(db.Integer, primary_key=True)
    email = db.Column(db.String, nullable=False)


def plain_app(**config: Any) -> Flask:
    """A Flask app without Flask-SQLAlchemy, in testing mode (no listener thread)."""
    app = Flask("registry")
    app.config.update({"TESTING": True, "PGEVENTS_DATABASE_URI": UNUSED_URI, **config})
    return app


def listener_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "pgevents-listener"]


# Moved from the integration tests -------------------------------------------------


def test_init_app_twice_on_one_app_is_refused():
    message = (
        "flask-pgevents is already set up on this Flask app. Call 'init_app' once per"
        " app, and register every handler on that one 'PGEvents' instance."
    )
    app = plain_app()
    first = PGEvents(app)
    with raises(AlreadyRegisteredError, message):
        first.init_app(app)
    with raises(AlreadyRegisteredError, message):
        PGEvents(app)
    assert app.extensions["pgevents"].extension is first
    assert isinstance(AlreadyRegisteredError(), RuntimeError)


def test_no_database_configured():
    app = Flask("registry")
    app.testing = True
    with raises(
        ConfigurationError,
        "No database configured for flask-pgevents. Set PGEVENTS_DATABASE_URI, or"
        " SQLALCHEMY_DATABASE_URI for Flask-SQLAlchemy, to a 'postgresql://' URI.",
    ):
        PGEvents(app)
    assert "pgevents" not in app.extensions
    assert isinstance(ConfigurationError(), RuntimeError)


@pytest.mark.parametrize("key, uri, backend", [
    ("PGEVENTS_DATABASE_URI", "sqlite://", "sqlite"),
    ("PGEVENTS_DATABASE_URI", "mysql://u@h/db", "mysql"),
    ("SQLALCHEMY_DATABASE_URI", "sqlite://", "sqlite"),
])
def test_database_that_is_not_postgresql_is_refused(key, uri, backend):
    app = plain_app(**{"PGEVENTS_DATABASE_URI": None, key: uri})
    if key == "SQLALCHEMY_DATABASE_URI":
        flask_db = SQLAlchemy(app)
    with raises(
        ConfigurationError,
        f"flask-pgevents needs PostgreSQL, but {key} is a {backend!r} URI ({uri})."
        " Set it to a 'postgresql://' URI.",
    ):
        PGEvents(app)
    assert "pgevents" not in app.extensions
    if key == "SQLALCHEMY_DATABASE_URI":
        with app.app_context():
            flask_db.engine.dispose()


def test_unparsable_database_uri_is_refused():
    app = plain_app(PGEVENTS_DATABASE_URI="localhost:5432/app")
    with raises(
        ConfigurationError,
        "PGEVENTS_DATABASE_URI is not a valid database URI. Use for example"
        " 'postgresql://user:password@localhost/dbname'.",
    ):
        PGEvents(app)


def test_bad_config_value_is_refused_at_init_app_and_can_be_fixed():
    app = plain_app(PGEVENTS_BATCH_SIZE="lots")
    pgevents = PGEvents()
    with pytest.raises(ConfigurationError) as info:
        pgevents.init_app(app)
    message = str(info.value)
    assert message == "PGEVENTS_BATCH_SIZE must be an integer, got 'lots'. Remove it to use the default 500."

    app.config["PGEVENTS_BATCH_SIZE"] = 0
    with raises(
        ConfigurationError,
        "PGEVENTS_BATCH_SIZE must be at least 1, got 0. Remove it to use the default 500.",
    ):
        pgevents.init_app(app)
    assert "pgevents" not in app.extensions

    # Nothing half-registered: the fixed config is accepted.
    app.config["PGEVENTS_BATCH_SIZE"] = "20"
    pgevents.init_app(app)
    assert app.extensions["pgevents"].extension is pgevents


def test_listens_for_returns_the_function_unchanged():
    pgevents = PGEvents()

    def on_change(event: Any) -> None:
        pass

    decorated = pgevents.listens_for(User, ["after_insert", "after_update"])(on_change)
    assert decorated is on_change
    assert pgevents.listens_for(User, "after_update", columns=["email"])(on_change) is on_change
    assert pgevents.listen("public.user", "after_delete", on_change) is None


def test_both_ways_of_setting_up_register_the_extension():
    app = plain_app(PGEVENTS_DATABASE_URI=None, SQLALCHEMY_DATABASE_URI=UNUSED_URI)
    flask_db = SQLAlchemy(app)
    at_once = PGEvents(app, db=flask_db)
    assert app.extensions["pgevents"].extension is at_once

    later_app = plain_app()
    later = PGEvents()
    assert "pgevents" not in later_app.extensions
    later.init_app(later_app)
    assert later_app.extensions["pgevents"].extension is later
    with app.app_context():
        flask_db.engine.dispose()


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"PGEVENTS_BATCH_SIZE": 2.7},
            "PGEVENTS_BATCH_SIZE must be an integer, got 2.7. Remove it to use the default 500.",
        ),
        (
            {"PGEVENTS_AUTOSTART": "sometimes"},
            "PGEVENTS_AUTOSTART must be true, false or 'always', got 'sometimes'. Use True, False or 'always'.",
        ),
        (
            {"PGEVENTS_SCHEMA": ""},
            "PGEVENTS_SCHEMA must be a non-empty schema name without '$', got ''. Remove it"
            " to use the default 'pgevents'.",
        ),
        (
            {"PGEVENTS_DATABASE_URI": "postgres://u@h/db"},
            "PGEVENTS_DATABASE_URI starts with 'postgres://', which SQLAlchemy does not"
            " accept. Write 'postgresql://' instead.",
        ),
        (
            {"PGEVENTS_DATABASE_URI": "postgresql+asyncpg://u@h/db"},
            "flask-pgevents supports the psycopg and psycopg2 drivers, but"
            " PGEVENTS_DATABASE_URI uses 'asyncpg' (postgresql+asyncpg://u@h/db). Use"
            " 'postgresql+psycopg://' or 'postgresql+psycopg2://'.",
        ),
    ],
)
def test_bad_config_values_are_refused_at_init(config, message):
    app = Flask(__name__)
    app.config.update({"PGEVENTS_DATABASE_URI": "postgresql+psycopg2://u@h/db", **config})
    with raises(ConfigurationError, message):
        PGEvents(app)
    assert "pgevents" not in app.extensions


def test_autostart_from_the_environment_is_parsed():
    app = Flask(__name__)
    app.config.update(PGEVENTS_DATABASE_URI="postgresql+psycopg2://u@h/db", PGEVENTS_AUTOSTART="false")
    PGEvents(app)
    assert app.extensions["pgevents"].config.autostart is False


def test_binds_without_a_default_database_is_a_clear_error():
    app = Flask(__name__)
    app.config["SQLALCHEMY_BINDS"] = {"users": "postgresql+psycopg2://u@h/db"}
    db = SQLAlchemy(app)
    with raises(
        ConfigurationError,
        "flask-pgevents needs the default database, but only SQLALCHEMY_BINDS is configured"
        " ('users'). Set PGEVENTS_DATABASE_URI to the PostgreSQL database whose tables you"
        " listen to.",
    ):
        PGEvents(app, db=db)



# Set-up --------------------------------------------------------------------------------


def test_init_app_documents_every_config_key_it_reads():
    doc = PGEvents.init_app.__doc__ or ""
    assert [key for key in DEFAULTS if f"``{key}``" not in doc] == []


def test_init_app_fills_in_the_defaults_and_keeps_what_the_app_set():
    app = plain_app(PGEVENTS_BATCH_SIZE=20)
    PGEvents(app)
    assert {key: app.config[key] for key in DEFAULTS} == {
        **DEFAULTS, "PGEVENTS_DATABASE_URI": UNUSED_URI, "PGEVENTS_BATCH_SIZE": 20,
    }


@pytest.mark.parametrize("config", [{"TESTING": True}, {"TESTING": False, "PGEVENTS_AUTOSTART": False}])
def test_no_listener_thread_starts_when_testing_or_autostart_is_off(config):
    before = listener_threads()
    PGEvents(plain_app(**config))
    assert listener_threads() == before


def test_one_pgevents_serves_several_apps_and_each_app_only_one():
    pgevents = PGEvents()
    first, second = plain_app(), plain_app()
    pgevents.init_app(first)
    pgevents.init_app(second)
    assert first.extensions["pgevents"].extension is second.extensions["pgevents"].extension is pgevents
    with raises(
        AlreadyRegisteredError,
        "flask-pgevents is already set up on this Flask app. Call 'init_app' once per app,"
        " and register every handler on that one 'PGEvents' instance.",
    ):
        PGEvents().init_app(second)


# Per-app operations need to know the app ------------------------------------------------


def test_an_operation_outside_an_app_context_with_several_apps_asks_for_the_app():
    pgevents = PGEvents()
    pgevents.init_app(plain_app())
    pgevents.init_app(plain_app())
    message = (
        "Working outside of application context: pass app=..., or run inside"
        " 'with app.app_context():'."
    )
    with raises(RuntimeError, message):
        pgevents.install_triggers()
    with raises(RuntimeError, message):
        pgevents.process_pending()
    with raises(RuntimeError, message):
        PGEvents().trigger_status()  # no app at all


def test_an_operation_on_an_app_set_up_by_another_pgevents_is_refused():
    message = (
        "The current Flask app is not registered with this 'PGEvents' instance."
        " Did you forget to call 'init_app'?"
    )
    app = plain_app()
    PGEvents(app)
    stranger = PGEvents()
    with raises(RuntimeError, message):
        stranger.install_sql(app)
    with app.app_context(), raises(RuntimeError, message):
        stranger.failed_events()
    with raises(RuntimeError, message):
        PGEvents().retry_failed(plain_app())  # not set up at all


def test_stopping_a_listener_that_never_started_returns_true():
    app = plain_app()
    pgevents = PGEvents(app)
    assert pgevents.stop(timeout=1) is True  # the one app is found without a context
    with app.app_context():
        assert pgevents.stop(timeout=1) is True


# PGEVENTS_ENABLED = False: a test set-up on SQLite ----------------------------------------

DISABLED = (
    "flask-pgevents is disabled on this app (PGEVENTS_ENABLED is False): it reads no"
    " database and handles no events. Set PGEVENTS_ENABLED to True, with a PostgreSQL"
    " database configured, to use it."
)


@pytest.fixture
def sqlite_app() -> Any:
    """An app on SQLite, not in testing mode, with PGEVENTS_ENABLED = False."""
    app = Flask("sqlite")
    app.config.update(SQLALCHEMY_DATABASE_URI="sqlite://", PGEVENTS_ENABLED=False)
    db.init_app(app)
    with app.app_context():
        db.create_all()
        yield app
        db.session.remove()
        db.engine.dispose()


def test_a_disabled_extension_sets_up_on_sqlite_and_handlers_register(sqlite_app):
    before = listener_threads()
    pgevents = PGEvents(sqlite_app, db=db)
    calls: list[Any] = []
    pgevents.listens_for(User, "after_insert")(calls.append)
    db.session.add(User(email="a@example.com"))
    db.session.commit()
    assert pgevents.process_pending() == 0
    assert sqlite_app.test_client().get("/").status_code == 404  # a request starts nothing
    assert listener_threads() == before
    assert calls == []


def test_start_on_a_disabled_extension_logs_and_starts_nothing(sqlite_app, caplog):
    before = listener_threads()
    pgevents = PGEvents(sqlite_app, db=db)
    with caplog.at_level("INFO", logger="flask_pgevents"):
        pgevents.start()
    assert caplog.messages == ["flask-pgevents is disabled (PGEVENTS_ENABLED is False): no listener started."]
    assert listener_threads() == before
    assert pgevents.stop(timeout=1) is True


def test_suppressed_on_a_disabled_extension_just_runs_the_block(sqlite_app):
    pgevents = PGEvents(sqlite_app, db=db)
    with pgevents.suppressed():
        db.session.add(User(email="b@example.com"))
    db.session.commit()
    assert db.session.query(User).count() == 1


@pytest.mark.parametrize("operation", ["install_triggers", "install_sql", "uninstall_triggers", "trigger_status"])
def test_database_operations_on_a_disabled_extension_say_it_is_disabled(sqlite_app, operation):
    pgevents = PGEvents(sqlite_app, db=db)
    with raises(DisabledError, DISABLED):
        getattr(pgevents, operation)()


def test_disabled_is_read_from_the_environment_and_reads_no_database_setting():
    app = Flask("disabled")
    app.config.update(PGEVENTS_ENABLED="false", PGEVENTS_DATABASE_URI="not a uri at all")
    PGEvents(app)
    assert app.extensions["pgevents"].enabled is False


def test_suppressed_without_flask_sqlalchemy_is_a_clear_error():
    app = plain_app()
    pgevents = PGEvents(app)
    with raises(
        ConfigurationError,
        "'pgevents.suppressed()' writes through Flask-SQLAlchemy's session, and this app has"
        " none. In other clients, run \"SET LOCAL pgevents.suppress = on\" in the transaction"
        " whose writes should not be captured.",
    ), pgevents.suppressed():
        pass
