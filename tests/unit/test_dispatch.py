"""dispatch.py: the Event a stored row becomes, calling a batch's handlers, and
failure records that jsonb always stores.

The app is set up on a database that is never reached: nothing here claims.
"""
from __future__ import annotations

import datetime
import json
import logging
from typing import Any, Optional

import pytest
from flask import Flask
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_pgevents import Event, PGEvents
from flask_pgevents.dispatch import ClaimCursor, Dispatcher, Failure, error_record, errors_json, storable
from flask_pgevents.registry import TableKey
from flask_pgevents.store import Claim, StoredEvent

NEVER_REACHED = "postgresql+psycopg2://u@127.0.0.1:1/db"
AT = datetime.datetime(2024, 5, 1, 12, tzinfo=datetime.timezone.utc)
ACCOUNT = TableKey("public", "account")


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "account"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str]
    seen_at: Mapped[datetime.datetime] = mapped_column(nullable=True)


# Storable records --------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "plain", "", "h\u00e9llo \u2603 \U0001f389 emoji", "tab\tnewline\n", "back\\slash \\u0000 as text",
])
def test_storable_leaves_ordinary_text_unchanged(text):
    assert storable(text) == text


def test_storable_drops_nul_and_escapes_lone_surrogates():
    assert storable("nul \x00 byte\x00") == "nul  byte"
    assert storable("lone \ud800 surrogate \udfff") == "lone \\ud800 surrogate \\udfff"
    assert storable("\x00\ud83c\udf89") == "\\ud83c\\udf89"  # a pair split in two is two lone halves
    storable("a\ud800\x00b").encode("utf-8")  # valid UTF-8: no error


def raised(exc: BaseException) -> dict[str, str]:
    """error_record of ``exc``, called where it is, in the except block."""
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001 - any exception is recorded
        return error_record(caught)


def test_error_record_has_the_error_and_the_traceback_of_the_exception_being_handled():
    record = raised(ValueError("bad value"))
    assert set(record) == {"error", "traceback"}
    assert record["error"] == "ValueError: bad value"
    assert record["traceback"].startswith("Traceback (most recent call last):\n")
    assert "in raised\n" in record["traceback"]
    assert record["traceback"].endswith("ValueError: bad value\n")


def test_error_record_makes_unstorable_messages_storable():
    record = raised(RuntimeError("nul \x00 and lone \ud800"))
    assert record["error"] == "RuntimeError: nul  and lone \\ud800"
    assert "\x00" not in record["traceback"] and "\\ud800" in record["traceback"]


def test_errors_json_is_json_without_what_jsonb_refuses():
    errors = {
        "app.handler": raised(KeyError("missing")),
        "app.h\x00andler\ud800": {"error": "E: \u00e9 \U0001f389", "traceback": ""},
    }
    text = errors_json(errors)
    assert json.loads(text) == {
        "app.handler": {"error": "KeyError: 'missing'", "traceback": errors["app.handler"]["traceback"]},
        "app.handler\\ud800": {"error": "E: \u00e9 \U0001f389", "traceback": ""},
    }
    # jsonb refuses \u0000 and unpaired surrogate escapes; a valid pair is fine.
    assert "\\u0000" not in text and "\\ud800" not in text.replace("\\\\ud800", "")


def test_a_failure_is_recorded_with_its_attempt_and_the_handlers_done():
    failure = Failure(event_id=7, attempt=2, done=["app.a"], errors={"app.b": {"error": "E", "traceback": ""}})
    assert (failure.event_id, failure.attempt, failure.done) == (7, 2, ["app.a"])
    assert json.loads(errors_json(failure.errors)) == {"app.b": {"error": "E", "traceback": ""}}


# Handlers of one event ---------------------------------------------------------------


@pytest.fixture
def app() -> Flask:
    app = Flask("dispatch")
    app.config.update(TESTING=True, PGEVENTS_DATABASE_URI=NEVER_REACHED, PGEVENTS_POLL_INTERVAL=0.25)
    return app


def event(**fields: Any) -> Event:
    values: dict[str, Any] = {
        "id": 7, "op": "update", "table": "public.account", "model": Account,
        "new": {"id": 1, "email": "b@x", "seen_at": None}, "old": {"id": 1, "email": "a@x", "seen_at": None},
        "timestamp": AT, "attempt": 1,
    }
    values.update(fields)
    return Event(**values)


def test_handlers_are_called_in_order_and_those_that_succeed_are_counted_done(app):
    pgevents = PGEvents(app)
    calls: list[tuple[str, Event]] = []
    pgevents.listen(Account, "after_update", lambda e: calls.append(("any", e)))
    pgevents.listen(Account, "after_update", lambda e: calls.append(("email", e)), columns=["email"])
    pgevents.listen(Account, "after_update", lambda e: calls.append(("seen", e)), columns=["seen_at"])
    subscriptions = pgevents.registry.handlers_for(ACCOUNT, "update")
    done: set[str] = set()
    errors = Dispatcher(app.extensions["pgevents"]).call_handlers(event(), subscriptions, done)
    assert errors == {}
    # The 'seen_at' handler is skipped: its column did not change.
    assert [label for label, _ in calls] == ["any", "email"]
    assert all(e == event() for _, e in calls)
    assert done == {subscriptions[0].name, subscriptions[1].name}


def test_a_failing_handler_is_recorded_by_name_and_the_others_still_run(app, caplog):
    pgevents = PGEvents(app)
    calls: list[str] = []

    def fails(e: Event) -> None:
        calls.append("fails")
        raise LookupError("no such mailbox")

    pgevents.listen(Account, "after_update", fails)
    pgevents.listen(Account, "after_update", lambda e: calls.append("after"))
    subscriptions = pgevents.registry.handlers_for(ACCOUNT, "update")
    done: set[str] = set()
    with caplog.at_level(logging.ERROR, logger="flask_pgevents"):
        errors = Dispatcher(app.extensions["pgevents"]).call_handlers(event(), subscriptions, done)
    assert calls == ["fails", "after"]
    assert list(errors) == [f"{__name__}.test_a_failing_handler_is_recorded_by_name_and_the_others_still_run"
                            ".<locals>.fails"]
    [record] = errors.values()
    assert record["error"] == "LookupError: no such mailbox"
    assert "raise LookupError" in record["traceback"]
    assert done == {subscriptions[1].name}
    assert f"Handler {subscriptions[0].name} failed for event 7 (update on public.account, attempt 1)." in caplog.text


def test_a_stored_row_becomes_the_event_handlers_receive(app):
    pgevents = PGEvents(app)
    pgevents.listen(Account, "after_update", lambda e: None)
    stored = StoredEvent(
        id=9, table=ACCOUNT, op="update",
        old='{"id": 1, "email": "a@x", "seen_at": null}',
        new='{"id": 1, "email": "a@x", "seen_at": "2024-05-01T12:00:00.5+00:00"}',
        created_at=AT, attempt=1,
    )
    received = Dispatcher(app.extensions["pgevents"]).event(stored, 2)
    assert (received.id, received.op, received.table, received.model, received.timestamp, received.attempt) == (
        9, "update", "public.account", Account, AT, 2,
    )
    assert received.new["seen_at"] == datetime.datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=datetime.timezone.utc)
    assert received.changed == frozenset({"seen_at"})
    assert received.target.email == "a@x"


def test_a_stored_insert_or_delete_has_one_side_only(app):
    pgevents = PGEvents(app)
    pgevents.listen(Account, ["after_insert", "after_delete"], lambda e: None)
    dispatcher = Dispatcher(app.extensions["pgevents"])
    row = '{"id": 1, "email": "a@x", "seen_at": null}'
    insert = dispatcher.event(StoredEvent(1, ACCOUNT, "insert", None, row, AT), 1)
    delete = dispatcher.event(StoredEvent(2, ACCOUNT, "delete", row, None, AT), 1)
    assert (insert.old, insert.new["email"], insert.target.email) == ({}, "a@x", "a@x")
    assert (delete.new, delete.old["email"], delete.target.email) == ({}, "a@x", "a@x")


def test_with_no_retry_due_an_idle_listener_sleeps_for_the_poll_interval(app):
    PGEvents(app)
    assert Dispatcher(app.extensions["pgevents"]).idle_timeout() == 0.25


# The claim cursor -------------------------------------------------------------------


def claim(xmin: int, newest_in_flight: Optional[int] = None) -> Claim:
    in_flight = 0 if newest_in_flight is None else 1
    return Claim(in_flight=in_flight, xmin=xmin, newest_in_flight=newest_in_flight, events=[])


def test_the_cursor_starts_with_a_full_scan_then_claims_after_what_it_handled():
    cursor = ClaimCursor(full_scan_seconds=10)
    assert cursor.start(now=0.0) == 0
    cursor.advance(claim(xmin=100), last_handled=500, more=True)
    assert cursor.start(now=1.0) == 500
    cursor.advance(claim(xmin=100), last_handled=640, more=False)
    assert cursor.start(now=2.0) == 640
    cursor.advance(claim(xmin=100), last_handled=None, more=False)
    assert cursor.start(now=3.0) == 640


def test_a_batch_that_stopped_early_resumes_after_its_last_handled_event():
    cursor = ClaimCursor(full_scan_seconds=10)
    cursor.start(now=0.0)
    cursor.advance(claim(xmin=100), last_handled=900, more=False)
    cursor.start(now=11.0)  # a full scan, from 0, that met a full batch ending at 300
    cursor.advance(claim(xmin=100), last_handled=300, more=True)
    assert cursor.start(now=12.0) == 300


def test_a_region_passed_while_transactions_were_in_flight_is_rescanned_once_they_ended():
    cursor = ClaimCursor(full_scan_seconds=10)
    cursor.start(now=0.0)
    cursor.advance(claim(xmin=100), last_handled=50, more=False)
    # Transaction 120 may hold an id below 80 and commit after this claim.
    cursor.advance(claim(xmin=110, newest_in_flight=120), last_handled=80, more=False)
    assert cursor.start(now=1.0) == 80
    assert not cursor.rescan_due()
    cursor.advance(claim(xmin=115, newest_in_flight=125), last_handled=None, more=False)
    assert cursor.start(now=2.0) == 80  # 120 may still be in flight
    cursor.advance(claim(xmin=121), last_handled=None, more=False)
    assert cursor.rescan_due()
    assert cursor.start(now=3.0) == 50  # rescans what it passed while 120 ran
    assert not cursor.rescan_due()
    cursor.advance(claim(xmin=130), last_handled=None, more=False)
    assert cursor.start(now=4.0) == 80


def test_a_full_scan_runs_every_period_and_when_a_retry_is_due():
    cursor = ClaimCursor(full_scan_seconds=0.5)
    assert cursor.start(now=0.0) == 0
    cursor.advance(claim(xmin=100), last_handled=70, more=False)
    assert cursor.start(now=0.4) == 70
    assert cursor.start(now=0.4, retry_due=True) == 0
    assert cursor.start(now=0.5) == 70
    assert cursor.start(now=0.9) == 0


def test_the_cursor_keeps_a_bounded_number_of_regions_and_still_rescans_them_all():
    cursor = ClaimCursor(full_scan_seconds=1000)
    cursor.start(now=0.0)
    for n in range(1, 101):
        cursor.advance(claim(xmin=n, newest_in_flight=1000 + n), last_handled=n * 10, more=False)
    assert cursor.start(now=1.0) == 1000
    cursor.advance(claim(xmin=2000), last_handled=None, more=False)
    assert cursor.start(now=2.0) == 0  # the first region, passed at position 0, merged with others
    cursor.advance(claim(xmin=2001), last_handled=None, more=False)
    assert cursor.start(now=3.0) == 1000


def test_a_slow_scan_from_the_start_spaces_out_the_next_ones():
    # With deleted entries vacuum cannot remove yet, a scan from the first id
    # walks them all: such scans may take about 1% of the time, no more.
    cursor = ClaimCursor(full_scan_seconds=0.5)
    assert cursor.start(now=0.0) == 0
    cursor.full_scan_took(0.3)
    cursor.advance(claim(xmin=100), last_handled=10, more=False)
    assert cursor.start(now=29.0) == 10
    assert cursor.start(now=30.0) == 0
    cursor.full_scan_took(0.001)
    assert cursor.start(now=30.4) == 10
    assert cursor.start(now=30.5) == 0
