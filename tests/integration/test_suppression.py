"""pgevents.suppressed() and SET LOCAL pgevents.suppress: writes that are not captured,
through the session, from other clients, and from a handler writing to its own table."""
from __future__ import annotations

import contextlib
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import thing_app

OPS = ["after_insert", "after_update", "after_delete"]


@pytest.fixture
def things(make_app, recorder) -> Any:
    """db, pgevents and Thing of an app whose handler records every change, in its app context."""
    app, db, pgevents, Thing = thing_app(make_app)
    pgevents.listen(Thing, OPS, recorder)
    with app.app_context():
        pgevents.install_triggers()
        yield db, pgevents, Thing
        db.session.remove()


def seen(recorder) -> list[tuple[str, str]]:
    return [(event.op, (event.new or event.old)["name"]) for event in recorder.events]


def pending(db) -> int:
    return db.session.scalar(sa.text("SELECT count(*) FROM pgevents.event WHERE status = 'pending'"))


def test_writes_in_the_block_are_not_captured_and_later_ones_of_the_transaction_are(things, recorder):
    db, pgevents, Thing = things
    db.session.add(Thing(name="before"))  # unflushed: flushed as the block starts
    with pgevents.suppressed():
        db.session.add(Thing(name="quiet"))  # unflushed: flushed as the block ends
        db.session.execute(sa.update(Thing).values(name=Thing.name + "!"))
        db.session.execute(sa.delete(Thing).where(Thing.name == "quiet!"))
    db.session.add(Thing(name="after"))
    db.session.commit()
    assert pgevents.process_pending() == 2
    assert seen(recorder) == [("insert", "before"), ("insert", "after")]
    assert db.session.scalars(sa.select(Thing.name).order_by(Thing.id)).all() == ["before!", "after"]


def test_a_commit_inside_the_block_keeps_the_next_transaction_suppressed(things, recorder):
    db, pgevents, Thing = things
    with pgevents.suppressed():
        db.session.add(Thing(name="first"))
        db.session.commit()
        db.session.add(Thing(name="second"))
        db.session.commit()
    assert pending(db) == 0
    db.session.add(Thing(name="third"))
    db.session.commit()
    assert pgevents.process_pending() == 1
    assert seen(recorder) == [("insert", "third")]


def test_nested_blocks_suppress_until_the_outermost_ends(things, recorder):
    db, pgevents, Thing = things
    with pgevents.suppressed():
        with pgevents.suppressed():
            db.session.add(Thing(name="inner"))
        db.session.add(Thing(name="outer"))
    db.session.add(Thing(name="after"))
    db.session.commit()
    assert pgevents.process_pending() == 1
    assert seen(recorder) == [("insert", "after")]


def test_an_error_in_the_block_leaves_capture_on_for_what_follows(things, recorder):
    db, pgevents, Thing = things
    with contextlib.suppress(LookupError), pgevents.suppressed():
        db.session.add(Thing(name="quiet"))
        raise LookupError("not found")
    db.session.add(Thing(name="loud"))
    db.session.commit()
    # A database error: the transaction is rolled back, and capture is on again.
    db.session.add(Thing(id=1, name="duplicate"))
    with pytest.raises(sa.exc.IntegrityError), pgevents.suppressed():
        db.session.flush()
    db.session.rollback()
    db.session.add(Thing(name="after the rollback"))
    db.session.commit()
    assert pgevents.process_pending() == 2
    assert seen(recorder) == [("insert", "loud"), ("insert", "after the rollback")]


def test_a_handler_that_writes_to_its_own_table_in_the_block_does_not_loop(make_app):
    app, db, pgevents, Thing = thing_app(make_app)
    calls: list[int] = []

    @pgevents.listens_for(Thing, "after_update")
    def stamp(event: Any) -> None:
        calls.append(event.new["id"])
        with pgevents.suppressed():
            db.session.execute(sa.update(Thing).where(Thing.id == event.new["id"]).values(name="stamped"))
        db.session.commit()

    with app.app_context():
        pgevents.install_triggers()
        db.session.add(Thing(name="a"))
        db.session.commit()
        db.session.execute(sa.update(Thing).values(name="b"))
        db.session.commit()
        assert pgevents.process_pending(timeout=10) == 1
        assert pgevents.process_pending(timeout=10) == 0
        assert db.session.scalar(sa.select(Thing.name)) == "stamped"
        db.session.remove()
    assert calls == [1]


@pytest.mark.parametrize("statement", [
    "SET LOCAL pgevents.suppress = on",
    "SET LOCAL pgevents.suppress = 'true'",
    "SELECT set_config('pgevents.suppress', 'on', true)",
])
def test_other_clients_suppress_a_transaction_with_set_local(things, other_service, recorder, statement):
    _, pgevents, _ = things
    with other_service.transaction():
        other_service.execute(statement)
        other_service.execute("INSERT INTO thing (name) VALUES ('backfilled')")
        other_service.execute("UPDATE thing SET name = 'fixed'")
    # The setting ended with the transaction; 'off' and '' (a reset) capture.
    other_service.execute("INSERT INTO thing (name) VALUES ('next')")
    with other_service.transaction():
        other_service.execute("SET LOCAL pgevents.suppress = off")
        other_service.execute("INSERT INTO thing (name) VALUES ('off')")
    assert pgevents.process_pending() == 2
    assert seen(recorder) == [("insert", "next"), ("insert", "off")]
