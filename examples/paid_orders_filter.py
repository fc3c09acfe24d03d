"""Capture filters: each handler gets exactly the rows it wants, tested in the database.

Run it with ``python examples/paid_orders_filter.py`` (DATABASE_URL, or an
embedded server). 1,000 orders are inserted and updated; only the paid ones
are stored as events, and the handler of a status transition sees only the
orders that became paid.
"""
from __future__ import annotations

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_pgevents import Event, PGEvents

db = SQLAlchemy()
pgevents = PGEvents()
seen: dict[str, list[int]] = {"invoiced": [], "became_paid": []}


class Order(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "filter_example_order"
    id = db.Column(db.Integer, primary_key=True)
    status = db.Column(db.String, nullable=False)


@pgevents.listens_for(Order, "after_insert", where=Order.status == "paid")
def invoice(event: Event) -> None:
    seen["invoiced"].append(event.new["id"])


@pgevents.listens_for(Order, "after_update", where=lambda old, new: (old.status != "paid") & (new.status == "paid"))
def became_paid(event: Event) -> None:
    seen["became_paid"].append(event.new["id"])


def run(database_url: str) -> int:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=database_url, PGEVENTS_AUTOSTART=False, PGEVENTS_SCHEMA="pgevents_filter_example",
    )
    db.init_app(app)
    pgevents.init_app(app)
    with app.app_context():
        db.create_all()
        try:
            pgevents.install_triggers()
            # One order in ten is paid at once; the others stay open.
            db.session.execute(sa.insert(Order), [
                {"id": n, "status": "paid" if n % 10 == 0 else "open"} for n in range(1, 1001)
            ])
            db.session.commit()
            # Orders 1 to 20 get paid: 18 of them were open.
            db.session.execute(sa.update(Order).where(Order.id <= 20).values(status="paid"))
            db.session.commit()
            stored = db.session.execute(sa.text('SELECT count(*) FROM pgevents_filter_example."event"')).scalar()
            print(f"1,000 inserts and 20 updates stored {stored} events")
            pgevents.process_pending(timeout=60)
            print(f"invoiced {len(seen['invoiced'])} orders paid at once;"
                  f" {len(seen['became_paid'])} orders became paid: {sorted(seen['became_paid'])}")
        finally:
            db.session.remove()
            pgevents.uninstall_triggers(drop_schema=True)
            db.drop_all()
            db.engine.dispose()
    return 0


def main() -> int:
    from flask_pgevents.embedded import run_with_database

    return run_with_database(run)


if __name__ == "__main__":
    raise SystemExit(main())
