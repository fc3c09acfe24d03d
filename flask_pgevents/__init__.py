"""React to committed row changes in PostgreSQL tables inside a Flask app."""
from __future__ import annotations

from .errors import (
    AlreadyRegisteredError,
    ConfigurationError,
    PGEventsError,
    UnknownColumnError,
    UnknownEventError,
    UnmappedTargetError,
)
from .events import Event
from .extension import PGEvents

__version__ = "0.1.0"

__all__ = [
    "AlreadyRegisteredError",
    "ConfigurationError",
    "Event",
    "PGEvents",
    "PGEventsError",
    "UnknownColumnError",
    "UnknownEventError",
    "UnmappedTargetError",
    "__version__",
]
