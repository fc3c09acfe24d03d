"""Capture in the database: keys, schemas, odd names, big rows, bulk writes,
column filters, transactions, installing and removing triggers, privileges."""
from __future__ import annotations

import datetime
import decimal
import threading
import uuid
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from conftest import role_url
from psycopg import sql

from flask_pgevents import ConfigurationError

ALL = ["after_insert", "after_update", "after_delete"]


def _q(name: str) -> str:
    """Quote an identifier, independently of the code under test."""
    return '"' + name.replace('"', '""') + '"'


def _drain(app: Any, pgevents: Any) -> int:
    with app.app_context():
        return pgevents.process_pending(timeout=60)


def _changes(recorder: Any) -> list[tuple[str, Any, Any]]:
    return [(e.op, e.old, e.new) for e in recorder.events]


def _triggers(conn: psycopg.Connection) -> list[tuple[str, str, str, list[str]]]:
    """Every user trigger: (schema, table, trigger, arguments), read from pg_trigger."""
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname, t.tgname, t.tgargs, t.tgnargs
        FROM pg_trigger AS t
        JOIN pg_class AS c ON c.oid = t.tgrelid
        JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE NOT t.tgisinternal
        ORDER BY 1, 2, 3
        """
    ).fetchall()
    return [
        (schema, table, name, [a.decode() for a in bytes(args).split(b"\x00")[:nargs]])
        for schema, table, name, args, nargs in rows
    ]


def _states(app: Any, pgevents: Any) -> dict[tuple[str, str], str]:
    with app.app_context():
        report, _ = pgevents.trigger_status()
    return {(str(s.table), s.kind): s.state for s in report}


def _ignore(event: Any) -> None:
    """A handler for tests that only look at the triggers."""


def _ignore_too(event: Any) -> None:
    """A second handler: the same function is registered once per table and event."""


def _event_count(conn: psycopg.Connection, schema: str = "pgevents") -> int:
    return conn.execute(f"SELECT count(*) FROM {_q(schema)}.event").fetchone()[0]


# Keys ------------------------------------------------------------------------


def test_uuid_primary_key_with_server_default(make_app, other_service, recorder):
    app, db, pgevents = make_app()

    class Token(db.Model):
        __tablename__ = "token"
        id = sa.Column(sa.Uuid, primary_key=True, server_default=sa.text("gen_random_uuid()"))
        label = sa.Column(sa.String, nullable=False)

    pgevents.init_app(app)
    pgevents.listen(Token, ALL, recorder)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
        token = Token(label="orm")
        db.session.add(token)
        db.session.commit()
        orm_id = token.id
        token.label = "orm, renamed"
        db.session.commit()
        db.session.delete(token)
        db.session.commit()
    sql_id = other_service.execute("INSERT INTO token (label) VALUES ('sql') RETURNING id").fetchone()[0]
    other_service.execute("UPDATE token SET label = 'sql, renamed'")
    assert _drain(app, pgevents) == 5
    assert isinstance(orm_id, uuid.UUID)
    assert _changes(recorder) == [
        ("insert", {}, {"id": orm_id, "label": "orm"}),
        ("update", {"id": orm_id, "label": "orm"}, {"id": orm_id, "label": "orm, renamed"}),
        ("delete", {"id": orm_id, "label": "orm, renamed"}, {}),
        ("insert", {}, {"id": sql_id, "label": "sql"}),
        ("update", {"id": sql_id, "label": "sql"}, {"id": sql_id, "label": "sql, renamed"}),
    ]
    first = recorder.events[0]
    assert (first.table, first.model, first.target.id) == ("public.token", Token, orm_id)
    assert recorder.events[2].target.label == "orm, renamed"


def test_text_primary_key_including_a_change_of_the_key(make_app, other_service, recorder):
    app, db, pgevents = make_app()

    class Country(db.Model):
        __tablename__ = "country"
        code = sa.Column(sa.Text, primary_key=True)
        name = sa.Column(sa.Text, nullable=False)

    pgevents.init_app(app)
    pgevents.listen(Country, ALL, recorder)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
        db.session.add_all([Country(code="fr", name="France"), Country(code="de", name="Germany")])
        db.session.commit()
        db.session.get(Country, "fr").code = "FR"  # the key itself changes
        db.session.commit()
    other_service.execute("UPDATE country SET code = upper(code), name = name || '!' WHERE code = 'de'")
    other_service.execute("DELETE FROM country WHERE code = 'FR'")
    # An upsert: one row inserted, one updated, one left as it was.
    other_service.execute("INSERT INTO country VALUES ('it', 'Italy')")
    other_service.execute(
        "INSERT INTO country VALUES ('DE', 'Germany!'), ('it', 'Italia'), ('es', 'Spain')"
        " ON CONFLICT (code) DO UPDATE SET name = excluded.name"
    )
    assert _drain(app, pgevents) == 8
    assert _changes(recorder) == [
        ("insert", {}, {"code": "fr", "name": "France"}),
        ("insert", {}, {"code": "de", "name": "Germany"}),
        ("update", {"code": "fr", "name": "France"}, {"code": "FR", "name": "France"}),
        ("update", {"code": "de", "name": "Germany"}, {"code": "DE", "name": "Germany!"}),
        ("delete", {"code": "FR", "name": "France"}, {}),
        ("insert", {}, {"code": "it", "name": "Italy"}),
        # PostgreSQL fires the upsert's statement triggers update first.
        ("update", {"code": "it", "name": "Italy"}, {"code": "it", "name": "Italia"}),
        ("insert", {}, {"code": "es", "name": "Spain"}),
    ]
    assert recorder.events[2].changed == frozenset({"code"})


def test_composite_primary_key(make_app, other_service, recorder):
    app, db, pgevents = make_app()

    class Stock(db.Model):
        __tablename__ = "stock"
        warehouse = sa.Column(sa.Integer, primary_key=True)
        sku = sa.Column(sa.Text, primary_key=True)
        quantity = sa.Column(sa.Integer, nullable=False)

    pgevents.init_app(app)
    pgevents.listen(Stock, ALL, recorder)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
        db.session.add_all([Stock(warehouse=1, sku="a", quantity=5), Stock(warehouse=2, sku="a", quantity=7)])
        db.session.commit()
        db.session.get(Stock, (2, "a")).quantity = 8
        db.session.commit()
    other_service.execute("UPDATE stock SET warehouse = 3 WHERE warehouse = 1")
    other_service.execute("DELETE FROM stock WHERE (warehouse, sku) = (2, 'a')")
    assert _drain(app, pgevents) == 5
    assert _changes(recorder) == [
        ("insert", {}, {"warehouse": 1, "sku": "a", "quantity": 5}),
        ("insert", {}, {"warehouse": 2, "sku": "a", "quantity": 7}),
        ("update", {"warehouse": 2, "sku": "a", "quantity": 7}, {"warehouse": 2, "sku": "a", "quantity": 8}),
        ("update", {"warehouse": 1, "sku": "a", "quantity": 5}, {"warehouse": 3, "sku": "a", "quantity": 5}),
        ("delete", {"warehouse": 2, "sku": "a", "quantity": 8}, {}),
    ]
    assert recorder.events[4].target.quantity == 8


def test_table_without_primary_key_and_duplicate_rows(make_app, other_service, recorder):
    app, db, pgevents = make_app()
    reading = db.Table("reading", sa.Column("sensor", sa.Text), sa.Column("value", sa.Integer))
    pgevents.init_app(app)
    pgevents.listen(reading, ALL, recorder)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
        db.session.execute(reading.insert(), [{"sensor": "a", "value": 1}] * 2 + [{"sensor": "b", "value": 5}])
        db.session.execute(sa.text("UPDATE reading SET value = value * 10"))
        db.session.commit()
    other_service.execute("UPDATE reading SET value = value + 1 WHERE sensor = 'a'")
    other_service.execute("DELETE FROM reading WHERE sensor = 'a'")
    with other_service.cursor().copy("COPY reading FROM STDIN") as copy:
        copy.write_row(("c", 7))
        copy.write_row(("c", 7))
    assert _drain(app, pgevents) == 12
    a1, a10, a11 = ({"sensor": "a", "value": v} for v in (1, 10, 11))
    b5, b50 = {"sensor": "b", "value": 5}, {"sensor": "b", "value": 50}
    # Old and new rows are paired by position, so identical rows pair right.
    assert _changes(recorder) == [
        ("insert", {}, a1), ("insert", {}, a1), ("insert", {}, b5),
        ("update", a1, a10), ("update", a1, a10), ("update", b5, b50),
        ("update", a10, a11), ("update", a10, a11),
        ("delete", a11, {}), ("delete", a11, {}),
        ("insert", {}, {"sensor": "c", "value": 7}), ("insert", {}, {"sensor": "c", "value": 7}),
    ]
    assert recorder.events[0].model is None and recorder.events[0].target is None


# Schemas and names -------------------------------------------------------------


def test_mixed_case_names_in_a_non_public_schema_through_the_orm(make_app, other_service, recorder):
    app, db, pgevents = make_app()
    other_service.execute('CREATE SCHEMA "Sales"')

    class OrderLine(db.Model):
        __tablename__ = "OrderLine"
        __table_args__ = {"schema": "Sales"}
        id = sa.Column("OrderLineId", sa.Integer, primary_key=True)
        quantity = sa.Column("Qty", sa.Integer, nullable=False)
        note = sa.Column("Note", sa.Text)
        # A type outside the capture functions' search_path.
        status = sa.Column("Status", sa.Enum("Open", "Shipped", name="Line Status", schema="Sales"))

    pgevents.init_app(app)
    pgevents.listen(OrderLine, ["after_insert", "after_delete"], recorder)
    pgevents.listen(OrderLine, "after_update", recorder, columns=["Qty"])
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
        line = OrderLine(quantity=1, note="first", status="Open")
        db.session.add(line)
        db.session.commit()
        line.note = "only the note"
        db.session.commit()
        line.quantity = 2
        db.session.commit()
    other_service.execute('DELETE FROM "Sales"."OrderLine"')
    assert ("Sales", "OrderLine", "pgevents_update", ["Qty"]) in _triggers(other_service)
    assert _drain(app, pgevents) == 3
    assert _changes(recorder) == [
        ("insert", {}, {"OrderLineId": 1, "Qty": 1, "Note": "first", "Status": "Open"}),
        ("update", {"OrderLineId": 1, "Qty": 1, "Note": "only the note", "Status": "Open"},
         {"OrderLineId": 1, "Qty": 2, "Note": "only the note", "Status": "Open"}),
        ("delete", {"OrderLineId": 1, "Qty": 2, "Note": "only the note", "Status": "Open"}, {}),
    ]
    assert {e.table for e in recorder.events} == {"Sales.OrderLine"}
    assert recorder.events[1].target.quantity == 2 and recorder.events[1].model is OrderLine


def test_quoted_names_with_a_string_target(make_app, other_service, recorder):
    schema, table = "My Schema", 'Odd "Table"'
    key, amount = "Key; Col", "it's $$ \"amount\""
    app, db, pgevents = make_app()
    other_service.execute(
        f"CREATE SCHEMA {_q(schema)};"
        f" CREATE TABLE {_q(schema)}.{_q(table)} ({_q(key)} text PRIMARY KEY, {_q(amount)} numeric)"
    )
    pgevents.init_app(app)
    amount_changes = []
    pgevents.listen(f"{schema}.{table}", ALL, recorder)
    pgevents.listen(f"{schema}.{table}", "after_update", amount_changes.append, columns=[amount])
    odd = sa.Table(table, sa.MetaData(), sa.Column(key, sa.Text, primary_key=True),
                   sa.Column(amount, sa.Numeric), schema=schema)
    with app.app_context():
        pgevents.install_triggers()
        db.session.execute(odd.insert().values({key: "k'1", amount: 1.5}))
        db.session.execute(odd.update().values({amount: 2}))
        db.session.commit()
    other_service.execute(
        sql.SQL("DELETE FROM {} WHERE {} = %s").format(sql.Identifier(schema, table), sql.Identifier(key)),
        ("k'1",),
    )
    assert _drain(app, pgevents) == 3
    before, after = {key: "k'1", amount: decimal.Decimal("1.5")}, {key: "k'1", amount: decimal.Decimal("2")}
    assert _changes(recorder) == [("insert", {}, before), ("update", before, after), ("delete", after, {})]
    assert [(e.old, e.new, e.changed) for e in amount_changes] == [(before, after, frozenset({amount}))]
    assert {e.table for e in recorder.events} == {'My Schema.Odd "Table"'}
    assert recorder.events[0].model is None


# Big rows and bulk writes --------------------------------------------------------


def test_rows_over_the_notify_limit_are_stored_and_notify_carries_no_row(
    make_app, other_service, libpq_url, recorder
):
    app, db, pgevents = make_app()

    class Document(db.Model):
        __tablename__ = "document"
        id = sa.Column(sa.Integer, primary_key=True)
        body = sa.Column(sa.Text, nullable=False)
        blob = sa.Column(sa.LargeBinary, nullable=False)

    pgevents.init_app(app)
    pgevents.listen(Document, ALL, recorder)
    text_100k = "pg" * 50_000
    blob_1m = bytes(range(256)) * 4096
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
    with psycopg.connect(libpq_url, autocommit=True) as listening:
        listening.execute("LISTEN pgevents")
        # Registered as a sleeping listener, as the listener loop does: writers
        # notify only while one sleeps.
        listening.execute("INSERT INTO pgevents.listener (pid, idle) VALUES (pg_backend_pid(), true)")
        with app.app_context():
            document = Document(body=text_100k, blob=blob_1m)
            db.session.add(document)
            db.session.commit()
            document.body = text_100k + "!"
            db.session.commit()
        other_service.execute("INSERT INTO document (body, blob) VALUES (%s, %s)", (text_100k, blob_1m[::-1]))
        other_service.execute("DELETE FROM document")
        payloads = [n.payload for n in listening.notifies(timeout=10, stop_after=4)]
    assert payloads == [""] * 4
    assert _drain(app, pgevents) == 5
    assert [(e.op, e.new and e.new["body"], e.new and e.new["blob"]) for e in recorder.events[:3]] == [
        ("insert", text_100k, blob_1m),
        ("update", text_100k + "!", blob_1m),
        ("insert", text_100k, blob_1m[::-1]),
    ]
    assert recorder.events[1].old["body"] == text_100k
    assert recorder.events[1].changed == frozenset({"body"})
    assert sorted(len(e.old["blob"]) for e in recorder.events[3:]) == [len(blob_1m)] * 2
    assert recorder.events[0].target.blob == blob_1m


def test_bulk_statements_give_one_event_per_row_in_row_order(make_app, other_service, recorder):
    app, db, pgevents = make_app()

    class Item(db.Model):
        __tablename__ = "item"
        id = sa.Column(sa.Integer, primary_key=True)
        rank = sa.Column(sa.Integer, nullable=False)

    pgevents.init_app(app)
    pgevents.listen(Item, ALL, recorder)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
        db.session.execute(sa.text("INSERT INTO item (rank) SELECT g FROM generate_series(1, 5000) AS g"))
        db.session.commit()
    assert _drain(app, pgevents) == 5000
    assert [e.new for e in recorder.events] == [{"id": i, "rank": i} for i in range(1, 5001)]
    recorder.events.clear()

    # RETURNING gives the order in which PostgreSQL changed the rows.
    updated = other_service.execute("UPDATE item SET rank = -rank RETURNING id").fetchall()
    deleted = other_service.execute("DELETE FROM item RETURNING id").fetchall()
    assert _drain(app, pgevents) == 10_000
    assert [(e.op, e.old["id"], e.old["rank"], e.new["rank"]) for e in recorder.events[:5000]] == [
        ("update", i, i, -i) for (i,) in updated
    ]
    assert [(e.op, e.old["id"], e.old["rank"]) for e in recorder.events[5000:]] == [
        ("delete", i, -i) for (i,) in deleted
    ]
    assert len(updated) == len(deleted) == 5000


# Updates and column filters ---------------------------------------------------------


def _user_app(make_app, **config):
    app, db, pgevents = make_app(**config)

    class User(db.Model):
        __tablename__ = "user"
        id = sa.Column(sa.Integer, primary_key=True)
        email = sa.Column(sa.String, nullable=False)
        name = sa.Column(sa.String, nullable=False)

    pgevents.init_app(app)
    return app, db, pgevents, User


def test_update_that_changes_no_value_is_not_an_event(make_app, other_service, recorder):
    app, db, pgevents, User = _user_app(make_app)
    pgevents.listen(User, "after_update", recorder)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
        db.session.add_all([User(email="a@x", name="A"), User(email="b@x", name="B")])
        db.session.commit()
        db.session.execute(sa.text('UPDATE "user" SET email = email'))
        db.session.commit()
    other_service.execute("""UPDATE "user" SET name = name, email = lower(email)""")
    # One statement, two rows, one of them really changed.
    other_service.execute("""UPDATE "user" SET name = CASE WHEN id = 2 THEN 'B2' ELSE name END""")
    assert _event_count(other_service) == 1
    assert _drain(app, pgevents) == 1
    assert _changes(recorder) == [
        ("update", {"id": 2, "email": "b@x", "name": "B"}, {"id": 2, "email": "b@x", "name": "B2"})
    ]


def test_columns_filter_fires_only_when_a_watched_column_changed(make_app, other_service, recorder):
    app, db, pgevents, User = _user_app(make_app)
    pgevents.listen(User, "after_update", recorder, columns=["email"])
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
        user = User(email="a@x", name="A")
        db.session.add(user)
        db.session.commit()
        user.name = "renamed"
        db.session.commit()
    assert ("public", "user", "pgevents_update", ["email"]) in _triggers(other_service)
    # The trigger itself skips changes of other columns: nothing is stored.
    assert _event_count(other_service) == 0
    other_service.execute("""UPDATE "user" SET email = 'b@x', name = 'B'""")
    assert _drain(app, pgevents) == 1
    [event] = recorder.events
    assert (event.old["email"], event.new["email"], event.changed) == ("a@x", "b@x", frozenset({"email", "name"}))


def test_column_filters_of_several_handlers_on_one_table(make_app, other_service):
    app, db, pgevents, User = _user_app(make_app)
    email_changes, name_changes, all_changes = [], [], []
    pgevents.listen(User, "after_update", email_changes.append, columns=["email"])
    pgevents.listen(User, "after_update", name_changes.append, columns=["name"])
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
    # Two column filters: the trigger watches the union of their columns.
    assert ("public", "user", "pgevents_update", ["email", "name"]) in _triggers(other_service)
    other_service.execute("""INSERT INTO "user" (email, name) VALUES ('a@x', 'A')""")
    other_service.execute("""UPDATE "user" SET name = 'B'""")
    other_service.execute("""UPDATE "user" SET email = 'b@x'""")
    other_service.execute("""UPDATE "user" SET id = 7""")
    assert _drain(app, pgevents) == 2
    assert [e.new["name"] for e in name_changes] == ["B"]
    assert [e.new["email"] for e in email_changes] == ["b@x"]

    # One handler without columns: the trigger watches every column, and
    # dispatch still calls each handler only for the changes it wants.
    pgevents.remove(User, "after_update", name_changes.append)
    pgevents.listen(User, "after_update", all_changes.append)
    email_changes.clear()
    with app.app_context():
        pgevents.install_triggers()
        user = db.session.get(User, 7)
        user.name = "C"
        db.session.commit()
        user.email = "c@x"
        db.session.commit()
    assert ("public", "user", "pgevents_update", []) in _triggers(other_service)
    assert _drain(app, pgevents) == 2
    assert [e.changed for e in all_changes] == [frozenset({"name"}), frozenset({"email"})]
    assert [(e.old["email"], e.new["email"]) for e in email_changes] == [("b@x", "c@x")]
    assert email_changes[0].id == all_changes[1].id


# Transactions -------------------------------------------------------------------------


def test_rolled_back_transactions_and_savepoints_leave_no_event(make_app, other_service, recorder):
    app, db, pgevents, User = _user_app(make_app)
    pgevents.listen(User, ALL, recorder)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
        db.session.add(User(email="orm@x", name="gone"))
        db.session.flush()
        db.session.execute(sa.text('UPDATE "user" SET name = \'still gone\''))
        db.session.rollback()
    with other_service.transaction(force_rollback=True):
        other_service.execute("""INSERT INTO "user" (email, name) VALUES ('sql@x', 'gone')""")
    assert _event_count(other_service) == 0

    with app.app_context():
        db.session.add(User(email="1@x", name="kept"))
        savepoint = db.session.begin_nested()
        db.session.add(User(email="2@x", name="dropped"))
        db.session.flush()
        savepoint.rollback()
        db.session.add(User(email="3@x", name="kept too"))
        db.session.commit()
    with other_service.transaction():
        other_service.execute("""UPDATE "user" SET name = 'sql kept' WHERE email = '1@x'""")
        with pytest.raises(psycopg.errors.UniqueViolation), other_service.transaction():
            other_service.execute("""DELETE FROM "user" WHERE email = '3@x'""")
            other_service.execute("""INSERT INTO "user" SELECT * FROM "user" WHERE name = 'sql kept'""")
    assert _drain(app, pgevents) == 3
    assert [(e.op, (e.new or e.old)["name"]) for e in recorder.events] == [
        ("insert", "kept"), ("insert", "kept too"), ("update", "sql kept")
    ]


# Installing, status, uninstalling -------------------------------------------------------


def test_install_is_idempotent_and_installs_exactly_what_handlers_need(make_app, other_service):
    app, db, pgevents, User = _user_app(make_app)
    pgevents.listen(User, "after_insert", _ignore)
    with app.app_context():
        db.create_all()
    assert _states(app, pgevents) == {("public.user", "insert"): "missing"}
    with app.app_context():
        _, backlog = pgevents.trigger_status()
        assert backlog is None  # no event table yet
        pgevents.install_triggers()
        first = _triggers(other_service)
        pgevents.install_triggers()
        _, backlog = pgevents.trigger_status()
    assert first == _triggers(other_service) == [("public", "user", "pgevents_insert", [])]
    assert _states(app, pgevents) == {("public.user", "insert"): "installed"}
    assert (backlog.pending, backlog.failed, backlog.oldest_pending_age) == (0, 0, None)
    other_service.execute("""INSERT INTO "user" (email, name) VALUES ('a@x', 'A')""")
    other_service.execute("""UPDATE "user" SET name = 'B'""")
    with app.app_context():
        _, backlog = pgevents.trigger_status()
    assert backlog.pending == 1 and backlog.oldest_pending_age >= datetime.timedelta(0)

    # A removed handler leaves an unneeded trigger, which only a pruning install drops.
    pgevents.listen(User, "after_delete", _ignore)
    with app.app_context():
        assert pgevents.install_triggers().changes == 1
    assert [t[2] for t in _triggers(other_service)] == ["pgevents_delete", "pgevents_insert"]
    pgevents.remove(User, "after_delete", _ignore)
    assert _states(app, pgevents) == {("public.user", "delete"): "unneeded", ("public.user", "insert"): "installed"}
    with app.app_context():
        assert pgevents.install_triggers().changes == 0
        assert [t[2] for t in _triggers(other_service)] == ["pgevents_delete", "pgevents_insert"]
        assert pgevents.install_triggers(prune=True).changes == 1
    assert _triggers(other_service) == [("public", "user", "pgevents_insert", [])]
    assert _states(app, pgevents) == {("public.user", "insert"): "installed"}


def test_outdated_triggers_are_reported_and_replaced(make_app, other_service):
    app, db, pgevents, User = _user_app(make_app)
    pgevents.listen(User, "after_update", _ignore, columns=["email"])
    pgevents.listen(User, "after_insert", _ignore)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
    pgevents.listen(User, "after_update", _ignore_too, columns=["name"])
    assert _states(app, pgevents) == {("public.user", "insert"): "installed", ("public.user", "update"): "outdated"}
    with app.app_context():
        pgevents.install_triggers()
    assert ("public", "user", "pgevents_update", ["email", "name"]) in _triggers(other_service)
    assert set(_states(app, pgevents).values()) == {"installed"}

    # A capture function from another version, or a disabled trigger, is outdated too.
    other_service.execute(
        "CREATE OR REPLACE FUNCTION pgevents.capture_insert() RETURNS trigger"
        " LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$"
    )
    other_service.execute('ALTER TABLE "user" DISABLE TRIGGER pgevents_update')
    assert set(_states(app, pgevents).values()) == {"outdated"}
    with app.app_context():
        pgevents.install_triggers()
    assert set(_states(app, pgevents).values()) == {"installed"}
    other_service.execute("""INSERT INTO "user" (email, name) VALUES ('a@x', 'A')""")
    other_service.execute("""UPDATE "user" SET name = 'B'""")
    assert _drain(app, pgevents) == 2


def test_uninstall_is_idempotent_and_can_drop_the_schema(make_app, other_service):
    app, db, pgevents, User = _user_app(make_app)
    pgevents.listen(User, ALL, _ignore)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
    other_service.execute("""INSERT INTO "user" (email, name) VALUES ('a@x', 'A')""")
    with app.app_context():
        assert len(_triggers(other_service)) == 3
        assert pgevents.uninstall_triggers() == 3
        assert _triggers(other_service) == []
        assert pgevents.uninstall_triggers() == 0
    assert set(_states(app, pgevents).values()) == {"missing"}
    # Without drop_schema, the pending event stays; new writes make none.
    other_service.execute("""UPDATE "user" SET name = 'B'""")
    assert _event_count(other_service) == 1
    with app.app_context():
        pgevents.install_triggers()
        assert pgevents.uninstall_triggers(drop_schema=True) == 3
        assert pgevents.uninstall_triggers(drop_schema=True) == 0
    assert other_service.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgevents'").fetchone() == (0,)
    other_service.execute('DELETE FROM "user"')
    with app.app_context():
        assert pgevents.trigger_status()[1] is None


def test_custom_event_schema_end_to_end(make_app, other_service, recorder):
    schema = "App Events \"Q\"; ü"
    app, db, pgevents, User = _user_app(make_app, PGEVENTS_SCHEMA=schema)
    pgevents.listen(User, ["after_insert", "after_update"], recorder)
    # A second app on the default schema: each leaves the other's triggers alone.
    other_app, _, other_pgevents = make_app(db=db)
    other_pgevents.init_app(other_app)
    other_pgevents.listen("public.user", "after_delete", _ignore)
    with app.app_context():
        db.create_all()
        other_pgevents.install_triggers(other_app)
        pgevents.install_triggers()
        pgevents.install_triggers()
    assert [t[2] for t in _triggers(other_service)] == [
        f"{schema}_insert", f"{schema}_update", "pgevents_delete"
    ]
    assert set(_states(app, pgevents).values()) == {"installed"}
    pgevents.start(app)
    other_service.execute("""INSERT INTO "user" (email, name) VALUES ('a@x', 'A')""")
    other_service.execute("""UPDATE "user" SET name = 'B'""")
    events = recorder.wait_for(2)
    assert [(e.op, e.new["name"]) for e in events] == [("insert", "A"), ("update", "B")]
    assert pgevents.stop(timeout=5, app=app)
    assert _event_count(other_service, schema) == 0
    with app.app_context():
        assert pgevents.uninstall_triggers(drop_schema=True) == 2
    assert [t[2] for t in _triggers(other_service)] == ["pgevents_delete"]
    assert other_service.execute("SELECT to_regclass('pgevents.event') IS NOT NULL").fetchone() == (True,)


# Hostile names and values, privileges -----------------------------------------------


def test_hostile_names_and_values_are_captured_verbatim_and_break_nothing(make_app, other_service, recorder):
    schema = "s.'; DROP TABLE victim; -- $$ \\ \"ü\""
    table = "t\"); DROP TABLE victim; -- $pgevents$ 🐘"
    quoted, dollars, unicode_ = "a\"b'c;d", "$$ $pgevents$ \\x", "naïve Ωmega 🐘"
    values = {
        quoted: "'); DROP TABLE victim; --",
        dollars: "$$; DROP TABLE victim; $$ $pgevents$ \\' \\\\ \\x00",
        unicode_: "\"quoted\" ünïcödé 🐘 \\n\\t",
    }
    app, db, pgevents = make_app()
    other_service.execute(
        f"CREATE TABLE victim (); CREATE SCHEMA {_q(schema)};"
        f" CREATE TABLE {_q(schema)}.{_q(table)} ({', '.join(_q(c) + ' text' for c in values)})"
    )
    pgevents.init_app(app)
    pgevents.listen(f"{schema}.{table}", ["after_insert", "after_delete"], recorder)
    pgevents.listen(f"{schema}.{table}", "after_update", recorder, columns=[dollars, unicode_])
    hostile = sa.Table(table, sa.MetaData(), *(sa.Column(c, sa.Text) for c in values), schema=schema)
    with app.app_context():
        pgevents.install_triggers()
        assert set(_states(app, pgevents).values()) == {"installed"}
        db.session.execute(hostile.insert().values(values))
        db.session.execute(hostile.update().values({unicode_: values[dollars]}))
        db.session.commit()
    assert (schema, table, "pgevents_update", sorted([dollars, unicode_])) in _triggers(other_service)
    target = sql.Identifier(schema, table)
    update = sql.SQL("UPDATE {} SET {} = %s")
    other_service.execute(update.format(target, sql.Identifier(dollars)), (values[quoted],))
    other_service.execute(update.format(target, sql.Identifier(quoted)), ("not watched",))
    other_service.execute(
        sql.SQL("INSERT INTO {} ({}) VALUES (%s)").format(target, sql.Identifier(unicode_)), (values[unicode_],)
    )
    other_service.execute(sql.SQL("DELETE FROM {}").format(target))
    assert _drain(app, pgevents) == 6
    second = dict(values, **{unicode_: values[dollars]})
    third = dict(second, **{dollars: values[quoted]})
    fourth = dict(third, **{quoted: "not watched"})
    inserted = {quoted: None, dollars: None, unicode_: values[unicode_]}
    assert _changes(recorder) == [
        ("insert", {}, values),
        ("update", values, second),
        ("update", second, third),
        ("insert", {}, inserted),
        ("delete", fourth, {}),
        ("delete", inserted, {}),
    ]
    assert {e.table for e in recorder.events} == {f"{schema}.{table}"}
    assert other_service.execute(
        "SELECT to_regclass('victim') IS NOT NULL, to_regclass(%s) IS NOT NULL", (f"{_q(schema)}.{_q(table)}",)
    ).fetchone() == (True, True)
    with app.app_context():
        assert pgevents.uninstall_triggers(drop_schema=True) == 3
    assert _triggers(other_service) == []


def test_column_names_that_shadow_names_in_the_capture_functions(make_app, other_service, recorder):
    # Each name is an alias or a PL/pgSQL variable the capture functions use.
    names = ["n", "o", "x", "c", "r", "rn", "name", "tg_table_schema", "tg_table_name", "tg_nargs",
             "tg_argv", "found", "new", "old"]
    app, db, pgevents = make_app()
    other_service.execute(f"CREATE TABLE shadow (id int PRIMARY KEY, {', '.join(_q(n) + ' int' for n in names)})")
    pgevents.init_app(app)
    pgevents.listen("shadow", ALL, recorder)
    watched = []
    pgevents.listen("shadow", "after_update", watched.append, columns=["name"])
    row = {"id": 1, **{n: i for i, n in enumerate(names)}}
    with app.app_context():
        pgevents.install_triggers()
        db.session.execute(sa.text(f"INSERT INTO shadow VALUES ({', '.join(map(str, row.values()))})"))
        db.session.commit()
    other_service.execute("UPDATE shadow SET x = -1")
    other_service.execute("UPDATE shadow SET name = -2")
    other_service.execute("DELETE FROM shadow")
    assert _drain(app, pgevents) == 4
    updated = dict(row, x=-1)
    assert _changes(recorder) == [
        ("insert", {}, row),
        ("update", row, updated),
        ("update", updated, dict(updated, name=-2)),
        ("delete", dict(updated, name=-2), {}),
    ]
    assert [e.changed for e in watched] == [frozenset({"name"})]


def test_a_role_without_privileges_on_the_event_schema_can_still_write(
    make_app, make_role, other_service, libpq_url, recorder
):
    app, db, pgevents, User = _user_app(make_app)
    pgevents.listen(User, ALL, recorder)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
    role = make_role()
    other_service.execute(
        sql.SQL('GRANT SELECT, INSERT, UPDATE, DELETE ON "user" TO {0};'
                " GRANT USAGE ON SEQUENCE user_id_seq TO {0}").format(sql.Identifier(role))
    )
    with psycopg.connect(role_url(libpq_url, role), autocommit=True) as writer:
        assert writer.execute("SELECT current_user").fetchone() == (role,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            writer.execute("SELECT count(*) FROM pgevents.event")
        writer.execute("""INSERT INTO "user" (email, name) VALUES ('a@x', 'A')""")
        writer.execute("""UPDATE "user" SET name = 'B'""")
        writer.execute('DELETE FROM "user"')
    assert _drain(app, pgevents) == 3
    a, b = {"id": 1, "email": "a@x", "name": "A"}, {"id": 1, "email": "a@x", "name": "B"}
    assert _changes(recorder) == [("insert", {}, a), ("update", a, b), ("delete", b, {})]


def test_the_writers_session_settings_do_not_change_captured_values(make_app, other_service, recorder):
    app, db, pgevents = make_app()

    class Sample(db.Model):
        __tablename__ = "sample"
        id = sa.Column(sa.Integer, primary_key=True)
        span = sa.Column(sa.Interval)
        ratio = sa.Column(sa.Float)
        blob = sa.Column(sa.LargeBinary)
        at = sa.Column(sa.DateTime(timezone=True))
        day = sa.Column(sa.Date)

    pgevents.init_app(app)
    pgevents.listen(Sample, "after_insert", recorder)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
    other_service.execute(
        "SET IntervalStyle = 'iso_8601'; SET bytea_output = 'escape'; SET extra_float_digits = 0;"
        " SET DateStyle = 'SQL, DMY'; SET TimeZone = 'Asia/Kolkata'"
    )
    written = {
        "span": datetime.timedelta(days=3, hours=4, microseconds=5),
        "ratio": 0.1 + 0.2,
        "blob": b"\x00\xff\\ x",
        "at": datetime.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=datetime.timezone.utc),
        "day": datetime.date(2024, 12, 31),
    }
    other_service.execute(
        "INSERT INTO sample (span, ratio, blob, at, day) VALUES (%(span)s, %(ratio)s, %(blob)s, %(at)s, %(day)s)",
        written,
    )
    assert _drain(app, pgevents) == 1
    assert recorder.events[0].new == {"id": 1, **written}


def test_concurrent_installs_all_succeed(make_app, other_service):
    app, db, pgevents, User = _user_app(make_app)
    pgevents.listen(User, ALL, _ignore)
    with app.app_context():
        db.create_all()
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def install() -> None:
        try:
            barrier.wait(timeout=10)
            pgevents.install_triggers(app)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=install) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert [t[2] for t in _triggers(other_service)] == ["pgevents_delete", "pgevents_insert", "pgevents_update"]


def test_event_schema_names_must_leave_room_for_trigger_names(make_app, other_service, recorder):
    # PostgreSQL cuts names at 63 bytes: longer trigger names would collide.
    app, db, pgevents = make_app(PGEVENTS_SCHEMA="é" * 25 + "e" * 7)
    with pytest.raises(ConfigurationError, match="at most 46 bytes"):
        pgevents.init_app(app)
    longest = "e" * 46
    app, db, pgevents, User = _user_app(make_app, PGEVENTS_SCHEMA=longest)
    pgevents.listen(User, ALL, recorder)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
    assert [t[2] for t in _triggers(other_service)] == [f"{longest}_{op}" for op in ("delete", "insert", "update")]
    assert set(_states(app, pgevents).values()) == {"installed"}
    other_service.execute("""INSERT INTO "user" (email, name) VALUES ('a@x', 'A')""")
    assert _drain(app, pgevents) == 1


def test_install_names_a_missing_table_and_a_misspelt_column_of_a_string_target(
    make_app, other_service, recorder
):
    from flask_pgevents import MissingTableError, UnknownColumnError
    from flask_pgevents.cli import pgevents_cli

    app, _db, pgevents = make_app()
    pgevents.init_app(app)
    other_service.execute("CREATE TABLE ledger (id int PRIMARY KEY, amount numeric, memo text)")
    pgevents.listen("public.ledger", "after_update", recorder, columns=["ammount"])
    with app.app_context(), pytest.raises(UnknownColumnError) as info:
        pgevents.install_triggers()
    assert str(info.value) == (
        "No column 'ammount' in table 'public.ledger', watched by an 'after_update' handler."
        " Expected some of 'amount', 'id', 'memo'."
    )
    pgevents.remove("public.ledger", "after_update", recorder)
    pgevents.listen("public.ledgers", "after_insert", recorder)
    result = app.test_cli_runner().invoke(pgevents_cli, ["install-triggers"])
    assert result.exit_code == 1
    assert result.output == (
        "Error: Table 'public.ledgers' does not exist, so no trigger can be installed on it."
        " Create it first (db.create_all() or a migration), or fix the handlers' targets."
        " Nothing was installed.\n"
    )
    pgevents.listen("public.journal", "after_delete", recorder)
    pgevents.listen("public.ledger", "after_insert", recorder)
    result = app.test_cli_runner().invoke(pgevents_cli, ["install-triggers"])
    assert (result.exit_code, result.output) == (1, (
        "Error: Tables 'public.journal', 'public.ledgers' do not exist, so no trigger can be"
        " installed on them. Create them first (db.create_all() or a migration), or fix the"
        " handlers' targets. Nothing was installed.\n"
    ))
    with app.app_context(), pytest.raises(MissingTableError):
        pgevents.install_triggers()
    # Nothing was installed by the failed attempts.
    assert _triggers(other_service) == []
