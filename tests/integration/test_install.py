"""Installing into a database that already has a history: a second app on the
same event schema, and tables that another transaction holds locked."""
from __future__ import annotations

import threading
from typing import Any, Callable

import psycopg
import pytest
import sqlalchemy as sa
from conftest import wait_until

from flask_pgevents import InstallLockError, TriggerOwnershipError
from flask_pgevents.cli import pgevents_cli


def ignore(event: Any) -> None:
    """A handler that does nothing."""


def shop_app(make_app: Callable[..., Any], name: str, tables: list[str], **config: Any) -> Any:
    """An app named ``name`` with one model per table (``id``, ``name``), tables created."""
    app, db, pgevents = make_app(PGEVENTS_APP_NAME=name, **config)
    models = {}
    for table in tables:
        models[table] = type(table.title(), (db.Model,), {
            "__tablename__": table,
            "id": sa.Column(sa.Integer, primary_key=True),
            "name": sa.Column(sa.String),
        })
    pgevents.init_app(app)
    with app.app_context():
        db.create_all()
    return app, pgevents, models


def install(app: Any, *args: str) -> Any:
    return app.test_cli_runner().invoke(pgevents_cli, ["install-triggers", *args])


def triggers(conn: psycopg.Connection) -> list[tuple[str, str, str]]:
    """(table, trigger, comment) of every capture trigger."""
    return [tuple(row) for row in conn.execute(
        "SELECT tgrelid::regclass::text, tgname, obj_description(oid, 'pg_trigger') FROM pg_trigger"
        " WHERE NOT tgisinternal ORDER BY 1, 2"
    ).fetchall()]


def pending(conn: psycopg.Connection) -> list[tuple[str, str]]:
    return [tuple(row) for row in conn.execute(
        "SELECT table_name, op FROM pgevents.event WHERE status = 'pending' ORDER BY id"
    ).fetchall()]


# A second app on the same database --------------------------------------------------------


def test_a_second_apps_install_leaves_the_first_apps_triggers_working(make_app, other_service):
    shop, shop_events, shop_models = shop_app(make_app, "shop", ["orders", "customer"])
    billing, billing_events, billing_models = shop_app(make_app, "billing", ["invoice"])
    shop_events.listen(shop_models["orders"], "after_insert", ignore)
    shop_events.listen(shop_models["customer"], ["after_insert", "after_delete"], ignore)
    billing_events.listen(billing_models["invoice"], "after_insert", ignore)
    assert install(shop).exit_code == 0

    result = install(billing)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "leave    public.customer  delete            (installed for app 'shop')",
        "leave    public.customer  insert            (installed for app 'shop')",
        "create   public.invoice   insert",
        "leave    public.orders    insert            (installed for app 'shop')",
        "1 change in schema 'pgevents'.",
    ]
    # Even a pruning install leaves another app's triggers.
    assert install(billing, "--prune").output.endswith("0 changes in schema 'pgevents'.\n")
    assert triggers(other_service) == [
        ("customer", "pgevents_delete", "flask-pgevents app: shop"),
        ("customer", "pgevents_insert", "flask-pgevents app: shop"),
        ("invoice", "pgevents_insert", "flask-pgevents app: billing"),
        ("orders", "pgevents_insert", "flask-pgevents app: shop"),
    ]
    other_service.execute("INSERT INTO orders (name) VALUES ('o'); INSERT INTO invoice (name) VALUES ('i')")
    assert pending(other_service) == [("orders", "insert"), ("invoice", "insert")]
    with shop.app_context():
        assert shop_events.process_pending() == 1
    with billing.app_context():
        assert billing_events.process_pending() == 1

    # Uninstalling one app drops its own triggers only.
    with billing.app_context():
        assert billing_events.uninstall_triggers() == 1
    assert [t[0] for t in triggers(other_service)] == ["customer", "customer", "orders"]


def test_a_second_app_that_needs_a_trigger_of_the_first_is_refused_and_changes_nothing(
    make_app, other_service
):
    shop, shop_events, shop_models = shop_app(make_app, "shop", ["orders"])
    billing, billing_events, _ = shop_app(make_app, "billing", [])
    shop_events.listen(shop_models["orders"], "after_update", ignore, columns=["name"])
    billing_events.listen("public.orders", "after_update", ignore)
    assert install(shop).exit_code == 0
    before = triggers(other_service)

    message = (
        "The update trigger on 'public.orders' in schema 'pgevents' was installed for the app"
        " 'shop', and this app ('billing') needs it too. Apps that share an event schema share its"
        " events, so each would miss the other's: give this app its own PGEVENTS_SCHEMA. If it is"
        " the same app under a new name, set PGEVENTS_APP_NAME = 'shop'."
    )
    result = install(billing)
    assert (result.exit_code, result.output) == (1, f"Error: {message}\n")
    with billing.app_context(), pytest.raises(TriggerOwnershipError) as info:
        billing_events.install_triggers()
    assert str(info.value) == message
    assert triggers(other_service) == before

    # With its own schema, it installs beside the first app, and both get every event.
    billing2, billing2_events, _ = shop_app(make_app, "billing", [], PGEVENTS_SCHEMA="billing_events")
    billing2_events.listen("public.orders", "after_update", ignore)
    assert install(billing2).exit_code == 0
    other_service.execute("INSERT INTO orders (name) VALUES ('a'); UPDATE orders SET name = 'b'")
    with shop.app_context():
        assert shop_events.process_pending() == 1
    with billing2.app_context():
        assert billing2_events.process_pending() == 1


# Tables held by another transaction ----------------------------------------------------------


class Writer(threading.Thread):
    """Inserts into a table in a loop, each insert allowed ``limit`` seconds."""

    def __init__(self, url: str, table: str, limit: float) -> None:
        super().__init__(name="test-writer", daemon=True)
        self.url, self.table, self.limit = url, table, limit
        self.done = threading.Event()
        self.inserted = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute("SELECT set_config('statement_timeout', %s, false)", (f"{int(self.limit * 1000)}ms",))
                while not self.done.is_set():
                    conn.execute(f"INSERT INTO {self.table} (name) VALUES ('w')")
                    self.inserted += 1
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def test_install_never_makes_writers_queue_behind_a_locked_table_and_names_it(
    make_app, other_service, libpq_url
):
    app, pgevents, models = shop_app(make_app, "shop", ["account", "orders"], PGEVENTS_LOCK_TIMEOUT=0.2)
    pgevents.listen(models["account"], "after_insert", ignore)
    pgevents.listen(models["orders"], "after_insert", ignore)
    other_service.execute("INSERT INTO orders (name) VALUES ('held')")
    with psycopg.connect(libpq_url, application_name="a long report") as blocker:
        blocker.execute("UPDATE orders SET name = name")  # a row lock, in an open transaction
        writer = Writer(libpq_url, "account", limit=2.0)
        writer.start()
        try:
            wait_until(lambda: writer.inserted > 0)
            result = install(app)
            inserted_during_install = writer.inserted
        finally:
            writer.done.set()
            writer.join(10)
        # Install locks account before orders: each attempt held it at most 0.2 s.
        assert writer.error is None, writer.error
        assert result.exit_code == 1
        assert result.output.startswith(
            "Error: Could not lock table 'public.orders' within 0.2 s, in 5 attempts: held by pid"
            f" {blocker.info.backend_pid}, application 'a long report', idle in transaction for "
        )
        assert result.output.endswith(
            ". Nothing was changed and the installed triggers keep working. End that transaction,"
            " or raise PGEVENTS_LOCK_TIMEOUT, and run the command again.\n"
        )
        assert inserted_during_install > writer.inserted // 2 > 0
        assert triggers(other_service) == []

        # Once the transaction ends during the retries, the install goes through.
        threading.Timer(0.5, blocker.rollback).start()
        with app.app_context():
            plan = pgevents.install_triggers()
    assert plan.changes == 3
    other_service.execute("INSERT INTO account (name) VALUES ('a'); INSERT INTO orders (name) VALUES ('o')")
    assert pending(other_service) == [("account", "insert"), ("orders", "insert")]


def test_install_with_nothing_to_change_takes_no_lock_on_any_table(make_app, other_service, libpq_url):
    app, pgevents, models = shop_app(make_app, "shop", ["orders"], PGEVENTS_LOCK_TIMEOUT=0.2)
    pgevents.listen(models["orders"], "after_insert", ignore)
    assert install(app).exit_code == 0
    with psycopg.connect(libpq_url) as blocker:
        blocker.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        with app.app_context():
            assert pgevents.install_triggers().changes == 0
        locked = pytest.raises(InstallLockError, match=r"^Could not lock table 'public\.orders' within 0\.2 s")
        with locked, app.app_context():
            pgevents.uninstall_triggers()
