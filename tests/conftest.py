"""Fixtures: a real PostgreSQL (embedded unless PGEVENTS_TEST_DATABASE_URI is set),
a fresh database per test, both drivers, and app factories."""
from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg
import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from psycopg import sql
from sqlalchemy.engine import make_url

from flask_pgevents import PGEvents
from flask_pgevents.embedded import EmbeddedPostgres

DRIVERS = ["psycopg", "psycopg2"]
_counter = itertools.count()


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """libpq URI of a superuser connection to the test server's 'postgres' database."""
    uri = os.environ.get("PGEVENTS_TEST_DATABASE_URI")
    if uri:
        yield make_url(uri).set(drivername="postgresql").render_as_string(hide_password=False)
        return
    server = EmbeddedPostgres()
    yield server.url()
    server.stop()


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def libpq_url(server_url: str) -> Iterator[str]:
    """A fresh, empty database for one test, as a libpq URI."""
    name = f"pgevents_test_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    url = make_url(server_url).set(database=name)
    yield url.render_as_string(hide_password=False)
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(libpq_url: str, driver: str) -> str:
    """The test database as a SQLAlchemy URI for the driver under test."""
    return make_url(libpq_url).set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)


@pytest.fixture
def other_service(libpq_url: str) -> Iterator[psycopg.Connection]:
    """A plain autocommit connection, writing as another service would."""
    with psycopg.connect(libpq_url, autocommit=True) as conn:
        yield conn


_roles = itertools.count()


@pytest.fixture
def make_role(libpq_url: str, other_service: psycopg.Connection) -> Iterator[Callable[..., str]]:
    """Create login roles, dropped after the test.

    They get the test server's password, if its URI has one (the embedded
    server trusts local connections), so that ``role_url`` can log in as them.
    """
    created: list[str] = []
    password = make_url(libpq_url).password

    def create(*privileges: str) -> str:
        name = f"pgevents_role_{other_service.info.backend_pid}_{next(_roles)}"
        other_service.execute(f'CREATE ROLE "{name}" LOGIN {" ".join(privileges)}')
        if password:
            other_service.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(name), sql.Literal(password))
            )
        created.append(name)
        return name

    yield create
    for name in created:
        other_service.execute(f'DROP OWNED BY "{name}" CASCADE')
        other_service.execute(f'DROP ROLE "{name}"')


@contextlib.contextmanager
def raises(error_class: type[BaseException], message: str) -> Iterator[None]:
    """Like pytest.raises, and the message must be exactly ``message``."""
    with pytest.raises(error_class) as info:
        yield
    assert str(info.value) == message


def role_url(url: str, role: str) -> str:
    """``url`` with another user name."""
    return make_url(url).set(username=role).render_as_string(hide_password=False)


@pytest.fixture
def make_app(database_url: str) -> Iterator[Callable[..., tuple[Flask, SQLAlchemy, PGEvents]]]:
    """Build an app with Flask-SQLAlchemy and PGEvents; stops listeners afterwards."""
    made: list[tuple[Flask, PGEvents]] = []

    def factory(**config: Any) -> tuple[Flask, SQLAlchemy, PGEvents]:
        app = Flask(f"app{next(_counter)}")
        app.config.update(
            SQLALCHEMY_DATABASE_URI=database_url,
            TESTING=True,
            PGEVENTS_RETRY_BACKOFF=0.05,
            PGEVENTS_POLL_INTERVAL=0.2,
        )
        app.config.update(config)
        db = config.pop("db", None) or SQLAlchemy()
        db.init_app(app)
        pgevents = PGEvents(db=db)
        made.append((app, pgevents))
        return app, db, pgevents

    yield factory
    for app, pgevents in made:
        if "pgevents" in app.extensions:
            pgevents.stop(timeout=10, app=app)
        db_ext = app.extensions.get("sqlalchemy")
        if db_ext is not None:
            with app.app_context():
                for engine in db_ext.engines.values():
                    engine.dispose()


def thing_app(make_app: Callable[..., Any], **config: Any) -> tuple[Flask, SQLAlchemy, PGEvents, Any]:
    """An app with a ``Thing(id, name)`` model, set up and its table created."""
    app, db, pgevents = make_app(**config)

    class Thing(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "thing"
        id = sa.Column(sa.Integer, primary_key=True)
        name = sa.Column(sa.String, nullable=False)

    pgevents.init_app(app)
    with app.app_context():
        db.create_all()
    return app, db, pgevents, Thing


class Recorder:
    """Collects handler calls and lets a test wait for them with a timeout."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self._cond = threading.Condition()

    def __call__(self, event: Any) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.events) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"expected {count} handler call(s) within {timeout} s, got {len(self.events)}"
                    )
                self._cond.wait(remaining)
            return list(self.events)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def wait_while_running(
    proc: subprocess.Popen[Any], log: Path, predicate: Callable[[], Any], timeout: float = 20.0
) -> Any:
    """Poll ``predicate`` like :func:`wait_until`; fail at once, with the output, if the process ended."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s:\n{log.read_text()}")
        time.sleep(0.05)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
