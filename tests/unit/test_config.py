"""config.py: every PGEVENTS_* key's default, how values from the environment are
read, and the message each bad value gets."""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from conftest import raises

from flask_pgevents import ConfigurationError
from flask_pgevents.config import DEFAULTS, Config, check_schema_name, trigger_name
from flask_pgevents.registry import MAX_IDENTIFIER_BYTES, TRIGGER_KINDS

#: The attribute of Config that each key sets.
NUMBER_KEYS = {
    "PGEVENTS_BATCH_SIZE": "batch_size",
    "PGEVENTS_BATCH_BYTES": "batch_bytes",
    "PGEVENTS_POLL_INTERVAL": "poll_interval",
    "PGEVENTS_MAX_ATTEMPTS": "max_attempts",
    "PGEVENTS_RETRY_BACKOFF": "retry_backoff",
    "PGEVENTS_RETRY_BACKOFF_MAX": "retry_backoff_max",
    "PGEVENTS_RECONNECT_BACKOFF": "reconnect_backoff",
    "PGEVENTS_RECONNECT_BACKOFF_MAX": "reconnect_backoff_max",
    "PGEVENTS_RETENTION": "retention",
    "PGEVENTS_FAILED_RETENTION": "failed_retention",
    "PGEVENTS_STOP_TIMEOUT": "stop_timeout",
    "PGEVENTS_CONNECT_TIMEOUT": "connect_timeout",
    "PGEVENTS_STATEMENT_TIMEOUT": "statement_timeout",
}
INTEGER_KEYS = {"PGEVENTS_BATCH_SIZE", "PGEVENTS_BATCH_BYTES", "PGEVENTS_MAX_ATTEMPTS"}
FLAG_KEYS = {
    "PGEVENTS_AUTOSTART": "autostart", "PGEVENTS_UNPICKLE": "unpickle", "PGEVENTS_ENABLED": "enabled",
    "PGEVENTS_ATOMIC_HANDLERS": "atomic_handlers",
}


def config(**values: Any) -> Config:
    return Config.from_mapping(values)


# Defaults ------------------------------------------------------------------------


def test_every_key_has_its_documented_default():
    assert DEFAULTS == {
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
        "PGEVENTS_CAPTURE_ROLE": None,
        "PGEVENTS_UNPICKLE": False,
        "PGEVENTS_APP_NAME": None,
        "PGEVENTS_LOCK_TIMEOUT": 2.0,
        "PGEVENTS_REQUEST_CONTEXT": True,
        "PGEVENTS_CONNECT_TIMEOUT": 10.0,
        "PGEVENTS_STATEMENT_TIMEOUT": 60.0,
        "PGEVENTS_ATOMIC_HANDLERS": True,
    }


def test_an_empty_config_takes_every_default():
    assert Config.from_mapping({}) == Config(
        schema="pgevents",
        autostart=True,
        batch_size=500,
        batch_bytes=33554432,
        poll_interval=0.5,
        max_attempts=5,
        retry_backoff=1.0,
        retry_backoff_max=300.0,
        reconnect_backoff=0.1,
        reconnect_backoff_max=10.0,
        retention=0.0,
        failed_retention=0.0,
        stop_timeout=10.0,
        capture_role="pgevents_capture",
        unpickle=False,
    )


def test_a_config_with_every_default_set_explicitly_is_the_default_config():
    assert Config.from_mapping(DEFAULTS) == Config.from_mapping({})


def test_keys_of_other_extensions_are_ignored():
    assert Config.from_mapping({"SQLALCHEMY_DATABASE_URI": "sqlite://", "PGEVENTS_TYPO": 1}) == config()


def test_config_is_read_only():
    with pytest.raises(dataclasses.FrozenInstanceError):
        config().batch_size = 1  # type: ignore[misc]


# Numbers -------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(NUMBER_KEYS))
def test_numbers_are_read_from_strings(key):
    value = getattr(config(**{key: "20"}), NUMBER_KEYS[key])
    assert value == 20
    assert type(value) is (int if key in INTEGER_KEYS else float)


@pytest.mark.parametrize("key", sorted(NUMBER_KEYS.keys() - INTEGER_KEYS))
def test_fractions_are_read_from_strings_and_numbers(key):
    assert getattr(config(**{key: "2.5"}), NUMBER_KEYS[key]) == 2.5
    assert getattr(config(**{key: 3}), NUMBER_KEYS[key]) == 3.0


def test_whole_floats_are_accepted_as_integers():
    value = config(PGEVENTS_BATCH_SIZE=20.0).batch_size
    assert (value, type(value)) == (20, int)


@pytest.mark.parametrize("key", sorted(INTEGER_KEYS))
@pytest.mark.parametrize("value", ["lots", "2.5", "1e3", 2.5, True, None, [1]])
def test_integer_keys_refuse_what_is_not_an_integer(key, value):
    with raises(
        ConfigurationError,
        f"{key} must be an integer, got {value!r}. Remove it to use the default {DEFAULTS[key]!r}.",
    ):
        config(**{key: value})


@pytest.mark.parametrize("key", sorted(NUMBER_KEYS.keys() - INTEGER_KEYS))
@pytest.mark.parametrize("value", ["soon", "", False, None])
def test_number_keys_refuse_what_is_not_a_number(key, value):
    with raises(
        ConfigurationError,
        f"{key} must be a number, got {value!r}. Remove it to use the default {DEFAULTS[key]!r}.",
    ):
        config(**{key: value})


@pytest.mark.parametrize("key, minimum, too_small", [
    ("PGEVENTS_BATCH_SIZE", 1, 0),
    ("PGEVENTS_BATCH_BYTES", 1, -5),
    ("PGEVENTS_MAX_ATTEMPTS", 1, 0),
    ("PGEVENTS_POLL_INTERVAL", 0.01, 0.001),
    ("PGEVENTS_RETRY_BACKOFF", 0, -1.0),
    ("PGEVENTS_RETRY_BACKOFF_MAX", 0, -0.5),
    ("PGEVENTS_RECONNECT_BACKOFF", 0.001, 0.0),
    ("PGEVENTS_RECONNECT_BACKOFF_MAX", 0.001, 0.0001),
    ("PGEVENTS_RETENTION", 0, -60.0),
    ("PGEVENTS_FAILED_RETENTION", 0, -1.0),
    ("PGEVENTS_STOP_TIMEOUT", 0, -1.0),
    ("PGEVENTS_CONNECT_TIMEOUT", 0, -1.0),
    ("PGEVENTS_STATEMENT_TIMEOUT", 0, -0.5),
])
def test_numbers_below_their_minimum_are_refused(key, minimum, too_small):
    with raises(
        ConfigurationError,
        f"{key} must be at least {minimum}, got {too_small!r}. Remove it to use the default"
        f" {DEFAULTS[key]!r}.",
    ):
        config(**{key: too_small})
    assert getattr(config(**{key: minimum}), NUMBER_KEYS[key]) == minimum


def test_a_number_from_the_environment_is_checked_against_its_minimum_too():
    with raises(
        ConfigurationError,
        "PGEVENTS_BATCH_SIZE must be at least 1, got 0. Remove it to use the default 500.",
    ):
        config(PGEVENTS_BATCH_SIZE="0")


# Flags -------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(FLAG_KEYS))
@pytest.mark.parametrize("text, expected", [
    ("1", True), ("true", True), ("True", True), (" YES ", True), ("on", True),
    ("0", False), ("false", False), ("FALSE", False), ("no", False), ("off", False), ("", False),
])
def test_flags_are_read_from_environment_strings(key, text, expected):
    assert getattr(config(**{key: text}), FLAG_KEYS[key]) is expected


@pytest.mark.parametrize("key", sorted(FLAG_KEYS))
@pytest.mark.parametrize("value, expected", [(True, True), (False, False), (1, True), (0, False)])
def test_flags_set_in_python_are_taken_as_booleans(key, value, expected):
    assert getattr(config(**{key: value}), FLAG_KEYS[key]) is expected


@pytest.mark.parametrize("key", sorted(FLAG_KEYS.keys() - {"PGEVENTS_AUTOSTART"}))
@pytest.mark.parametrize("text", ["sometimes", "2", "y"])
def test_flags_refuse_other_strings(key, text):
    with raises(ConfigurationError, f"{key} must be true or false, got {text!r}. Use True or False."):
        config(**{key: text})


@pytest.mark.parametrize("text", ["always", "Always", " ALWAYS "])
def test_autostart_may_also_be_always(text):
    assert config(PGEVENTS_AUTOSTART=text).autostart == "always"


@pytest.mark.parametrize("text", ["sometimes", "2", "y", "never"])
def test_autostart_refuses_other_strings(text):
    with raises(
        ConfigurationError,
        f"PGEVENTS_AUTOSTART must be true, false or 'always', got {text!r}. Use True, False or 'always'.",
    ):
        config(PGEVENTS_AUTOSTART=text)


# The event schema's name --------------------------------------------------------------


def test_trigger_names_are_the_schema_then_the_kind():
    assert [trigger_name("pgevents", kind) for kind in TRIGGER_KINDS] == [
        "pgevents_insert", "pgevents_update", "pgevents_delete", "pgevents_truncate",
        "pgevents_broadcast_insert", "pgevents_broadcast_update", "pgevents_broadcast_delete",
    ]


@pytest.mark.parametrize("schema", ["", "pg$events", "pg\x00events", 42, None, b"pgevents"])
def test_a_schema_name_that_cannot_name_a_schema_is_refused(schema):
    message = (
        f"PGEVENTS_SCHEMA must be a non-empty schema name without '$', got {schema!r}."
        " Remove it to use the default 'pgevents'."
    )
    with raises(ConfigurationError, message):
        check_schema_name(schema)
    with raises(ConfigurationError, message):
        config(PGEVENTS_SCHEMA=schema)


@pytest.mark.parametrize("schema", [
    "e" * 47,
    # 24 characters, 47 bytes: multibyte characters count in bytes.
    "\u00e9" * 23 + "e",
])
def test_a_schema_name_too_long_for_its_trigger_names_is_refused(schema):
    with raises(
        ConfigurationError,
        f"PGEVENTS_SCHEMA {schema!r} is too long: trigger names are '<schema>_<operation>' and"
        " PostgreSQL cuts names at 63 bytes, so it must be at most 46 bytes. Set PGEVENTS_SCHEMA"
        " to a shorter name.",
    ):
        config(PGEVENTS_SCHEMA=schema)


@pytest.mark.parametrize("schema", ["e" * 46, "\u00e9" * 23, "My Events", 'pg"events', "pg\\events", "x"])
def test_schema_names_that_fit_are_kept_as_given(schema):
    assert check_schema_name(schema) == schema
    assert config(PGEVENTS_SCHEMA=schema).schema == schema


def test_the_longest_schema_name_gives_trigger_names_of_exactly_63_bytes():
    longest = "\u00e9" * 23
    lengths = [len(trigger_name(longest, kind).encode()) for kind in TRIGGER_KINDS]
    assert max(lengths) == MAX_IDENTIFIER_BYTES == 63
    assert len(trigger_name(longest, "broadcast_insert").encode()) == 63


def test_the_schema_is_checked_before_the_other_keys():
    with pytest.raises(ConfigurationError, match=r"^PGEVENTS_SCHEMA "):
        config(PGEVENTS_SCHEMA="", PGEVENTS_BATCH_SIZE="lots")


# The capture role --------------------------------------------------------------------


@pytest.mark.parametrize("schema, role", [
    ("pgevents", "pgevents_capture"),
    ("audit", "audit_capture"),
    ("e" * 46, "e" * 46 + "_capture"),
])
def test_the_capture_role_defaults_to_the_schema_name_and_capture(schema, role):
    assert config(PGEVENTS_SCHEMA=schema).capture_role == role
    assert config(PGEVENTS_SCHEMA=schema, PGEVENTS_CAPTURE_ROLE=None).capture_role == role


@pytest.mark.parametrize("role", ["events_writer", "x", "Mixed Case", "\u00e9" * 31 + "e"])
def test_a_capture_role_that_fits_is_kept_as_given(role):
    assert config(PGEVENTS_CAPTURE_ROLE=role).capture_role == role


@pytest.mark.parametrize("role", ["", "nul\x00", "\u00e9" * 32, "r" * 64, 42, False, "a$pgevents$b"])
def test_a_capture_role_that_cannot_name_a_role_is_refused(role):
    # '$' too: the role's name is written inside a dollar-quoted DO block.
    with raises(
        ConfigurationError,
        f"PGEVENTS_CAPTURE_ROLE must be a role name of 1 to 63 bytes without '$', got {role!r}."
        " Remove it to use '<PGEVENTS_SCHEMA>_capture'.",
    ):
        config(PGEVENTS_CAPTURE_ROLE=role)


@pytest.mark.parametrize("value", ["nan", "inf", float("nan"), float("inf"), "-inf"])
def test_a_number_that_is_not_finite_is_refused(value):
    with raises(
        ConfigurationError,
        f"PGEVENTS_POLL_INTERVAL must be a finite number, got {float(value)!r}. Remove it to use"
        " the default 0.5.",
    ):
        config(PGEVENTS_POLL_INTERVAL=value)


def test_every_key_is_documented_in_the_readme_and_in_init_app():
    from pathlib import Path

    from flask_pgevents import PGEvents

    readme = (Path(__file__).resolve().parents[2] / "README.rst").read_text(encoding="utf-8")
    for key in DEFAULTS:
        assert f"``{key}``" in readme, key
        assert key in (PGEvents.init_app.__doc__ or ""), key
