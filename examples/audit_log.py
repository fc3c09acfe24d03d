"""An audit log: every change of ``account`` with who made it (``event.context``).

Run it with ``python examples/audit_log.py`` (DATABASE_URL, or an embedded
server as in the quickstart). Changes come from a Flask request (endpoint,
request id, and the user from a context provider), from a job in
``with pgevents.context(actor=...)``, and from ``psql``-like SQL with
``SET LOCAL pgevents.context``. The handler writes one audit row each.
"""
from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy

from flask_pgevents import Event, PGEvents

db = SQLAlchemy()
pgevents = PGEvents()


class Account(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "audit_example_account"
    id = db.Column(db.Integer, primary_key=True)
    email = db.Column(db.String, nullable=False)


class AuditLog(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "audit_example_log"
    id = db.Column(db.Integer, primary_key=True)
    op = db.Column(db.String, nullable=False)
    row = db.Column(db.Text, nullable=False)
    actor = db.Column(db.String)
    request_id = db.Column(db.String)
    txid = db.Column(db.BigInteger)


@pgevents.context_provider
def current_user() -> dict[str, Any]:
    # A real app returns its logged-in user (flask_login.current_user.id).
    return {"user_id": request.headers.get("X-User")}


@pgevents.listens_for(Account, ["after_insert", "after_update", "after_delete"])
def audit(event: Event) -> None:
    db.session.add(AuditLog(
        op=event.op,
        row=json.dumps(event.new or event.old, default=str),
        actor=event.context.get("user_id") or event.context.get("actor"),
        request_id=event.context.get("request_id"),
        txid=event.txid,
    ))
    db.session.commit()


def create_app(database_url: str) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=database_url, PGEVENTS_AUTOSTART=False, PGEVENTS_SCHEMA="pgevents_audit_example",
    )
    db.init_app(app)
    pgevents.init_app(app)

    @app.post("/accounts/<email>")
    def create_account(email: str) -> str:
        db.session.add(Account(email=email))
        db.session.commit()
        return "created"

    return app


def run(database_url: str) -> int:
    app = create_app(database_url)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
        try:
            app.test_client().post("/accounts/ada@example.com", headers={"X-User": "admin-7", "X-Request-ID": "r-1"})
            with pgevents.context(actor="nightly-job"):
                db.session.execute(sa.update(Account).values(email=sa.func.upper(Account.email)))
            db.session.commit()
            db.session.execute(sa.text("""SET LOCAL pgevents.context = '{"actor": "dba"}'"""))
            db.session.execute(sa.delete(Account))
            db.session.commit()
            pgevents.process_pending(timeout=30)
            for entry in db.session.scalars(sa.select(AuditLog).order_by(AuditLog.id)):
                print(f"audit: {entry.op} by {entry.actor} (request {entry.request_id}) {entry.row}")
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
