from __future__ import annotations

import sqlalchemy as sa


def test_insert_update_delete_reach_handlers(make_app, other_service, recorder):
    app, db, pgevents = make_app()

    class Thing(db.Model):
        __tablename__ = "thing"
        id = sa.Column(sa.Integer, primary_key=True)
        name = sa.Column(sa.String, nullable=False)

    pgevents.init_app(app)
    pgevents.listen(Thing, ["after_insert", "after_update", "after_delete"], recorder)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
    other_service.execute("INSERT INTO thing (name) VALUES ('a'), ('b')")
    other_service.execute("UPDATE thing SET name = 'c' WHERE name = 'a'")
    other_service.execute("UPDATE thing SET name = name")
    other_service.execute("DELETE FROM thing WHERE name = 'b'")
    with app.app_context():
        assert pgevents.process_pending() == 4
    ops = [(e.op, e.new, e.old) for e in recorder.events]
    assert ops == [
        ("insert", {"id": 1, "name": "a"}, {}),
        ("insert", {"id": 2, "name": "b"}, {}),
        ("update", {"id": 1, "name": "c"}, {"id": 1, "name": "a"}),
        ("delete", {}, {"id": 2, "name": "b"}),
    ]
    assert recorder.events[2].changed == frozenset({"name"})
    assert recorder.events[0].target.name == "a"
