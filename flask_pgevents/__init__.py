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
    InvalidFilterError,
    InvalidHandlerError,
    MigrationContextError,
    MissingAuthorizationError,
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
from .signals import (
    event_failed,
    event_gave_up,
    event_handled,
    listener_connection_lost,
    listener_reconnected,
    listener_started,
    listener_stopped,
)
from .stats import Readiness, Stats

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
    "InvalidFilterError",
    "InvalidHandlerError",
    "MigrationContextError",
    "MissingAuthorizationError",
    "MissingTableError",
    "PGEvents",
    "PGEventsError",
    "Readiness",
    "Stats",
    "TriggerOwnershipError",
    "UnknownColumnError",
    "UnknownEventError",
    "UnknownHandlerError",
    "UnknownRoleError",
    "UnmappedTargetError",
    "__version__",
    "event_failed",
    "event_gave_up",
    "event_handled",
    "listener_connection_lost",
    "listener_reconnected",
    "listener_started",
    "listener_stopped",
]
