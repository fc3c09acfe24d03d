"""React to committed row changes in PostgreSQL tables inside a Flask app."""
from __future__ import annotations

from .errors import (
    AlreadyRegisteredError,
    ConfigurationError,
    IdentifierTooLongError,
    InvalidHandlerError,
    MissingTableError,
    PGEventsError,
    UnknownColumnError,
    UnknownEventError,
    UnknownHandlerError,
    UnknownRoleError,
    UnmappedTargetError,
)
from .events import Event
from .extension import PGEvents

__version__ = "0.1.0"

__all__ = [
    "AlreadyRegisteredError",
    "ConfigurationError",
    "Event",
    "IdentifierTooLongError",
    "InvalidHandlerError",
    "MissingTableError",
    "PGEvents",
    "PGEventsError",
    "UnknownColumnError",
    "UnknownEventError",
    "UnknownHandlerError",
    "UnknownRoleError",
    "UnmappedTargetError",
    "__version__",
]
