"""connection.py: which database URIs are accepted, and SQLSTATEs of either driver's errors."""
from __future__ import annotations

import psycopg
import psycopg2
import pytest
from conftest import raises
from sqlalchemy.engine import make_url

from flask_pgevents import ConfigurationError
from flask_pgevents.connection import CONNECTION_ERRORS, driver_name, parse_database_url, sqlstate


@pytest.mark.parametrize("uri, driver", [
    ("postgresql+psycopg2://u:pw@h:5433/db", "psycopg2"),
    ("postgresql+psycopg://u@h/db?sslmode=require", "psycopg"),
])
def test_postgresql_uris_with_either_driver_are_accepted(uri, driver):
    url = parse_database_url(uri, "PGEVENTS_DATABASE_URI")
    assert url == make_url(uri)
    assert driver_name(url) == driver


def test_a_uri_without_a_driver_uses_sqlalchemys_default_postgresql_driver():
    url = parse_database_url("postgresql://u@h/db", "PGEVENTS_DATABASE_URI")
    assert driver_name(url) == url.get_dialect().driver
    assert driver_name(url) in ("psycopg", "psycopg2")


def test_a_url_object_is_accepted_too():
    url = make_url("postgresql+psycopg://u@h/db")
    assert parse_database_url(url, "SQLALCHEMY_DATABASE_URI") == url


@pytest.mark.parametrize("uri, message", [
    ("postgres://u@h/db",
     "SQLALCHEMY_DATABASE_URI starts with 'postgres://', which SQLAlchemy does not accept. Write"
     " 'postgresql://' instead."),
    ("sqlite:///app.db",
     "flask-pgevents needs PostgreSQL, but SQLALCHEMY_DATABASE_URI is a 'sqlite' URI (sqlite:///app.db)."
     " Set it to a 'postgresql://' URI."),
    ("mysql://u:hidden@h/db",
     "flask-pgevents needs PostgreSQL, but SQLALCHEMY_DATABASE_URI is a 'mysql' URI (mysql://u:***@h/db)."
     " Set it to a 'postgresql://' URI."),
    ("postgresql+pg8000://u:hidden@h/db",
     "flask-pgevents supports the psycopg and psycopg2 drivers, but SQLALCHEMY_DATABASE_URI uses 'pg8000'"
     " (postgresql+pg8000://u:***@h/db). Use 'postgresql+psycopg://' or 'postgresql+psycopg2://'."),
    ("not a uri",
     "SQLALCHEMY_DATABASE_URI is not a valid database URI: Could not parse SQLAlchemy URL from given URL"
     " string. Use for example 'postgresql://user:password@localhost/dbname'."),
])
def test_other_uris_are_refused_naming_the_key_without_the_password(uri, message):
    with raises(ConfigurationError, message):
        parse_database_url(uri, "SQLALCHEMY_DATABASE_URI")


def test_sqlstate_reads_either_drivers_code():
    class WithSqlstate(Exception):
        sqlstate = "42501"

    class WithPgcode(Exception):
        pgcode = "42P01"

    assert sqlstate(WithSqlstate()) == "42501"
    assert sqlstate(WithPgcode()) == "42P01"
    assert sqlstate(psycopg.errors.InsufficientPrivilege()) == "42501"
    assert sqlstate(ValueError("no code")) is None
    assert sqlstate(psycopg2.OperationalError()) is None


def test_connection_errors_of_both_drivers_are_known():
    for error in (psycopg.OperationalError, psycopg.InterfaceError, psycopg2.OperationalError,
                  psycopg2.InterfaceError, ConnectionRefusedError):
        assert issubclass(error, CONNECTION_ERRORS)
    assert not issubclass(psycopg.errors.InsufficientPrivilege, CONNECTION_ERRORS)
