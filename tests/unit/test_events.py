"""events.py: decoding stored rows into the values SQLAlchemy loads, and the Event.

Rows are the JSON text the capture functions store (to_json with the output
settings their header pins), written here by hand.
"""
from __future__ import annotations

import datetime
import decimal
import enum
import math
import pickle
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_pgevents import Event
from flask_pgevents.events import RowDecoder, build_instance, changed_columns, changed_in_json, converter_for, load_row


class Color(enum.Enum):
    # Values differ from names: PostgreSQL stores the names.
    red = "R"
    green = "G"


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "account"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str]
    label: Mapped[str] = mapped_column("display_name")


class Cents(sa.TypeDecorator[int]):
    """Loads with process_result_value: Decimal dollars become integer cents."""

    impl = sa.Numeric(12, 2)
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return int(value * 100) if value is not None else None


class Lowercase(sa.TypeDecorator[str]):
    """Decorates binds only: values load as its impl's."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return value


UTC = datetime.timezone.utc
NEPAL = datetime.timezone(datetime.timedelta(hours=5, minutes=45))
NEWFOUNDLAND = datetime.timezone(-datetime.timedelta(hours=3, minutes=30))


@pytest.fixture(params=["psycopg", "psycopg2"])
def dialect(request: pytest.FixtureRequest) -> sa.engine.Dialect:
    dialect_class: Any = make_url(f"postgresql+{request.param}://").get_dialect()
    return dialect_class()  # type: ignore[no-any-return]


def decode(type_: Any, value: Any, dialect: sa.engine.Dialect, **options: Any) -> Any:
    """A JSON value as the row decoder gives it for a column of ``type_``."""
    convert = converter_for(type_, dialect, **options)
    return value if convert is None else convert(value)


def assert_same(actual: Any, expected: Any) -> None:
    assert (type(actual), actual) == (type(expected), expected)


# Values ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("2024-02-29T23:59:58.123456+05:45", datetime.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=NEPAL)),
    # PostgreSQL trims trailing zeros of fractions and writes whole-hour offsets as "+05".
    ("2024-02-29T23:59:58.12+05", datetime.datetime(2024, 2, 29, 23, 59, 58, 120000,
                                                    tzinfo=datetime.timezone(datetime.timedelta(hours=5)))),
    ("2024-02-29T23:59:58+00:00", datetime.datetime(2024, 2, 29, 23, 59, 58, tzinfo=UTC)),
    ("1999-12-31T23:59:59-03:30", datetime.datetime(1999, 12, 31, 23, 59, 59, tzinfo=NEWFOUNDLAND)),
    ("infinity", datetime.datetime.max),
    ("-infinity", datetime.datetime.min),
])
def test_timestamps_with_time_zone(dialect, text, expected):
    value = decode(sa.DateTime(timezone=True), text, dialect)
    assert_same(value, expected)
    assert value.tzinfo == expected.tzinfo


@pytest.mark.parametrize("type_", [sa.DateTime(), postgresql.TIMESTAMP()])
def test_timestamps_without_time_zone_are_naive(dialect, type_):
    value = decode(type_, "1999-12-31T23:59:59.000005", dialect)
    assert_same(value, datetime.datetime(1999, 12, 31, 23, 59, 59, 5))
    assert value.tzinfo is None


@pytest.mark.parametrize("text, expected", [
    ("2024-02-29", datetime.date(2024, 2, 29)),
    ("infinity", datetime.date.max),
    ("-infinity", datetime.date.min),
])
def test_dates(dialect, text, expected):
    assert_same(decode(sa.Date(), text, dialect), expected)


@pytest.mark.parametrize("type_, text, expected", [
    (sa.Time(), "23:59:58.25", datetime.time(23, 59, 58, 250000)),
    (sa.Time(), "00:00:00", datetime.time(0, 0)),
    (sa.Time(timezone=True), "23:59:58+05:45", datetime.time(23, 59, 58, tzinfo=NEPAL)),
    (sa.Time(timezone=True), "08:00:00.5-02",
     datetime.time(8, 0, 0, 500000, tzinfo=datetime.timezone(-datetime.timedelta(hours=2)))),
])
def test_times(dialect, type_, text, expected):
    value = decode(type_, text, dialect)
    assert_same(value, expected)
    assert value.tzinfo == expected.tzinfo


@pytest.mark.parametrize("text, expected", [
    ("00:00:00", datetime.timedelta(0)),
    ("3 days 04:05:06.000789", datetime.timedelta(days=3, hours=4, minutes=5, seconds=6, microseconds=789)),
    ("1 day", datetime.timedelta(days=1)),
    ("-1 days -02:00:00", datetime.timedelta(days=-1, hours=-2)),
    ("1 day -00:00:01", datetime.timedelta(days=1, seconds=-1)),
    ("-00:59:59.9995", -datetime.timedelta(minutes=59, seconds=59, microseconds=999500)),
    # Months count as 30 days and years as 365, as psycopg loads them.
    ("1 year 2 mons", datetime.timedelta(days=365 + 60)),
    ("2 years -1 mons 3 days", datetime.timedelta(days=730 - 30 + 3)),
    ("1 mon 00:00:00.000001", datetime.timedelta(days=30, microseconds=1)),
    ("2562047788:00:54.775807", datetime.timedelta(hours=2562047788, seconds=54, microseconds=775807)),
])
@pytest.mark.parametrize("type_", [sa.Interval(), postgresql.INTERVAL(), sa.Interval(second_precision=3)])
def test_intervals_in_the_postgres_style(dialect, type_, text, expected):
    assert_same(decode(type_, text, dialect), expected)


@pytest.mark.parametrize("type_", [sa.LargeBinary(), postgresql.BYTEA()])
def test_bytea_in_hex_and_escape_output(dialect, type_):
    assert_same(decode(type_, "\\x00ff27225c80", dialect), b"\x00\xff'\"\\\x80")
    assert_same(decode(type_, "\\x", dialect), b"")
    # bytea_output = 'escape' in an old writer's session.
    assert_same(decode(type_, "a\\\\b\\000\\377", dialect), b"a\\b\x00\xff")


def test_uuids(dialect):
    text = "0b6a3f4e-8d0c-4c2e-9a57-3f2f1c2d4e5f"
    assert_same(decode(sa.Uuid(), text, dialect), uuid.UUID(text))
    assert_same(decode(postgresql.UUID(), text, dialect), uuid.UUID(text))
    assert_same(decode(sa.Uuid(as_uuid=False), text, dialect), text)


@pytest.mark.parametrize("type_", [sa.Float(), postgresql.DOUBLE_PRECISION(), postgresql.REAL(),
                                   sa.Numeric(asdecimal=False)])
def test_floats_including_not_a_number_and_infinities(dialect, type_):
    row = load_row('{"a": 0.5, "b": 3, "c": "NaN", "d": "Infinity", "e": "-Infinity", "f": 1e300}')
    assert row is not None
    values = {name: decode(type_, value, dialect) for name, value in row.items()}
    assert {name: type(value) for name, value in values.items()} == dict.fromkeys("abcdef", float)
    assert (values["a"], values["b"], values["d"], values["e"], values["f"]) == (0.5, 3.0, math.inf, -math.inf, 1e300)
    assert math.isnan(values["c"])


@pytest.mark.parametrize("type_", [sa.Numeric(30, 3), sa.Numeric(), sa.Float(asdecimal=True)])
def test_numerics_are_exact_decimals(dialect, type_):
    row = load_row('{"a": 12345678901234567.891, "b": 7, "c": "NaN", "d": "Infinity", "e": 1.50}')
    assert row is not None
    values = {name: decode(type_, value, dialect) for name, value in row.items()}
    assert {name: type(value) for name, value in values.items()} == dict.fromkeys("abcde", decimal.Decimal)
    assert str(values["a"]) == "12345678901234567.891"
    assert str(values["e"]) == "1.50"  # the scale too
    assert values["b"] == 7 and values["d"] == decimal.Decimal("Infinity") and values["c"].is_nan()


@pytest.mark.parametrize("type_", [sa.Integer(), sa.BigInteger(), sa.String(), sa.Text(), sa.Boolean(),
                                   postgresql.INET(),
                                   # CITEXT came in SQLAlchemy 2.0.7; setup.cfg allows 2.0.0.
                                   *([postgresql.CITEXT()] if hasattr(postgresql, "CITEXT") else [])])
def test_text_integers_and_booleans_need_no_conversion(dialect, type_):
    assert converter_for(type_, dialect) is None


def test_big_integers_stay_exact():
    assert load_row('{"big": 9007199254740993}') == {"big": 2**53 + 1}


def test_enums_load_their_python_members(dialect):
    assert decode(sa.Enum(Color, name="color"), "green", dialect) is Color.green
    assert_same(decode(sa.Enum("draft", "sent", name="state"), "sent", dialect), "sent")


@pytest.mark.parametrize("type_", [sa.JSON(), postgresql.JSON(), postgresql.JSONB()])
def test_json_values_are_plain_json_with_floats(dialect, type_):
    row = load_row('{"doc": {"a": {"b": [1, 2.5, {"c": null}], "f": 1.0}, "i": 100000000000000000000, "t": true}}')
    assert row is not None
    value = decode(type_, row["doc"], dialect)
    assert value == {"a": {"b": [1, 2.5, {"c": None}], "f": 1.0}, "i": 10**20, "t": True}
    assert_same(value["a"]["b"][1], 2.5)
    assert_same(value["a"]["f"], 1.0)
    assert_same(value["i"], 10**20)
    assert_same(decode(type_, [decimal.Decimal("0.5"), "x"], dialect), [0.5, "x"])


def test_arrays_convert_each_element_and_keep_nulls_and_nesting(dialect):
    floats = load_row('{"v": [0.5, null, "Infinity", 3]}')
    assert floats is not None
    assert decode(postgresql.ARRAY(sa.Float), floats["v"], dialect) == [0.5, None, math.inf, 3.0]
    assert_same(decode(postgresql.ARRAY(sa.Integer), [[1, 2], [None, 4]], dialect), [[1, 2], [None, 4]])
    assert decode(sa.ARRAY(sa.Date), ["2024-02-29", None], dialect) == [datetime.date(2024, 2, 29), None]
    assert decode(postgresql.ARRAY(sa.Enum(Color, name="color")), [["red"], ["green"]], dialect) == [
        [Color.red], [Color.green],
    ]
    assert decode(postgresql.ARRAY(sa.Text), ["a", None, ""], dialect) == ["a", None, ""]


def test_type_decorators_load_as_sqlalchemy_loads_them(dialect):
    assert_same(decode(Cents(), decimal.Decimal("12.34"), dialect), 1234)
    assert decode(Cents(), None, dialect) is None
    # Only binds decorated: loads as its impl, a timestamp.
    assert_same(
        decode(Lowercase(), "2024-05-01T12:00:00+00:00", dialect), datetime.datetime(2024, 5, 1, 12, tzinfo=UTC)
    )


def test_pickles_arrive_as_their_bytes_unless_trusted(dialect):
    stored = "\\x" + pickle.dumps({"k": (1, 2.5)}).hex()
    assert_same(decode(sa.PickleType(), stored, dialect), pickle.dumps({"k": (1, 2.5)}))
    assert decode(sa.PickleType(), stored, dialect, unpickle=True) == {"k": (1, 2.5)}


# Rows --------------------------------------------------------------------------------


def pickled_table() -> sa.Table:
    return sa.Table(
        "jar", sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("trusted", sa.PickleType, info={"pgevents_unpickle": True}),
        sa.Column("untrusted", sa.PickleType),
        sa.Column("at", sa.DateTime(timezone=True)),
    )


def test_a_row_decoder_unpickles_only_the_columns_marked_trusted(dialect):
    stored = "\\x" + pickle.dumps([1, 2]).hex()
    row = {"id": 1, "trusted": stored, "untrusted": stored, "at": None}
    assert RowDecoder(pickled_table(), dialect).decode(dict(row)) == {
        "id": 1, "trusted": [1, 2], "untrusted": pickle.dumps([1, 2]), "at": None,
    }
    assert RowDecoder(pickled_table(), dialect, unpickle=True).decode(dict(row)) == {
        "id": 1, "trusted": [1, 2], "untrusted": [1, 2], "at": None,
    }


def test_a_row_decoder_converts_by_database_column_name_and_skips_absent_columns(dialect):
    decoder = RowDecoder(Account.__table__, dialect)  # type: ignore[arg-type]
    assert decoder.decode({"id": 1, "email": "a@x", "display_name": "A"}) == {
        "id": 1, "email": "a@x", "display_name": "A",
    }
    table = sa.Table("t", sa.MetaData(), sa.Column("at", sa.Date, key="when"), sa.Column("n", sa.Numeric))
    decoder = RowDecoder(table, dialect)
    assert decoder.decode({"at": "2024-02-29", "n": 1}) == {"at": datetime.date(2024, 2, 29), "n": decimal.Decimal(1)}
    # A column added since the row was written, or dropped from the model, is left alone.
    assert decoder.decode({"n": None, "extra": "2024-02-29"}) == {"n": None, "extra": "2024-02-29"}


def test_without_a_table_rows_are_passed_as_json(dialect):
    row = {"at": "2024-02-29", "n": decimal.Decimal("1.5")}
    assert RowDecoder(None, dialect).decode(row) == {"at": "2024-02-29", "n": decimal.Decimal("1.5")}
    assert RowDecoder(None, dialect).decode(None) is None
    assert RowDecoder(pickled_table(), dialect).decode(None) is None


def test_load_row_keeps_numbers_exact():
    assert load_row(None) is None
    row = load_row('{"a": 1.10, "b": 1e16, "c": "t\\u00e9xt", "d": [1, 2.0], "e": null}')
    assert row == {"a": decimal.Decimal("1.10"), "b": decimal.Decimal("1E+16"), "c": "t\u00e9xt",
                   "d": [1, decimal.Decimal("2.0")], "e": None}
    assert str(row["a"]) == "1.10"


def test_load_row_reads_json_with_whitespace_around_it_and_refuses_anything_after_it():
    assert load_row(' \n{"a": 1.5}\t ') == {"a": decimal.Decimal("1.5")}
    with pytest.raises(ValueError, match="Extra data"):
        load_row('{"a": 1} {"b": 2}')
    with pytest.raises(ValueError, match="Expecting value"):
        load_row("")


def test_load_row_accepts_rows_a_driver_already_decoded():
    decoded = {"a": 1}
    row = load_row(decoded)  # type: ignore[arg-type]
    assert row == {"a": 1} and row is not decoded


# Changed columns ---------------------------------------------------------------------


def test_changed_columns_are_those_whose_values_differ():
    old = {"id": 1, "name": "a", "email": "a@x", "tags": ["x"], "note": None}
    new = {"id": 1, "name": "b", "email": "a@x", "tags": ["x", "y"], "note": None}
    assert changed_columns(old, new) == frozenset({"name", "tags"})
    assert changed_columns(old, dict(old)) == frozenset()


def test_a_column_only_in_one_version_has_changed_unless_it_is_null():
    assert changed_columns({"a": 1}, {"a": 1, "b": 2}) == frozenset({"b"})
    assert changed_columns({"a": 1, "b": 2}, {"a": 1}) == frozenset({"b"})
    assert changed_columns({"a": 1}, {"a": 1, "b": None}) == frozenset()


def test_nan_left_as_it_was_is_no_change():
    nan, dnan = float("nan"), decimal.Decimal("NaN")
    row = {"f": nan, "d": dnan, "l": [1.0, nan]}
    assert changed_columns(row, {"f": nan, "d": dnan, "l": [1.0, nan]}) == frozenset()
    assert changed_columns({"f": nan, "l": [nan]}, {"f": 1.0, "l": [1.0]}) == frozenset({"f", "l"})
    assert changed_columns({"f": 1.0}, {"f": nan}) == frozenset({"f"})
    assert changed_columns({"g": [[nan], [2]]}, {"g": [[nan], [2]]}) == frozenset()


def test_inserts_and_deletes_change_no_column():
    assert changed_columns(None, {"a": 1}) == frozenset()
    assert changed_columns({"a": 1}, None) == frozenset()
    assert changed_columns({}, {"a": 1}) == frozenset()


# Event -------------------------------------------------------------------------------


AT = datetime.datetime(2024, 5, 1, 12, tzinfo=UTC)


def make_event(**fields: Any) -> Event:
    values: dict[str, Any] = {
        "id": 7, "op": "update", "table": "public.account", "model": Account,
        "new": {"id": 1, "email": "b@x", "display_name": "B"},
        "old": {"id": 1, "email": "a@x", "display_name": "B"},
        "timestamp": AT, "attempt": 1,
    }
    values.update(fields)
    return Event(**values)


def test_an_event_has_what_a_handler_reads():
    event = make_event()
    assert (event.id, event.op, event.table, event.model, event.timestamp, event.attempt) == (
        7, "update", "public.account", Account, AT, 1,
    )
    assert event.new == {"id": 1, "email": "b@x", "display_name": "B"}
    assert event.old == {"id": 1, "email": "a@x", "display_name": "B"}
    assert event.changed == frozenset({"email"})
    assert repr(event) == "<Event 7 update public.account attempt=1>"


def test_new_and_old_are_empty_dicts_when_absent():
    insert = make_event(op="insert", old=None)
    delete = make_event(op="delete", new=None)
    assert (insert.old, insert.changed) == ({}, frozenset())
    assert (delete.new, delete.changed) == ({}, frozenset())


def test_changed_may_be_given():
    assert make_event(changed=frozenset({"display_name"})).changed == frozenset({"display_name"})


@pytest.mark.parametrize("name", ["id", "op", "table", "model", "new", "old", "changed", "timestamp", "attempt",
                                  "target", "extra"])
def test_an_event_is_immutable(name):
    event = make_event()
    with pytest.raises(AttributeError) as info:
        setattr(event, name, None)
    assert str(info.value) == f"Event is immutable; cannot set {name!r}."
    with pytest.raises(AttributeError) as info:
        delattr(event, name)
    assert str(info.value) == f"Event is immutable; cannot delete {name!r}."
    assert event.id == 7 and event.op == "update"


def test_events_are_equal_by_id_and_attempt():
    assert make_event() == make_event(op="insert", new={"x": 1})
    assert make_event() != make_event(attempt=2)
    assert make_event() != make_event(id=8)
    assert make_event() != 7
    assert len({make_event(), make_event(), make_event(attempt=2)}) == 2


def test_target_is_a_transient_instance_built_from_new():
    event = make_event()
    target = event.target
    assert isinstance(target, Account)
    assert (target.id, target.email, target.label) == (1, "b@x", "B")
    assert sa.inspect(target).transient
    assert event.target is target  # built once


def test_target_of_a_delete_is_built_from_old():
    target = make_event(op="delete", new=None).target
    assert (target.id, target.email, target.label) == (1, "a@x", "B")


def test_target_is_none_without_a_model():
    assert make_event(model=None).target is None


def test_build_instance_sets_the_mapped_attributes_the_row_has():
    account = build_instance(Account, {"id": 3, "display_name": "C", "not_a_column": 1})
    assert isinstance(account, Account)
    assert (account.id, account.label) == (3, "C")
    assert "email" not in vars(account) and not hasattr(account, "not_a_column")
    assert build_instance(None, {"id": 1}) is None
    assert build_instance(Account, None) is None


@pytest.mark.parametrize("old, new", [
    (1, True),
    (decimal.Decimal("1.0"), decimal.Decimal("1.00")),
    ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
    ([1, 2], [1, 2, 3]),
    ("x", None),
])
def test_changed_in_json_sees_what_the_trigger_sees(old, new):
    # The trigger compares JSON text: each of these is a change, though some
    # are equal once decoded into Python values.
    assert changed_in_json({"id": 1, "v": old}, {"id": 1, "v": new}) == frozenset({"v"})


def test_changed_in_json_of_equal_rows_and_of_inserts_is_empty():
    row = {"id": 1, "v": [decimal.Decimal("1.5"), {"k": "NaN"}]}
    assert changed_in_json(row, {"id": 1, "v": [decimal.Decimal("1.5"), {"k": "NaN"}]}) == frozenset()
    assert changed_in_json(None, row) == frozenset()
