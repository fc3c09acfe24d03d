"""where= filters tested in the database, and TRUNCATE events, on both drivers."""
from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from flask_pgevents import Event, InvalidFilterError


def _order_app(make_app: Any, **config: Any) -> tuple[Any, Any, Any, Any]:
    app, db, pgevents = make_app(**config)

    class Order(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "order"
        id = sa.Column(sa.Integer, primary_key=True)
        status = sa.Column(sa.String, nullable=True)
        total = sa.Column("Total", sa.Numeric, nullable=False, server_default="0")

    pgevents.init_app(app)
    with app.app_context():
        db.create_all()
    return app, db, pgevents, Order


def _drain(app: Any, pgevents: Any) -> int:
    with app.app_context():
        return pgevents.process_pending(timeout=60)


def _event_rows(conn: psycopg.Connection) -> int:
    return conn.execute('SELECT count(*) FROM pgevents."event"').fetchone()[0]  # type: ignore[index]


def _states(app: Any, pgevents: Any) -> dict[tuple[str, str], str]:
    with app.app_context():
        report, _ = pgevents.trigger_status()
    return {(str(s.table), s.kind): s.state for s in report}


def test_each_filtered_handler_gets_exactly_its_rows(make_app: Any, other_service: psycopg.Connection) -> None:
    app, _, pgevents, Order = _order_app(make_app)
    paid: list[Event] = []
    big: list[Event] = []
    became_paid: list[Event] = []

    pgevents.listen(Order, "after_insert", paid.append, where=Order.status == "paid")
    pgevents.listen(Order, "after_insert", big.append, where=Order.total > 100)
    pgevents.listen(
        Order, "after_update", became_paid.append,
        where=lambda old, new: (old.status != "paid") & (new.status == "paid"),
    )
    with app.app_context():
        pgevents.install_triggers()

    other_service.execute(
        'INSERT INTO "order" (id, status, "Total") VALUES'
        " (1, 'paid', 5), (2, 'open', 500), (3, 'paid', 200), (4, 'open', 1), (5, NULL, 1)"
    )
    # Rows no handler wants cost no event row.
    assert _event_rows(other_service) == 3
    other_service.execute("UPDATE \"order\" SET status = 'paid' WHERE id IN (2, 3, 4)")
    other_service.execute("UPDATE \"order\" SET \"Total\" = 7 WHERE id = 1")
    assert _event_rows(other_service) == 5  # orders 2 and 4 became paid; 3 was paid already
    assert _drain(app, pgevents) == 5

    assert sorted(e.new["id"] for e in paid) == [1, 3]
    assert sorted(e.new["id"] for e in big) == [2, 3]
    assert sorted((e.old["status"], e.new["id"]) for e in became_paid) == [("open", 2), ("open", 4)]


def test_unfiltered_handler_gets_every_row_beside_a_filtered_one(
    make_app: Any, other_service: psycopg.Connection
) -> None:
    app, _, pgevents, Order = _order_app(make_app)
    every: list[Event] = []
    paid: list[Event] = []
    pgevents.listen(Order, "after_delete", every.append)
    pgevents.listen(Order, "after_delete", paid.append, where=Order.status.in_(["paid", "refunded"]))
    with app.app_context():
        pgevents.install_triggers()

    other_service.execute("INSERT INTO \"order\" (id, status) VALUES (1, 'paid'), (2, 'open'), (3, NULL)")
    other_service.execute('DELETE FROM "order"')
    assert _drain(app, pgevents) == 3
    assert sorted(e.old["id"] for e in every) == [1, 2, 3]
    assert [e.old["id"] for e in paid] == [1]


def test_a_changed_filter_makes_the_trigger_outdated_until_install(
    make_app: Any, other_service: psycopg.Connection
) -> None:
    app, _, pgevents, Order = _order_app(make_app)

    def paid(event: Event) -> None:
        pass

    pgevents.listen(Order, "after_update", paid, where=Order.status == "paid")
    with app.app_context():
        first = pgevents.install_triggers()
        assert [(s.action, s.kind) for s in first.steps if s.table is not None] == [("create", "update")]
        assert pgevents.install_triggers().changes == 0
    assert _states(app, pgevents) == {("public.order", "update"): "installed"}

    pgevents.listen(Order, "after_update", paid, where=Order.status == "shipped")
    assert _states(app, pgevents) == {("public.order", "update"): "outdated"}
    with app.app_context():
        plan = pgevents.install_triggers()
    [step] = [s for s in plan.steps if s.table is not None]
    assert step.action == "replace" and step.detail.startswith("filters: ")
    assert _states(app, pgevents) == {("public.order", "update"): "installed"}

    # No filter any more: the trigger's own function is replaced by the shared one, and dropped.
    pgevents.remove(Order, "after_update", paid)
    pgevents.listen(Order, "after_update", paid)
    with app.app_context():
        pgevents.install_triggers()
    assert _states(app, pgevents) == {("public.order", "update"): "installed"}
    functions = other_service.execute(
        "SELECT proname FROM pg_proc WHERE pronamespace = 'pgevents'::regnamespace AND proname LIKE '%\\_\\_%'"
    ).fetchall()
    assert functions == []


def test_filtered_function_is_owned_by_the_capture_role_and_not_public(
    make_app: Any, other_service: psycopg.Connection
) -> None:
    app, _, pgevents, Order = _order_app(make_app)
    pgevents.listen(Order, "after_insert", lambda event: None, where=Order.status == "it's paid")
    with app.app_context():
        pgevents.install_triggers()
    [(owner, acl, config)] = other_service.execute(
        "SELECT proowner::regrole::text, proacl::text, proconfig FROM pg_proc"
        " WHERE pronamespace = 'pgevents'::regnamespace AND proname LIKE 'capture\\_insert\\_\\_%'"
    ).fetchall()
    assert owner == "pgevents_capture"
    assert not any(entry.startswith("=") for entry in acl.strip("{}").split(","))  # none for PUBLIC
    assert "search_path=pg_catalog, pg_temp" in config
    other_service.execute("INSERT INTO \"order\" (id, status) VALUES (1, 'it''s paid'), (2, 'paid')")
    assert _event_rows(other_service) == 1
    with app.app_context():
        pgevents.uninstall_triggers()
    remaining = other_service.execute(
        "SELECT count(*) FROM pg_proc WHERE pronamespace = 'pgevents'::regnamespace AND proname LIKE '%\\_\\_%'"
    ).fetchone()
    assert remaining == (0,)



def test_a_filter_its_capture_function_could_not_run_is_refused_at_install_and_writes_go_on(
    make_app: Any, other_service: psycopg.Connection
) -> None:
    other_service.execute("CREATE FUNCTION public.is_big(numeric) RETURNS boolean LANGUAGE sql AS 'SELECT $1 > 100'")
    app, _, pgevents, Order = _order_app(make_app)
    big: list[Event] = []
    # Unqualified, is_big() resolves for the app's own connections but not in a
    # capture function (search_path = pg_catalog, pg_temp): every insert would fail.
    pgevents.listen(Order, "after_insert", big.append, where=sa.func.is_big(Order.total))
    with app.app_context(), pytest.raises(InvalidFilterError) as refused:
        pgevents.install_sql()
    assert "function is_big(numeric) does not exist" in str(refused.value)
    assert "'after_insert' handlers of 'public.order'" in str(refused.value)
    assert "sa.func.myschema.f(...)" in str(refused.value)
    with app.app_context(), pytest.raises(InvalidFilterError):
        pgevents.install_triggers()
    assert _states(app, pgevents) == {("public.order", "insert"): "missing"}
    other_service.execute("INSERT INTO \"order\" (id, \"Total\") VALUES (1, 500)")

    # Named with its schema, it runs, as the capture role may execute it.
    pgevents.remove(Order, "after_insert", big.append)
    pgevents.listen(Order, "after_insert", big.append, where=sa.func.public.is_big(Order.total))
    with app.app_context():
        pgevents.install_triggers()
    other_service.execute("INSERT INTO \"order\" (id, \"Total\") VALUES (2, 500), (3, 5)")
    assert _drain(app, pgevents) == 1
    assert [event.new["id"] for event in big] == [2]

def test_a_filter_naming_a_type_outside_pg_catalog_by_its_bare_name_is_refused(
    make_app: Any, other_service: psycopg.Connection
) -> None:
    # Capture functions look types up in pg_temp after pg_catalog: a writer's own
    # temporary "mood" type would stand in for this one. Install refuses it.
    other_service.execute("CREATE TYPE public.mood AS ENUM ('happy', 'sad')")
    app, _, pgevents, Order = _order_app(make_app)
    bare = sa.Enum("happy", "sad", name="mood", create_type=False)
    happy: list[Event] = []
    pgevents.listen(Order, "after_insert", happy.append, where=sa.cast(Order.status, bare) == "happy")
    with app.app_context(), pytest.raises(InvalidFilterError, match='type "mood" does not exist'):
        pgevents.install_triggers()

    pgevents.remove(Order, "after_insert", happy.append)
    qualified = sa.Enum("happy", "sad", name="mood", schema="public", create_type=False)
    pgevents.listen(Order, "after_insert", happy.append, where=sa.cast(Order.status, qualified) == "happy")
    with app.app_context():
        pgevents.install_triggers()
    other_service.execute("INSERT INTO \"order\" (id, status) VALUES (1, 'happy'), (2, 'sad')")
    assert _drain(app, pgevents) == 1
    assert [event.new["id"] for event in happy] == [1]


def test_checking_a_new_filter_waits_for_a_locked_table_no_longer_than_the_ddl_would(
    make_app: Any, other_service: psycopg.Connection, libpq_url: str, caplog: Any
) -> None:
    app, _, pgevents, Order = _order_app(make_app, PGEVENTS_LOCK_TIMEOUT=0.2)
    pgevents.listen(Order, "after_insert", lambda event: None, where=Order.status == "paid")
    with psycopg.connect(libpq_url, application_name="a migration") as blocker:
        blocker.execute('LOCK TABLE "order" IN ACCESS EXCLUSIVE MODE')
        # The first attempt gives up after 0.2 s, names the table and backs off
        # (0.5 s); the lock is gone by the second.
        threading.Timer(0.4, blocker.rollback).start()
        with app.app_context():
            assert pgevents.install_triggers().changes == 2
    assert "Table public.order is locked, held by pid" in caplog.text
    assert "application 'a migration'" in caplog.text

    # A filter installed as it is is not planned again: nothing to change
    # takes no lock.
    with psycopg.connect(libpq_url) as blocker:
        blocker.execute('LOCK TABLE "order" IN ACCESS EXCLUSIVE MODE')
        with app.app_context():
            assert pgevents.install_triggers().changes == 0


def test_truncate_is_one_event_per_table(make_app: Any, other_service: psycopg.Connection) -> None:
    app, db, pgevents, Order = _order_app(make_app)

    class Item(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "item"
        id = sa.Column(sa.Integer, primary_key=True)

    with app.app_context():
        db.create_all()
    truncated: list[Event] = []
    pgevents.listen(Order, "after_truncate", truncated.append)
    pgevents.listen(Item, ["after_truncate", "after_insert"], truncated.append)
    with app.app_context():
        pgevents.install_triggers()
    assert _states(app, pgevents) == {
        ("public.item", "insert"): "installed",
        ("public.item", "truncate"): "installed",
        ("public.order", "truncate"): "installed",
    }
    other_service.execute("INSERT INTO \"order\" (id, status) VALUES (1, 'paid'), (2, 'open')")
    other_service.execute('TRUNCATE "order", item')
    with other_service.transaction():
        other_service.execute('TRUNCATE "order"')
        other_service.execute("SET LOCAL pgevents.suppress = on")
        other_service.execute("TRUNCATE item")  # suppressed, like other writes
    with pytest.raises(psycopg.errors.DivisionByZero), other_service.transaction():
        other_service.execute('TRUNCATE "order"')
        other_service.execute("SELECT 1/0")  # rolled back: never delivered
    assert _drain(app, pgevents) == 3
    assert _drain(app, pgevents) == 0  # claimed once
    assert sorted(e.table for e in truncated) == ["public.item", "public.order", "public.order"]
    for event in truncated:
        assert (event.op, event.new, event.old, event.changed, event.target) == (
            "truncate", {}, {}, frozenset(), None
        )

