"""Roles: a non-superuser table owner runs everything; a listen-only role needs only the README's GRANTs."""
from __future__ import annotations

import itertools
from typing import Iterator

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from conftest import Recorder, wait_until

_roles = itertools.count()


@pytest.fixture
def make_role(libpq_url: str, other_service: psycopg.Connection) -> Iterator[object]:
    """Create login roles (trust auth on the embedded server); dropped after the test."""
    created: list[str] = []

    def create(*privileges: str) -> str:
        name = f"pgevents_role_{other_service.info.backend_pid}_{next(_roles)}"
        other_service.execute(f'CREATE ROLE "{name}" LOGIN {" ".join(privileges)}')
        created.append(name)
        return name

    yield create
    for name in created:
        other_service.execute(f'DROP OWNED BY "{name}"')
        other_service.execute(f'DROP ROLE "{name}"')


def _role_url(database_url: str, role: str) -> str:
    return make_url(database_url).set(username=role).render_as_string(hide_password=False)


def test_a_non_superuser_owner_installs_triggers_and_listens(make_app, make_role, database_url, other_service):
    owner = make_role()
    other_service.execute(f'GRANT CREATE ON DATABASE "{other_service.info.dbname}" TO "{owner}"')
    other_service.execute(f'GRANT CREATE ON SCHEMA public TO "{owner}"')
    app, db, pgevents = make_app(SQLALCHEMY_DATABASE_URI=_role_url(database_url, owner))

    class Note(db.Model):
        __tablename__ = "note"
        id = sa.Column(sa.Integer, primary_key=True)
        body = sa.Column(sa.Text)

    recorder = Recorder()
    pgevents.listen(Note, ["after_insert", "after_delete"], recorder)
    pgevents.init_app(app)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
        db.session.add(Note(body="hello"))
        db.session.commit()
        db.session.execute(sa.delete(Note))
        db.session.commit()
    pgevents.start(app)
    events = recorder.wait_for(2)
    assert [(e.op, (e.new or e.old)["body"]) for e in events] == [("insert", "hello"), ("delete", "hello")]
    superuser = other_service.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (owner,)).fetchone()[0]
    assert superuser is False


def test_a_listen_only_role_needs_only_the_documented_grants(make_app, make_role, database_url, other_service):
    app, db, pgevents = make_app()

    class Note(db.Model):
        __tablename__ = "note"
        id = sa.Column(sa.Integer, primary_key=True)
        body = sa.Column(sa.Text)

    # The deploying app installs the trigger; the listening process is another app.
    pgevents.listen(Note, "after_insert", Recorder())
    pgevents.init_app(app)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
    listener_role = make_role()
    # Exactly the GRANTs the README gives.
    other_service.execute(f'GRANT USAGE ON SCHEMA pgevents TO "{listener_role}"')
    other_service.execute(f'GRANT SELECT, UPDATE, DELETE ON pgevents.event TO "{listener_role}"')
    other_service.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON pgevents.listener TO "{listener_role}"')
    other_service.execute("INSERT INTO note (body) VALUES ('a'), ('b')")

    listen_app, _, listen_pgevents = make_app(
        SQLALCHEMY_DATABASE_URI=_role_url(database_url, listener_role)
    )
    recorder = Recorder()
    listen_pgevents.listen("public.note", "after_insert", recorder)
    listen_pgevents.init_app(listen_app)
    listen_pgevents.start(listen_app)
    events = recorder.wait_for(2)
    assert [e.new["body"] for e in events] == ["a", "b"]
    wait_until(lambda: other_service.execute("SELECT count(*) FROM pgevents.event").fetchone()[0] == 0)
