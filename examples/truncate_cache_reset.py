"""TRUNCATE events: reset a cache when its table is emptied.

Run it with ``python examples/truncate_cache_reset.py`` (DATABASE_URL, or an
embedded server). A per-process cache of product names is filled by insert
events; a ``TRUNCATE`` made by another client (here: plain SQL, as a data
reload script would) is one ``after_truncate`` event, whose handler bumps a
version number in the database. Every process compares it with the version
its cache was built for, and drops its cache when it changed: one queued
event, durable and handled once, resets the caches of all processes.
"""
from __future__ import annotations

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_pgevents import Event, PGEvents

db = SQLAlchemy()
pgevents = PGEvents()


class Product(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "truncate_example_product"
    id = db.Column(db.Integer, primary_key=True)
    name = db.Column(db.String, nullable=False)


class CacheVersion(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "truncate_example_cache_version"
    name = db.Column(db.String, primary_key=True)
    version = db.Column(db.Integer, nullable=False, default=0)


class ProductCache:
    """This process's cache, valid for one version of the product table."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.version = 0

    def current(self) -> dict[int, str]:
        version = db.session.get(CacheVersion, "product")
        if version is not None and version.version != self.version:
            self.names.clear()  # emptied since this cache was built
            self.version = version.version
        return self.names


cache = ProductCache()


@pgevents.listens_for(Product, "after_insert")
def remember_product(event: Event) -> None:
    cache.current()[event.new["id"]] = event.new["name"]


@pgevents.listens_for(Product, "after_truncate")
def reset_product_caches(event: Event) -> None:
    db.session.execute(
        sa.update(CacheVersion).where(CacheVersion.name == "product").values(version=CacheVersion.version + 1)
    )
    db.session.commit()
    print(f"{event.table} was truncated at {event.timestamp:%H:%M:%S}: caches reset")


def run(database_url: str) -> int:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=database_url, PGEVENTS_AUTOSTART=False, PGEVENTS_SCHEMA="pgevents_truncate_example",
    )
    db.init_app(app)
    pgevents.init_app(app)
    with app.app_context():
        db.create_all()
        try:
            db.session.add(CacheVersion(name="product", version=0))
            db.session.commit()
            pgevents.install_triggers()
            db.session.execute(sa.insert(Product), [{"name": f"product {n}"} for n in range(3)])
            db.session.commit()
            pgevents.process_pending(timeout=60)
            print(f"cached {len(cache.current())} products")
            with db.engine.begin() as other_client:  # a reload script, outside the app
                other_client.execute(sa.text("TRUNCATE truncate_example_product"))
            pgevents.process_pending(timeout=60)
            db.session.commit()
            print(f"cached {len(cache.current())} products after the TRUNCATE")
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
