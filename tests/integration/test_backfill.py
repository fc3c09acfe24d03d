"""Backfill: insert events, marked as backfill, for rows that already exist; in batches,
resumable, once per row while writes go on, for every handler or one."""
from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import raises, thing_app

from flask_pgevents import MissingTableError, UnknownHandlerError


@pytest.fixture
def things(make_app, recorder) -> Any:
    """app, db, pgevents and Thing with five rows written before any trigger existed."""
    app, db, pgevents, Thing = thing_app(make_app)
    pgevents.listen(Thing, ["after_insert", "after_update"], recorder)
    with app.app_context():
        db.session.add_all([Thing(name=f"old-{n}") for n in range(1, 6)])
        db.session.commit()
        pgevents.install_triggers()
        yield app, db, pgevents, Thing
        db.session.remove()


def names(recorder, backfill: bool = True) -> list[str]:
    return [event.new["name"] for event in recorder.events if event.backfill is backfill]


def test_every_existing_row_becomes_one_insert_event_in_key_order(things, recorder):
    _, _, pgevents, Thing = things
    reports: list[Any] = []
    result = pgevents.backfill(Thing, batch_size=2, progress=reports.append)
    assert (result.emitted, result.finished, result.resumed) == (5, True, False)
    assert [(r.emitted, r.batch, r.finished) for r in reports] == [
        (0, 0, False), (2, 2, False), (4, 2, False), (5, 1, True),
    ]
    assert reports[0].estimate >= 1 and result.table == "public.thing"
    assert pgevents.process_pending() == 5
    assert names(recorder) == [f"old-{n}" for n in range(1, 6)]
    event = recorder.events[0]
    assert (event.op, event.backfill, event.old, event.context) == ("insert", True, {}, {})
    assert event.target.name == "old-1" and event.txid is not None


def test_a_finished_backfill_called_again_starts_a_new_run(things, recorder):
    _, _, pgevents, Thing = things
    first = pgevents.backfill(Thing)
    second = pgevents.backfill("Thing")  # a model's name works too
    assert second.run != first.run and second.emitted == 5
    assert pgevents.process_pending() == 10


def test_an_interrupted_backfill_resumes_after_its_last_batch(things, recorder):
    _, _, pgevents, Thing = things

    def interrupt(report: Any) -> None:
        if report.batch:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pgevents.backfill(Thing, batch_size=2, progress=interrupt)
    resumed = pgevents.backfill(Thing, batch_size=2)
    assert (resumed.resumed, resumed.emitted) == (True, 5)
    assert pgevents.process_pending() == 5
    assert Counter(names(recorder)) == {f"old-{n}": 1 for n in range(1, 6)}


def test_writes_during_the_backfill_get_their_normal_events_and_no_row_is_emitted_twice(
    things, other_service, recorder
):
    _, _, pgevents, Thing = things

    def write_meanwhile(report: Any) -> None:
        if report.emitted == 2:  # the cursor is after id 2
            other_service.execute("UPDATE thing SET name = 'changed-1' WHERE id = 1")  # behind the cursor
            other_service.execute("UPDATE thing SET name = 'changed-4' WHERE id = 4")  # ahead of it
            other_service.execute("INSERT INTO thing (id, name) VALUES (6, 'new-6')")  # ahead of it

    result = pgevents.backfill(Thing, batch_size=2, progress=write_meanwhile)
    assert result.emitted == 6
    assert pgevents.process_pending() == 9
    assert names(recorder) == ["old-1", "old-2", "old-3", "changed-4", "old-5", "new-6"]
    assert [(e.op, e.new["name"]) for e in recorder.events if not e.backfill] == [
        ("update", "changed-1"), ("update", "changed-4"), ("insert", "new-6"),
    ]
    # Per row, the last event handled carries the row as it is now.
    last = {event.new["id"]: event.new["name"] for event in sorted(recorder.events, key=lambda e: e.id)}
    assert last == {1: "changed-1", 2: "old-2", 3: "old-3", 4: "changed-4", 5: "old-5", 6: "new-6"}


def test_a_backfill_for_one_handler_reaches_only_that_handler(things, recorder):
    _, _, pgevents, Thing = things
    welcomed: list[str] = []

    def welcome(event: Any) -> None:
        welcomed.append(event.new["name"])

    pgevents.listen(Thing, "after_insert", welcome)
    result = pgevents.backfill(Thing, handler="welcome", where="id > 3")
    assert result.handler.endswith(".welcome") and result.emitted == 2
    assert pgevents.process_pending() == 2
    assert (welcomed, recorder.events) == (["old-4", "old-5"], [])
    # A run for another handler is another backfill, with its own progress.
    assert pgevents.backfill(Thing, handler=recorder, where="id > 3").emitted == 2


def test_where_is_sql_taken_verbatim(things, recorder):
    _, db, pgevents, Thing = things
    db.session.execute(sa.update(Thing).where(Thing.id == 2).values(name="100% new"))
    db.session.commit()
    assert pgevents.backfill(Thing, where="name LIKE '%\\%%' ESCAPE '\\'").emitted == 1
    pgevents.process_pending()
    assert names(recorder) == ["100% new"]


def test_composite_keys_quoted_names_and_string_targets(make_app, other_service, recorder):
    app, db, pgevents = make_app()
    other_service.execute(
        'CREATE SCHEMA "Odd"; CREATE TABLE "Odd"."Line ""items""" ('
        ' "Order" text, n int, at timestamptz, PRIMARY KEY ("Order", n))'
    )
    other_service.execute(
        'INSERT INTO "Odd"."Line ""items""" SELECT o, n,'
        " '2024-01-01'::timestamptz + n * interval '1 day'"
        " FROM unnest(ARRAY['b', 'a', 'it''s']) AS o, generate_series(1, 3) AS n"
    )
    pgevents.listen('Odd.Line "items"', "after_insert", recorder)
    pgevents.init_app(app)
    with app.app_context():
        pgevents.install_triggers()
        assert pgevents.backfill('Odd.Line "items"', batch_size=4).emitted == 9
        assert pgevents.process_pending() == 9
        db.session.remove()
    keys = [(event.new["Order"], event.new["n"]) for event in recorder.events]
    assert keys == sorted(keys) and len(set(keys)) == 9
    assert recorder.events[0].new["at"].year == 2024


def test_what_cannot_be_backfilled_is_refused_clearly(make_app, other_service):
    app, db, pgevents, Thing = thing_app(make_app)
    other_service.execute("CREATE TABLE keyless (name text)")
    pgevents.listen("keyless", "after_insert", print)
    pgevents.listen(Thing, "after_update", print)
    with app.app_context():
        with raises(MissingTableError, "The event schema 'pgevents' is not installed, so there is nowhere"
                    " to put backfill events. Run 'flask pgevents install-triggers' first."):
            pgevents.backfill("keyless")
        pgevents.install_triggers()
        with raises(MissingTableError, "Table 'public.keyless' has no primary key, which a backfill pages"
                    " through so that it can resume and never emit a row twice. Add a primary key (or"
                    " backfill a view of it by hand: INSERT INTO the event table yourself)."):
            pgevents.backfill("keyless")
        with raises(UnknownHandlerError, "No 'after_insert' handler listens to table 'public.thing'."
                    " Backfill events are inserts, so nothing would handle them: register the handler first."):
            pgevents.backfill(Thing)
        pgevents.listen(Thing, "after_insert", print)
        with pytest.raises(UnknownHandlerError, match="'nobody' is not an 'after_insert' handler of table"):
            pgevents.backfill(Thing, handler="nobody")
        db.session.remove()


def test_the_cli_shows_progress_and_resumes(things, recorder):
    app, _, pgevents, _ = things
    runner = app.test_cli_runner()
    result = runner.invoke(args=["pgevents", "backfill", "thing", "--batch-size", "2", "--where", "id <= 4"])
    assert result.exit_code == 0, result.output
    assert "Starting backfill 1 of public.thing (0 rows emitted so far)." in result.output
    assert "Backfill 1 of public.thing done: 4 row(s) emitted." in result.output
    assert pgevents.process_pending() == 4
    result = runner.invoke(args=["pgevents", "backfill", "Thing", "--handler", "nobody"])
    assert result.exit_code == 1
    assert "Error: 'nobody' is not an 'after_insert' handler of table 'public.thing'." in result.output
