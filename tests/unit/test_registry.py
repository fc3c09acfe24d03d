"""registry.py: targets, event names, columns= and handler names are checked when
a handler is registered; the registry says which triggers the handlers need."""
from __future__ import annotations

import functools
import re
from typing import Any, Callable

import pytest
import sqlalchemy as sa
from conftest import raises
from flask_sqlalchemy import SQLAlchemy

from flask_pgevents import (
    IdentifierTooLongError,
    PGEvents,
    UnknownColumnError,
    UnknownEventError,
    UnmappedTargetError,
)
from flask_pgevents.errors import InvalidFilterError, InvalidHandlerError, UnknownHandlerError
from flask_pgevents.registry import (
    MAX_IDENTIFIER_BYTES,
    TRIGGER_KINDS,
    Registry,
    TableKey,
    TriggerSpec,
    handler_name,
    is_broadcast,
    op_of,
    resolve_ops,
    resolve_target,
    trigger_order,
)

EXPECTED_EVENTS = "Expected one of 'after_insert', 'after_update', 'after_delete', 'after_truncate'."

db = SQLAlchemy()


class User(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "user"
    id = db.Column(db.Integer, primary_key=True)
    name = db.Column(db.String, nullable=False)
    email = db.Column(db.String, nullable=False)


class Labelled(db.Model):  # type: ignore[name-defined,misc]
    """Attribute keys that differ from the database's column names."""

    __tablename__ = "labelled"
    __table_args__ = {"schema": "audit"}
    id = db.Column(db.Integer, primary_key=True)
    label = db.Column("display_name", db.String)


class NotAModel:
    pass


def handler(event: Any) -> None:
    pass


def other_handler(event: Any) -> None:
    pass


def assert_nothing_registered(pgevents: PGEvents, target: Any = User) -> None:
    for identifier in ("after_insert", "after_update", "after_delete"):
        with pytest.raises(UnknownHandlerError):
            pgevents.remove(target, identifier, handler)


def make_handler() -> Callable[[Any], None]:
    """A new closure on each call, all sharing one qualified name."""

    def record(event: Any) -> None:
        pass

    return record


class Counter:
    def __init__(self, label: str) -> None:
        self.label = label

    def on_insert(self, event: Any) -> None:
        pass


class CallableHandler:
    def __call__(self, event: Any) -> None:
        pass


USER = TableKey("public", "user")


# Moved from the integration tests: bad input to listen(), listens_for(), remove() --


@pytest.mark.parametrize("identifier, message", [
    ("after_upsert", f"No such event 'after_upsert' for 'User'. {EXPECTED_EVENTS}"),
    ("insert", f"No such event 'insert' for 'User'. {EXPECTED_EVENTS}"),
    (["after_insert", "after_upsert"], f"No such event 'after_upsert' for 'User'. {EXPECTED_EVENTS}"),
    ([], f"No event given for 'User'. {EXPECTED_EVENTS}"),
    (None, f"No such event None for 'User'. {EXPECTED_EVENTS}"),
])
def test_unknown_event_name_is_refused_when_registering(identifier, message):
    pgevents = PGEvents()
    with raises(UnknownEventError, message):
        pgevents.listens_for(User, identifier)(handler)
    with raises(UnknownEventError, message):
        pgevents.listen(User, identifier, handler)
    assert_nothing_registered(pgevents)


def test_handler_and_event_name_swapped():
    with raises(
        UnknownEventError,
        f"Expected an event name for 'User', got the function '{__name__}.handler'."
        " The event name comes before the handler: listen(target, 'after_insert', fn).",
    ):
        PGEvents().listen(User, handler, "after_insert")  # type: ignore[arg-type]


@pytest.mark.parametrize("target, message", [
    (NotAModel,
     "Cannot listen to 'NotAModel': it is not a mapped class. Pass a Flask-SQLAlchemy model"
     " or other mapped class, a sqlalchemy.Table, or a table name such as 'public.user'."),
    (db.Model,
     "Cannot listen to 'Model': it is not a mapped class. Pass a Flask-SQLAlchemy model"
     " or other mapped class, a sqlalchemy.Table, or a table name such as 'public.user'."),
    (User(name="n", email="e"),
     "Cannot listen to an instance of 'User': events are per table. Pass the class User itself."),
    (42,
     "Cannot listen to 42: a target must be a mapped class, a sqlalchemy.Table, or a table"
     " name such as 'public.user'. Pass one of those."),
    ("", "Table name '' is incomplete. Pass 'table' or 'schema.table'."),
    ("audit.", "Table name 'audit.' is incomplete. Pass 'table' or 'schema.table'."),
    (".user", "Table name '.user' is incomplete. Pass 'table' or 'schema.table'."),
])
def test_target_that_names_no_table_is_refused(target, message):
    pgevents = PGEvents()
    with raises(UnmappedTargetError, message):
        pgevents.listens_for(target, "after_insert")(handler)
    with raises(UnmappedTargetError, message):
        pgevents.remove(target, "after_insert", handler)
    assert isinstance(UnmappedTargetError(), TypeError)


@pytest.mark.parametrize("not_callable", ["handler", None])
def test_handler_that_is_not_callable_is_refused(not_callable):
    pgevents = PGEvents()
    with raises(
        InvalidHandlerError,
        f"The handler for 'after_insert', 'after_delete' on 'User' is not callable:"
        f" got {not_callable!r}. Pass a function that takes one Event.",
    ):
        pgevents.listen(User, ["after_insert", "after_delete"], not_callable)  # type: ignore[arg-type]
    assert isinstance(InvalidHandlerError(), TypeError)


@pytest.mark.parametrize("target, identifier, columns, message", [
    (User, "after_update", ["emial"],
     "No column 'emial' in table 'user' of model 'User'. Pass one or more of 'id', 'name', 'email'."),
    (User.__table__, "after_update", ["email", "nme", "emial"],
     "No columns 'emial', 'nme' in table 'user'. Pass one or more of 'id', 'name', 'email'."),
    (User, "after_update", [User.email],
     "'columns' for 'User' must be column names (strings), got User.email. Pass 'email' instead."),
    (User, "after_insert", ["email"],
     "'columns' applies to 'after_update' only, but the handler for 'User' listens to"
     " 'after_insert'. Remove columns=, or listen to 'after_update'."),
    (User, "after_delete", ["email"],
     "'columns' applies to 'after_update' only, but the handler for 'User' listens to"
     " 'after_delete'. Remove columns=, or listen to 'after_update'."),
    (User, ["after_update", "after_insert"], ["email"],
     "'columns' applies to 'after_update' only, but the handler for 'User' also listens to"
     " 'after_insert'. Register the 'after_update' handler with columns= in its own call."),
    (User, "after_update", [],
     "'columns' for 'User' is empty. Pass at least one column name, or None to fire on any change."),
    ("public.user", "after_update", (),
     "'columns' for 'public.user' is empty. Pass at least one column name, or None to fire on any change."),
])
def test_bad_columns_are_refused(target, identifier, columns, message):
    pgevents = PGEvents()
    with raises(UnknownColumnError, message):
        pgevents.listens_for(target, identifier, columns=columns)(handler)
    assert_nothing_registered(pgevents)
    assert isinstance(UnknownColumnError(), ValueError)


def test_removing_an_unregistered_handler_is_refused_and_removes_nothing():
    pgevents = PGEvents()
    pgevents.listen(User, "after_insert", handler)
    with raises(
        UnknownHandlerError,
        f"Handler '{__name__}.handler' is not registered for 'after_delete' on table"
        " 'public.user'. Pass the same target, event name and function that were given"
        " to listen() or listens_for().",
    ):
        pgevents.remove(User, ["after_insert", "after_delete"], handler)
    # The 'after_insert' registration survived the failed call.
    pgevents.remove("public.user", "after_insert", handler)
    with pytest.raises(ValueError):
        pgevents.remove(User, "after_insert", handler)


# Targets --------------------------------------------------------------------------


def test_each_kind_of_target_names_its_table():
    table = sa.Table("entry", sa.MetaData(), sa.Column("id", sa.Integer), schema="audit")
    assert resolve_target(User) == (USER, User, User.__table__)
    assert resolve_target(User.__table__) == (USER, None, User.__table__)
    assert resolve_target(table) == (TableKey("audit", "entry"), None, table)
    assert resolve_target(Labelled) == (TableKey("audit", "labelled"), Labelled, Labelled.__table__)
    assert resolve_target("user") == (USER, None, None)
    assert resolve_target("public.user") == (USER, None, None)
    # Names are taken as PostgreSQL spells them: no case folding, no unquoting.
    assert resolve_target("Audit.Entry") == (TableKey("Audit", "Entry"), None, None)
    assert resolve_target('"q".t') == (TableKey('"q"', "t"), None, None)


def test_table_key_reads_as_schema_dot_name():
    assert str(TableKey("audit", "entry")) == "audit.entry"
    assert TableKey("public", "user") == USER and hash(TableKey("public", "user")) == hash(USER)


@pytest.mark.parametrize("target, what, name, shown", [
    ("t" * 64, "table", "t" * 64, "t" * 64),
    ("s" * 64 + ".t", "schema", "s" * 64, "s" * 64 + ".t"),
    # Multibyte characters count in bytes: 32 characters, 64 bytes.
    ("\u00e9" * 32, "table", "\u00e9" * 32, "\u00e9" * 32),
    (sa.Table("t", sa.MetaData(), sa.Column("id", sa.Integer), schema="\u00e9" * 32),
     "schema", "\u00e9" * 32, "\u00e9" * 32 + ".t"),
])
def test_a_name_postgresql_would_cut_is_refused(target, what, name, shown):
    pgevents = PGEvents()
    with raises(
        IdentifierTooLongError,
        f"The {what} name {name!r} of {shown!r} is 64 bytes long, but PostgreSQL cuts names"
        " at 63 bytes, so its triggers would report another name and no event would reach"
        f" the handler. Rename the {what} to at most 63 bytes.",
    ):
        pgevents.listen(target, "after_insert", handler)
    assert isinstance(IdentifierTooLongError(), ValueError)


def test_names_of_63_bytes_are_accepted():
    longest = "\u00e9" * 31 + "e"
    assert len(longest.encode()) == MAX_IDENTIFIER_BYTES == 63
    registry = Registry()
    registry.add(f"{longest}.{longest}", "after_insert", handler)
    assert registry.subscribed() == [(TableKey(longest, longest), "insert")]


# Event names ------------------------------------------------------------------------


def test_event_names_become_ops_in_the_order_given_without_repeats():
    assert resolve_ops("after_update", User) == ["update"]
    assert resolve_ops(["after_delete", "after_insert", "after_delete"], User) == ["delete", "insert"]
    assert resolve_ops(("after_update", "after_insert"), User) == ["update", "insert"]
    assert resolve_ops(frozenset(["after_insert"]), User) == ["insert"]


@pytest.mark.parametrize("identifier, message", [
    ("after_upsert", f"No such event 'after_upsert' for 'audit.entry'. {EXPECTED_EVENTS}"),
    (["after_insert", 1], f"No such event 1 for 'audit.entry'. {EXPECTED_EVENTS}"),
    ((), f"No event given for 'audit.entry'. {EXPECTED_EVENTS}"),
    (42, f"No such event 42 for 'audit.entry'. {EXPECTED_EVENTS}"),
])
def test_unknown_event_names_name_the_target_as_given(identifier, message):
    with raises(UnknownEventError, message):
        resolve_ops(identifier, "audit.entry")


def test_a_handler_passed_as_event_name_is_named_in_the_error():
    with raises(
        UnknownEventError,
        "Expected an event name for 'public.user', got the function"
        f" '{__name__}.Counter.on_insert'. The event name comes before the handler:"
        " listen(target, 'after_insert', fn).",
    ):
        Registry().add("public.user", Counter("a").on_insert, handler)  # type: ignore[arg-type]


def test_an_error_in_a_later_argument_registers_nothing():
    registry = Registry()
    with pytest.raises(InvalidHandlerError):
        registry.add(User, ["after_insert", "after_update"], 42)  # type: ignore[arg-type]
    with pytest.raises(UnknownColumnError):
        registry.add(User, "after_update", handler, columns=["nope"])
    assert registry.subscribed() == [] and registry.needed_triggers() == {}


# columns= -----------------------------------------------------------------------------


def test_columns_are_stored_as_database_column_names():
    registry = Registry()
    by_attribute = registry.add(Labelled, "after_update", handler, columns=["label"])
    by_column = registry.add(Labelled, "after_update", other_handler, columns=["display_name"])
    assert [sub.columns for sub in by_attribute + by_column] == [frozenset({"display_name"})] * 2


def test_columns_of_a_table_may_be_given_by_column_key():
    table = sa.Table(
        "entry", sa.MetaData(), sa.Column("id", sa.Integer), sa.Column("db_name", sa.String, key="name")
    )
    [sub] = Registry().add(table, "after_update", handler, columns=["name"])
    assert sub.columns == frozenset({"db_name"})


def test_one_column_name_may_be_given_as_a_string():
    [sub] = Registry().add(User, "after_update", handler, columns="email")
    assert sub.columns == frozenset({"email"})


def test_columns_of_a_table_named_by_string_are_checked_only_at_install():
    [sub] = Registry().add("public.ledger", "after_update", handler, columns=["ammount"])
    assert sub.columns == frozenset({"ammount"})


@pytest.mark.parametrize("target, columns, message", [
    (Labelled, ["labell"],
     "No column 'labell' in table 'audit.labelled' of model 'Labelled'. Pass one or more of 'id',"
     " 'display_name'."),
    (User, [42], "'columns' for 'User' must be column names (strings), got 42. Pass column names."),
    (User, ["email", None],
     "'columns' for 'User' must be column names (strings), got None. Pass column names."),
])
def test_more_bad_columns_are_refused(target, columns, message):
    with raises(UnknownColumnError, message):
        Registry().add(target, "after_update", handler, columns=columns)


def test_columns_with_every_event_name_explains_which_ones_do_not_take_them():
    with raises(
        UnknownColumnError,
        "'columns' applies to 'after_update' only, but the handler for 'User' also listens to"
        " 'after_insert', 'after_delete'. Register the 'after_update' handler with columns= in"
        " its own call.",
    ):
        Registry().add(User, ["after_insert", "after_update", "after_delete"], handler, columns=["email"])


# Handler names ----------------------------------------------------------------------


def test_handler_names_come_from_module_and_qualified_name():
    assert handler_name(handler) == f"{__name__}.handler"
    assert handler_name(make_handler()) == f"{__name__}.make_handler.<locals>.record"
    assert handler_name(Counter("a").on_insert) == f"{__name__}.Counter.on_insert"
    assert handler_name(CallableHandler()) == f"{__name__}.CallableHandler"
    assert handler_name(functools.partial(handler)) == f"{__name__}.handler(partial)"
    assert handler_name(functools.partial(Counter("a").on_insert)) == f"{__name__}.Counter.on_insert(partial)"
    here = f"{__name__}.test_handler_names_come_from_module_and_qualified_name"
    assert handler_name(lambda event: None) == f"{here}.<locals>.<lambda>"
    assert handler_name(print) == "builtins.print"


def test_handler_names_are_the_same_in_every_process():
    # No memory address: a new registry (another process) names them alike.
    def names() -> list[str]:
        registry = Registry()
        for fn in (make_handler(), make_handler(), Counter("a").on_insert, functools.partial(handler)):
            registry.add(User, "after_insert", fn)
        return [sub.name for sub in registry.handlers_for(USER, "insert")]

    assert names() == names() == [
        f"{__name__}.make_handler.<locals>.record",
        f"{__name__}.make_handler.<locals>.record#2",
        f"{__name__}.Counter.on_insert",
        f"{__name__}.handler(partial)",
    ]


def test_handlers_sharing_a_name_are_numbered_per_table_and_kind():
    registry = Registry()
    first, second, third = make_handler(), make_handler(), make_handler()
    names = [
        registry.add(User, "after_insert", first)[0].name,
        registry.add(User, "after_insert", second)[0].name,
        registry.add(User, "after_insert", third)[0].name,
        # Another kind, another table: numbering starts again.
        registry.add(User, "after_delete", second)[0].name,
        registry.add("public.other", "after_insert", third)[0].name,
        registry.add(User, "after_insert", second, broadcast=True)[0].name,
    ]
    base = f"{__name__}.make_handler.<locals>.record"
    assert names == [base, f"{base}#2", f"{base}#3", base, base, base]


def test_bound_methods_of_two_objects_are_two_handlers_and_of_one_object_one():
    registry = Registry()
    a, b = Counter("a"), Counter("b")
    registry.add(User, "after_insert", a.on_insert)
    registry.add(User, "after_insert", b.on_insert)
    registry.add(User, "after_insert", a.on_insert)  # a new bound method object, equal to the first
    subs = registry.handlers_for(USER, "insert")
    assert [(sub.handler, sub.name) for sub in subs] == [
        (a.on_insert, f"{__name__}.Counter.on_insert"),
        (b.on_insert, f"{__name__}.Counter.on_insert#2"),
    ]


def test_registering_the_same_handler_again_keeps_one_subscription_and_its_name():
    registry = Registry()
    first = registry.add(User, ["after_insert", "after_update"], handler)
    again = registry.add(User, "after_insert", handler)
    assert again == first[:1]
    assert [sub.name for sub in registry.handlers_for(USER, "insert")] == [f"{__name__}.handler"]


def test_subscriptions_say_what_was_registered():
    [sub] = Registry().add(Labelled, "after_update", handler, columns=["label"], broadcast=True)
    assert (sub.table, sub.kind, sub.handler, sub.columns, sub.name, sub.model, sub.sa_table) == (
        TableKey("audit", "labelled"), "broadcast_update", handler, frozenset({"display_name"}),
        f"{__name__}.handler", Labelled, Labelled.__table__,
    )


# Removing -----------------------------------------------------------------------------


def test_remove_takes_the_handler_off_every_event_named_and_no_other():
    registry = Registry()
    registry.add(User, ["after_insert", "after_update", "after_delete"], handler)
    registry.add(User, "after_insert", other_handler)
    registry.remove("public.user", ["after_insert", "after_delete"], handler)
    assert [sub.handler for sub in registry.handlers_for(USER, "insert")] == [other_handler]
    assert [sub.handler for sub in registry.handlers_for(USER, "update")] == [handler]
    assert registry.handlers_for(USER, "delete") == ()
    assert sorted(registry.needed_triggers()) == [(USER, "insert"), (USER, "update")]


def test_remove_takes_a_handler_off_both_its_queued_and_broadcast_registrations():
    registry = Registry()
    registry.add(User, "after_insert", handler)
    registry.add(User, "after_insert", handler, broadcast=True)
    registry.remove(User, "after_insert", handler)
    assert registry.needed_triggers() == {}
    assert not registry.has_broadcast()


def test_remove_accepts_a_new_bound_method_of_the_same_object_only():
    registry = Registry()
    counter = Counter("a")
    registry.add(User, "after_insert", counter.on_insert)
    with pytest.raises(UnknownHandlerError):
        registry.remove(User, "after_insert", Counter("a").on_insert)
    registry.remove(User, "after_insert", counter.on_insert)  # a new bound method object
    assert registry.handlers_for(USER, "insert") == ()


@pytest.mark.parametrize("target, message", [
    ("", "Table name '' is incomplete. Pass 'table' or 'schema.table'."),
    (NotAModel,
     "Cannot listen to 'NotAModel': it is not a mapped class. Pass a Flask-SQLAlchemy model"
     " or other mapped class, a sqlalchemy.Table, or a table name such as 'public.user'."),
])
def test_remove_checks_its_target_like_add(target, message):
    with raises(UnmappedTargetError, message):
        Registry().remove(target, "after_insert", handler)


# What the triggers need -------------------------------------------------------------


def test_needed_triggers_watch_the_union_of_the_update_handlers_columns():
    registry = Registry()
    registry.add(User, "after_update", handler, columns=["email"])
    registry.add(User, "after_update", other_handler, columns=["name", "email"])
    registry.add(User, ["after_insert", "after_delete"], handler)
    registry.add("public.other", "after_update", handler, columns=["a"])
    registry.add("public.other", "after_update", other_handler)  # any column
    registry.add("public.other", "after_update", make_handler(), columns=["b"], broadcast=True)
    assert registry.needed_triggers() == {
        (USER, "update"): TriggerSpec(frozenset({"email", "name"})),
        (USER, "insert"): TriggerSpec(),
        (USER, "delete"): TriggerSpec(),
        (TableKey("public", "other"), "update"): TriggerSpec(),
        (TableKey("public", "other"), "broadcast_update"): TriggerSpec(frozenset({"b"})),
    }


def test_subscribed_lists_queued_kinds_only_and_has_broadcast_says_if_any_is_broadcast():
    registry = Registry()
    assert registry.subscribed() == [] and not registry.has_broadcast()
    registry.add(User, "after_insert", handler)
    assert registry.subscribed() == [(USER, "insert")] and not registry.has_broadcast()
    registry.add("public.cache", ["after_update", "after_delete"], handler, broadcast=True)
    assert registry.subscribed() == [(USER, "insert")] and registry.has_broadcast()
    registry.remove("public.cache", ["after_update", "after_delete"], handler)
    assert not registry.has_broadcast()


def test_handlers_for_gives_subscriptions_in_registration_order():
    registry = Registry()
    handlers = [make_handler() for _ in range(3)]
    for fn in reversed(handlers):
        registry.add(User, "after_insert", fn)
    assert [sub.handler for sub in registry.handlers_for(USER, "insert")] == list(reversed(handlers))
    assert registry.handlers_for(USER, "update") == ()
    assert registry.handlers_for(USER, "broadcast_insert") == ()


def test_model_for_finds_the_model_and_table_of_any_registration():
    registry = Registry()
    registry.add("public.user", "after_insert", handler)
    assert registry.model_for(USER) == (None, None)
    registry.add(User.__table__, "after_delete", handler)
    assert registry.model_for(USER) == (None, User.__table__)
    registry.add(User, "after_update", handler)
    assert registry.model_for(USER) == (User, User.__table__)
    assert registry.model_for(TableKey("public", "other")) == (None, None)


def test_kinds_and_their_ops():
    assert TRIGGER_KINDS == (
        "insert", "update", "delete", "truncate", "broadcast_insert", "broadcast_update", "broadcast_delete",
    )
    assert [op_of(kind) for kind in TRIGGER_KINDS] == [
        "insert", "update", "delete", "truncate", "insert", "update", "delete",
    ]
    assert [is_broadcast(kind) for kind in TRIGGER_KINDS] == [False] * 4 + [True] * 3


def test_trigger_order_sorts_by_table_then_kind():
    keys = [
        (TableKey("public", "user"), "update"),
        (TableKey("audit", "z"), "insert"),
        (TableKey("public", "user"), "broadcast_insert"),
        (TableKey("public", "user"), "delete"),
    ]
    assert sorted(keys, key=trigger_order) == [keys[1], keys[2], keys[3], keys[0]]


def test_registering_a_handler_again_with_other_columns_replaces_them_and_it_runs_once():
    registry = Registry()
    registry.add(User, "after_update", handler, columns=["email"])
    registry.add(User, "after_update", handler, columns=["name"])
    [sub] = registry.handlers_for(USER, "update")
    assert (sub.handler, sub.columns, sub.name) == (handler, frozenset({"name"}), f"{__name__}.handler")
    assert registry.needed_triggers() == {(USER, "update"): TriggerSpec(frozenset({"name"}))}


# where= filters and TRUNCATE -------------------------------------------------------


def test_where_is_compiled_per_op_with_literal_values_against_the_rows_aliases():
    registry = Registry()
    registry.add(User, ["after_insert", "after_update", "after_delete"], handler, where=User.email == "a'b@x")
    registry.add(User, "after_update", other_handler, where=lambda old, new: old.email != new.email)
    by_kind = {sub.kind: sub.filter for sub in registry.handlers_for(USER, "insert") + registry.handlers_for(
        USER, "delete"
    )}
    assert by_kind == {"insert": "x.email = 'a''b@x'", "delete": "x.email = 'a''b@x'"}
    [paid, changed] = registry.handlers_for(USER, "update")
    assert (paid.filter, changed.filter) == ("new_row.email = 'a''b@x'", "old_row.email != new_row.email")
    assert paid.filter_id is not None and len(paid.filter_id) == 8 and paid.filter_id != changed.filter_id
    assert registry.needed_triggers()[(USER, "update")] == TriggerSpec(
        None, frozenset({"new_row.email = 'a''b@x'", "old_row.email != new_row.email"}), every_row=False
    )


def test_a_handler_without_where_makes_its_trigger_capture_every_row():
    registry = Registry()
    registry.add(User, "after_insert", handler, where=User.email.like("%@x"))
    registry.add(User, "after_insert", other_handler)
    assert registry.needed_triggers() == {(USER, "insert"): TriggerSpec(None, frozenset({"x.email LIKE '%@x'"}))}


@pytest.mark.parametrize("where, identifier, message", [
    (User.id, "after_insert", "is not a condition"),
    (sa.text("id = 1"), "after_insert", "Raw SQL (sa.text) is not accepted"),
    (User.id.in_(sa.select(User.id)), "after_insert", "holds a subquery or another table"),
    (User.email == sa.bindparam("email"), "after_insert", "has a parameter without a value ('email')"),
    (User.email == "back\\slash", "after_insert", "holds a backslash"),
    (lambda old, new: new.email == "x", "after_insert", "applies to 'after_update' only"),
    (lambda old, new: new.nope == "x", "after_update", "The new row has no column 'nope'"),
    (User.email == "x", "after_truncate", "has no rows for where= to test"),
])
def test_filters_the_capture_sql_cannot_run_are_refused_at_registration(where, identifier, message):
    registry = Registry()
    with pytest.raises(InvalidFilterError, match=re.escape(message)):
        registry.add(User, identifier, handler, where=where)
    assert registry.needed_triggers() == {}


def test_where_needs_a_model_or_table_and_no_broadcast():
    with pytest.raises(InvalidFilterError, match="is a table name"):
        Registry().add("public.user", "after_insert", handler, where=User.email == "x")
    with pytest.raises(InvalidFilterError, match="not supported on broadcast handlers"):
        Registry().add(User, "after_insert", handler, where=User.email == "x", broadcast=True)


def test_after_truncate_is_a_kind_of_its_own_and_never_broadcast():
    registry = Registry()
    registry.add(User, ["after_truncate", "after_insert"], handler)
    assert sorted(registry.needed_triggers()) == [(USER, "insert"), (USER, "truncate")]
    with pytest.raises(UnknownEventError, match="cannot be broadcast"):
        registry.add(User, "after_truncate", handler, broadcast=True)
