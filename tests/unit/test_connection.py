"""connection.py: which database URIs are accepted, SQLSTATEs of either driver's errors,
and which failures are permanent, worded the same for both drivers."""
from __future__ import annotations

import psycopg
import psycopg2
import pytest
from conftest import raises
from sqlalchemy.engine import make_url

from flask_pgevents import ConfigurationError
from flask_pgevents.connection import (
    CONNECTION_ERRORS,
    PERMANENT_FAILURES,
    as_sentence,
    classify,
    connect_error,
    driver_name,
    error_reason,
    parse_database_url,
    sqlstate,
)
from flask_pgevents.errors import DatabaseAccessError, DatabaseUnavailableError, PGEventsError


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
     "SQLALCHEMY_DATABASE_URI is not a valid database URI. Use for example"
     " 'postgresql://user:password@localhost/dbname'."),
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


# Failures: what they mean for retrying, and how they read --------------------------

URL = make_url("postgresql+psycopg://app:s3cret-pw@db.example:5432/shop")
SHOWN = "postgresql+psycopg://app:***@db.example:5432/shop"
ATTEMPT = 'connection to server at "10.0.0.5", port 5432 failed: '


def failed_connect(driver_error: type[BaseException], message: str) -> BaseException:
    """A failed connection attempt as the driver reports it: text, no SQLSTATE."""
    prefix = "connection failed: " if driver_error is psycopg.OperationalError else ""
    return driver_error(prefix + ATTEMPT + message)


DRIVER_ERRORS = [psycopg.OperationalError, psycopg2.OperationalError]


@pytest.mark.parametrize("driver_error", DRIVER_ERRORS)
@pytest.mark.parametrize("message, failure", [
    ('FATAL:  password authentication failed for user "app"', "authentication"),
    ('FATAL:  role "app" does not exist', "authentication"),
    ('FATAL:  role "app" is not permitted to log in', "authentication"),
    ('FATAL:  no pg_hba.conf entry for host "10.0.0.7", user "app", database "shop", no encryption',
     "authentication"),
    ("fe_sendauth: no password supplied", "authentication"),
    ('FATAL:  database "shop" does not exist', "missing-database"),
    ('FATAL:  permission denied for database "shop"\nDETAIL:  User does not have CONNECT privilege.',
     "privilege"),
    ("Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?",
     "unavailable"),
    ("timeout expired", "unavailable"),
    ("FATAL:  the database system is starting up", "unavailable"),
    ("FATAL:  sorry, too many clients already", "unavailable"),
    ("server closed the connection unexpectedly", "unavailable"),
])
def test_failed_connection_attempts_are_told_apart_by_the_servers_message(driver_error, message, failure):
    assert classify(failed_connect(driver_error, message)) == failure
    assert (failure in PERMANENT_FAILURES) == (failure != "unavailable")


@pytest.mark.parametrize("error, failure", [
    (psycopg.errors.InvalidPassword(), "authentication"),
    (psycopg.errors.InvalidAuthorizationSpecification(), "authentication"),
    (psycopg.errors.InvalidCatalogName(), "missing-database"),
    (psycopg.errors.InsufficientPrivilege(), "privilege"),
    (psycopg.errors.AdminShutdown(), "unavailable"),
    (psycopg.errors.CannotConnectNow(), "unavailable"),
    (psycopg.errors.TooManyConnections(), "unavailable"),
    (psycopg.errors.UndefinedTable(), None),
    (psycopg.errors.UniqueViolation(), None),
    (ValueError('database "shop" does not exist'), None),
    (ConnectionResetError(), "unavailable"),
])
def test_errors_with_a_sqlstate_are_told_apart_by_it(error, failure):
    assert classify(error) == failure


@pytest.mark.parametrize("driver_error", DRIVER_ERRORS)
@pytest.mark.parametrize("message, error_class, text", [
    ('FATAL:  password authentication failed for user "app"', DatabaseAccessError,
     f'Authentication failed for the database {SHOWN}: password authentication failed for user "app".'
     " Check the user name and password in the database URI, and the server's pg_hba.conf."),
    ('FATAL:  database "shop" does not exist', DatabaseAccessError,
     f"The database {SHOWN} does not exist. Create it, or correct the database name in the URI."),
    ('FATAL:  permission denied for database "shop"\nDETAIL:  User does not have CONNECT privilege.',
     DatabaseAccessError,
     f"The role 'app' may not connect to the database {SHOWN}: permission denied for database \"shop\"."
     " Grant it CONNECT on the database."),
    ("timeout expired", DatabaseUnavailableError,
     f"Could not connect to the database {SHOWN}: no answer within 3 s (PGEVENTS_CONNECT_TIMEOUT)."),
    ("Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?",
     DatabaseUnavailableError,
     f'Could not connect to the database {SHOWN}: connection to server at "10.0.0.5", port 5432 failed:'
     " Connection refused Is the server running on that host and accepting TCP/IP connections?"),
    ("FATAL:  the database system is shutting down", DatabaseUnavailableError,
     f"Could not connect to the database {SHOWN}: the database system is shutting down."),
])
def test_a_failed_connection_attempt_reads_the_same_with_either_driver(driver_error, message, error_class, text):
    error = connect_error(failed_connect(driver_error, message), URL, connect_timeout=3)
    assert type(error) is error_class
    assert str(error) == text
    assert "s3cret-pw" not in str(error)


def test_psycopgs_own_connect_timeout_names_the_config_key_too():
    error = connect_error(psycopg.errors.ConnectionTimeout("connection timeout expired"), URL, connect_timeout=2)
    assert str(error) == f"Could not connect to the database {SHOWN}: no answer within 2 s (PGEVENTS_CONNECT_TIMEOUT)."


def test_both_kinds_of_failure_are_pgevents_errors_refining_builtins():
    assert issubclass(DatabaseAccessError, PGEventsError) and issubclass(DatabaseAccessError, PermissionError)
    assert issubclass(DatabaseUnavailableError, PGEventsError) and issubclass(DatabaseUnavailableError, ConnectionError)


def test_a_reason_is_one_line():
    error = psycopg2.OperationalError("server closed the connection unexpectedly\n\tThis probably means...\n")
    assert error_reason(error) == "server closed the connection unexpectedly This probably means..."
    assert error_reason(psycopg.OperationalError("")) == "OperationalError"
    assert as_sentence("refused") == "refused."
    assert as_sentence("accepting connections?") == "accepting connections?"
