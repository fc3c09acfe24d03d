"""Registration against PostgreSQL: every kind of target, columns, handlers added,
removed and sharing a name, with and without Flask-SQLAlchemy.

Validation that needs no database is in ``tests/unit/test_registry.py`` and
``tests/unit/test_extension.py``.
"""
from __future__ import annotations

import datetime
import decimal
import functools
from typing import Any, Callable

import sqlalchemy as sa
from conftest import raises, wait_until
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_pgevents import PGEvents
from flask_pgevents.errors import UnknownHandlerError


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
        f"Handler '{__name__}.Notifier.on_insert' is not registered for 'after_insert' on"
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
