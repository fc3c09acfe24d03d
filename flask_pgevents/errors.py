"""Exceptions raised by flask_pgevents, each refining a builtin."""
from __future__ import annotations


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


class InvalidHandlerError(PGEventsError, TypeError):
    """A handler that cannot be called."""


class UnknownHandlerError(PGEventsError, ValueError):
    """``remove`` was given a handler that is not registered for that event."""


class ConfigurationError(PGEventsError, RuntimeError):
    """The app's configuration cannot work: no database, not PostgreSQL, ..."""


class AlreadyRegisteredError(PGEventsError, RuntimeError):
    """``init_app`` was called twice for the same app."""


class MissingTableError(PGEventsError, LookupError):
    """A handler's table does not exist when triggers are installed."""


class UnknownRoleError(PGEventsError, LookupError):
    """``grant-listener`` was given a role that does not exist."""
