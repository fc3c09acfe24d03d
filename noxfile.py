"""The support matrix: every combination that README.rst's *Requirements* claims.

``pip install "nox[uv]"``, then ``nox`` runs every session, one after another;
``nox -l`` lists them, ``nox -s oldest-3.11`` runs one, and arguments after
``--`` go to pytest (``nox -s postgres15 -- tests/integration``).

* ``tests-3.X``: the newest releases that setup.cfg allows, on each Python,
  against the embedded PostgreSQL 18.
* ``oldest-3.X``: the oldest Flask, Flask-SQLAlchemy, SQLAlchemy, psycopg and
  psycopg2 that setup.cfg allows (``tests/constraints-oldest.txt``), on the
  oldest Python and on 3.11, against the embedded PostgreSQL 18.
* ``postgres15``: the newest releases against Debian's PostgreSQL 15, in a
  private cluster that the session starts on a free port and removes. The
  server is installed with ``apt-get`` when it is missing (as root).

A Python missing on this machine skips its sessions, and fails them where
``CI`` is set.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

import nox

nox.options.default_venv_backend = "uv|virtualenv"

PYTHONS = ["3.9", "3.10", "3.11", "3.12", "3.13"]
OLDEST_CONSTRAINTS = "tests/constraints-oldest.txt"
POSTGRES15_BIN = Path("/usr/lib/postgresql/15/bin")
REPORT_VERSIONS = (
    "import importlib.metadata as m, platform; print(f'Python {platform.python_version()}', *(f'{n} {m.version(n)}'"
    " for n in ('Flask', 'Werkzeug', 'blinker', 'Flask-SQLAlchemy', 'SQLAlchemy', 'psycopg', 'psycopg2-binary',"
    " 'alembic', 'Flask-Migrate', 'pytest-flask')), sep=', ')"
)

# Pythons installed with pyenv but not made global have no working
# ``python3.X`` on PATH: offer them to nox (and to uv, which must not
# download one).
_pyenv_root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
os.environ["PATH"] = os.pathsep.join(
    [*(str(path) for path in sorted(_pyenv_root.glob("versions/3.*/bin"))), os.environ["PATH"]]
)
os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The suite with the newest dependencies, against the embedded PostgreSQL 18."""
    session.install("-e", ".[test]")
    run_pytest(session, database_uri="")


@nox.session(python=[PYTHONS[0], "3.11"])
def oldest(session: nox.Session) -> None:
    """The suite with the oldest dependencies setup.cfg allows, against the embedded PostgreSQL 18."""
    session.install("-e", ".[test]", "-c", OLDEST_CONSTRAINTS)
    run_pytest(session, database_uri="")


@nox.session(python="3.11")
def postgres15(session: nox.Session) -> None:
    """The suite with the newest dependencies, against a private PostgreSQL 15 cluster."""
    session.install("-e", ".[test]")
    install_postgres15(session)
    with postgres15_cluster(session) as uri:
        run_pytest(session, database_uri=uri)


def run_pytest(session: nox.Session, database_uri: str) -> None:
    """Run pytest with the session's arguments; an empty ``database_uri`` means the embedded server."""
    session.run("python", "-c", REPORT_VERSIONS, silent=False)
    session.run("python", "-m", "pytest", *session.posargs, env={"PGEVENTS_TEST_DATABASE_URI": database_uri})


def install_postgres15(session: nox.Session) -> None:
    """Install Debian's postgresql-15 unless it is there."""
    if (POSTGRES15_BIN / "initdb").exists():
        return
    if not shutil.which("apt-get") or os.geteuid() != 0:
        session.error(f"PostgreSQL 15 is not in {POSTGRES15_BIN}. Install it as root: apt-get install postgresql-15")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    session.run("apt-get", "update", "-qq", external=True, env=env)
    session.run("apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql-15", external=True, env=env)


@contextlib.contextmanager
def postgres15_cluster(session: nox.Session) -> Iterator[str]:
    """Start a throw-away PostgreSQL 15 cluster on a free port; yield a superuser URI; remove it."""
    directory = Path(tempfile.mkdtemp(prefix="pgevents-pg15-"))
    data, log = directory / "data", directory / "server.log"
    # initdb refuses to run as root: run the server as the postgres system user then.
    as_owner: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pg_ctl = [*as_owner, str(POSTGRES15_BIN / "pg_ctl"), "-D", str(data)]
    session.run(
        *as_owner, str(POSTGRES15_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
        "-E", "UTF8", "--no-sync", external=True, silent=True,
    )
    try:
        session.run(
            *pg_ctl, "-l", str(log), "-w", "-o", f"-p {port} -k {directory} -c listen_addresses=127.0.0.1",
            "start", external=True,
        )
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        session.run(*pg_ctl, "-m", "fast", "-w", "stop", external=True, success_codes=[0, 1])
        shutil.rmtree(directory, ignore_errors=True)
