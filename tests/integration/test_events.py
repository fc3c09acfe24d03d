"""What a handler receives: the Event, and values typed as SQLAlchemy loads them.

Rows are written by ``other_service``, a plain psycopg connection, as another
service would; each decoded value is compared, value and type, with what
SQLAlchemy itself loads for the same row through the driver under test.
"""
from __future__ import annotations

import datetime
import decimal
import enum
import math
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from psycopg.types.json import Json, Jsonb
from sqlalchemy.dialects import postgresql

from flask_pgevents import Event


class Color(enum.Enum):
    # Values differ from names: PostgreSQL stores the names.
    red = "R"
    green = "G"


WRITER_TZ = datetime.timezone(datetime.timedelta(hours=5, minutes=45))
NOT_UTF8 = b"\x00\xff\xfe'\"\\x\x80\n abc"
UNICODE_TEXT = "h\u00e9llo 'single' \"double\" back\\slash \\x00 \n\t\u2603 \U0001f389 {a,b} NULL"

#: One row with a value in every column, as Python objects handed to psycopg.
FULL_ROW: dict[str, Any] = {
    "big": 2**53 + 1,
    "amount": decimal.Decimal("12345678901234567.891"),
    "ratio": 1 / 3,
    "at": datetime.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=WRITER_TZ),
    "naive": datetime.datetime(1999, 12, 31, 23, 59, 59, 5),
    "day": datetime.date(2024, 2, 29),
    "clock": datetime.time(23, 59, 58, 250000),
    "span": datetime.timedelta(days=3, hours=4, minutes=5, seconds=6, microseconds=789),
    "flag": False,
    "uid": uuid.UUID("0b6a3f4e-8d0c-4c2e-9a57-3f2f1c2d4e5f"),
    "doc": {"a": {"b": [1, 2.5, {"c": None}], "f": 1.0}, "i": 10**20, "s": "\u00fc\"\\", "t": True},
    "plain_json": [{"x": 0.5, "y": [True, None, -7]}, 3, "t", 2.0],
    "ints": [1, None, 3],
    "ratios": [0.5, None, float("inf"), 3.0],
    "grid": [[1, 2], [None, 4]],
    "words": ["a", None, 'with "quotes"', "back\\slash", "comma,{brace}", "NULL", "", "\u00e9"],
    "color": "green",
    "blob": NOT_UTF8,
    "note": UNICODE_TEXT,
}


def _typed_app(make_app):
    app, db, pgevents = make_app()

    class Sample(db.Model):
        __tablename__ = "sample"
        id = sa.Column(sa.Integer, primary_key=True)
        big = sa.Column(sa.BigInteger)
        amount = sa.Column(sa.Numeric(30, 3))
        ratio = sa.Column(sa.Float)
        at = sa.Column(sa.DateTime(timezone=True))
        naive = sa.Column(sa.DateTime)
        day = sa.Column(sa.Date)
        clock = sa.Column(sa.Time)
        span = sa.Column(sa.Interval)
        flag = sa.Column(sa.Boolean)
        uid = sa.Column(sa.Uuid)
        doc = sa.Column(postgresql.JSONB)
        plain_json = sa.Column(sa.JSON)
        ints = sa.Column(postgresql.ARRAY(sa.Integer))
        ratios = sa.Column(postgresql.ARRAY(sa.Float))
        grid = sa.Column(postgresql.ARRAY(sa.Integer))
        words = sa.Column(postgresql.ARRAY(sa.Text))
        color = sa.Column(sa.Enum(Color, name="color"))
        blob = sa.Column(sa.LargeBinary)
        note = sa.Column(sa.Text)

    pgevents.init_app(app)
    return app, db, pgevents, Sample


def _insert(conn, table: str, values: dict[str, Any]) -> int:
    """Insert one row with psycopg's own adaptation; return its id."""
    names = ", ".join(values)
    params = ", ".join(
        "%s::color" if name == "color" else "%s" for name in values
    )
    adapted = [
        Jsonb(v) if name == "doc" else Json(v) if name == "plain_json" else v
        for name, v in values.items()
    ]
    return conn.execute(f"INSERT INTO {table} ({names}) VALUES ({params}) RETURNING id", adapted).fetchone()[0]


def _loaded(db, model, id_: int) -> dict[str, Any]:
    """The row as SQLAlchemy loads it, keyed by column name."""
    db.session.expire_all()
    obj = db.session.get(model, id_)
    return {prop.columns[0].name: getattr(obj, prop.key) for prop in sa.inspect(model).column_attrs}


def assert_same(actual: Any, expected: Any, path: str = "row") -> None:
    """Equal values of the same types, all the way down; NaN equals NaN."""
    assert type(actual) is type(expected), f"{path}: {actual!r} is a {type(actual).__name__}, expected {expected!r}"
    if isinstance(expected, dict):
        assert set(actual) == set(expected), path
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{path}[{i}]")
    elif isinstance(expected, (float, decimal.Decimal)) and expected != expected:
        assert actual != actual, f"{path}: {actual!r}, expected NaN"
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"
        if isinstance(expected, (datetime.datetime, datetime.time)):
            assert (actual.tzinfo is None) == (expected.tzinfo is None), path
        if isinstance(expected, decimal.Decimal):
            assert str(actual) == str(expected), path  # same scale too


def test_values_have_the_types_sqlalchemy_loads(make_app, other_service, recorder):
    app, db, pgevents, Sample = _typed_app(make_app)
    pgevents.listen(Sample, "after_insert", recorder)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
    other_service.execute("SET TimeZone = 'America/St_Johns'")
    full_id = _insert(other_service, "sample", FULL_ROW)
    null_id = _insert(other_service, "sample", {"note": None})
    special_id = _insert(other_service, "sample", {
        "big": -(2**63),
        "amount": decimal.Decimal("-0.010"),
        "ratio": float("-inf"),
        "span": datetime.timedelta(days=-1, seconds=7384, microseconds=5),
        "flag": True,
        "doc": [],
        "plain_json": "just a string",
        "ints": [],
        "words": [None],
        "color": "red",
        "blob": b"",
        "note": "",
    })
    with app.app_context():
        assert pgevents.process_pending() == 3
        by_id = {e.new["id"]: e for e in recorder.events}
        for id_ in (full_id, null_id, special_id):
            assert_same(by_id[id_].new, _loaded(db, Sample, id_), f"row {id_}")

    new = by_id[full_id].new
    # What was written, not only what SQLAlchemy reads.
    for name in ("big", "amount", "ratio", "at", "naive", "day", "clock", "span", "flag", "uid",
                 "doc", "plain_json", "ints", "ratios", "grid", "words", "blob", "note"):
        assert new[name] == FULL_ROW[name], name
    assert new["big"] == 9007199254740993 and str(new["amount"]) == "12345678901234567.891"
    assert new["at"].utcoffset() is not None
    assert isinstance(new["doc"]["a"]["f"], float) and isinstance(new["doc"]["i"], int)
    assert isinstance(new["plain_json"][3], float) and isinstance(new["plain_json"][0]["y"][2], int)
    assert new["color"] is Color.green
    assert type(new["blob"]) is bytes
    assert by_id[null_id].new == {"id": null_id, **dict.fromkeys(FULL_ROW)}
    assert by_id[special_id].new["ratio"] == float("-inf")
    assert by_id[special_id].new["color"] is Color.red


def test_float_and_numeric_not_a_number(make_app, other_service, recorder):
    app, db, pgevents, Sample = _typed_app(make_app)
    pgevents.listen(Sample, ["after_insert", "after_update"], recorder)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
    id_ = _insert(other_service, "sample", {
        "ratio": float("nan"), "amount": decimal.Decimal("NaN"), "ratios": [float("nan"), 1.5], "note": "a",
    })
    with app.app_context():
        assert pgevents.process_pending() == 1
        assert_same(recorder.events[0].new, _loaded(db, Sample, id_))
    assert math.isnan(recorder.events[0].new["ratio"]) and recorder.events[0].new["amount"].is_nan()
    other_service.execute("UPDATE sample SET note = 'b'")
    with app.app_context():
        assert pgevents.process_pending() == 1
    # A NaN that stays NaN is not a change.
    assert recorder.events[1].changed == frozenset({"note"})


def test_values_written_with_other_session_settings(make_app, other_service, recorder):
    """TimeZone, IntervalStyle and bytea_output of the writer change how rows are stored."""
    app, db, pgevents, Sample = _typed_app(make_app)
    pgevents.listen(Sample, "after_insert", recorder)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
    spans = [
        "1 year 2 months 3 days 04:05:06.789",
        "-1 year -2 months +3 days -04:05:06.5",
        "-3 days +01:00:00",
        "100000000 hours 0.000001 seconds",
        "-0.000001 seconds",
        "0",
    ]
    settings = [
        ("postgres", "hex", "UTC"),
        ("postgres", "escape", "Asia/Kathmandu"),
        ("postgres_verbose", "hex", "America/Los_Angeles"),
        ("sql_standard", "hex", "Australia/Lord_Howe"),
        ("iso_8601", "escape", "Europe/Moscow"),
    ]
    ids = []
    for style, bytea_output, zone in settings:
        other_service.execute(f"SET IntervalStyle = '{style}'")
        other_service.execute(f"SET bytea_output = '{bytea_output}'")
        other_service.execute(f"SET TimeZone = '{zone}'")
        for span in spans:
            ids.append(other_service.execute(
                "INSERT INTO sample (span, blob, at, note) VALUES (%s::interval, %s, %s, %s) RETURNING id",
                (span, NOT_UTF8, FULL_ROW["at"], f"{style} {span}"),
            ).fetchone()[0])
    with app.app_context():
        assert pgevents.process_pending() == len(ids)
        by_id = {e.new["id"]: e for e in recorder.events}
        for id_ in ids:
            loaded = _loaded(db, Sample, id_)
            assert_same(by_id[id_].new, loaded, loaded["note"])
            assert by_id[id_].new["blob"] == NOT_UTF8
            assert by_id[id_].new["at"] == FULL_ROW["at"]


def _event_fields_are_common(event: Event, model: Any, table: str) -> None:
    assert isinstance(event, Event)
    assert type(event.id) is int
    assert event.attempt == 1
    assert event.model is model
    assert event.table == table
    assert isinstance(event.changed, frozenset)
    assert isinstance(event.timestamp, datetime.datetime) and event.timestamp.utcoffset() is not None


def _assert_transient_copy(target: Any, model: Any, loaded: dict[str, Any]) -> None:
    assert type(target) is model
    state = sa.inspect(target)
    assert state.transient and state.session is None
    for prop in sa.inspect(model).column_attrs:
        assert_same(getattr(target, prop.key), loaded[prop.columns[0].name], f"target.{prop.key}")


def test_insert_update_delete_events(make_app, other_service, recorder):
    app, db, pgevents, Sample = _typed_app(make_app)
    pgevents.listen(Sample, ["after_insert", "after_update", "after_delete"], recorder)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
    with other_service.transaction():
        id_ = _insert(other_service, "sample", FULL_ROW)
        written_at = other_service.execute("SELECT now()").fetchone()[0]
    with app.app_context():
        assert pgevents.process_pending() == 1
        inserted = _loaded(db, Sample, id_)
    # Only note, flag and ints change; ratio and doc are assigned their own value.
    other_service.execute(
        "UPDATE sample SET note = 'changed', flag = NOT flag, ints[2] = 2, ratio = ratio, doc = doc"
        " WHERE id = %s", (id_,),
    )
    with app.app_context():
        assert pgevents.process_pending() == 1
        updated = _loaded(db, Sample, id_)
    other_service.execute("DELETE FROM sample WHERE id = %s", (id_,))
    with app.app_context():
        assert pgevents.process_pending() == 1

    insert, update, delete = recorder.events
    for event in (insert, update, delete):
        _event_fields_are_common(event, Sample, "public.sample")
    assert insert.id < update.id < delete.id
    assert insert.timestamp == written_at

    assert (insert.op, insert.old, insert.changed) == ("insert", {}, frozenset())
    assert_same(insert.new, inserted)
    _assert_transient_copy(insert.target, Sample, inserted)
    assert insert.target is insert.target

    assert update.op == "update"
    assert_same(update.old, inserted)
    assert_same(update.new, updated)
    assert update.changed == frozenset({"note", "flag", "ints"})
    _assert_transient_copy(update.target, Sample, updated)
    assert update.target.note == "changed" and update.target.ints == [1, 2, 3]

    assert (delete.op, delete.new, delete.changed) == ("delete", {}, frozenset())
    assert_same(delete.old, updated)
    _assert_transient_copy(delete.target, Sample, updated)


def test_event_is_immutable(make_app, other_service, recorder):
    app, db, pgevents, Sample = _typed_app(make_app)
    pgevents.listen(Sample, "after_insert", recorder)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
    other_service.execute("INSERT INTO sample (note) VALUES ('a')")
    with app.app_context():
        assert pgevents.process_pending() == 1
    (event,) = recorder.events
    for name in ("id", "op", "table", "model", "new", "old", "changed", "timestamp", "attempt", "target"):
        with pytest.raises(AttributeError):
            setattr(event, name, None)
        with pytest.raises(AttributeError):
            delattr(event, name)
    with pytest.raises(AttributeError):
        event.something_else = 1
    assert (event.op, event.new, event.attempt) == ("insert", {"id": 1, **dict.fromkeys(FULL_ROW), "note": "a"}, 1)


def test_attribute_named_unlike_its_column(make_app, other_service, recorder):
    app, db, pgevents = make_app()

    class Account(db.Model):
        __tablename__ = "account"
        id = sa.Column(sa.Integer, primary_key=True)
        email = sa.Column("e_mail", sa.String, nullable=False)
        joined = sa.Column("Joined At", sa.DateTime(timezone=True))

    pgevents.init_app(app)
    pgevents.listen(Account, ["after_insert", "after_update"], recorder)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
    joined = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=WRITER_TZ)
    other_service.execute('INSERT INTO account (e_mail, "Joined At") VALUES (%s, %s)', ("a@example.com", joined))
    other_service.execute("UPDATE account SET e_mail = 'b@example.com'")
    with app.app_context():
        assert pgevents.process_pending() == 2
        loaded = _loaded(db, Account, 1)
    insert, update = recorder.events
    assert insert.new == {"id": 1, "e_mail": "a@example.com", "Joined At": joined}
    assert insert.target.email == "a@example.com" and insert.target.joined == joined
    _assert_transient_copy(update.target, Account, loaded)
    assert update.target.email == "b@example.com"
    assert update.changed == frozenset({"e_mail"})


def test_string_target_for_an_unmapped_table_is_reflected(make_app, other_service, recorder):
    app, db, pgevents = make_app()
    pgevents.init_app(app)
    other_service.execute("""
        CREATE SCHEMA audit;
        CREATE TYPE audit.level AS ENUM ('info', 'warn');
        CREATE TABLE audit."Log Entry" (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            seq bigint, amount numeric(30, 3), ratio double precision, small real,
            at timestamptz, naive timestamp, day date, clock time, span interval, flag boolean,
            doc jsonb, plain json, ints int[], grid int[], words text[], level audit.level,
            blob bytea, note text
        )
    """)
    pgevents.listen("audit.Log Entry", ["after_insert", "after_delete"], recorder)
    with app.app_context():
        pgevents.install_triggers()
    row = {
        "seq": FULL_ROW["big"], "amount": FULL_ROW["amount"], "ratio": FULL_ROW["ratio"], "small": 0.1,
        "at": FULL_ROW["at"], "naive": FULL_ROW["naive"], "day": FULL_ROW["day"], "clock": FULL_ROW["clock"],
        "span": FULL_ROW["span"], "flag": True, "doc": Jsonb(FULL_ROW["doc"]), "plain": Json(FULL_ROW["plain_json"]),
        "ints": FULL_ROW["ints"], "grid": FULL_ROW["grid"], "words": FULL_ROW["words"], "level": "warn",
        "blob": NOT_UTF8, "note": UNICODE_TEXT,
    }
    columns = ", ".join(row)
    params = ", ".join("%s::audit.level" if name == "level" else "%s" for name in row)
    other_service.execute(f'INSERT INTO audit."Log Entry" ({columns}) VALUES ({params})', list(row.values()))
    with app.app_context():
        table = sa.Table("Log Entry", sa.MetaData(), schema="audit", autoload_with=db.engine)
        loaded = dict(db.session.execute(sa.select(table)).mappings().one())
        assert pgevents.process_pending() == 1
        other_service.execute('DELETE FROM audit."Log Entry"')
        assert pgevents.process_pending() == 1
    insert, delete = recorder.events
    for event in (insert, delete):
        _event_fields_are_common(event, None, "audit.Log Entry")
        assert event.target is None
    assert_same(insert.new, loaded)
    assert_same(delete.old, loaded)
    assert type(insert.new["id"]) is uuid.UUID and insert.new["amount"] == FULL_ROW["amount"]
    assert insert.new["seq"] == 2**53 + 1 and insert.new["blob"] == NOT_UTF8 and insert.new["level"] == "warn"


class Lowercase(sa.TypeDecorator):
    """Decorates binds only: values load as the impl's."""

    impl = sa.String
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return value.lower() if value is not None else None


class CommaList(sa.TypeDecorator):
    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return ",".join(value) if value is not None else None

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return value.split(",") if value is not None else None


class UtcDateTime(sa.TypeDecorator):
    """Decorates a type that needs decoding itself."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return value.astimezone(datetime.timezone.utc) if value is not None else None


class Cents(sa.TypeDecorator):
    impl = sa.Numeric(12, 2)
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return int(value * 100) if value is not None else None


def test_type_decorators_load_as_sqlalchemy_loads_them(make_app, other_service, recorder):
    app, db, pgevents = make_app()

    class Decorated(db.Model):
        __tablename__ = "decorated"
        id = sa.Column(sa.Integer, primary_key=True)
        email = sa.Column(Lowercase)
        tags = sa.Column(CommaList)
        at = sa.Column(UtcDateTime)
        price = sa.Column(Cents)
        span = sa.Column(sa.Interval(second_precision=3))
        pickled = sa.Column(sa.PickleType, info={"pgevents_unpickle": True})  # trusted: opted in

    pgevents.init_app(app)
    pgevents.listen(Decorated, "after_insert", recorder)
    with app.app_context():
        db.create_all()
        pgevents.install_triggers()
        db.session.add(Decorated(
            email="Mixed@Example.com", tags=["a", "b"], at=FULL_ROW["at"], price=decimal.Decimal("12.34"),
            span=datetime.timedelta(hours=-1, microseconds=500), pickled={"k": (1, 2.5)},
        ))
        db.session.commit()
        other_service.execute("INSERT INTO decorated (email) VALUES ('Other@Example.com')")
        assert pgevents.process_pending() == 2
        for event in recorder.events:
            assert_same(event.new, _loaded(db, Decorated, event.new["id"]))
    new = recorder.events[0].new
    assert new["email"] == "mixed@example.com" and new["tags"] == ["a", "b"] and new["price"] == 1234
    assert new["at"] == FULL_ROW["at"] and new["at"].tzinfo is datetime.timezone.utc
    assert new["pickled"] == {"k": (1, 2.5)}
