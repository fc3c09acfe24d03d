"""A handler's db.session work commits with its event's claim: exactly once.

The claim that deletes a handled event and the handler's writes through
``db.session`` (its ``commit()`` included) are one transaction, so a crash
between them can neither lose the writes nor repeat them.
"""
from __future__ import annotations

from typing import Any, Callable

import psycopg
import pytest
import sqlalchemy as sa
from conftest import wait_until

from flask_pgevents import Event
from flask_pgevents.connection import CONNECTION_ERRORS


def audit_app(make_app: Callable[..., Any], **config: Any) -> Any:
    """An app with ``Thing`` (watched) and ``Audit`` (written by handlers), tables and triggers made."""
    app, db, pgevents = make_app(PGEVENTS_MAX_ATTEMPTS=3, PGEVENTS_RETRY_BACKOFF=0, **config)

    class Thing(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "thing"
        id = sa.Column(sa.Integer, primary_key=True)
        name = sa.Column(sa.String, nullable=False)

    class Audit(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "audit"
        id = sa.Column(sa.Integer, primary_key=True)
        event_id = sa.Column(sa.BigInteger, nullable=False)
        note = sa.Column(sa.String, nullable=False)

    pgevents.init_app(app)
    with app.app_context():
        db.create_all()
    return app, db, pgevents, Thing, Audit


def audits(conn: psycopg.Connection) -> list[tuple[int, str]]:
    return [tuple(row) for row in conn.execute("SELECT event_id, note FROM audit ORDER BY id").fetchall()]


def events_left(conn: psycopg.Connection) -> list[tuple[str, int]]:
    return [tuple(row) for row in conn.execute("SELECT status, attempt FROM pgevents.event ORDER BY id").fetchall()]


def drain(app: Any, pgevents: Any) -> int:
    with app.app_context():
        return pgevents.process_pending(timeout=30)


def install(app: Any, pgevents: Any) -> None:
    with app.app_context():
        pgevents.install_triggers()


def crash_after_the_handlers_commit(
    make_app: Callable[..., Any], other_service: psycopg.Connection, **config: Any
) -> Any:
    """An audit handler that commits, then its process dies before the claim commits
    (here its backend is terminated under it), once. Returns the app, its
    PGEvents and the crashed event's id, after the failed drain."""
    app, db, pgevents, Thing, Audit = audit_app(make_app, **config)
    crashes = []

    @pgevents.listens_for(Thing, "after_insert")
    def audit(event: Event) -> None:
        db.session.add(Audit(event_id=event.id, note=event.new["name"]))
        db.session.commit()
        if not crashes:
            crashes.append(event.id)
            other_service.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'pgevents-process-pending'"
            )

    install(app, pgevents)
    other_service.execute("INSERT INTO thing (name) VALUES ('ada')")
    with pytest.raises(CONNECTION_ERRORS):  # the drain's connection was terminated
        drain(app, pgevents)
    return app, pgevents, crashes[0]


def test_a_handlers_commit_lands_with_its_event_and_a_lost_claim_takes_it_back(make_app, other_service):
    app, pgevents, event_id = crash_after_the_handlers_commit(make_app, other_service)
    assert audits(other_service) == []  # the handler's commit went with the claim
    assert events_left(other_service) == [("pending", 0)]

    assert drain(app, pgevents) == 1
    assert audits(other_service) == [(event_id, "ada")]  # exactly once
    assert events_left(other_service) == []


def test_with_atomic_handlers_off_the_same_crash_repeats_the_handlers_write(make_app, other_service):
    app, pgevents, event_id = crash_after_the_handlers_commit(
        make_app, other_service, PGEVENTS_ATOMIC_HANDLERS=False
    )
    assert drain(app, pgevents) == 1
    assert audits(other_service) == [(event_id, "ada"), (event_id, "ada")]  # at least once


def test_a_handler_that_raises_after_its_commit_leaves_nothing_and_is_retried(make_app, other_service):
    app, db, pgevents, Thing, Audit = audit_app(make_app)
    calls: list[str] = []

    @pgevents.listens_for(Thing, "after_insert")
    def first(event: Event) -> None:
        calls.append("first")
        db.session.add(Audit(event_id=event.id, note="first"))
        db.session.commit()

    @pgevents.listens_for(Thing, "after_insert")
    def flaky(event: Event) -> None:
        calls.append("flaky")
        db.session.add(Audit(event_id=event.id, note=f"flaky {event.attempt}"))
        db.session.commit()
        db.session.add(Audit(event_id=event.id, note="uncommitted"))
        db.session.flush()
        if event.attempt < 3:
            raise RuntimeError("half the time")

    install(app, pgevents)
    other_service.execute("INSERT INTO thing (name) VALUES ('ada')")
    (event_id,) = other_service.execute("SELECT id FROM pgevents.event").fetchone()
    wait_until(lambda: drain(app, pgevents) == 0 and not events_left(other_service), timeout=20)
    # first ran once (its success is remembered), flaky three times; only
    # the writes of successful runs survive, and nothing left uncommitted.
    assert calls == ["first", "flaky", "flaky", "flaky"]
    assert audits(other_service) == [(event_id, "first"), (event_id, "flaky 3")]


def test_handlers_queries_see_the_apps_tables_and_the_claim_keeps_its_safe_search_path(
    make_app, other_service
):
    app, db, pgevents, Thing, _ = audit_app(make_app)
    seen: list[Any] = []

    @pgevents.listens_for(Thing, "after_insert")
    def count(event: Event) -> None:
        seen.append(db.session.execute(sa.text("SELECT count(*) FROM thing")).scalar())
        seen.append(db.session.execute(sa.text("SHOW search_path")).scalar())
        seen.append(db.session.get(Thing, event.new["id"]).name)

    install(app, pgevents)
    other_service.execute("INSERT INTO thing (name) VALUES ('ada'), ('bob')")
    assert drain(app, pgevents) == 2
    assert seen[:3] == [2, '"$user", public', "ada"]
    assert seen[5] == "bob"


def test_the_listener_thread_commits_handlers_writes_with_their_events(make_app, other_service):
    app, db, pgevents, Thing, Audit = audit_app(make_app)

    @pgevents.listens_for(Thing, "after_insert")
    def audit(event: Event) -> None:
        db.session.add(Audit(event_id=event.id, note=event.new["name"]))
        db.session.commit()

    install(app, pgevents)
    pgevents.start(app=app)
    try:
        other_service.execute("INSERT INTO thing (name) SELECT 'n' || g FROM generate_series(1, 300) AS g")
        wait_until(lambda: len(audits(other_service)) == 300 and not events_left(other_service), timeout=30)
    finally:
        assert pgevents.stop(timeout=10, app=app)
    assert len({event_id for event_id, _ in audits(other_service)}) == 300
