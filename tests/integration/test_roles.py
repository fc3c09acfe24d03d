"""Roles: who owns the capture functions, a non-superuser table owner runs everything,
and a role made with grant-listener listens and can do nothing more."""
from __future__ import annotations

from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from conftest import Recorder, role_url, wait_until
from sqlalchemy.engine import make_url

from flask_pgevents.cli import pgevents_cli


def test_a_non_superuser_owner_installs_triggers_and_listens(make_app, make_role, database_url, other_service):
    owner = make_role()
    other_service.execute(f'GRANT CREATE ON DATABASE "{other_service.info.dbname}" TO "{owner}"')
    other_service.execute(f'GRANT CREATE ON SCHEMA public TO "{owner}"')
    app, db, pgevents = make_app(SQLALCHEMY_DATABASE_URI=role_url(database_url, owner))

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


def _function_owners(conn: Any) -> set[tuple[str, Any]]:
    """Owner and ACL of every capture function."""
    rows = conn.execute(
        "SELECT p.proowner::regrole::text, p.proacl::text[] FROM pg_proc AS p"
        " WHERE p.pronamespace = 'pgevents'::regnamespace"
    ).fetchall()
    return {(owner, tuple(acl or ())) for owner, acl in rows}


def test_a_non_superuser_owner_without_createrole_keeps_the_functions_and_is_told(
    make_app, make_role, database_url, other_service, caplog
):
    owner = make_role()
    other_service.execute(f'GRANT CREATE ON DATABASE "{other_service.info.dbname}" TO "{owner}"')
    app, _db, pgevents = make_app(SQLALCHEMY_DATABASE_URI=role_url(database_url, owner))
    pgevents.listen("public.note", "after_insert", Recorder())
    pgevents.init_app(app)
    other_service.execute(f'CREATE TABLE note (id serial PRIMARY KEY, body text); ALTER TABLE note OWNER TO "{owner}"')
    with app.app_context():
        pgevents.install_triggers()
    owners = _function_owners(other_service)
    assert {o for o, _ in owners} == {owner}
    # Nobody else may call them: only the owner's own privilege is listed.
    assert all(acl == (f"{owner}=X/{owner}",) for _, acl in owners), owners
    assert "the NOLOGIN role 'pgevents_capture'" in caplog.text  # 'may not create' or, once it exists, 'act as'
    assert f'GRANT "pgevents_capture" TO "{owner}"' in caplog.text


def test_a_createrole_owner_gives_the_functions_to_a_nologin_capture_role(
    make_app, make_role, database_url, other_service
):
    owner = make_role("CREATEROLE")
    capture = f"{owner}_capture"
    other_service.execute(f'GRANT CREATE ON DATABASE "{other_service.info.dbname}" TO "{owner}"')
    app, _db, pgevents = make_app(SQLALCHEMY_DATABASE_URI=role_url(database_url, owner), PGEVENTS_CAPTURE_ROLE=capture)
    recorder = Recorder()
    pgevents.listen("public.note", "after_insert", recorder)
    pgevents.init_app(app)
    other_service.execute(f'CREATE TABLE note (id serial PRIMARY KEY, body text); ALTER TABLE note OWNER TO "{owner}"')
    try:
        with app.app_context():
            pgevents.install_triggers()
            pgevents.install_triggers()  # again: the installer can still replace them
        owners = _function_owners(other_service)
        assert {o for o, _ in owners} == {capture}
        assert all(acl == (f"{capture}=X/{capture}",) for _, acl in owners), owners
        login, = other_service.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (capture,)).fetchone()
        assert login is False
        # A writer with no privilege on the event schema still writes, and the event is delivered.
        writer = make_role()
        other_service.execute(f'GRANT INSERT ON note TO "{writer}"; GRANT USAGE ON SEQUENCE note_id_seq TO "{writer}"')
        with psycopg.connect(_libpq(role_url(database_url, writer)), autocommit=True) as conn:
            conn.execute("INSERT INTO note (body) VALUES ('from a writer')")
        with app.app_context():
            assert pgevents.process_pending() == 1
        assert recorder.events[0].new["body"] == "from a writer"
    finally:
        other_service.execute(f'DROP OWNED BY "{capture}" CASCADE; DROP ROLE "{capture}"')


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def test_a_role_made_with_grant_listener_listens_and_reads_broadcasts(make_app, make_role, database_url, other_service):
    app, db, pgevents = make_app()

    class Note(db.Model):
        __tablename__ = "note"
        id = sa.Column(sa.Integer, primary_key=True)
        body = sa.Column(sa.Text)

    # The deploying app installs the triggers and grants; the listening process is another app.
    pgevents.listen(Note, "after_insert", Recorder())
    pgevents.listen(Note, "after_insert", Recorder(), broadcast=True)
    pgevents.init_app(app)
    listener_role = make_role()
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
    result = app.test_cli_runner().invoke(pgevents_cli, ["grant-listener", listener_role])
    assert result.exit_code == 0, result.output
    assert f"Role {listener_role!r} may now listen" in result.output

    listen_app, _, listen_pgevents = make_app(SQLALCHEMY_DATABASE_URI=role_url(database_url, listener_role))
    queued, broadcast = Recorder(), Recorder()
    listen_pgevents.listen("public.note", "after_insert", queued)
    listen_pgevents.listen("public.note", "after_insert", broadcast, broadcast=True)
    listen_pgevents.init_app(listen_app)
    listen_pgevents.start(listen_app)
    wait_until(lambda: other_service.execute("SELECT count(*) FROM pgevents.listener").fetchone()[0] == 1)
    other_service.execute("INSERT INTO note (body) VALUES ('a'), ('b')")
    assert [e.new["body"] for e in queued.wait_for(2)] == ["a", "b"]
    assert [e.new["body"] for e in broadcast.wait_for(2)] == ["a", "b"]
    wait_until(lambda: other_service.execute("SELECT count(*) FROM pgevents.event").fetchone()[0] == 0)

    # It can settle events, but neither forge one nor rewrite what one says.
    other_service.execute("DROP TRIGGER pgevents_insert ON note")
    other_service.execute(
        "INSERT INTO pgevents.event (table_schema, table_name, op, new) VALUES ('public', 'note', 'insert', '{}')"
    )
    with psycopg.connect(_libpq(role_url(database_url, listener_role)), autocommit=True) as conn:
        for statement in (
            "UPDATE pgevents.event SET table_schema = 'other'",
            "UPDATE pgevents.event SET new = '{\"body\": \"forged\"}'",
            "INSERT INTO pgevents.event (table_schema, table_name, op) VALUES ('public', 'secret', 'insert')",
            "SELECT pgevents.capture_insert()",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


def test_grant_listener_names_a_missing_role_and_prints_its_sql(make_app, other_service):
    app, _db, pgevents = make_app()
    pgevents.listen("public.note", "after_insert", Recorder())
    pgevents.init_app(app)
    other_service.execute("CREATE TABLE note (id serial PRIMARY KEY, body text)")
    runner = app.test_cli_runner()
    result = runner.invoke(pgevents_cli, ["grant-listener", "nobody_here"])
    assert result.exit_code == 1
    assert "Role 'nobody_here' does not exist" in result.output
    with app.app_context():
        pgevents.install_triggers()
    other_service.execute("CREATE ROLE pgevents_sql_reader")
    try:
        result = runner.invoke(pgevents_cli, ["grant-listener", "pgevents_sql_reader", "--sql"])
        assert result.exit_code == 0, result.output
        assert (
            'GRANT UPDATE (status, attempt, run_after, done_handlers, errors, handled_at) ON "pgevents"."event"'
            ' TO "pgevents_sql_reader";'
        ) in result.output
        assert "broadcast" not in result.output.split("REVOKE ALL ON")[-1].split(";", 1)[1]
        # Printing changed nothing.
        granted = other_service.execute(
            "SELECT count(*) FROM information_schema.role_table_grants WHERE grantee = 'pgevents_sql_reader'"
        ).fetchone()[0]
        assert granted == 0
    finally:
        other_service.execute("DROP OWNED BY pgevents_sql_reader; DROP ROLE pgevents_sql_reader")
