"""The ``PGEVENTS_*`` configuration keys: defaults, parsing and validation."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping, Optional, Union

from .errors import ConfigurationError
from .registry import MAX_IDENTIFIER_BYTES, TRIGGER_KINDS

#: ``PGEVENTS_AUTOSTART``: ``True`` (serving processes), ``False`` (never) or ``"always"``.
Autostart = Union[bool, Literal["always"]]

#: Every configuration key with its default; the README describes each.
DEFAULTS: dict[str, Any] = {
    "PGEVENTS_ENABLED": True,
    "PGEVENTS_DATABASE_URI": None,
    "PGEVENTS_SCHEMA": "pgevents",
    "PGEVENTS_AUTOSTART": True,
    "PGEVENTS_BATCH_SIZE": 500,
    "PGEVENTS_BATCH_BYTES": 32 * 1024 * 1024,
    "PGEVENTS_POLL_INTERVAL": 0.5,
    "PGEVENTS_MAX_ATTEMPTS": 5,
    "PGEVENTS_RETRY_BACKOFF": 1.0,
    "PGEVENTS_RETRY_BACKOFF_MAX": 300.0,
    "PGEVENTS_RECONNECT_BACKOFF": 0.1,
    "PGEVENTS_RECONNECT_BACKOFF_MAX": 10.0,
    "PGEVENTS_RETENTION": 0.0,
    "PGEVENTS_FAILED_RETENTION": 0.0,
    "PGEVENTS_STOP_TIMEOUT": 10.0,
    "PGEVENTS_CONNECT_TIMEOUT": 10.0,
    "PGEVENTS_STATEMENT_TIMEOUT": 60.0,
    "PGEVENTS_ATOMIC_HANDLERS": True,
    "PGEVENTS_CAPTURE_ROLE": None,
    "PGEVENTS_UNPICKLE": False,
    "PGEVENTS_APP_NAME": None,
    "PGEVENTS_LOCK_TIMEOUT": 2.0,
    "PGEVENTS_REQUEST_CONTEXT": True,
}


def trigger_name(schema: str, kind: str) -> str:
    """A capture trigger's name: one per kind per table, named after the schema."""
    return f"{schema}_{kind}"


#: The longest suffix a trigger name adds to the schema's name.
_TRIGGER_SUFFIX_BYTES = max(len(trigger_name("", kind)) for kind in TRIGGER_KINDS)


def check_schema_name(schema: Any) -> str:
    """Return ``schema`` if it can name the event schema, or explain why not.

    :raises ConfigurationError: for an empty name, one with ``$`` or NUL, or
        one so long that PostgreSQL would cut the trigger names made from it.
    """
    if not isinstance(schema, str) or not schema or "$" in schema or "\x00" in schema:
        raise ConfigurationError(
            f"PGEVENTS_SCHEMA must be a non-empty schema name without '$', got"
            f" {schema!r}. Remove it to use the default 'pgevents'."
        )
    if len(schema.encode()) + _TRIGGER_SUFFIX_BYTES > MAX_IDENTIFIER_BYTES:
        raise ConfigurationError(
            f"PGEVENTS_SCHEMA {schema!r} is too long: trigger names are"
            f" '<schema>_<operation>' and PostgreSQL cuts names at {MAX_IDENTIFIER_BYTES}"
            f" bytes, so it must be at most {MAX_IDENTIFIER_BYTES - _TRIGGER_SUFFIX_BYTES}"
            " bytes. Set PGEVENTS_SCHEMA to a shorter name."
        )
    return schema


@dataclasses.dataclass(frozen=True)
class Config:
    """The ``PGEVENTS_*`` settings of one app, read once by ``init_app``."""

    schema: str
    autostart: Autostart
    batch_size: int
    batch_bytes: int
    poll_interval: float
    max_attempts: int
    retry_backoff: float
    retry_backoff_max: float
    reconnect_backoff: float
    reconnect_backoff_max: float
    retention: float
    failed_retention: float
    stop_timeout: float
    #: The NOLOGIN role that owns the capture functions.
    capture_role: str
    unpickle: bool
    #: The name install writes on this app's triggers (default: the app's name).
    app_name: Optional[str] = None
    #: Seconds install and uninstall wait for each table's lock per attempt.
    lock_timeout: float = 2.0
    #: Transactions begun in a Flask request carry its endpoint and request id.
    request_context: bool = True
    #: False: the extension is inert (no database is read, opened or listened to).
    enabled: bool = True
    #: Seconds to wait for the server's answer when connecting; 0: no limit.
    connect_timeout: float = 10.0
    #: Seconds the server lets a statement of the CLI and admin operations run; 0: no limit.
    statement_timeout: float = 60.0
    #: Handlers' db.session work commits with the claim of their event.
    atomic_handlers: bool = True

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> Config:
        """Read and check every key; missing keys take their defaults.

        :raises ConfigurationError: naming the first bad key and the fix.
        """
        reader = _Reader(config)
        schema = check_schema_name(reader.get("PGEVENTS_SCHEMA"))
        return cls(
            schema=schema,
            autostart=reader.autostart("PGEVENTS_AUTOSTART"),
            batch_size=reader.number("PGEVENTS_BATCH_SIZE", int, 1),
            batch_bytes=reader.number("PGEVENTS_BATCH_BYTES", int, 1),
            poll_interval=reader.number("PGEVENTS_POLL_INTERVAL", float, 0.01),
            max_attempts=reader.number("PGEVENTS_MAX_ATTEMPTS", int, 1),
            retry_backoff=reader.number("PGEVENTS_RETRY_BACKOFF", float, 0),
            retry_backoff_max=reader.number("PGEVENTS_RETRY_BACKOFF_MAX", float, 0),
            reconnect_backoff=reader.number("PGEVENTS_RECONNECT_BACKOFF", float, 0.001),
            reconnect_backoff_max=reader.number("PGEVENTS_RECONNECT_BACKOFF_MAX", float, 0.001),
            retention=reader.number("PGEVENTS_RETENTION", float, 0),
            failed_retention=reader.number("PGEVENTS_FAILED_RETENTION", float, 0),
            stop_timeout=reader.number("PGEVENTS_STOP_TIMEOUT", float, 0),
            capture_role=reader.role_name("PGEVENTS_CAPTURE_ROLE") or f"{schema}_capture",
            unpickle=reader.flag("PGEVENTS_UNPICKLE"),
            app_name=reader.app_name("PGEVENTS_APP_NAME"),
            lock_timeout=reader.number("PGEVENTS_LOCK_TIMEOUT", float, 0.001),
            request_context=reader.flag("PGEVENTS_REQUEST_CONTEXT"),
            enabled=reader.flag("PGEVENTS_ENABLED"),
            connect_timeout=reader.number("PGEVENTS_CONNECT_TIMEOUT", float, 0),
            statement_timeout=reader.number("PGEVENTS_STATEMENT_TIMEOUT", float, 0),
            atomic_handlers=reader.flag("PGEVENTS_ATOMIC_HANDLERS"),
        )


class _Reader:
    """Reads one key at a time, with the message each kind of bad value gets."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config

    def get(self, key: str) -> Any:
        return self.config.get(key, DEFAULTS[key])

    def number(self, key: str, kind: type, minimum: float) -> Any:
        value = self.get(key)
        noun = "an integer" if kind is int else "a number"
        bad = isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer())
        if not bad:
            try:
                value = kind(value)
            except (TypeError, ValueError):
                bad = True
        if bad:
            raise ConfigurationError(
                f"{key} must be {noun}, got {value!r}. Remove it to use the default {DEFAULTS[key]!r}."
            )
        if not math.isfinite(value):
            raise ConfigurationError(
                f"{key} must be a finite number, got {value!r}. Remove it to use the default {DEFAULTS[key]!r}."
            )
        if value < minimum:
            raise ConfigurationError(
                f"{key} must be at least {minimum}, got {value!r}. Remove it to use the"
                f" default {DEFAULTS[key]!r}."
            )
        return value

    def flag(self, key: str) -> bool:
        value = self.get(key)
        if isinstance(value, str):  # from the environment
            if value.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if value.strip().lower() in ("0", "false", "no", "off", ""):
                return False
            raise ConfigurationError(f"{key} must be true or false, got {value!r}. Use True or False.")
        return bool(value)

    def autostart(self, key: str) -> Autostart:
        value = self.get(key)
        if isinstance(value, str) and value.strip().lower() == "always":
            return "always"
        try:
            return self.flag(key)
        except ConfigurationError:
            raise ConfigurationError(
                f"{key} must be true, false or 'always', got {value!r}. Use True, False or 'always'."
            ) from None

    def app_name(self, key: str) -> Optional[str]:
        value = self.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigurationError(
                f"{key} must be a non-empty string, got {value!r}. Remove it to use the app's name."
            )
        return value

    def role_name(self, key: str) -> Optional[str]:
        value = self.get(key)
        if value is not None and (
            not isinstance(value, str) or not value or "\x00" in value or "$" in value
            or len(value.encode()) > MAX_IDENTIFIER_BYTES
        ):
            raise ConfigurationError(
                f"{key} must be a role name of 1 to {MAX_IDENTIFIER_BYTES} bytes without '$',"
                f" got {value!r}. Remove it to use '<PGEVENTS_SCHEMA>_capture'."
            )
        return value
