"""React to committed row changes in PostgreSQL tables inside a Flask app."""
from __future__ import annotations

from .errors import (
    AlreadyRegisteredError,
    CommandLineConfigurationError,
    ConfigurationError,
    DatabaseAccessError,
    DatabaseUnavailableError,
    DisabledError,
    HandlerFailedError,
    IdentifierTooLongError,
    InstallLockError,
    InvalidHandlerError,
    MigrationContextError,
    MissingTableError,
    PGEventsError,
    TriggerOwnershipError,
    UnknownColumnError,
    UnknownEventError,
    UnknownHandlerError,
    UnknownRoleError,
    UnmappedTargetError,
)
from .events import Event
from .extension import PGEvents

__version__ = "0.2.0"

__all__ = [
    "AlreadyRegisteredError",
    "CommandLineConfigurationError",
    "ConfigurationError",
    "DatabaseAccessError",
    "DatabaseUnavailableError",
    "DisabledError",
    "Event",
    "HandlerFailedError",
    "IdentifierTooLongError",
    "InstallLockError",
    "InvalidHandlerError",
    "MigrationContextError",
    "MissingTableError",
    "PGEvents",
    "PGEventsError",
    "TriggerOwnershipError",
    "UnknownColumnError",
    "UnknownEventError",
    "UnknownHandlerError",
    "UnknownRoleError",
    "UnmappedTargetError",
    "__version__",
]
