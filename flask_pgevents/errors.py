"""Exceptions raised by flask_pgevents, each refining a builtin."""
from __future__ import annotations

import click


class PGEventsError(Exception):
    """Base class of every error raised by flask_pgevents."""


class UnknownEventError(PGEventsError, ValueError):
    """An event name other than after_insert, after_update or after_delete."""


class UnmappedTargetError(PGEventsError, TypeError):
    """A target that is neither a mapped class, a Table, nor a table name."""


class IdentifierTooLongError(PGEventsError, ValueError):
    """A table or schema name that PostgreSQL would cut at 63 bytes."""


class UnknownColumnError(PGEventsError, ValueError):
    """``columns=`` names a column the table does not have, or is misused."""


class InvalidFilterError(PGEventsError, ValueError):
    """A ``where=`` filter the capture SQL cannot evaluate: another table's
    columns, a subquery, an unbound parameter, or a misuse."""


class InvalidHandlerError(PGEventsError, TypeError):
    """A handler that cannot be called."""


class UnknownHandlerError(PGEventsError, ValueError):
    """``remove`` was given a handler that is not registered for that event."""


class ConfigurationError(PGEventsError, RuntimeError):
    """The app's configuration cannot work: no database, not PostgreSQL, ..."""


class CommandLineConfigurationError(ConfigurationError, click.ClickException):
    """A :class:`ConfigurationError` met while the ``flask`` command loads the app.

    Click reports it as one line (``Error: ...``, exit status 1) instead of a
    traceback; code that catches ``ConfigurationError`` still catches it.
    """

    def __init__(self, message: str) -> None:
        ConfigurationError.__init__(self, message)
        click.ClickException.__init__(self, message)


class DisabledError(PGEventsError, RuntimeError):
    """An operation that needs the database on an app with ``PGEVENTS_ENABLED = False``."""


class AlreadyRegisteredError(PGEventsError, RuntimeError):
    """``init_app`` was called twice for the same app."""


class MissingTableError(PGEventsError, LookupError):
    """A handler's table does not exist when triggers are installed."""


class UnknownRoleError(PGEventsError, LookupError):
    """``grant-listener`` was given a role that does not exist."""


class TriggerOwnershipError(PGEventsError, RuntimeError):
    """A trigger this app needs was installed in its event schema for another app."""


class InstallLockError(PGEventsError, TimeoutError):
    """Install or uninstall could not lock a table within ``PGEVENTS_LOCK_TIMEOUT``."""


class DatabaseUnavailableError(PGEventsError, ConnectionError):
    """Could not connect to the database: refused, unreachable, no answer in
    time, or the server is starting or stopping. Trying again may work."""


class DatabaseAccessError(PGEventsError, PermissionError):
    """The server answered and refused: authentication failed, the database
    does not exist, or the role lacks a privilege. Trying again will not work
    until the configuration or the grants change."""


class MigrationContextError(PGEventsError, RuntimeError):
    """A migration operation of flask-pgevents was run where it cannot work:
    offline (``--sql``), outside the Flask app's context, or on a database or
    driver other than PostgreSQL with psycopg or psycopg2."""


class HandlerFailedError(PGEventsError, AssertionError):
    """A handler raised while the pytest plugin's ``drain()`` ran it."""


class MissingAuthorizationError(PGEventsError, TypeError):
    """The dashboard blueprint was made without an ``authorize`` callback."""
