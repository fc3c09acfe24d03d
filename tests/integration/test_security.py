"""Security: what an untrusted role, row or error can do through flask-pgevents.

Each test reproduces an attack or a failure found in review and shows that it
no longer works: the capture functions cannot be borrowed, casts run with no
power, no hostile operator is ever called, no error record stalls the queue,
no captured pickle is loaded, a batch is bounded by bytes, and odd names work.
"""
from __future__ import annotations

import os
import pickle
import threading
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from conftest import Recorder, role_url, thing_app, wait_until
from sqlalchemy.engine import make_url

from flask_pgevents import IdentifierTooLongError
from flask_pgevents.cli import pgevents_cli


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _count(conn: psycopg.Connection, query: str, *params: Any) -> Any:
    return conn.execute(query, params).fetchone()[0]


# The capture functions --------------------------------------------------------


def test_a_listener_role_cannot_attach_the_capture_functions_to_its_own_temp_table(
    make_app, make_role, database_url, other_service
):
    # The review's attack: a temp table whose column type has a pg_temp cast
    # to json, captured by the SECURITY DEFINER function, runs the cast as
    # the function's owner.
    app, _db, pgevents, Thing = thing_app(make_app)
    pgevents.listen(Thing, "after_insert", Recorder())
    with app.app_context():
        pgevents.install_triggers()
    attacker = make_role()
    assert app.test_cli_runner().invoke(pgevents_cli, ["grant-listener", attacker]).exit_code == 0
    other_service.execute("CREATE TABLE secret (value text); INSERT INTO secret VALUES ('s3cret')")
    with psycopg.connect(_libpq(role_url(database_url, attacker)), autocommit=True) as conn:
        conn.execute("CREATE TYPE pg_temp.mood AS ENUM ('sad')")
        conn.execute(f"""
            CREATE FUNCTION pg_temp.mood_json(pg_temp.mood) RETURNS json LANGUAGE plpgsql AS $$
            BEGIN
                EXECUTE 'GRANT SELECT ON public.secret TO "{attacker}"';
                EXECUTE 'ALTER ROLE "{attacker}" SUPERUSER';
                RETURN '"pwned"';
            END $$""")
        conn.execute("CREATE CAST (pg_temp.mood AS json) WITH FUNCTION pg_temp.mood_json(pg_temp.mood)")
        conn.execute("CREATE TEMP TABLE bait (m pg_temp.mood)")
        for function in ("capture_insert", "capture_broadcast_insert"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for function"):
                conn.execute(
                    f"CREATE TRIGGER bait AFTER INSERT ON bait REFERENCING NEW TABLE AS pgevents_new"
                    f" FOR EACH STATEMENT EXECUTE FUNCTION pgevents.{function}()"
                )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM public.secret")
    assert _count(other_service, "SELECT count(*) FROM pg_roles WHERE rolname = %s AND rolsuper", attacker) == 0


def test_a_watched_tables_owner_gains_nothing_through_a_cast(make_app, make_role, database_url, other_service):
    # Defence in depth: a role that owns a watched table can make the capture
    # function run its cast, but the function's owner may only write events.
    alice = make_role()
    other_service.execute(f'GRANT CREATE ON SCHEMA public TO "{alice}"')
    other_service.execute("CREATE TABLE secret (value text); INSERT INTO secret VALUES ('s3cret')")
    with psycopg.connect(_libpq(role_url(database_url, alice)), autocommit=True) as conn:
        conn.execute("CREATE TABLE diary (id serial PRIMARY KEY, note text)")
    app, _db, pgevents = make_app()
    pgevents.listen("public.diary", "after_insert", Recorder())
    pgevents.init_app(app)
    with app.app_context():
        pgevents.install_triggers()  # as a superuser, the worst case
    with psycopg.connect(_libpq(role_url(database_url, alice)), autocommit=True) as conn:
        conn.execute("CREATE TYPE mood AS ENUM ('sad')")
        conn.execute(f"""
            CREATE FUNCTION mood_json(mood) RETURNS json LANGUAGE plpgsql AS $$
            BEGIN
                BEGIN EXECUTE 'ALTER ROLE "{alice}" SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END;
                BEGIN EXECUTE 'GRANT SELECT ON public.secret TO "{alice}"'; EXCEPTION WHEN OTHERS THEN NULL; END;
                RETURN pg_catalog.to_json(current_user::text);
            END $$""")
        conn.execute("CREATE CAST (mood AS json) WITH FUNCTION mood_json(mood)")
        conn.execute("ALTER TABLE diary ADD COLUMN m mood")
        conn.execute("INSERT INTO diary (note, m) VALUES ('hello', 'sad')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM public.secret")
    assert _count(other_service, "SELECT count(*) FROM pg_roles WHERE rolname = %s AND rolsuper", alice) == 0
    # The cast ran as the NOLOGIN capture role, not as the superuser that installed.
    assert _count(other_service, "SELECT new ->> 'm' FROM pgevents.event") == "pgevents_capture"


# Connections ------------------------------------------------------------------


def _set_operator_trap(conn: psycopg.Connection) -> None:
    """``public.||(integer, text)``, which counts its calls in ``hijacked``: it
    matches ``length(...) || ':'`` better than the built-in operator does."""
    conn.execute("CREATE TABLE hijacked (at timestamptz DEFAULT now()); GRANT INSERT ON hijacked TO PUBLIC")
    conn.execute("""
        CREATE FUNCTION public.cat(integer, text) RETURNS text LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO public.hijacked DEFAULT VALUES; RETURN $1::text || $2; END $$;
        CREATE OPERATOR public.|| (LEFTARG = integer, RIGHTARG = text, FUNCTION = public.cat);
    """)
    assert _count(conn, "SELECT length('ab') || ':'") is not None  # the trap works for others
    assert _count(conn, "SELECT count(*) FROM hijacked") == 1
    conn.execute("TRUNCATE hijacked")


def test_a_hostile_public_operator_is_never_called(make_app, make_role, other_service, caplog):
    # CVE-2018-1058: an operator in public that matches better than the
    # built-in one would run as the listener's role on every claim.
    app, _db, pgevents, Thing = thing_app(make_app)
    recorder = Recorder()
    pgevents.listen(Thing, ["after_insert", "after_update"], recorder)
    pgevents.listen("public.thing", "after_delete", recorder)  # reflected: SQLAlchemy's own queries too
    _set_operator_trap(other_service)
    runner = app.test_cli_runner()
    assert runner.invoke(pgevents_cli, ["install-triggers"]).exit_code == 0
    other_service.execute("INSERT INTO thing (name) VALUES ('a'), ('b')")
    with app.app_context():
        assert pgevents.process_pending() == 2
    other_service.execute("UPDATE thing SET name = 'c' WHERE name = 'a'")
    other_service.execute("DELETE FROM thing WHERE name = 'b'")
    pgevents.start(app)
    recorder.wait_for(4)
    for args in (["status"], ["failed"], ["retry", "--all"]):
        assert runner.invoke(pgevents_cli, args).exit_code == 0
    assert pgevents.stop(timeout=10, app=app)
    assert [e.op for e in recorder.events] == ["insert", "insert", "update", "delete"]
    assert _count(other_service, "SELECT count(*) FROM hijacked") == 0


def test_a_hostile_public_operator_is_never_called_by_the_features_of_0_2(make_app, other_service):
    # Atomic handlers (one that sets its connection's search_path, as a
    # multi-tenant app does, and commits: the claiming connection is
    # handlers' db.session), where= filters, TRUNCATE, backfill, stats(),
    # status --json and the dashboard's page and buttons.
    app, db, pgevents, Thing = thing_app(make_app, SECRET_KEY="test", PGEVENTS_MAX_ATTEMPTS=1, PGEVENTS_BATCH_SIZE=1)
    app.register_blueprint(pgevents.dashboard_blueprint(authorize=lambda request: True), url_prefix="/events")
    recorder = Recorder()

    @pgevents.listens_for(Thing, "after_insert")
    def tenant(event: Any) -> None:
        db.session.execute(sa.text('SET search_path TO "$user", public'))
        db.session.commit()
        if event.new["name"] == "fails":
            raise RuntimeError("fails")

    pgevents.listen(Thing, "after_update", recorder, where=Thing.name == "paid")
    pgevents.listen(Thing, "after_truncate", recorder)
    _set_operator_trap(other_service)
    runner = app.test_cli_runner()
    assert runner.invoke(pgevents_cli, ["install-triggers"]).exit_code == 0
    with app.app_context():
        other_service.execute("INSERT INTO thing (name) VALUES ('a'), ('fails')")
        assert pgevents.process_pending() == 2  # one claim each, on the same connection
        other_service.execute("UPDATE thing SET name = 'paid' WHERE name = 'a'")
        assert pgevents.backfill(Thing).emitted == 2
        other_service.execute("TRUNCATE thing")
        assert pgevents.process_pending() == 4
        assert pgevents.stats().failed == 2  # 'fails', captured and backfilled
    assert [event.op for event in recorder.events] == ["update", "truncate"]
    assert runner.invoke(pgevents_cli, ["status", "--json"]).exit_code == 0
    client = app.test_client()
    assert b"RuntimeError: fails" in client.get("/events/").data
    token = {"csrf_token": _session_token(client)}
    assert client.post("/events/retry", data={**token, "all": "1"}).status_code == 303
    other_service.execute("UPDATE pgevents.event SET status = 'failed'")
    ids = [row[0] for row in other_service.execute("SELECT id FROM pgevents.event").fetchall()]
    assert client.post("/events/discard", data={**token, "event_id": ids}).status_code == 303
    assert _count(other_service, "SELECT count(*) FROM pgevents.event") == 0
    assert _count(other_service, "SELECT count(*) FROM hijacked") == 0


def test_the_dashboards_actions_change_nothing_on_get_nor_without_the_sessions_token(make_app, other_service):
    app, _db, pgevents, Thing = thing_app(make_app, SECRET_KEY="test", PGEVENTS_MAX_ATTEMPTS=1)
    app.register_blueprint(pgevents.dashboard_blueprint(authorize=lambda request: True), url_prefix="/events")
    pgevents.listen(Thing, "after_insert", lambda event: 1 / 0)
    with app.app_context():
        pgevents.install_triggers()
        other_service.execute("INSERT INTO thing (name) VALUES ('a')")
        assert pgevents.process_pending() == 1
    (event_id,) = other_service.execute("SELECT id FROM pgevents.event").fetchone()
    client = app.test_client()
    client.get("/events/")  # the session gets its token
    for action in ("retry", "discard"):
        assert client.get(f"/events/{action}?all=1&event_id={event_id}").status_code == 405
        assert client.post(f"/events/{action}", data={"all": "1", "event_id": event_id}).status_code == 400
        assert client.post(f"/events/{action}", data={
            "csrf_token": _session_token(client), "all": "1", "event_id": event_id,
        }, headers={"Origin": "https://elsewhere.example"}).status_code == 400
    assert other_service.execute("SELECT status FROM pgevents.event").fetchall() == [("failed",)]


def _session_token(client: Any) -> str:
    from flask_pgevents.dashboard import CSRF_SESSION_KEY

    with client.session_transaction() as session:
        token: str = session[CSRF_SESSION_KEY]
    return token


#: Records, for each statement that creates or alters a function or revokes a
#: privilege, its transaction: a capture function must never be committed
#: before the REVOKE that keeps others from calling it, nor before its owner
#: is the capture role.
DDL_LOG = """
    CREATE TABLE ddl_log (tag text, xact xid8);
    CREATE FUNCTION log_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO public.ddl_log
        SELECT command_tag, pg_catalog.pg_current_xact_id() FROM pg_catalog.pg_event_trigger_ddl_commands()
        WHERE command_tag IN ('CREATE FUNCTION', 'REVOKE', 'ALTER FUNCTION');
    END $$;
    CREATE EVENT TRIGGER log_ddl ON ddl_command_end EXECUTE FUNCTION log_ddl();
"""


def test_migrations_give_every_capture_function_away_in_the_transaction_that_creates_it(
    make_app, other_service, database_url
):
    # Also in an autocommit block, where each statement would commit alone.
    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext

    import flask_pgevents.migrations  # noqa: F401  (registers the operations)

    app, _db, _pgevents, _Thing = thing_app(make_app)
    _set_operator_trap(other_service)
    other_service.execute(DDL_LOG)
    engine = sa.create_engine(database_url)
    try:
        with app.app_context(), engine.connect() as conn:
            context = MigrationContext.configure(conn)
            op = Operations(context)
            with context.begin_transaction():
                with context.autocommit_block():
                    op.create_pgevents_trigger("thing", "after_insert")
                    op.create_pgevents_trigger("thing", "after_update", filters=["new_row.name = 'x'"])
                op.create_pgevents_trigger("thing", "after_truncate")
                op.alter_pgevents_trigger("thing", "after_update", filters=["new_row.name = 'y'"])
    finally:
        engine.dispose()
    by_transaction = other_service.execute(
        "SELECT array_agg(DISTINCT tag ORDER BY tag) FROM ddl_log GROUP BY xact"
    ).fetchall()
    assert len(by_transaction) >= 3
    for (tags,) in by_transaction:
        assert "CREATE FUNCTION" not in tags or {"REVOKE", "ALTER FUNCTION"} <= set(tags), by_transaction
    functions = other_service.execute(
        "SELECT proname, proowner::regrole::text, proacl::text[] FROM pg_proc"
        " WHERE pronamespace = 'pgevents'::regnamespace AND prosecdef"
    ).fetchall()
    assert {name for name, _, _ in functions} >= {"capture_insert", "capture_truncate", "capture_update"}
    assert any("__" in name for name, _, _ in functions)  # the filtered trigger's own
    for _name, owner, acl in functions:
        assert (owner, acl) == ("pgevents_capture", ["pgevents_capture=X/pgevents_capture"])
    assert _count(other_service, "SELECT count(*) FROM hijacked") == 0


# Grants -------------------------------------------------------------------------


def test_a_grant_listener_role_runs_the_features_of_0_2_and_cannot_rewrite_them(
    make_app, make_role, database_url, other_service
):
    # where= filters, TRUNCATE, context, backfill events, atomic handlers and
    # stats(), as the role 'grant-listener' made; and no column they added is its to write.
    app, _db, pgevents, Thing = thing_app(make_app)
    pgevents.listen(Thing, "after_insert", Recorder())
    pgevents.listen(Thing, "after_update", Recorder(), where=Thing.name == "paid")
    pgevents.listen(Thing, "after_truncate", Recorder())
    other_service.execute("CREATE TABLE audit (id serial PRIMARY KEY, note text)")
    listener = make_role()
    with app.app_context():
        pgevents.install_triggers()
    assert app.test_cli_runner().invoke(pgevents_cli, ["grant-listener", listener]).exit_code == 0
    # The app's own tables are the app's to grant.
    other_service.execute(f'GRANT SELECT, INSERT ON thing, audit TO "{listener}"')
    other_service.execute(f'GRANT USAGE ON SEQUENCE audit_id_seq TO "{listener}"')

    listen_app, listen_db, listen_pgevents, ListenThing = thing_app(
        make_app, SQLALCHEMY_DATABASE_URI=role_url(database_url, listener)
    )
    seen: list[tuple[str, Any, Any, bool]] = []

    @listen_pgevents.listens_for(ListenThing, "after_insert")
    def audit(event: Any) -> None:
        listen_db.session.execute(sa.text("INSERT INTO audit (note) VALUES (:note)"), {"note": event.new["name"]})
        listen_db.session.commit()
        seen.append(("insert", event.new["name"], event.context, event.backfill))

    listen_pgevents.listen(
        ListenThing, "after_update", lambda event: seen.append(("update", event.new["name"], {}, False)),
        where=ListenThing.name == "paid",
    )
    listen_pgevents.listen(ListenThing, "after_truncate", lambda event: seen.append(("truncate", None, {}, False)))
    with other_service.transaction():
        other_service.execute("""SET LOCAL pgevents.context = '{"actor": "cron"}'""")
        other_service.execute("INSERT INTO thing (name) VALUES ('a')")
    other_service.execute("UPDATE thing SET name = 'paid'")
    with app.app_context():
        pgevents.backfill(Thing)
    other_service.execute("TRUNCATE thing")
    with listen_app.app_context():
        assert listen_pgevents.process_pending() == 4
        stats = listen_pgevents.stats()
    assert (stats.installed, stats.pending, stats.failed) == (True, 0, 0)
    assert seen == [
        ("insert", "a", {"actor": "cron"}, False), ("update", "paid", {}, False),
        ("insert", "paid", {}, True), ("truncate", None, {}, False),
    ]
    assert [row[0] for row in other_service.execute("SELECT note FROM audit ORDER BY id").fetchall()] == ["a", "paid"]
    with psycopg.connect(_libpq(role_url(database_url, listener)), autocommit=True) as conn:
        for statement in (
            "UPDATE pgevents.event SET context = '{}'",
            "UPDATE pgevents.event SET matched = NULL",
            "UPDATE pgevents.event SET backfill = true, handler = 'other'",
            "UPDATE pgevents.event SET retried_attempts = 0",
            "UPDATE pgevents.event SET txid = NULL",
            "INSERT INTO pgevents.event (table_schema, table_name, op) VALUES ('public', 'x', 'insert')",
            "SELECT * FROM pgevents.backfill",
            "UPDATE pgevents.backfill SET last_key = NULL",
            "SELECT pgevents.capture_truncate()",
            f"SELECT pgevents.{_filtered_function(other_service)}()",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


def test_a_writers_context_nested_too_deep_for_python_still_reaches_the_handler(make_app, other_service):
    app, _db, pgevents, Thing = thing_app(make_app)
    recorder = Recorder()
    pgevents.listen(Thing, "after_insert", recorder)
    nested = "[" * 100_000 + "]" * 100_000
    with app.app_context():
        pgevents.install_triggers()
        with other_service.transaction():
            other_service.execute("SELECT set_config('pgevents.context', %s, true)", (nested,))
            other_service.execute("INSERT INTO thing (name) VALUES ('deep')")
        other_service.execute("INSERT INTO thing (name) VALUES ('plain')")
        assert pgevents.process_pending() == 2
        assert pgevents.failed_events() == []
    assert [event.context for event in recorder.events] == [{"value": nested}, {}]


def _filtered_function(conn: psycopg.Connection) -> str:
    name: str = _count(conn, "SELECT proname FROM pg_proc WHERE starts_with(proname, 'capture_update__')")
    return name


# Failure records ----------------------------------------------------------------


@pytest.mark.parametrize("message", ["nul \x00 byte", "lone \ud800 surrogate"])
def test_an_error_jsonb_refuses_is_stored_and_does_not_stall_the_batch(make_app, other_service, message):
    app, _db, pgevents, Thing = thing_app(make_app, PGEVENTS_MAX_ATTEMPTS=1)
    calls: list[str] = []

    @pgevents.listens_for(Thing, "after_insert")
    def fussy(event: Any) -> None:
        calls.append(event.new["name"])
        if event.new["name"] == "bad":
            raise ValueError(message)

    with app.app_context():
        pgevents.install_triggers()
        other_service.execute("INSERT INTO thing (name) VALUES ('before'), ('bad'), ('after')")
        assert pgevents.process_pending() == 3
        assert pgevents.process_pending() == 0
        failed = pgevents.failed_events()
    assert sorted(calls) == ["after", "bad", "before"]  # each once
    assert len(failed) == 1
    error = failed[0]["errors"][f"{fussy.__module__}.{fussy.__qualname__}"]["error"]
    assert error.startswith("ValueError: ")
    assert "\x00" not in error and ("byte" in error or "\\ud800" in error)
    assert _count(other_service, "SELECT count(*) FROM pgevents.event WHERE status = 'pending'") == 0


def test_an_event_whose_batch_cannot_be_settled_ends_up_failed_and_its_batch_mates_go_on(make_app, other_service):
    app, _db, pgevents, Thing = thing_app(make_app, PGEVENTS_MAX_ATTEMPTS=2, PGEVENTS_RETRY_BACKOFF=0)
    calls: list[str] = []
    pgevents.listen(Thing, "after_insert", lambda event: calls.append(event.new["name"]))
    with app.app_context():
        pgevents.install_triggers()
    # Something in the database refuses to settle one event: here a trigger.
    other_service.execute("""
        CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'cannot settle %', OLD.id; END $$;
        CREATE TRIGGER refuse BEFORE DELETE ON pgevents.event FOR EACH ROW
        WHEN (OLD.new ->> 'name' = 'poison') EXECUTE FUNCTION refuse();
    """)
    other_service.execute("INSERT INTO thing (name) VALUES ('a'), ('poison'), ('b'), ('c')")
    with app.app_context():
        wait_until(lambda: pgevents.process_pending() == 0 and not _count(
            other_service, "SELECT count(*) FROM pgevents.event WHERE status = 'pending'"
        ))
        failed = pgevents.failed_events()
    assert [row["attempt"] for row in failed] == [2]
    assert "cannot settle" in failed[0]["errors"]["<settling the event>"]["error"]
    # The batch ran once whole, then one by one: the others ran at most twice.
    assert {name: calls.count(name) for name in "abc"} == {"a": 2, "b": 2, "c": 2}
    assert _count(other_service, "SELECT count(*) FROM pgevents.event") == 1


# Rows ---------------------------------------------------------------------------


class Boom:
    """A pickle that, when loaded, creates a directory."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (os.mkdir, (self.path,))


def test_a_captured_pickle_is_not_loaded_unless_trusted(make_app, other_service, tmp_path):
    app, db, pgevents = make_app()

    class Blob(db.Model):
        __tablename__ = "blob"
        id = sa.Column(sa.Integer, primary_key=True)
        data = sa.Column(sa.PickleType)
        trusted = sa.Column(sa.PickleType, info={"pgevents_unpickle": True})

    recorder = Recorder()
    pgevents.listen(Blob, "after_insert", recorder)
    pgevents.init_app(app)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Boom(str(marker)))
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
        # A role with INSERT only writes bytes of its choosing.
        other_service.execute("INSERT INTO blob (data, trusted) VALUES (%s, %s)", (payload, pickle.dumps({"k": 1})))
        assert pgevents.process_pending() == 1
    assert not marker.exists()
    assert recorder.events[0].new["data"] == payload
    assert recorder.events[0].new["trusted"] == {"k": 1}


class ClaimSizes:
    """A handler of Thing's inserts that notes which claim (transaction) handled each event."""

    def __init__(self, pgevents: Any, Thing: Any, libpq_url: str) -> None:
        self.observer = psycopg.connect(libpq_url, autocommit=True)
        self.transactions: list[Any] = []
        self.lengths: list[int] = []
        pgevents.listens_for(Thing, "after_insert")(self)

    def __call__(self, event: Any) -> None:
        self.transactions.append(self.observer.execute(
            "SELECT backend_xid FROM pg_stat_activity WHERE application_name = 'pgevents-process-pending'"
        ).fetchone()[0])
        self.lengths.append(len(event.new["name"]))

    def batches(self) -> list[int]:
        """Events per claim, in claim order."""
        self.observer.close()
        return [self.transactions.count(xid) for xid in dict.fromkeys(self.transactions)]


def test_a_claim_is_bounded_by_bytes(make_app, other_service, libpq_url):
    app, _db, pgevents, Thing = thing_app(make_app, PGEVENTS_BATCH_BYTES=1_000_000)
    claims = ClaimSizes(pgevents, Thing, libpq_url)
    with app.app_context():
        pgevents.install_triggers()
        # Eight rows of 300 kB of incompressible text.
        other_service.execute(
            "INSERT INTO thing (name) SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 8) AS r,"
            " generate_series(1, 9400) AS i GROUP BY r"
        )
        assert pgevents.process_pending() == 8
    batches = claims.batches()
    # 1 MB holds 3 rows, plus the one that crosses it.
    assert sum(batches) == 8 and max(batches) <= 4 and len(batches) >= 2, batches


def test_a_claim_counts_the_writers_context_in_its_byte_bound(make_app, other_service, libpq_url):
    # Any writer sets pgevents.context, as large as it likes, and every row
    # of its statement stores it: eight small rows carrying 300 kB each.
    app, _db, pgevents, Thing = thing_app(make_app, PGEVENTS_BATCH_BYTES=1_000_000)
    claims = ClaimSizes(pgevents, Thing, libpq_url)
    with app.app_context():
        pgevents.install_triggers()
        with other_service.transaction():
            other_service.execute(
                "SELECT set_config('pgevents.context', (SELECT string_agg(md5(random()::text), '')"
                " FROM generate_series(1, 9400)), true)"
            )
            other_service.execute("INSERT INTO thing (name) SELECT 'small' FROM generate_series(1, 8)")
        assert pgevents.process_pending() == 8
    batches = claims.batches()
    assert sum(batches) == 8 and max(batches) <= 4 and len(batches) >= 2, batches


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_rows_of_100_mb_are_claimed_one_at_a_time_under_the_default_byte_budget(make_app, other_service, libpq_url):
    app, _db, pgevents, Thing = thing_app(make_app)  # PGEVENTS_BATCH_BYTES: 32 MB
    claims = ClaimSizes(pgevents, Thing, libpq_url)
    with app.app_context():
        pgevents.install_triggers()
        # Three rows of 100 MB, incompressible for TOAST (a random 1 MB repeated
        # beyond pglz's 4 kB window); the table's own copy is not compressed,
        # which only saves the test time.
        other_service.execute("ALTER TABLE thing ALTER COLUMN name SET STORAGE EXTERNAL")
        other_service.execute(
            "INSERT INTO thing (name) SELECT repeat(c.chunk, 100) FROM generate_series(1, 3),"
            " (SELECT string_agg(md5(random()::text), '') AS chunk FROM generate_series(1, 31250)) AS c"
        )
        baseline = peak = _resident_bytes()
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.005):
                peak = max(peak, _resident_bytes())

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            assert pgevents.process_pending() == 3
        finally:
            done.set()
            sampler.join()
    assert claims.lengths == [100_000_000] * 3
    assert claims.batches() == [1, 1, 1]
    # One such row costs about 400 MB while it is fetched and decoded; the three in
    # one claim (PGEVENTS_BATCH_BYTES unbounded) measured 900 MB on both drivers.
    assert peak - baseline < 650_000_000, f"the drain grew by {(peak - baseline) / 1e6:.0f} MB"


# Names --------------------------------------------------------------------------


def test_a_table_name_postgresql_would_cut_is_refused_at_registration(make_app):
    _app, _db, pgevents = make_app()
    name = "t" * 64
    with pytest.raises(IdentifierTooLongError, match=r"64 bytes long, but PostgreSQL cuts names at 63 bytes"):
        pgevents.listen(name, "after_insert", Recorder())
    with pytest.raises(IdentifierTooLongError, match="schema name"):
        long_schema = sa.Table("t", sa.MetaData(), sa.Column("id", sa.Integer), schema="é" * 32)
        pgevents.listen(long_schema, "after_insert", Recorder())
    pgevents.listen("t" * 63, "after_insert", Recorder())


def test_a_schema_name_with_a_backslash_works_for_writers_without_standard_strings(make_app, other_service):
    schema = "pg\\events\\"
    app, _db, pgevents, Thing = thing_app(make_app, PGEVENTS_SCHEMA=schema, PGEVENTS_POLL_INTERVAL=30)
    recorder = Recorder()
    pgevents.listen(Thing, "after_insert", recorder)
    with app.app_context():
        pgevents.install_triggers()
    pgevents.start(app)
    quoted = '"' + schema + '"'
    wait_until(lambda: _count(other_service, f"SELECT count(*) FROM {quoted}.listener WHERE idle") == 1)
    other_service.execute("SET standard_conforming_strings = off")
    other_service.execute("SET escape_string_warning = off")
    other_service.execute("INSERT INTO thing (name) VALUES ('x')")
    # Woken by its NOTIFY (the safety poll is 30 s away).
    assert recorder.wait_for(1, timeout=5)[0].new["name"] == "x"


# Retention ------------------------------------------------------------------------


def test_failed_events_are_purged_after_their_retention(make_app, other_service):
    app, _db, pgevents, Thing = thing_app(make_app, PGEVENTS_MAX_ATTEMPTS=1, PGEVENTS_FAILED_RETENTION=0.5)

    @pgevents.listens_for(Thing, "after_insert")
    def fails(event: Any) -> None:
        raise RuntimeError("no")

    with app.app_context():
        pgevents.install_triggers()
    other_service.execute("INSERT INTO thing (name) VALUES ('x')")
    pgevents.start(app)
    wait_until(lambda: _count(other_service, "SELECT count(*) FROM pgevents.event WHERE status = 'failed'") == 1)
    wait_until(lambda: _count(other_service, "SELECT count(*) FROM pgevents.event") == 0)


def test_broadcast_rows_are_written_only_while_someone_listens_and_purged_by_any_listener(make_app, other_service):
    app, _db, pgevents, Thing = thing_app(make_app)
    pgevents.listen(Thing, "after_insert", Recorder(), broadcast=True)
    with app.app_context():
        pgevents.install_triggers()
    other_service.execute("INSERT INTO thing (name) VALUES ('nobody listens')")
    assert _count(other_service, "SELECT count(*) FROM pgevents.broadcast") == 0
    # A listener with no broadcast handler of its own (another app) purges old rows.
    other_app, _, other_pgevents = make_app()
    other_pgevents.listen("public.thing", "after_update", Recorder())
    other_pgevents.init_app(other_app)
    other_pgevents.start(other_app)
    wait_until(lambda: _count(other_service, "SELECT count(*) FROM pgevents.listener") == 1)
    other_service.execute("INSERT INTO thing (name) VALUES ('someone listens')")
    assert _count(other_service, "SELECT count(*) FROM pgevents.broadcast") == 1
    other_service.execute("UPDATE pgevents.broadcast SET created_at = now() - interval '1 hour'")
    other_pgevents.stop(timeout=10, app=other_app)
    other_pgevents.start(other_app)  # a fresh listener purges soon after it starts
    wait_until(lambda: _count(other_service, "SELECT count(*) FROM pgevents.broadcast") == 0)


# Upgrading ------------------------------------------------------------------------


def test_an_install_of_the_previous_version_is_upgraded_with_its_backlog(make_app, other_service, caplog):
    app, _db, pgevents, Thing = thing_app(make_app)
    recorder = Recorder()
    pgevents.listen(Thing, "after_insert", recorder)
    with app.app_context():
        pgevents.install_triggers()
    assert "runs as the superuser 'postgres'" in caplog.text
    # What 0.1 left: functions owned by the installer and callable by
    # anyone, and a backlog of pending events.
    other_service.execute("""
        DROP TRIGGER pgevents_insert ON thing;
        ALTER FUNCTION pgevents.capture_insert() OWNER TO postgres;
        GRANT EXECUTE ON FUNCTION pgevents.capture_insert() TO PUBLIC;
        INSERT INTO pgevents.event (table_schema, table_name, op, new)
        SELECT 'public', 'thing', 'insert', json_build_object('id', i, 'name', 'old ' || i)
        FROM generate_series(1, 3) AS i;
    """)
    with app.app_context():
        pgevents.install_triggers()
        other_service.execute("INSERT INTO thing (name) VALUES ('new')")
        assert pgevents.process_pending() == 4
    assert [e.new["name"] for e in recorder.events] == ["old 1", "old 2", "old 3", "new"]
    owner, acl = other_service.execute(
        "SELECT proowner::regrole::text, proacl::text[] FROM pg_proc WHERE oid = 'pgevents.capture_insert'::regproc"
    ).fetchone()
    assert (owner, acl) == ("pgevents_capture", ["pgevents_capture=X/pgevents_capture"])
