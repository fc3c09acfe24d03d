"""flask-pgevents under gunicorn: every worker runs its own listener.

Each row inserted into ``item``, by this app, ``psql`` or any other client, is
handled exactly once across all workers; the handler records the event id and
the pid of the worker that handled it in ``handled``.

Set up the tables and triggers once, then serve::

    export DATABASE_URL=postgresql://user:password@localhost/dbname
    python examples/gunicorn_app.py init
    gunicorn --workers 2 'examples.gunicorn_app:create_app()'
    # or: gunicorn --workers 2 --chdir examples 'gunicorn_app:create_app()'

    curl -X POST localhost:8000/items     # add an item
    curl localhost:8000/                  # this worker, and who handled what

``--preload`` works too: the listener starts in each worker after the fork.
``python examples/gunicorn_app.py`` alone sets up the database and serves
with two workers until Ctrl-C; without ``DATABASE_URL`` it first starts an
embedded PostgreSQL (``pip install -e '.[embedded]'`` in a clone).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any, Optional

from flask import Blueprint, Flask, jsonify
from flask_sqlalchemy import SQLAlchemy

from flask_pgevents import Event, PGEvents

db = SQLAlchemy()
pgevents = PGEvents()
bp = Blueprint("items", __name__)


class Item(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "item"
    id = db.Column(db.Integer, primary_key=True)
    name = db.Column(db.String, nullable=False, default="item")


class Handled(db.Model):  # type: ignore[name-defined,misc]
    """One row per handler call: exactly one per item in normal operation."""

    __tablename__ = "handled"
    id = db.Column(db.Integer, primary_key=True)
    event_id = db.Column(db.BigInteger, nullable=False)
    item_id = db.Column(db.Integer, nullable=False)
    pid = db.Column(db.Integer, nullable=False)


@pgevents.listens_for(Item, "after_insert")
def record_handled(event: Event) -> None:
    """Record which worker handled the new item; runs in the listener's app context."""
    assert event.new is not None  # set for every insert
    db.session.add(Handled(event_id=event.id, item_id=event.new["id"], pid=os.getpid()))
    db.session.commit()


@bp.get("/")
def overview() -> Any:
    """This worker's pid, whether its listener runs, and the handler calls by pid."""
    rows = db.session.execute(
        db.select(Handled.pid, db.func.count()).group_by(Handled.pid)
    ).all()
    return jsonify(
        pid=os.getpid(),
        listener=any(t.name == "pgevents-listener" for t in threading.enumerate()),
        items=db.session.scalar(db.select(db.func.count()).select_from(Item)),
        handled_by_pid={str(pid): count for pid, count in rows},
    )


@bp.post("/items")
def add_item() -> Any:
    item = Item(name="from the web")
    db.session.add(item)
    db.session.commit()
    return jsonify(id=item.id), 201


def create_app(config: Optional[dict[str, Any]] = None) -> Flask:
    """Build the app from ``DATABASE_URL``; ``config`` overrides settings."""
    url = os.environ.get("DATABASE_URL")
    if not url:
        raise RuntimeError(
            "Set DATABASE_URL to a PostgreSQL URI, for example"
            " 'postgresql://user:password@localhost/dbname'."
        )
    if url.startswith("postgres://"):  # the spelling of Heroku and others
        url = "postgresql://" + url[len("postgres://"):]
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    app.config.update(config or {})
    db.init_app(app)
    pgevents.init_app(app)
    app.register_blueprint(bp)
    return app


def init_database() -> None:
    """Create the tables and install the triggers the handlers need."""
    # A one-off script: handling events is the servers' job.
    app = create_app({"PGEVENTS_AUTOSTART": False})
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
        db.engine.dispose()


def serve() -> None:
    """Set up the database and serve with two gunicorn workers until Ctrl-C.

    Without ``DATABASE_URL``, an embedded PostgreSQL is started first.
    """
    server = None
    if not os.environ.get("DATABASE_URL"):
        from flask_pgevents.embedded import EmbeddedPostgres

        server = EmbeddedPostgres()
        os.environ["DATABASE_URL"] = server.url()
    try:
        init_database()
        gunicorn = subprocess.Popen([
            sys.executable, "-m", "gunicorn", "--workers", "2",
            "--chdir", os.path.dirname(os.path.abspath(__file__)), "gunicorn_app:create_app()",
        ])
        try:
            gunicorn.wait()
        except KeyboardInterrupt:
            gunicorn.terminate()
            gunicorn.wait()
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "serve"
    if command == "init":
        init_database()
        print("Tables created and triggers installed.")
    elif command == "serve":
        serve()
    else:
        sys.exit("usage: python gunicorn_app.py [init | serve]")
