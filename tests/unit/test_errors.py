"""errors.py: one base class to catch them all, each refining a builtin."""
from __future__ import annotations

from typing import Any, Callable

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

import flask_pgevents
from flask_pgevents import (
    AlreadyRegisteredError,
    ConfigurationError,
    IdentifierTooLongError,
    MissingTableError,
    PGEvents,
    PGEventsError,
    UnknownColumnError,
    UnknownEventError,
    UnknownRoleError,
    UnmappedTargetError,
)
from flask_pgevents import errors as errors_module
from flask_pgevents.errors import InvalidHandlerError, UnknownHandlerError

db = SQLAlchemy()


class User(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "user"
    id = db.Column(db.Integer, primary_key=True)
    email = db.Column(db.String, nullable=False)


class NotAModel:
    pass


def handler(event: Any) -> None:
    pass


def plain_app(**config: Any) -> Flask:
    app = Flask("errors")
    app.config.update({"TESTING": True, **config})
    return app


# Moved from the integration tests -------------------------------------------------


@pytest.mark.parametrize("error_class, builtin", [
    (UnknownEventError, ValueError),
    (UnmappedTargetError, TypeError),
    (UnknownColumnError, ValueError),
    (InvalidHandlerError, TypeError),
    (UnknownHandlerError, ValueError),
    (ConfigurationError, RuntimeError),
    (AlreadyRegisteredError, RuntimeError),
])
def test_every_error_is_a_pgevents_error_and_refines_a_builtin(error_class, builtin):
    assert issubclass(error_class, PGEventsError)
    assert issubclass(error_class, builtin)
    assert issubclass(PGEventsError, Exception)


def test_one_except_clause_catches_every_registration_error():
    pgevents = PGEvents()
    bad_calls: list[Callable[[], Any]] = [
        lambda: pgevents.listen(User, "after_upsert", handler),
        lambda: pgevents.listen(NotAModel, "after_insert", handler),
        lambda: pgevents.listen(User, "after_insert", "handler"),  # type: ignore[arg-type]
        lambda: pgevents.listen(User, "after_update", handler, columns=["nope"]),
        lambda: pgevents.remove(User, "after_insert", handler),
        lambda: PGEvents(plain_app(PGEVENTS_DATABASE_URI="sqlite://")),
    ]
    for call in bad_calls:
        with pytest.raises(PGEventsError):
            call()


@pytest.mark.parametrize("error_class, builtin", [
    (IdentifierTooLongError, ValueError),
    (MissingTableError, LookupError),
    (UnknownRoleError, LookupError),
])
def test_the_install_and_grant_errors_refine_a_builtin_too(error_class, builtin):
    assert issubclass(error_class, PGEventsError)
    assert issubclass(error_class, builtin)


def test_every_error_class_is_exported_by_the_package():
    defined = {
        name for name, value in vars(errors_module).items()
        if isinstance(value, type) and issubclass(value, Exception)
    }
    assert defined <= set(flask_pgevents.__all__)
    assert all(getattr(flask_pgevents, name) is getattr(errors_module, name) for name in defined)
