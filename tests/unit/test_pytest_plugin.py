"""pytest_plugin.py: options, the recorder's registrations, and assertion
messages, on events built by hand. Nothing here reaches a database."""
from __future__ import annotations

import datetime
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_pgevents import Event, PGEvents, UnknownEventError
from flask_pgevents.pytest_plugin import HandledEvents, database_scope, describe_event, pytest_configure

AT = datetime.datetime(2024, 5, 1, tzinfo=datetime.timezone.utc)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "user"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str]
    name: Mapped[str]


class Order(Base):
    __tablename__ = "order"
    __table_args__ = {"schema": "shop"}
    id: Mapped[int] = mapped_column(primary_key=True)


def event(event_id: int, op: str, table: str = "public.user", /, **row: Any) -> Event:
    new, old = ({}, row) if op == "delete" else (row, {})
    return Event(id=event_id, op=op, table=table, model=None, new=new, old=old, timestamp=AT, attempt=1)


def handled(*events: Event) -> HandledEvents:
    recorded = HandledEvents(Flask("plugin"), PGEvents())
    recorded.events.extend(events)
    return recorded


class Options:
    def __init__(self, ini: dict[str, str], option: Any = None) -> None:
        self.ini, self.option = ini, option

    def getini(self, name: str) -> str:
        return self.ini[name]

    def getoption(self, name: str) -> Any:
        return self.option


# Options ----------------------------------------------------------------------------------


def test_the_database_is_per_test_unless_the_command_line_or_ini_says_session():
    ini = {"pgevents_database_scope": "function"}
    assert database_scope("pgevents_database_url", Options(ini)) == "function"  # type: ignore[arg-type]
    assert database_scope("pgevents_database_url", Options(ini, "session")) == "session"  # type: ignore[arg-type]
    session = {"pgevents_database_scope": "session"}
    assert database_scope("pgevents_database_url", Options(session)) == "session"  # type: ignore[arg-type]
    assert database_scope("pgevents_database_url", Options(session, "function")) == "function"  # type: ignore[arg-type]


@pytest.mark.parametrize("name, value, expected", [
    ("pgevents_database_scope", "module", "'function' or 'session'"),
    ("pgevents_driver", "asyncpg", "'psycopg' or 'psycopg2'"),
])
def test_a_wrong_ini_value_is_a_usage_error(name, value, expected):
    ini = {"pgevents_database_scope": "function", "pgevents_driver": "psycopg", name: value}
    with pytest.raises(pytest.UsageError) as info:
        pytest_configure(Options(ini))  # type: ignore[arg-type]
    assert str(info.value) == f"The ini option {name} is {value!r}; set it to {expected}."


# The recorder's registrations ----------------------------------------------------------------


def test_recording_listens_beside_the_handlers_without_changing_the_triggers():
    pgevents = PGEvents()
    pgevents.listen(User, "after_insert", print)
    pgevents.listen(User, "after_update", print, columns=["email"])
    pgevents.listen(User, "after_update", repr, columns=["name"])
    pgevents.listen("shop.order", "after_delete", print)
    pgevents.listen(User, "after_delete", print, broadcast=True)
    needed = pgevents.registry.needed_triggers()
    recorded = HandledEvents(Flask("plugin"), pgevents)

    recorded.start_recording()
    assert pgevents.registry.needed_triggers() == needed
    assert recorder_subscriptions(pgevents, recorded) == [  # not beside the broadcast handler
        ("public.user", "insert", None),
        ("public.user", "update", frozenset({"email", "name"})),
        ("shop.order", "delete", None),
    ]

    recorded.stop_recording()
    assert recorder_subscriptions(pgevents, recorded) == []
    assert pgevents.registry.needed_triggers() == needed


def recorder_subscriptions(pgevents: PGEvents, recorded: HandledEvents) -> list[tuple[str, str, Any]]:
    registry = pgevents.registry
    return sorted(
        (str(table), sub.kind, sub.columns)
        for table, kind in registry.subscribed()
        for sub in registry.handlers_for(table, kind)
        if sub.handler == recorded._record
    )


# Assertions -----------------------------------------------------------------------------------


def test_assert_handled_returns_the_matching_events():
    first, second = event(1, "insert", email="a@x"), event(2, "insert", email="b@x")
    recorded = handled(first, event(3, "delete", "shop.order", id=4), second)
    assert recorded.assert_handled(User, "after_insert", count=2) == [first, second]
    assert recorded.assert_handled(User, "after_insert", values={"email": "b@x"}) == [second]
    assert recorded.assert_handled(Order, ["after_insert", "after_delete"], values={"id": 4}, count=1)
    assert recorded.assert_handled("shop.order", "after_update", count=0) == []
    assert recorded.ops == [("public.user", "insert"), ("shop.order", "delete"), ("public.user", "insert")]
    assert recorded.of(identifier="after_delete") == [recorded[1]]
    assert len(recorded) == 3 and list(recorded) == recorded.events


def test_a_failed_assert_handled_lists_what_was_handled():
    recorded = handled(event(1, "insert", id=1, email="a@x"), event(2, "delete", "shop.order", id=4))
    with pytest.raises(AssertionError) as info:
        recorded.assert_handled(User, "after_insert", count=1, values={"email": "b@x"})
    assert str(info.value) == (
        "Expected 1 'after_insert' event(s) on public.user with email='b@x', got 0.\n"
        "Handled (2):\n"
        "  #1 insert on public.user: {'id': 1, 'email': 'a@x'}\n"
        "  #2 delete on shop.order: {'id': 4}"
    )


def test_a_failed_assertion_without_events_says_what_to_check():
    with pytest.raises(AssertionError, match=r"^Expected at least one 'after_update' or 'after_delete' event"
                                             r"\(s\) on public.user, got 0.\nNothing was handled. Was the write"
                                             r" committed"):
        handled().assert_handled(User, ["after_update", "after_delete"])


def test_assert_nothing_handled():
    handled().assert_nothing_handled()
    with pytest.raises(AssertionError, match=r"^Expected no event to be handled.\nHandled \(1\):\n  #1 insert"):
        handled(event(1, "insert", id=1)).assert_nothing_handled()


def test_assertions_check_their_arguments_like_listen():
    with pytest.raises(UnknownEventError):
        handled().assert_handled(User, "after_save")
    with pytest.raises(TypeError):
        handled().assert_handled(sa.Table, "after_insert")


def test_an_update_shows_its_changed_columns():
    update = Event(
        id=5, op="update", table="public.user", model=None, new={"id": 1, "email": "b@x"},
        old={"id": 1, "email": "a@x"}, timestamp=AT, attempt=1, changed=frozenset({"email"}),
    )
    assert describe_event(update) == "#5 update on public.user: {'id': 1, 'email': 'b@x'} (changed: email)"


def test_clear_forgets_everything():
    recorded = handled(event(1, "insert", id=1))
    recorded.clear()
    assert recorded.events == [] and recorded.failures == []
