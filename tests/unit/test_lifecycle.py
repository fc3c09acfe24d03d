"""lifecycle.py: which processes start a listener thread when the app is set up.

Servers and forks run for real in tests/acceptance/test_lifecycle.py; here the
click context a command would run in is built by hand.
"""
from __future__ import annotations

from typing import Any, Optional

import click
import pytest
from flask import Flask
from flask.cli import run_command

from flask_pgevents.config import Config
from flask_pgevents.lifecycle import should_autostart


def app(testing: bool = False) -> Flask:
    app = Flask("lifecycle")
    app.testing = testing
    return app


def config(**values: Any) -> Config:
    return Config.from_mapping(values)


def in_command(command: click.Command, params: Optional[dict[str, Any]] = None) -> bool:
    """should_autostart for a plain app, as called while ``command`` runs."""
    with click.Context(command) as ctx:
        ctx.params = dict(params or {})
        return should_autostart(app(), config())


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("WERKZEUG_RUN_MAIN", "FLASK_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_wsgi_server_or_script_starts_a_listener():
    assert should_autostart(app(), config()) is True


def test_testing_or_autostart_off_starts_none():
    assert should_autostart(app(testing=True), config()) is False
    assert should_autostart(app(), config(PGEVENTS_AUTOSTART=False)) is False
    assert should_autostart(app(), config(PGEVENTS_AUTOSTART="off")) is False


def test_other_commands_start_none():
    assert in_command(click.Command("shell")) is False
    assert in_command(click.Command("upgrade")) is False


def test_flask_run_without_the_reloader_starts_one(environment):
    assert in_command(run_command, {"reload": False}) is True


def test_with_the_reloader_only_the_serving_child_starts_one(environment):
    assert in_command(run_command, {"reload": True}) is False
    environment.setenv("WERKZEUG_RUN_MAIN", "true")
    assert in_command(run_command, {"reload": True}) is True


def test_flask_run_follows_debug_mode_when_reload_is_not_given(environment):
    assert in_command(run_command, {"reload": None}) is True
    environment.setenv("FLASK_DEBUG", "1")
    assert in_command(run_command, {"reload": None}) is False
    environment.setenv("WERKZEUG_RUN_MAIN", "true")
    assert in_command(run_command, {"reload": None}) is True
