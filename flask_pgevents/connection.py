"""Raw connections with either PostgreSQL driver, and waiting for wake-ups.

The listener keeps one long-lived connection outside SQLAlchemy's pool: it
LISTENs, claims events and must never be handed to application code.
"""
from __future__ import annotations

import contextlib
import select
from typing import Any, Optional

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

from .errors import ConfigurationError
from .sql import render

#: libpq keepalive settings: a half-open connection is noticed in about 15 s.
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 5,
}


def _connection_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]
    try:
        import psycopg

        errors += [psycopg.OperationalError, psycopg.InterfaceError]
    except ImportError:  # pragma: no cover - psycopg 3 is an optional extra
        pass
    import psycopg2

    errors += [psycopg2.OperationalError, psycopg2.InterfaceError]
    return tuple(errors)


#: Exceptions that mean the connection is gone, for both drivers.
CONNECTION_ERRORS = _connection_errors()


def sqlstate(exc: BaseException) -> Optional[str]:
    """The SQLSTATE of a psycopg or psycopg2 error, if it has one."""
    code = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    return code if isinstance(code, str) else None



def parse_database_url(uri: str | URL, source: str) -> URL:
    """Parse and check a database URI; only PostgreSQL is accepted.

    :param source: the config key the URI came from, named in errors.
    """
    try:
        url = make_url(uri)
    except sa.exc.ArgumentError as exc:
        raise ConfigurationError(
            f"{source} is not a valid database URI: {exc}. Use for example"
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
    """

    def __init__(self, url: URL, *, application_name: str = "pgevents", keepalives: bool = False) -> None:
        self.driver = driver_name(url)
        dialect = url.get_dialect()()
        cargs, cparams = dialect.create_connect_args(url)
        cparams = dict(cparams)
        cparams.setdefault("application_name", application_name)
        if keepalives:
            for key, value in KEEPALIVES.items():
                cparams.setdefault(key, value)
        if self.driver == "psycopg":
            import psycopg

            self.raw: Any = psycopg.connect(*cargs, autocommit=True, **cparams)
        else:
            import psycopg2
            import psycopg2.extensions

            self.raw = psycopg2.connect(*cargs, **cparams)
            self.raw.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
        self.cursor = self.raw.cursor()
        try:
            # Before any other query: no other schema's function or operator
            # can stand in for a built-in one (CVE-2018-1058).
            self.execute(render("safe_search_path"))
        except BaseException:
            self.close()
            raise

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
