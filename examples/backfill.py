"""Backfill: a handler added today processes the rows that already exist.

Run it with ``python examples/backfill.py`` (DATABASE_URL, or an embedded
server). 2,500 products exist before the handler; ``pgevents.backfill``
emits them in batches of 1,000 (``flask pgevents backfill Product`` does the
same with a progress bar), an interrupted run resumes, and a product added
meanwhile arrives as a normal insert.
"""
from __future__ import annotations

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_pgevents import Event, PGEvents
from flask_pgevents.backfill import BackfillProgress

db = SQLAlchemy()
pgevents = PGEvents()
indexed: dict[str, int] = {"backfill": 0, "insert": 0}


class Product(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "backfill_example_product"
    id = db.Column(db.Integer, primary_key=True)
    name = db.Column(db.String, nullable=False)


@pgevents.listens_for(Product, "after_insert")
def index_product(event: Event) -> None:
    indexed["backfill" if event.backfill else "insert"] += 1


class Interrupted(Exception):
    pass


def run(database_url: str) -> int:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=database_url, PGEVENTS_AUTOSTART=False, PGEVENTS_SCHEMA="pgevents_backfill_example",
    )
    db.init_app(app)
    pgevents.init_app(app)
    with app.app_context():
        db.create_all()
        db.session.execute(sa.insert(Product), [{"name": f"product {n}"} for n in range(2500)])
        db.session.commit()
        pgevents.install_triggers()
        try:
            def stop_after_first_batch(progress: BackfillProgress) -> None:
                print(f"backfill {progress.run}: {progress.emitted} of about {progress.estimate} rows")
                if progress.batch:
                    db.session.add(Product(name="added meanwhile"))  # gets its normal event
                    db.session.commit()
                    raise Interrupted

            try:
                pgevents.backfill(Product, progress=stop_after_first_batch)
            except Interrupted:
                print("interrupted; resuming")
            result = pgevents.backfill(Product)
            print(f"backfill {result.run} resumed={result.resumed}: {result.emitted} rows emitted")
            pgevents.process_pending(timeout=60)
            print(f"handled: {indexed['backfill']} backfilled rows, {indexed['insert']} new insert")
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
