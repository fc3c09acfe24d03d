"""Raw connections with either PostgreSQL driver, and waiting for wake-ups.

The listener keeps one long-lived connection outside SQLAlchemy's pool: it
LISTENs, claims events and must never be handed to application code.
"""
from __future__ import annotations

import contextlib
import math
import re
import select
from typing import Any, Literal, Optional

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

from .errors import ConfigurationError, DatabaseAccessError, DatabaseUnavailableError, PGEventsError
from .sql import render

#: libpq keepalive settings: a half-open connection is noticed in about 15 s,
#: and so is data the peer's host never acknowledges (a dead host or network).
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 5,
    "tcp_user_timeout": 15_000,
}


def _driver_errors(*names: str) -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = []
    try:
        import psycopg

        errors += [getattr(psycopg, name) for name in names]
    except ImportError:  # pragma: no cover - psycopg 3 is an optional extra
        pass
    import psycopg2  # type: ignore[import-untyped,unused-ignore]

    errors += [getattr(psycopg2, name) for name in names]
    return tuple(errors)


#: Exceptions that mean the connection is gone, for both drivers.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (OSError, *_driver_errors("OperationalError", "InterfaceError"))
#: Every error either driver raises for a statement or a connection.
DATABASE_ERRORS = _driver_errors("Error")


def sqlstate(exc: BaseException) -> Optional[str]:
    """The SQLSTATE of a psycopg or psycopg2 error, if it has one."""
    code = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    return code if isinstance(code, str) else None


#: What a database error means for trying again: the first three are
#: permanent (only a change of configuration or grants fixes them),
#: ``"unavailable"`` is transient (network, timeout, server restarting).
Failure = Literal["authentication", "missing-database", "privilege", "unavailable"]
PERMANENT_FAILURES: frozenset[Failure] = frozenset({"authentication", "missing-database", "privilege"})

_FAILURES_BY_SQLSTATE: dict[str, Failure] = {
    "28000": "authentication",  # invalid_authorization_specification: no such role, no pg_hba.conf entry
    "28P01": "authentication",  # invalid_password
    "3D000": "missing-database",  # invalid_catalog_name
    "42501": "privilege",  # insufficient_privilege
}
#: SQLSTATE classes and codes of failures that trying again may fix.
_TRANSIENT_SQLSTATES = ("08", "53", "57P")

# libpq gives no SQLSTATE for a failed connection attempt, only the server's
# message (in the server's language: English unless lc_messages says
# otherwise; anything unrecognised counts as transient).
_FAILURES_BY_MESSAGE: list[tuple[re.Pattern[str], Failure]] = [
    (re.compile(
        r"authentication failed|no password supplied|no pg_hba\.conf entry|pg_hba\.conf rejects"
        r'|role ".*" does not exist|is not permitted to log in'
    ), "authentication"),
    (re.compile(r'database ".*" does not exist'), "missing-database"),
    (re.compile(r"permission denied for database"), "privilege"),
]


def classify(exc: BaseException) -> Optional[Failure]:
    """What a driver's error means for trying again, or ``None`` if it is no
    connection or privilege failure (a bug, a constraint, a handler's error).

    Example::

        if classify(exc) in PERMANENT_FAILURES:
            ...  # fails fast: retrying will not help
    """
    code = sqlstate(exc)
    if code is not None:
        if code in _FAILURES_BY_SQLSTATE:
            return _FAILURES_BY_SQLSTATE[code]
        return "unavailable" if code.startswith(_TRANSIENT_SQLSTATES) else None
    if not isinstance(exc, CONNECTION_ERRORS):
        return None
    message = str(exc)
    for pattern, failure in _FAILURES_BY_MESSAGE:
        if pattern.search(message):
            return failure
    return "unavailable"


def error_reason(exc: BaseException) -> str:
    """The server's or the driver's reason for an error, on one line.

    For a query error, the server's primary message (without the query
    excerpt); for a failed connection attempt, the server's message without
    what the drivers put before it (``connection to server at ... FATAL:``).
    """
    primary = getattr(getattr(exc, "diag", None), "message_primary", None)
    if isinstance(primary, str) and primary:
        return primary
    text = str(exc)
    if "FATAL:" in text:
        text = re.split(r"\n(?:DETAIL|HINT):", text.rsplit("FATAL:", 1)[1])[0]
    text = " ".join(text.split())
    return text.removeprefix("connection failed: ") or type(exc).__name__


def connect_error(exc: BaseException, url: URL, connect_timeout: Optional[float] = None) -> PGEventsError:
    """The error to raise for a failed connection attempt: a sentence naming
    the database (password hidden), what went wrong and, if it can, the fix.

    :param connect_timeout: the timeout flask-pgevents set, named in the
        message when the server did not answer in time.
    :returns: a :class:`DatabaseAccessError` for a permanent failure, else a
        :class:`DatabaseUnavailableError`.
    """
    shown = url.render_as_string(hide_password=True)
    reason = error_reason(exc)
    failure = classify(exc)
    if failure == "authentication":
        return DatabaseAccessError(
            f"Authentication failed for the database {shown}: {reason}. Check the user name and"
            " password in the database URI, and the server's pg_hba.conf."
        )
    if failure == "missing-database":
        return DatabaseAccessError(
            f"The database {shown} does not exist. Create it, or correct the database name in the URI."
        )
    if failure == "privilege":
        return DatabaseAccessError(
            f"The role {url.username!r} may not connect to the database {shown}: {reason}."
            " Grant it CONNECT on the database."
        )
    if connect_timeout and "timeout expired" in reason:
        reason = f"no answer within {connect_timeout:g} s (PGEVENTS_CONNECT_TIMEOUT)"
    return DatabaseUnavailableError(f"Could not connect to the database {shown}: {as_sentence(reason)}")


def as_sentence(text: str) -> str:
    """``text`` ending with a full stop, unless it ends a sentence already."""
    return text if text.endswith((".", "?", "!")) else f"{text}."



def parse_database_url(uri: str | URL, source: str) -> URL:
    """Parse and check a database URI; only PostgreSQL is accepted.

    :param source: the config key the URI came from, named in errors.
    """
    try:
        url = make_url(uri)
    except sa.exc.ArgumentError:
        # Not SQLAlchemy's message: older releases quote the string, password included.
        raise ConfigurationError(
            f"{source} is not a valid database URI. Use for example"
            " 'postgresql://user:password@localhost/dbname'."
        ) from None
    if url.drivername == "postgres":
        raise ConfigurationError(
            f"{source} starts with 'postgres://', which SQLAlchemy does not accept."
            " Write 'postgresql://' instead."
        )
    if url.get_backend_name() != "postgresql":
        raise ConfigurationError(
            f"flask-pgevents needs PostgreSQL, but {source} is a"
            f" {url.get_backend_name()!r} URI ({url.render_as_string(hide_password=True)})."
            " Set it to a 'postgresql://' URI."
        )
    driver_name(url, source)
    return url


def driver_name(url: URL, source: str = "The database URI") -> str:
    """``"psycopg"`` or ``"psycopg2"``: the driver SQLAlchemy would use for the URL."""
    driver = url.get_dialect().driver
    if driver not in ("psycopg", "psycopg2"):
        raise ConfigurationError(
            f"flask-pgevents supports the psycopg and psycopg2 drivers, but {source} uses"
            f" {driver!r} ({url.render_as_string(hide_password=True)}). Use"
            " 'postgresql+psycopg://' or 'postgresql+psycopg2://'."
        )
    return driver


class Connection:
    """A DB-API connection in autocommit mode with explicit transactions.

    :param url: a SQLAlchemy URL; its driver picks psycopg or psycopg2.
    :param keepalives: notice a dead peer or network within about 15 s.
    :param connect_timeout: seconds to wait for the server when connecting
        (whole seconds, at least 2: libpq's rule); 0 leaves the driver's
        default. A ``connect_timeout`` in the URL wins.
    :param statement_timeout: seconds after which the server cancels a
        statement of this session; 0 for none.
    :raises DatabaseUnavailableError: when the server cannot be reached or
        does not answer in time.
    :raises DatabaseAccessError: when the server refuses the login or the
        database.
    """

    def __init__(
        self,
        url: URL,
        *,
        application_name: str = "pgevents",
        keepalives: bool = False,
        connect_timeout: float = 0,
        statement_timeout: float = 0,
    ) -> None:
        self.driver = driver_name(url)
        dialect = url.get_dialect()()
        cargs, cparams = dialect.create_connect_args(url)
        cparams = dict(cparams)
        cparams.setdefault("application_name", application_name)
        if keepalives:
            for key, value in KEEPALIVES.items():
                cparams.setdefault(key, value)
        timeout_set = connect_timeout > 0 and "connect_timeout" not in cparams
        if timeout_set:
            cparams["connect_timeout"] = max(2, math.ceil(connect_timeout))
        try:
            self.raw: Any = self._connect(cargs, cparams)
        except CONNECTION_ERRORS as exc:
            raise connect_error(exc, url, cparams["connect_timeout"] if timeout_set else None) from exc
        self.cursor = self.raw.cursor()
        try:
            # Before any other query: no other schema's function or operator
            # can stand in for a built-in one (CVE-2018-1058).
            self.execute(render("safe_search_path"))
            if statement_timeout > 0:
                self.execute(render("set_statement_timeout"), (f"{math.ceil(statement_timeout * 1000)}ms",))
        except BaseException:
            self.close()
            raise

    def _connect(self, cargs: Any, cparams: dict[str, Any]) -> Any:
        if self.driver == "psycopg":
            import psycopg

            return psycopg.connect(*cargs, autocommit=True, **cparams)
        import psycopg2  # type: ignore[import-untyped,unused-ignore]
        import psycopg2.extensions  # type: ignore[import-untyped,unused-ignore]

        raw = psycopg2.connect(*cargs, **cparams)
        raw.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
        return raw

    @property
    def closed(self) -> bool:
        return bool(self.raw.closed)

    def execute(self, sql: str, params: Optional[Any] = None) -> Any:
        self.cursor.execute(sql, params)
        return self.cursor

    def take_notifications(self) -> list[str]:
        """The payloads of the wake-ups that arrived since the last call; does not block."""
        if self.driver == "psycopg":
            return [notify.payload for notify in self.raw.notifies(timeout=0)]
        self.raw.poll()
        payloads = [notify.payload for notify in self.raw.notifies]
        del self.raw.notifies[:]
        return payloads

    def wait(self, timeout: float, interrupt: Optional[int] = None) -> list[str]:
        """Block until a NOTIFY arrives, ``interrupt`` is readable or ``timeout``
        seconds pass; return the payloads of the wake-ups (empty if none).

        :param interrupt: a file descriptor that ends the wait early (the
            read end of a pipe written to stop the listener).
        """
        payloads = self.take_notifications()
        if payloads or timeout <= 0:
            return payloads
        watched = [self.raw] if interrupt is None else [self.raw, interrupt]
        select.select(watched, [], [], timeout)
        return self.take_notifications()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a broken connection may fail
            self.raw.close()


class BorrowedConnection(Connection):
    """A DB-API connection that another library opened and will close: an
    Alembic migration's.

    Statements run in its owner's transaction, with its owner's session
    settings: nothing here begins, commits or changes a setting for longer
    than that transaction. Closing closes only the cursor.

    :param raw: the psycopg or psycopg2 connection (SQLAlchemy's
        ``connection.connection.driver_connection``).
    :param driver: ``"psycopg"`` or ``"psycopg2"``.
    """

    def __init__(self, raw: Any, driver: str) -> None:  # no super(): it would connect
        self.driver = driver
        self.raw = raw
        self.cursor = raw.cursor()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.cursor.close()
