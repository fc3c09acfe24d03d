"""lifecycle.py: which processes start a listener thread, and when.

Servers and forks run for real in tests/acceptance/test_lifecycle.py; here the
click context a command would run in, and the modules a server loads, are
built by hand.
"""
from __future__ import annotations

import sys
import types
from typing import Any, Optional

import click
import pytest
from flask import Flask
from flask.cli import run_command

from flask_pgevents.config import Config
from flask_pgevents.lifecycle import FIRST_REQUEST, NEVER, NOW, SERVER_MODULES, When, when_to_start


def app(testing: bool = False) -> Flask:
    app = Flask("lifecycle")
    app.testing = testing
    return app


def config(**values: Any) -> Config:
    return Config.from_mapping(values)


def in_command(command: click.Command, params: Optional[dict[str, Any]] = None, **values: Any) -> When:
    """when_to_start for a plain app, as called while ``command`` runs."""
    with click.Context(command) as ctx:
        ctx.params = dict(params or {})
        return when_to_start(app(), config(**values))


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("WERKZEUG_RUN_MAIN", "FLASK_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def no_server_modules(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in SERVER_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    return monkeypatch


def test_a_script_or_worker_starts_none_until_the_app_serves_a_request(no_server_modules):
    # A script, a Celery or RQ worker, a notebook, python -c: nothing runs
    # unless the app serves a request, as any WSGI server makes it do.
    assert when_to_start(app(), config()) == FIRST_REQUEST


@pytest.mark.parametrize("module", SERVER_MODULES)
def test_a_known_server_starts_one_at_once(no_server_modules, module):
    # Its idle workers listen too.
    no_server_modules.setitem(sys.modules, module, types.ModuleType(module))
    assert when_to_start(app(), config()) == NOW


def test_always_starts_one_in_every_process_but_a_test(no_server_modules):
    assert when_to_start(app(), config(PGEVENTS_AUTOSTART="always")) == NOW
    assert in_command(click.Command("shell"), PGEVENTS_AUTOSTART="Always") == NOW
    assert when_to_start(app(testing=True), config(PGEVENTS_AUTOSTART="always")) == NEVER


def test_testing_autostart_off_or_disabled_starts_none(no_server_modules):
    no_server_modules.setitem(sys.modules, "uwsgi", types.ModuleType("uwsgi"))
    assert when_to_start(app(testing=True), config()) == NEVER
    assert when_to_start(app(), config(PGEVENTS_AUTOSTART=False)) == NEVER
    assert when_to_start(app(), config(PGEVENTS_AUTOSTART="off")) == NEVER
    assert when_to_start(app(), config(PGEVENTS_ENABLED=False)) == NEVER
    assert when_to_start(app(), config(PGEVENTS_ENABLED=False, PGEVENTS_AUTOSTART="always")) == NEVER


def test_other_commands_start_none():
    assert in_command(click.Command("shell")) == NEVER
    assert in_command(click.Command("upgrade")) == NEVER


def test_flask_run_without_the_reloader_starts_one(environment):
    assert in_command(run_command, {"reload": False}) == NOW


def test_with_the_reloader_only_the_serving_child_starts_one(environment):
    assert in_command(run_command, {"reload": True}) == NEVER
    environment.setenv("WERKZEUG_RUN_MAIN", "true")
    assert in_command(run_command, {"reload": True}) == NOW


def test_flask_run_follows_debug_mode_when_reload_is_not_given(environment):
    assert in_command(run_command, {"reload": None}) == NOW
    environment.setenv("FLASK_DEBUG", "1")
    assert in_command(run_command, {"reload": None}) == NEVER
    environment.setenv("WERKZEUG_RUN_MAIN", "true")
    assert in_command(run_command, {"reload": None}) == NOW
