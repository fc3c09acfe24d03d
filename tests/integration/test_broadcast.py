"""Broadcast handlers: every listening process, at most once, only while it listens."""
from __future__ import annotations

import sqlalchemy as sa
from conftest import Recorder, wait_until


def _two_processes(make_app):
    """Two apps with their own listeners, as two worker processes would have."""
    apps = []
    for _ in range(2):
        app, db, pgevents = make_app()
        table = sa.Table(
            "thing", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("name", sa.String), sa.Column("hits", sa.Integer, default=0),
        )
        pgevents.init_app(app)
        apps.append((app, db, pgevents, table))
    return apps


def test_broadcast_reaches_every_listener_and_queued_handlers_run_once(make_app, other_service):
    (app1, db1, pg1, table1), (app2, _, pg2, table2) = _two_processes(make_app)
    broadcast1, broadcast2, queued = Recorder(), Recorder(), Recorder()
    pg1.listen(table1, "after_insert", broadcast1, broadcast=True)
    pg2.listen(table2, "after_insert", broadcast2, broadcast=True)
    pg1.listen(table1, "after_insert", queued)
    pg2.listen(table2, "after_insert", queued)
    with app1.app_context():
        table1.create(db1.engine)
        pg1.install_triggers()
        report, _ = pg1.trigger_status()
    assert {(t.kind, t.state) for t in report} == {("insert", "installed"), ("broadcast_insert", "installed")}
    pg1.start(app1)
    pg2.start(app2)
    wait_until(lambda: other_service.execute("SELECT count(*) FROM pgevents.listener").fetchone()[0] == 2)
    other_service.execute("INSERT INTO thing (name) SELECT 'n' || g FROM generate_series(1, 10) g")
    other_service.execute("INSERT INTO thing (name) VALUES ('last')")
    names = [f"n{i}" for i in range(1, 11)] + ["last"]
    assert [e.new["name"] for e in broadcast1.wait_for(11)] == names
    assert [e.new["name"] for e in broadcast2.wait_for(11)] == names
    assert sorted(e.new["name"] for e in queued.wait_for(11)) == sorted(names)
    wait_until(lambda: other_service.execute("SELECT count(*) FROM pgevents.event").fetchone()[0] == 0)
    assert len(queued.events) == 11
    assert {e.attempt for e in broadcast1.events} == {1}
    assert len({e.id for e in broadcast1.events}) == 11


def test_broadcast_is_at_most_once_and_only_while_listening(make_app, other_service, recorder):
    app, db, pgevents = make_app()

    class Thing(db.Model):
        __tablename__ = "thing"
        id = sa.Column(sa.Integer, primary_key=True)
        name = sa.Column(sa.String, nullable=False)
        hits = sa.Column(sa.Integer, nullable=False, default=0)

    calls = []

    @pgevents.listens_for(Thing, "after_update", columns=["name"], broadcast=True)
    def flaky(event):
        calls.append(event.new["name"])
        raise RuntimeError("not retried")

    pgevents.listen(Thing, "after_update", recorder, columns=["name"], broadcast=True)
    pgevents.init_app(app)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
    other_service.execute("INSERT INTO thing (name, hits) VALUES ('a', 0)")
    other_service.execute("UPDATE thing SET name = 'before-listening'")
    pgevents.start(app)
    wait_until(lambda: other_service.execute("SELECT count(*) FROM pgevents.listener").fetchone()[0] == 1)
    other_service.execute("UPDATE thing SET hits = hits + 1")  # not a watched column
    other_service.execute("UPDATE thing SET name = 'while-listening'")
    events = recorder.wait_for(1)
    assert [e.new["name"] for e in events] == ["while-listening"]
    assert calls == ["while-listening"]  # failed once, never retried
    other_service.execute("UPDATE thing SET name = 'next'")
    recorder.wait_for(2)
    assert calls == ["while-listening", "next"]
