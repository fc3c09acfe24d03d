"""Quickstart: call Python handlers when rows of a table change, whoever changes them.

Run it with::

    python examples/quickstart.py

With no DATABASE_URL in the environment it starts a throw-away PostgreSQL
server (the ``embedded`` extra) and deletes it at the end. Set DATABASE_URL,
for example ``postgresql://user:password@localhost/dbname``, to use your own
server instead; the example creates a table ``quickstart_user`` and a schema
``pgevents_quickstart`` there, and drops both at the end.

What happens, in order:

1. A Flask app with Flask-SQLAlchemy, a ``User`` model and PGEvents.
2. Three handlers: new users, changed e-mail addresses, deleted users.
3. ``db.create_all()`` creates the table; ``install_triggers()`` installs the
   database triggers that record each change.
4. ``start()`` starts the listener thread that calls the handlers.
5. Another program (here: a plain psycopg connection, no Flask, no
   SQLAlchemy) inserts, updates and deletes rows.
6. The handlers run in this process, inside the app context, and print what
   they received. The script waits until each change was handled, stops the
   listener and exits.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Optional

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.engine import make_url

from flask_pgevents import Event, PGEvents

db = SQLAlchemy()
pgevents = PGEvents()


class User(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "quickstart_user"

    id = db.Column(db.Integer, primary_key=True)
    name = db.Column(db.String, nullable=False)
    email = db.Column(db.String, nullable=False)

    def __repr__(self) -> str:
        return f"<User {self.id} {self.name} {self.email}>"


# Handlers may be registered before or after init_app. Each receives one
# Event; it runs in the listener thread, inside the app context, so
# current_app and db.session work as in a request.
#
# Each handler also releases the semaphore below: only so that this script
# knows when to stop. A real app needs nothing like it.
handled = threading.Semaphore(0)


@pgevents.listens_for(User, "after_insert")
def welcome(event: Event) -> None:
    # event.new: the row as a dict; event.target: a User built from it,
    # not attached to any session.
    print(f"after_insert: op={event.op} new={event.new} target={event.target!r}")
    handled.release()


# columns=["email"]: called only when the email column changed. An update
# of the name alone does not call it (the trigger does not even record it).
@pgevents.listens_for(User, "after_update", columns=["email"])
def email_changed(event: Event) -> None:
    # For updates, event.old and event.new are both set.
    assert event.old is not None and event.new is not None
    print(
        f"after_update: op={event.op} old={event.old['email']} new={event.new['email']}"
        f" changed={sorted(event.changed)} target={event.target!r}"
    )
    handled.release()


@pgevents.listens_for(User, "after_delete")
def goodbye(event: Event) -> None:
    # For deletes, event.new is empty ({}) and event.target is built from event.old.
    print(f"after_delete: op={event.op} old={event.old} target={event.target!r}")
    handled.release()


def create_app(database_url: str) -> Flask:
    """The app factory: the usual Flask-SQLAlchemy set-up plus PGEvents."""
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = database_url
    # PGEvents starts its listener thread by itself only where the app is
    # served (flask run, gunicorn, ...): a plain script like this one that
    # creates the app handles no events unless it asks. This one asks: it
    # installs the triggers below, then calls start(). Autostart stays off
    # so that nothing listens before the triggers exist, however it is run.
    app.config["PGEVENTS_AUTOSTART"] = False
    # Keep this example's triggers and stored events apart from any other
    # app's in the same database (the default schema is "pgevents"), so that
    # the clean-up at the end touches nothing else.
    app.config["PGEVENTS_SCHEMA"] = "pgevents_quickstart"
    db.init_app(app)
    pgevents.init_app(app)
    return app


def change_rows_as_another_service(libpq_url: str) -> int:
    """Insert, update and delete users without Flask; return how many handler calls to expect."""
    try:
        import psycopg  # psycopg 3
    except ImportError:  # psycopg2, which flask-pgevents installs by default
        import psycopg2 as psycopg  # type: ignore[no-redef,import-untyped]

    conn = psycopg.connect(libpq_url)
    conn.autocommit = True  # each statement commits: events are delivered on commit
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                "INSERT INTO quickstart_user (name, email) VALUES"
                " ('Ada', 'ada@example.com'), ('Grace', 'grace@example.com')"
            )  # 2 x after_insert
            cursor.execute(
                "UPDATE quickstart_user SET email = 'ada@example.org' WHERE name = 'Ada'"
            )  # after_update: the email changed
            cursor.execute(
                "UPDATE quickstart_user SET name = 'Grace Hopper' WHERE name = 'Grace'"
            )  # no call: only the name changed
            cursor.execute("DELETE FROM quickstart_user WHERE name = 'Grace Hopper'")  # after_delete
    finally:
        conn.close()
    return 4


def wait_until_handled(count: int, timeout: float = 30.0) -> bool:
    """Wait until the handlers were called ``count`` times, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    return all(handled.acquire(timeout=max(0.0, deadline - time.monotonic())) for _ in range(count))


def run(database_url: str) -> int:
    app = create_app(database_url)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()

    try:
        pgevents.start(app)
        # The other service connects with plain libpq: no '+driver' in its URI.
        libpq_url = make_url(database_url).set(drivername="postgresql")
        expected = change_rows_as_another_service(libpq_url.render_as_string(hide_password=False))
        if not wait_until_handled(expected):
            print(f"Timed out waiting for {expected} handler calls.", file=sys.stderr)
            return 1
        print(f"All {expected} changes were handled.")
    finally:
        pgevents.stop(timeout=10, app=app)
        # Leave the database as it was: drop the example's triggers, event
        # schema and table.
        with app.app_context():
            pgevents.uninstall_triggers(drop_schema=True)
            db.drop_all()
            db.engine.dispose()
    return 0


def main() -> int:
    database_url: Optional[str] = os.environ.get("DATABASE_URL")
    if database_url:
        # Hosting services often hand out 'postgres://'; SQLAlchemy wants 'postgresql://'.
        if database_url.startswith("postgres://"):
            database_url = "postgresql://" + database_url[len("postgres://"):]
        return run(database_url)

    from flask_pgevents.embedded import EmbeddedPostgres

    print("DATABASE_URL is not set: starting an embedded PostgreSQL server.")
    server = EmbeddedPostgres()
    try:
        return run(app_role_url(server.url()))
    finally:
        server.stop()


def app_role_url(superuser_url: str) -> str:
    """As a real app would: run as a role that owns its tables, not as a superuser.

    CREATEROLE lets install_triggers() make the NOLOGIN role that owns the
    capture functions (see 'Security' in the README).
    """
    import psycopg

    with psycopg.connect(superuser_url, autocommit=True) as conn:
        conn.execute("CREATE ROLE quickstart_app LOGIN CREATEROLE")
        conn.execute("GRANT CREATE ON DATABASE postgres TO quickstart_app")
        conn.execute("GRANT CREATE ON SCHEMA public TO quickstart_app")
    return make_url(superuser_url).set(username="quickstart_app").render_as_string(hide_password=False)


if __name__ == "__main__":
    sys.exit(main())
