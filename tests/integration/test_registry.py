"""Registration and set-up: bad input fails at once with a clear message; good input fires."""
from __future__ import annotations

import contextlib
import datetime
import decimal
import functools
from typing import Any, Callable, Iterator

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_pgevents import (
    AlreadyRegisteredError,
    ConfigurationError,
    PGEvents,
    PGEventsError,
    UnknownColumnError,
    UnknownEventError,
    UnmappedTargetError,
)
from flask_pgevents.errors import InvalidHandlerError, UnknownHandlerError

from conftest import wait_until

#: Validation needs no server: PGEvents never connects to this one.
UNUSED_URI = "postgresql://pgevents@localhost/never_connected"
EXPECTED_EVENTS = "Expected one of 'after_insert', 'after_update', 'after_delete'."

db = SQLAlchemy()


class User(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "user"
    id = db.Column(db.Integer, primary_key=True)
    name = db.Column(db.String, nullable=False)
    email = db.Column(db.String, nullable=False)


class NotAModel:
    pass


def handler(event: Any) -> None:
    pass


@contextlib.contextmanager
def raises(error_class: type[BaseException], message: str) -> Iterator[None]:
    """Like pytest.raises, and the message must be exactly ``message``."""
    with pytest.raises(error_class) as info:
        yield
    assert str(info.value) == message


def assert_nothing_registered(pgevents: PGEvents, target: Any = User) -> None:
    for identifier in ("after_insert", "after_update", "after_delete"):
        with pytest.raises(UnknownHandlerError):
            pgevents.remove(target, identifier, handler)


def plain_app(**config: Any) -> Flask:
    """A Flask app without Flask-SQLAlchemy, in testing mode (no listener thread)."""
    app = Flask("registry")
    app.config.update({"TESTING": True, "PGEVENTS_DATABASE_URI": UNUSED_URI, **config})
    return app


class Notifier:
    def __init__(self) -> None:
        self.count = 0

    def on_insert(self, event: Any) -> None:
        self.count += 1


class Calls:
    """Handlers that record (label, event) in one list, in call order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def handler(self, label: str) -> Callable[[Any], None]:
        def record(event: Any) -> None:
            self.calls.append((label, event))

        return record

    def labels(self) -> list[str]:
        return [label for label, _ in self.calls]


# Bad input ------------------------------------------------------------------


@pytest.mark.parametrize("identifier, message", [
    ("after_upsert", f"No such event 'after_upsert' for 'User'. {EXPECTED_EVENTS}"),
    ("insert", f"No such event 'insert' for 'User'. {EXPECTED_EVENTS}"),
    (["after_insert", "after_upsert"], f"No such event 'after_upsert' for 'User'. {EXPECTED_EVENTS}"),
    ([], f"No event given for 'User'. {EXPECTED_EVENTS}"),
    (None, f"No such event None for 'User'. {EXPECTED_EVENTS}"),
])
def test_unknown_event_name_is_refused_when_registering(identifier, message):
    pgevents = PGEvents()
    with raises(UnknownEventError, message):
        pgevents.listens_for(User, identifier)(handler)
    with raises(UnknownEventError, message):
        pgevents.listen(User, identifier, handler)
    assert_nothing_registered(pgevents)


def test_handler_and_event_name_swapped():
    with raises(
        UnknownEventError,
        "Expected an event name for 'User', got the function 'test_registry.handler'."
        " The event name comes before the handler: listen(target, 'after_insert', fn).",
    ):
        PGEvents().listen(User, handler, "after_insert")  # type: ignore[arg-type]


@pytest.mark.parametrize("target, message", [
    (NotAModel,
     "Cannot listen to 'NotAModel': it is not a mapped class. Pass a Flask-SQLAlchemy model"
     " or other mapped class, a sqlalchemy.Table, or a table name such as 'public.user'."),
    (db.Model,
     "Cannot listen to 'Model': it is not a mapped class. Pass a Flask-SQLAlchemy model"
     " or other mapped class, a sqlalchemy.Table, or a table name such as 'public.user'."),
    (User(name="n", email="e"),
     "Cannot listen to an instance of 'User': events are per table. Pass the class User itself."),
    (42,
     "Cannot listen to 42: a target must be a mapped class, a sqlalchemy.Table, or a table"
     " name such as 'public.user'. Pass one of those."),
    ("", "Table name '' is incomplete. Pass 'table' or 'schema.table'."),
    ("audit.", "Table name 'audit.' is incomplete. Pass 'table' or 'schema.table'."),
    (".user", "Table name '.user' is incomplete. Pass 'table' or 'schema.table'."),
])
def test_target_that_names_no_table_is_refused(target, message):
    pgevents = PGEvents()
    with raises(UnmappedTargetError, message):
        pgevents.listens_for(target, "after_insert")(handler)
    with raises(UnmappedTargetError, message):
        pgevents.remove(target, "after_insert", handler)
    assert isinstance(UnmappedTargetError(), TypeError)


@pytest.mark.parametrize("not_callable", ["handler", None])
def test_handler_that_is_not_callable_is_refused(not_callable):
    pgevents = PGEvents()
    with raises(
        InvalidHandlerError,
        f"The handler for 'after_insert', 'after_delete' on 'User' is not callable:"
        f" got {not_callable!r}. Pass a function that takes one Event.",
    ):
        pgevents.listen(User, ["after_insert", "after_delete"], not_callable)  # type: ignore[arg-type]
    assert isinstance(InvalidHandlerError(), TypeError)


@pytest.mark.parametrize("target, identifier, columns, message", [
    (User, "after_update", ["emial"],
     "No column 'emial' in table 'user' of model 'User'. Pass one or more of 'id', 'name', 'email'."),
    (User.__table__, "after_update", ["email", "nme", "emial"],
     "No columns 'emial', 'nme' in table 'user'. Pass one or more of 'id', 'name', 'email'."),
    (User, "after_update", [User.email],
     "'columns' for 'User' must be column names (strings), got User.email. Pass 'email' instead."),
    (User, "after_insert", ["email"],
     "'columns' applies to 'after_update' only, but the handler for 'User' listens to"
     " 'after_insert'. Remove columns=, or listen to 'after_update'."),
    (User, "after_delete", ["email"],
     "'columns' applies to 'after_update' only, but the handler for 'User' listens to"
     " 'after_delete'. Remove columns=, or listen to 'after_update'."),
    (User, ["after_update", "after_insert"], ["email"],
     "'columns' applies to 'after_update' only, but the handler for 'User' also listens to"
     " 'after_insert'. Register the 'after_update' handler with columns= in its own call."),
    (User, "after_update", [],
     "'columns' for 'User' is empty. Pass at least one column name, or None to fire on any change."),
    ("public.user", "after_update", (),
     "'columns' for 'public.user' is empty. Pass at least one column name, or None to fire on any change."),
])
def test_bad_columns_are_refused(target, identifier, columns, message):
    pgevents = PGEvents()
    with raises(UnknownColumnError, message):
        pgevents.listens_for(target, identifier, columns=columns)(handler)
    assert_nothing_registered(pgevents)
    assert isinstance(UnknownColumnError(), ValueError)


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
        "PGEVENTS_DATABASE_URI is not a valid database URI: Could not parse SQLAlchemy URL"
        " from given URL string. Use for example 'postgresql://user:password@localhost/dbname'.",
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


@pytest.mark.parametrize("error_class, builtin", [
    (UnknownEventError, ValueError),
    (UnmappedTargetError, TypeError),
    (UnknownColumnError, ValueError),
    (InvalidHandlerError, TypeError),
    (UnknownHandlerError, ValueError),
    (ConfigurationError, RuntimeError),
    (AlreadyRegisteredError, RuntimeError),
])
def test_every_error_is_a_pgevents_error_and_refines_a_builtin(error_class, builtin):
    assert issubclass(error_class, PGEventsError)
    assert issubclass(error_class, builtin)
    assert issubclass(PGEventsError, Exception)


def test_one_except_clause_catches_every_registration_error():
    pgevents = PGEvents()
    bad_calls: list[Callable[[], Any]] = [
        lambda: pgevents.listen(User, "after_upsert", handler),
        lambda: pgevents.listen(NotAModel, "after_insert", handler),
        lambda: pgevents.listen(User, "after_insert", "handler"),  # type: ignore[arg-type]
        lambda: pgevents.listen(User, "after_update", handler, columns=["nope"]),
        lambda: pgevents.remove(User, "after_insert", handler),
        lambda: PGEvents(plain_app(PGEVENTS_DATABASE_URI="sqlite://")),
    ]
    for call in bad_calls:
        with pytest.raises(PGEventsError):
            call()


# Good paths without a database ---------------------------------------------------


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


def test_removing_an_unregistered_handler_is_refused_and_removes_nothing():
    pgevents = PGEvents()
    pgevents.listen(User, "after_insert", handler)
    with raises(
        UnknownHandlerError,
        "Handler 'test_registry.handler' is not registered for 'after_delete' on table"
        " 'public.user'. Pass the same target, event name and function that were given"
        " to listen() or listens_for().",
    ):
        pgevents.remove(User, ["after_insert", "after_delete"], handler)
    # The 'after_insert' registration survived the failed call.
    pgevents.remove("public.user", "after_insert", handler)
    with pytest.raises(ValueError):
        pgevents.remove(User, "after_insert", handler)


# Good paths against PostgreSQL -------------------------------------------------


def test_every_kind_of_target_fires(make_app, other_service):
    app, flask_db, pgevents = make_app()

    class Account(flask_db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "user"  # a reserved word: every identifier must be quoted
        id = sa.Column(sa.Integer, primary_key=True)
        email = sa.Column(sa.String, nullable=False)

    tag = flask_db.Table(
        "tag",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("weight", sa.Numeric(6, 2), nullable=False),
    )
    other_service.execute("CREATE TABLE note (id serial PRIMARY KEY, body text)")
    other_service.execute("CREATE SCHEMA audit")
    other_service.execute(
        "CREATE TABLE audit.entry (id serial PRIMARY KEY, at timestamptz NOT NULL)"
    )
    calls = Calls()
    pgevents.listen(Account, "after_insert", calls.handler("mapped class"))
    pgevents.listen("user", "after_insert", calls.handler("name of a mapped table"))
    pgevents.listen(tag, "after_insert", calls.handler("Table"))
    pgevents.listen("note", "after_insert", calls.handler("'table'"))
    pgevents.listen("audit.entry", "after_insert", calls.handler("'schema.table'"))
    pgevents.init_app(app)
    with app.app_context():
        flask_db.create_all()
        pgevents.install_triggers()

    other_service.execute("""INSERT INTO "user" (email) VALUES ('a@example.com')""")
    other_service.execute("INSERT INTO tag (weight) VALUES (1.50)")
    other_service.execute("INSERT INTO note (body) VALUES ('hello')")
    other_service.execute("INSERT INTO audit.entry (at) VALUES ('2024-05-01 12:00:00+00')")
    with app.app_context():
        assert pgevents.process_pending(timeout=10) == 4

    assert calls.labels() == [
        "mapped class", "name of a mapped table", "Table", "'table'", "'schema.table'"
    ]
    seen = {label: (event.table, event.model, event.new) for label, event in calls.calls}
    assert seen == {
        "mapped class": ("public.user", Account, {"id": 1, "email": "a@example.com"}),
        "name of a mapped table": ("public.user", Account, {"id": 1, "email": "a@example.com"}),
        "Table": ("public.tag", None, {"id": 1, "weight": decimal.Decimal("1.50")}),
        "'table'": ("public.note", None, {"id": 1, "body": "hello"}),
        "'schema.table'": (
            "audit.entry", None,
            {"id": 1, "at": datetime.datetime(2024, 5, 1, 12, tzinfo=datetime.timezone.utc)},
        ),
    }
    targets = [event.target for _, event in calls.calls]
    assert [type(t) for t in targets[:2]] == [Account, Account]
    assert targets[0].email == "a@example.com"
    assert targets[2:] == [None, None, None]


def test_list_of_identifiers_and_columns_by_attribute_key(make_app, other_service):
    app, flask_db, pgevents = make_app()

    class Thing(flask_db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "thing"
        id = sa.Column(sa.Integer, primary_key=True)
        name = sa.Column(sa.String, nullable=False)
        label = sa.Column("display_name", sa.String)  # attribute key != column name

    calls = Calls()
    pgevents.listen(Thing, ["after_insert", "after_update", "after_delete"], calls.handler("all"))
    pgevents.listen(Thing, ("after_update",), calls.handler("label"), columns=["label"])
    pgevents.init_app(app)
    with app.app_context():
        flask_db.create_all()
        pgevents.install_triggers()

    other_service.execute("INSERT INTO thing (name) VALUES ('a')")
    other_service.execute("UPDATE thing SET name = 'b'")
    other_service.execute("UPDATE thing SET display_name = 'B'")
    other_service.execute("DELETE FROM thing")
    with app.app_context():
        assert pgevents.process_pending(timeout=10) == 4
    assert [(label, event.op, event.changed) for label, event in calls.calls] == [
        ("all", "insert", frozenset()),
        ("all", "update", {"name"}),
        ("all", "update", {"display_name"}),
        ("label", "update", {"display_name"}),
        ("all", "delete", frozenset()),
    ]
    assert calls.calls[3][1].target.label == "B"


def test_handlers_registered_before_and_after_init_app_both_fire(database_url, other_service):
    app = Flask("before_and_after")
    app.config.update(TESTING=True, SQLALCHEMY_DATABASE_URI=database_url)
    flask_db = SQLAlchemy(app)

    class Thing(flask_db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "thing"
        id = sa.Column(sa.Integer, primary_key=True)

    calls = Calls()
    pgevents = PGEvents()  # no db=: found in app.extensions["sqlalchemy"]
    pgevents.listen(Thing, "after_insert", calls.handler("before"))
    pgevents.init_app(app)
    assert app.extensions["pgevents"].extension is pgevents
    pgevents.listen("thing", "after_insert", calls.handler("after"))
    with app.app_context():
        try:
            flask_db.create_all()
            pgevents.install_triggers()
            other_service.execute("INSERT INTO thing DEFAULT VALUES")
            assert pgevents.process_pending(timeout=10) == 1
        finally:
            flask_db.engine.dispose()
    assert calls.labels() == ["before", "after"]
    # Found through the app's Flask-SQLAlchemy although registered by table name.
    assert calls.calls[1][1].model is Thing


def test_removed_handler_no_longer_fires(make_app, other_service):
    app, flask_db, pgevents = make_app()

    class Thing(flask_db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "thing"
        id = sa.Column(sa.Integer, primary_key=True)

    calls = Calls()
    kept, removed = calls.handler("kept"), calls.handler("removed")
    notifier = Notifier()
    pgevents.listen(Thing, "after_insert", kept)
    pgevents.listen(Thing, ["after_insert", "after_delete"], removed)
    pgevents.listen(Thing, "after_insert", notifier.on_insert)
    pgevents.init_app(app)
    with app.app_context():
        flask_db.create_all()
        pgevents.install_triggers()

    other_service.execute("INSERT INTO thing DEFAULT VALUES")
    with app.app_context():
        assert pgevents.process_pending(timeout=10) == 1
    assert calls.labels() == ["kept", "removed"] and notifier.count == 1

    pgevents.remove(Thing, ["after_insert", "after_delete"], removed)
    pgevents.remove(Thing, "after_insert", notifier.on_insert)  # a new bound method object
    other_service.execute("INSERT INTO thing DEFAULT VALUES")
    other_service.execute("DELETE FROM thing")
    with app.app_context():
        assert pgevents.process_pending(timeout=10) == 1
    assert calls.labels() == ["kept", "removed", "kept"] and notifier.count == 1
    # The delete events stay for a process that still handles deletes (a
    # rolling deploy), until install_triggers() drops the unneeded trigger.
    pending_deletes = other_service.execute("SELECT count(*) FROM pgevents.event WHERE op = 'delete'")
    assert pending_deletes.fetchone()[0] == 2
    with raises(
        UnknownHandlerError,
        "Handler 'test_registry.Notifier.on_insert' is not registered for 'after_insert' on"
        " table 'public.thing'. Pass the same target, event name and function that were"
        " given to listen() or listens_for().",
    ):
        pgevents.remove(Thing, "after_insert", notifier.on_insert)


def test_handlers_sharing_a_qualified_name_each_fire_and_retry_apart(make_app, other_service):
    """Closures from one factory, bound methods of two objects, partials: one name each."""
    app, flask_db, pgevents = make_app(PGEVENTS_MAX_ATTEMPTS=3, PGEVENTS_RETRY_BACKOFF=0.01)

    class Thing(flask_db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "thing"
        id = sa.Column(sa.Integer, primary_key=True)

    calls: list[str] = []

    class Counter:
        def __init__(self, label: str) -> None:
            self.label = label

        def on_insert(self, event: Any) -> None:
            calls.append(self.label)

    def make_handler(label: str, fail_first: bool = False) -> Callable[[Any], None]:
        def record(event: Any) -> None:
            calls.append(label)
            if fail_first and event.attempt == 1:
                raise RuntimeError(f"{label} fails once")

        return record

    def tagged(label: str, event: Any) -> None:
        calls.append(label)

    for fn in [
        make_handler("closure a", fail_first=True), make_handler("closure b"),
        Counter("method a").on_insert, Counter("method b").on_insert,
        functools.partial(tagged, "partial a"), functools.partial(tagged, "partial b"),
    ]:
        pgevents.listen(Thing, "after_insert", fn)
    pgevents.init_app(app)
    with app.app_context():
        flask_db.create_all()
        pgevents.install_triggers()
    other_service.execute("INSERT INTO thing DEFAULT VALUES")

    def retried() -> bool:
        # The retry of 'closure a' is due a moment after its first attempt failed.
        pgevents.process_pending(timeout=5)
        return calls.count("closure a") == 2

    with app.app_context():
        wait_until(retried)
        _, backlog = pgevents.trigger_status()
    assert backlog is not None and (backlog.pending, backlog.failed) == (0, 0)
    # Only the handler that failed ran again: the others' success was recorded apart.
    assert sorted(calls) == sorted([
        "closure a", "closure a", "closure b", "method a", "method b", "partial a", "partial b",
    ])


def test_without_flask_sqlalchemy_pgevents_database_uri_is_enough(database_url, other_service):
    other_service.execute(
        "CREATE TABLE invoice (id serial PRIMARY KEY, total numeric(10, 2) NOT NULL,"
        " paid_at timestamptz)"
    )
    app = Flask("no_sqlalchemy")
    app.config.update(TESTING=True, PGEVENTS_DATABASE_URI=database_url)
    assert "sqlalchemy" not in app.extensions
    pgevents = PGEvents(app)
    calls = Calls()
    pgevents.listen("invoice", ["after_insert", "after_update"], calls.handler("invoice"))
    with app.app_context():
        pgevents.install_triggers()
    other_service.execute("INSERT INTO invoice (total) VALUES (12.50)")
    other_service.execute("UPDATE invoice SET paid_at = '2024-05-01 12:00:00+00'")
    assert pgevents.process_pending(timeout=10, app=app) == 2
    insert, update = (event for _, event in calls.calls)
    assert (insert.op, insert.table, insert.model, insert.target) == ("insert", "public.invoice", None, None)
    assert insert.new == {"id": 1, "total": decimal.Decimal("12.50"), "paid_at": None}
    assert update.changed == {"paid_at"}
    assert update.new["paid_at"] == datetime.datetime(2024, 5, 1, 12, tzinfo=datetime.timezone.utc)


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"PGEVENTS_BATCH_SIZE": 2.7},
            "PGEVENTS_BATCH_SIZE must be an integer, got 2.7. Remove it to use the default 500.",
        ),
        (
            {"PGEVENTS_AUTOSTART": "sometimes"},
            "PGEVENTS_AUTOSTART must be true or false, got 'sometimes'. Use True or False.",
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
