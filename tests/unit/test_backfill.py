"""backfill.py: what a backfill is for (table, handler) is settled before it connects.

Runs, resumes and concurrent writes are in tests/integration/test_backfill.py."""
from __future__ import annotations

import re
from typing import Any

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_pgevents import PGEvents, UnknownHandlerError
from flask_pgevents.backfill import resolve_backfill_target
from flask_pgevents.registry import TableKey

#: Every call here fails before it connects: PGEvents never reaches this server.
UNUSED_URI = "postgresql://pgevents@localhost/never_connected"

db = SQLAlchemy()


class Invoice(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "invoice"
    __table_args__ = {"schema": "billing"}
    id = db.Column(db.Integer, primary_key=True)


def welcome(event: Any) -> None: ...


def audit(event: Any) -> None: ...


class Other:
    @staticmethod
    def welcome(event: Any) -> None: ...


def make_app() -> tuple[Flask, PGEvents]:
    app = Flask("backfill")
    app.config.update({"TESTING": True, "SQLALCHEMY_DATABASE_URI": UNUSED_URI})
    db.init_app(app)
    return app, PGEvents(app, db=db)


def test_a_model_its_class_name_a_table_name_and_a_table_name_the_same_table():
    app, _ = make_app()
    state = app.extensions["pgevents"]
    expected = TableKey("billing", "invoice")
    for target in (Invoice, "Invoice", Invoice.__table__, "billing.invoice"):
        assert resolve_backfill_target(state, target) == expected


def test_a_table_without_an_after_insert_handler_is_refused():
    app, pgevents = make_app()
    pgevents.listen(Invoice, "after_update", welcome)
    with pytest.raises(UnknownHandlerError, match=re.escape(
        "No 'after_insert' handler listens to table 'billing.invoice'. Backfill events are"
        " inserts, so nothing would handle them: register the handler first."
    )):
        pgevents.backfill("Invoice", app=app)


def test_a_handler_that_is_not_one_of_the_tables_is_refused_with_their_names():
    app, pgevents = make_app()
    pgevents.listen(Invoice, "after_insert", welcome)
    pgevents.listen(Invoice, "after_insert", audit)
    names = f"'{__name__}.welcome', '{__name__}.audit'"
    for handler in ("nobody", print):
        with pytest.raises(UnknownHandlerError, match=re.escape(f"is not an 'after_insert' handler of table"
                                                                f" 'billing.invoice'. Its handlers are: {names}.")):
            pgevents.backfill(Invoice, handler=handler, app=app)


def test_a_short_name_that_names_several_handlers_is_refused():
    app, pgevents = make_app()
    pgevents.listen(Invoice, "after_insert", welcome)
    pgevents.listen(Invoice, "after_insert", Other.welcome)
    with pytest.raises(UnknownHandlerError, match="'welcome' names several"):
        pgevents.backfill(Invoice, handler="welcome", app=app)


def test_batch_size_must_be_positive():
    app, pgevents = make_app()
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        pgevents.backfill(Invoice, batch_size=0, app=app)
