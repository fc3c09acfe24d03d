"""The Event handed to handlers, and decoding stored rows into typed values.

Rows are stored as ``json`` by the capture triggers. Decoding turns each
JSON value back into what SQLAlchemy gives for the column's type when it
loads the row: ``datetime``, ``Decimal``, ``UUID``, enum members, ...
"""
from __future__ import annotations

import datetime
import decimal
import json
import re
import uuid
from typing import Any, Callable, Dict, FrozenSet, Mapping, Optional

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

Converter = Callable[[Any], Any]
Row = Dict[str, Any]

_exact_json = json.JSONDecoder(parse_float=decimal.Decimal)


def load_row(text: Optional[str]) -> Optional[Row]:
    """Parse a stored row, keeping numeric values exact."""
    if text is None:
        return None
    if not isinstance(text, str):  # a driver that already decoded the json
        return dict(text)
    # Captured rows have no whitespace around them, which decode() would
    # look for with two regular expressions per row; anything else takes it.
    try:
        row, end = _exact_json.raw_decode(text)
    except ValueError:
        end = -1
    if end != len(text):
        row = _exact_json.decode(text)
    result: Row = row
    return result


def _json_floats(value: Any) -> Any:
    # JSON columns hold plain JSON: give floats, as json.loads would.
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, list):
        return [_json_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_floats(v) for k, v in value.items()}
    return value


_FRACTION = re.compile(r"\.(\d+)")


def _iso(text: str) -> str:
    # PostgreSQL trims trailing zeros of fractional seconds and may write
    # "+05" for an offset; Python 3.9's fromisoformat needs 6 digits and ":MM".
    text = _FRACTION.sub(lambda m: "." + (m.group(1) + "000000")[:6], text, count=1)
    if re.search(r"[+-]\d\d$", text):
        text += ":00"
    return text


def _to_datetime(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        # Python 3.11 reads PostgreSQL's forms as they are: one call per row.
        return datetime.datetime.fromisoformat(value)
    except ValueError:
        pass
    if value in ("infinity", "-infinity"):
        return datetime.datetime.max if value == "infinity" else datetime.datetime.min
    return datetime.datetime.fromisoformat(_iso(value))


def _to_date(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if value in ("infinity", "-infinity"):
        return datetime.date.max if value == "infinity" else datetime.date.min
    return datetime.date.fromisoformat(value)


def _to_time(value: Any) -> Any:
    return datetime.time.fromisoformat(_iso(value)) if isinstance(value, str) else value


_INTERVAL = re.compile(
    r"(?:(?P<years>[+-]?\d+) years? ?)?(?:(?P<months>[+-]?\d+) mons? ?)?"
    r"(?:(?P<days>[+-]?\d+) days? ?)?"
    r"(?:(?P<sign>[+-])?(?P<hours>\d+):(?P<minutes>\d\d):(?P<seconds>\d\d(?:\.\d+)?))?$"
)


def _to_interval(value: Any) -> Any:
    # IntervalStyle 'postgres', the default; months count as 30 days, as in psycopg.
    if not isinstance(value, str):
        return value
    match = _INTERVAL.match(value)
    if not match:
        return value
    parts = match.groupdict()
    days = int(parts["years"] or 0) * 365 + int(parts["months"] or 0) * 30 + int(parts["days"] or 0)
    microseconds = 0
    if parts["hours"] is not None:
        # Whole microseconds: a float of seconds loses them beyond ~2**53 µs.
        seconds = int(parts["hours"]) * 3600 + int(parts["minutes"]) * 60
        microseconds = seconds * 1_000_000 + int(decimal.Decimal(parts["seconds"]) * 1_000_000)
        if parts["sign"] == "-":
            microseconds = -microseconds
    return datetime.timedelta(days=days, microseconds=microseconds)


def _to_bytes(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if value.startswith("\\x"):
        return bytes.fromhex(value[2:])
    # bytea_output = 'escape' in the writing session.
    return value.encode("latin-1").decode("unicode_escape").encode("latin-1")


def _to_uuid(value: Any) -> Any:
    return uuid.UUID(value) if isinstance(value, str) else value


def _to_float(value: Any) -> Any:
    # JSON has no NaN or infinities: PostgreSQL writes them as "NaN", "Infinity".
    return float(value) if isinstance(value, (int, decimal.Decimal, str)) else value


def _to_decimal(value: Any) -> Any:
    if isinstance(value, int):
        return decimal.Decimal(value)
    if isinstance(value, str):  # 'NaN', 'Infinity'
        return decimal.Decimal(value)
    return value


def _array(element: Optional[Converter]) -> Converter:
    def convert(value: Any) -> Any:
        if isinstance(value, list):
            return [convert(v) for v in value]
        if value is None or element is None:
            return value
        return element(value)

    return convert


def converter_for(
    type_: sa.types.TypeEngine[Any], dialect: sa.engine.Dialect, *, unpickle: bool = False
) -> Optional[Converter]:
    """A function turning a JSON value of this column type into its Python value.

    ``None`` means the JSON value is already right (text, integers, booleans).

    :param unpickle: load ``PickleType`` values. Unpickling runs code chosen
        by whoever wrote the row, so without it they arrive as the pickled
        ``bytes``.
    """
    # Before TypeDecorator: sa.Interval is one, emulating the native INTERVAL
    # that PostgreSQL stores and SQLAlchemy loads as a timedelta.
    if isinstance(type_, (sa.Interval, postgresql.INTERVAL)):
        return _to_interval
    if isinstance(type_, sa.PickleType):
        # The one built-in decorator that loads in result_processor, not in
        # process_result_value: unpickle the stored bytes here, if trusted.
        if not unpickle:
            return _to_bytes
        loads = type_.pickler.loads
        return lambda value: loads(_to_bytes(value))
    if isinstance(type_, sa.types.TypeDecorator):
        inner = converter_for(type_.impl_instance, dialect, unpickle=unpickle)
        if type(type_).process_result_value is sa.types.TypeDecorator.process_result_value:
            # Only binds are decorated: values load as the impl's.
            return inner
        process = type_.process_result_value

        def decorated(value: Any) -> Any:
            return process(inner(value) if inner and value is not None else value, dialect)

        return decorated
    if isinstance(type_, sa.Enum):
        processor: Optional[Converter] = type_.result_processor(dialect, None)  # type: ignore[no-untyped-call]
        return processor
    if isinstance(type_, sa.ARRAY):
        return _array(converter_for(type_.item_type, dialect, unpickle=unpickle))
    if isinstance(type_, sa.JSON):
        return _json_floats
    if isinstance(type_, sa.DateTime):
        return _to_datetime
    if isinstance(type_, sa.Date):
        return _to_date
    if isinstance(type_, sa.Time):
        return _to_time
    if isinstance(type_, sa.LargeBinary):
        return _to_bytes
    if isinstance(type_, sa.Uuid):
        return _to_uuid if type_.as_uuid else None
    if isinstance(type_, sa.Float):
        return _to_float if not type_.asdecimal else _to_decimal
    if isinstance(type_, sa.Numeric):
        return _to_decimal if type_.asdecimal else _to_float
    return None


#: ``Column(..., info={UNPICKLE_INFO: True})`` trusts one column's pickles.
UNPICKLE_INFO = "pgevents_unpickle"


class RowDecoder:
    """Decodes stored rows of one table, with a converter per column.

    :param unpickle: load every ``PickleType`` column; without it, only
        columns whose ``info`` has ``"pgevents_unpickle": True``.
    """

    def __init__(self, table: Optional[sa.Table], dialect: sa.engine.Dialect, *, unpickle: bool = False) -> None:
        self.converters: dict[str, Converter] = {}
        if table is not None:
            for column in table.columns:
                trusted = unpickle or bool(column.info.get(UNPICKLE_INFO, False))
                convert = converter_for(column.type, dialect, unpickle=trusted)
                if convert is not None:
                    self.converters[column.name] = convert

    def decode(self, row: Optional[Row]) -> Optional[Row]:
        if row is None or not self.converters:
            return row
        for name, convert in self.converters.items():
            value = row.get(name)
            if value is not None:
                row[name] = convert(value)
        return row


def changed_columns(old: Optional[Mapping[str, Any]], new: Optional[Mapping[str, Any]]) -> FrozenSet[str]:
    """Names of the columns whose value differs between two versions of a row."""
    if not old or not new:
        return frozenset()
    return frozenset(k for k in new.keys() | old.keys() if not _same(old.get(k), new.get(k)))


def _same(old: Any, new: Any) -> bool:
    # NaN differs from itself, but a NaN left as it was is no change.
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(map(_same, old, new))
    return bool(old == new) or (old != old and new != new)


def changed_in_json(old: Optional[Row], new: Optional[Row]) -> FrozenSet[str]:
    """Names of the columns whose stored JSON differs, as the capture trigger sees it.

    Compared before decoding, by type and text: ``1`` and ``true``, or
    ``1.0`` and ``1.00``, are changes to the trigger (it compares JSON text)
    though equal once decoded.
    """
    if not old or not new:
        return frozenset()
    return frozenset(k for k in new.keys() | old.keys() if not _same_json(old.get(k), new.get(k)))


def _same_json(old: Any, new: Any) -> bool:
    if type(old) is not type(new):
        return False
    if isinstance(old, list):
        return len(old) == len(new) and all(map(_same_json, old, new))
    if isinstance(old, dict):
        return list(old) == list(new) and all(_same_json(old[k], new[k]) for k in old)
    if isinstance(old, decimal.Decimal):
        return str(old) == str(new)
    return bool(old == new)


_UNSET: Any = object()


def load_context(text: Optional[str]) -> Optional[Row]:
    """The writer's context from the stored setting: a JSON object.

    Any other value (a client's ``SET LOCAL pgevents.context = 'cron'``)
    arrives as ``{"value": <the text>}``, rather than failing the event:
    so does JSON nested too deep for Python's parser (``[[[...]]]``), which
    any writer may set.
    """
    if not text:
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return {"value": text}
    context: Row = value if isinstance(value, dict) else {"value": value}
    return context


class Event:
    """One committed row change, as handed to handlers; immutable.

    ``new`` and ``old`` are always dicts: ``old`` is empty for inserts and
    ``new`` for deletes, so that a handler indexes them without a ``None``
    check and type checkers agree (``event.old["email"]``).

    Example::

        @pgevents.listens_for(User, "after_update", columns=["email"])
        def email_changed(event: Event) -> None:
            print(event.old["email"], "->", event.new["email"], event.changed)
    """

    __slots__ = (
        "_target", "attempt", "backfill", "changed", "context", "id", "model", "new", "old", "op", "table",
        "timestamp", "txid",
    )

    id: int
    op: str
    table: str
    model: Optional[type]
    new: Row
    old: Row
    changed: FrozenSet[str]
    timestamp: datetime.datetime
    attempt: int
    #: Who made the change, as the writing transaction said: the Flask request's
    #: ``endpoint`` and ``request_id``, ``pgevents.context(**values)``, or a
    #: client's ``SET LOCAL pgevents.context``. Empty when it said nothing.
    context: Row
    #: The writing transaction's id (``pg_current_xact_id()``): the events of one
    #: transaction share it, and their ids give their order in it. ``None`` for
    #: events stored before 0.2.
    txid: Optional[int]
    #: ``True`` for a row emitted by ``flask pgevents backfill`` (its ``op`` is
    #: ``"insert"``), ``False`` for a captured change.
    backfill: bool
    _target: Any

    def __init__(
        self,
        *,
        id: int,
        op: str,
        table: str,
        model: Optional[type],
        new: Optional[Row],
        old: Optional[Row],
        timestamp: datetime.datetime,
        attempt: int,
        changed: Optional[FrozenSet[str]] = None,
        context: Optional[Row] = None,
        txid: Optional[int] = None,
        backfill: bool = False,
    ) -> None:
        set_ = object.__setattr__
        set_(self, "id", id)
        set_(self, "op", op)
        set_(self, "table", table)
        set_(self, "model", model)
        set_(self, "new", new if new is not None else {})
        set_(self, "old", old if old is not None else {})
        set_(self, "changed", changed if changed is not None else changed_columns(old, new))
        set_(self, "timestamp", timestamp)
        set_(self, "attempt", attempt)
        set_(self, "context", context if context is not None else {})
        set_(self, "txid", txid)
        set_(self, "backfill", backfill)
        set_(self, "_target", _UNSET)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Event is immutable; cannot set {name!r}.")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Event is immutable; cannot delete {name!r}.")

    @property
    def target(self) -> Any:
        """A transient instance of the model built from ``new`` (``old`` for deletes).

        Not attached to any session; ``None`` when no model maps the table,
        and for ``"truncate"``, which has no row.
        """
        if self._target is _UNSET:
            row = None if self.op == "truncate" else self.new or self.old
            object.__setattr__(self, "_target", build_instance(self.model, row))
        return self._target

    def __repr__(self) -> str:
        return f"<Event {self.id} {self.op} {self.table} attempt={self.attempt}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Event) and other.id == self.id and other.attempt == self.attempt

    def __hash__(self) -> int:
        return hash((self.id, self.attempt))


def build_instance(model: Optional[type], row: Optional[Mapping[str, Any]]) -> Any:
    """A transient instance of ``model`` with the row's values, or ``None``."""
    if model is None or row is None:
        return None
    mapper: sa.orm.Mapper[Any] = sa.inspect(model)
    instance = mapper.class_manager.new_instance()
    for prop in mapper.column_attrs:
        column = prop.columns[0]
        if isinstance(column, sa.Column) and column.name in row:
            setattr(instance, prop.key, row[column.name])
    return instance
