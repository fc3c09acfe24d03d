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


@pgevents.listens_for(Item, "after_insert")
def record(event: Event) -> None:
    if event.new["name"].startswith("slow") and os.environ.get("SLOW_SECONDS"):
        db.session.add(Handled(event_id=event.id, item_id=event.new["id"], pid=os.getpid(), stage="started"))
        db.session.commit()
        time.sleep(float(os.environ["SLOW_SECONDS"]))
    db.session.add(Handled(event_id=event.id, item_id=event.new["id"], pid=os.getpid()))
    db.session.commit()


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=os.environ["DATABASE_URL"],
        PGEVENTS_AUTOSTART=False,
        PGEVENTS_STOP_TIMEOUT=30,
    )
    db.init_app(app)
    pgevents.init_app(app)
    return app
