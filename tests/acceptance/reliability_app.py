"""The app that reliability tests run in `flask pgevents listen` subprocesses.

Its handler records each event it handles in the ``handled`` table; rows named
``slow...`` make it record a start and then sleep ``SLOW_SECONDS`` first.
"""
from __future__ import annotations

import os
import time

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_pgevents import Event, PGEvents

db = SQLAlchemy()
pgevents = PGEvents()


class Item(db.Model):
    __tablename__ = "item"
    id = sa.Column(sa.Integer, primary_key=True)
    name = sa.Column(sa.String, nullable=False)


class Handled(db.Model):
    __tablename__ = "handled"
    id = sa.Column(sa.Integer, primary_key=True)
    event_id = sa.Column(sa.BigInteger, nullable=False)
    item_id = sa.Column(sa.Integer, nullable=False)
    pid = sa.Column(sa.Integer, nullable=False)
    stage = sa.Column(sa.String, nullable=False, default="done")


class HandledAttempt(db.Model):
    """Attempts at each event, recorded on a connection of their own (at least once)."""

    __tablename__ = "handled_attempt"
    id = sa.Column(sa.Integer, primary_key=True)
    event_id = sa.Column(sa.BigInteger, nullable=False)
    attempt = sa.Column(sa.Integer, nullable=False)


@pgevents.listens_for(Item, "after_insert")
def record(event: Event) -> None:
    if event.new["name"].startswith("slow") and os.environ.get("SLOW_SECONDS"):
        # On a connection of its own: visible at once, while the handler's
        # db.session work commits only with the event's claim.
        with db.engine.begin() as conn:
            conn.execute(sa.insert(Handled).values(
                event_id=event.id, item_id=event.new["id"], pid=os.getpid(), stage="started"))
        time.sleep(float(os.environ["SLOW_SECONDS"]))
    if os.environ.get("FAIL_HALF"):
        # A partial write, committed, then a failure on the first attempt of
        # every other event: the partial write must not survive.
        with db.engine.begin() as conn:
            conn.execute(sa.insert(HandledAttempt).values(event_id=event.id, attempt=event.attempt))
        db.session.add(Handled(event_id=event.id, item_id=event.new["id"], pid=os.getpid(), stage="partial"))
        db.session.commit()
        if event.attempt == 1 and event.new["id"] % 2:
            raise RuntimeError("fails half the time")
        db.session.query(Handled).filter_by(event_id=event.id, stage="partial").delete()
    db.session.add(Handled(event_id=event.id, item_id=event.new["id"], pid=os.getpid()))
    db.session.commit()


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=os.environ["DATABASE_URL"],
        PGEVENTS_AUTOSTART=False,
        PGEVENTS_STOP_TIMEOUT=30,
        PGEVENTS_RETRY_BACKOFF=0.05,
        PGEVENTS_ATOMIC_HANDLERS=os.environ.get("ATOMIC_HANDLERS", "true"),
    )
    db.init_app(app)
    pgevents.init_app(app)
    return app
