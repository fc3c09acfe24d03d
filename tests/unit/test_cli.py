"""cli.py: what the `flask pgevents` commands say before they need the database:
usage errors, help, an app without PGEvents, and a database that cannot be reached."""
from __future__ import annotations

import pytest
from click.testing import CliRunner, Result
from flask import Flask
from flask.cli import FlaskGroup

from flask_pgevents import ConfigurationError, PGEvents
from flask_pgevents.cli import pgevents_cli

#: Nothing listens there: a command that connects fails at once.
NEVER_REACHED = "postgresql+psycopg2://u:s3cret-pw@127.0.0.1:1/db"
NOT_SET_UP = (
    "Error: flask-pgevents is not set up on this app. Call 'PGEvents(app)' or"
    " 'pgevents.init_app(app)' in your app factory.\n"
)
COMMANDS = [
    "backfill", "discard", "failed", "grant-listener", "install-triggers", "listen", "retry", "status",
    "uninstall-triggers",
]


@pytest.fixture
def app() -> Flask:
    app = Flask("cli")
    app.config.update(TESTING=True, PGEVENTS_DATABASE_URI=NEVER_REACHED)
    PGEvents(app)
    return app


def invoke(app: Flask, *args: str) -> Result:
    """Run ``flask pgevents ARGS`` against ``app`` in this process."""
    return app.test_cli_runner().invoke(pgevents_cli, list(args))


# Usage errors -------------------------------------------------------------------------


def test_retry_without_ids_or_all_is_a_usage_error(app):
    result = invoke(app, "retry")
    assert result.exit_code == 2
    assert result.output == (
        "Usage: pgevents retry [OPTIONS] [EVENT_IDS]...\n"
        "Try 'pgevents retry --help' for help.\n"
        "\n"
        "Error: Name the event ids to retry, or pass --all.\n"
    )


def test_retry_ids_must_be_integers(app):
    result = invoke(app, "retry", "12", "abc")
    assert result.exit_code == 2
    assert result.output.endswith("Error: Invalid value for '[EVENT_IDS]...': 'abc' is not a valid integer.\n")


def test_grant_listener_without_a_role_is_a_usage_error(app):
    result = invoke(app, "grant-listener", "--sql")
    assert result.exit_code == 2
    assert result.output == (
        "Usage: pgevents grant-listener [OPTIONS] ROLE\n"
        "Try 'pgevents grant-listener --help' for help.\n"
        "\n"
        "Error: Missing argument 'ROLE'.\n"
    )


def test_failed_limit_must_be_an_integer(app):
    result = invoke(app, "failed", "--limit", "all")
    assert result.exit_code == 2
    assert result.output.endswith("Error: Invalid value for '--limit': 'all' is not a valid integer.\n")


def test_an_unknown_command_is_a_usage_error(app):
    result = invoke(app, "install")
    assert result.exit_code == 2
    assert "Error: No such command 'install'." in result.output


# Help ----------------------------------------------------------------------------------


def test_the_group_lists_every_command(app):
    result = invoke(app, "--help")
    assert result.exit_code == 0
    assert result.output.startswith(
        "Usage: pgevents [OPTIONS] COMMAND [ARGS]...\n\n"
        "  Install capture triggers and run the row-change event listener.\n"
    )
    listed = result.output.split("Commands:\n", 1)[1]
    assert [line.split()[0] for line in listed.splitlines()] == COMMANDS


def test_init_app_adds_the_group_to_flask(app):
    result = app.test_cli_runner().invoke(args=["pgevents", "--help"])
    assert result.exit_code == 0
    assert "Install capture triggers and run the row-change event listener." in result.output


@pytest.mark.parametrize("command, usage, lines", [
    ("install-triggers", "install-triggers [OPTIONS]", [
        "Create the event schema and the needed triggers; print the plan.",
        "--sql    Print the SQL instead of running it.",
        "--prune  Also drop this app's triggers that no handler needs.",
    ]),
    ("grant-listener", "grant-listener [OPTIONS] ROLE", [
        "Grant ROLE exactly what a process that only listens needs.",
        "--sql   Print the SQL instead of running it.",
    ]),
    ("uninstall-triggers", "uninstall-triggers [OPTIONS]", [
        "Drop this app's capture triggers (and, with --drop-schema, the stored events).",
        "--drop-schema  Also drop the event schema and every stored event.",
        "--yes          Drop the schema without asking.",
        "--sql          Print the SQL instead of running it.",
    ]),
    ("status", "status [OPTIONS]", [
        "Show triggers per table and operation, the backlog and failed events.",
        "--json  Print pgevents.stats() as JSON, with listeners and counters.",
    ]),
    ("failed", "failed [OPTIONS]", [
        "List events whose handlers failed on every attempt.",
        "--limit INTEGER  Show at most this many.  [default: 50]",
        "--traceback      Also show each traceback and the row.",
    ]),
    ("discard", "discard [OPTIONS] [EVENT_IDS]...", [
        "Delete failed events for good; pending events are never deleted.",
        "--all   Discard every failed event.",
        "--yes   Discard every failed event without asking.",
    ]),
    ("retry", "retry [OPTIONS] [EVENT_IDS]...", [
        "Queue failed events again; handlers that succeeded are not run again.",
        "--all   Retry every failed event.",
    ]),
    ("listen", "listen [OPTIONS]", [
        "Run the listener in the foreground until SIGTERM or Ctrl-C.",
        "--ready-file PATH  Keep PATH written while the listener is ready, for a",
    ]),
])
def test_each_command_explains_itself_and_its_options(app, command, usage, lines):
    result = invoke(app, command, "--help")
    assert result.exit_code == 0
    assert result.output.startswith(f"Usage: pgevents {usage}\n")
    # Compared word by word: click aligns the option columns.
    shown = [" ".join(line.split()) for line in result.output.splitlines()]
    for line in [*lines, "--help Show this message and exit."]:
        assert " ".join(line.split()) in shown, (line, result.output)


# Apps without PGEvents -----------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["install-triggers"], ["install-triggers", "--sql"], ["grant-listener", "reader"], ["uninstall-triggers"],
    ["status"], ["failed"], ["retry", "--all"], ["retry", "1"], ["listen"],
])
def test_a_command_on_an_app_without_pgevents_says_how_to_set_it_up(args):
    result = invoke(Flask("plain"), *args)
    assert result.exit_code == 1
    assert result.output == NOT_SET_UP


# An unreachable database ---------------------------------------------------------------


@pytest.mark.parametrize("args", [["status"], ["retry", "--all"], ["failed"], ["grant-listener", "reader"]])
def test_an_unreachable_database_is_one_line_naming_it_without_its_password(app, args):
    result = invoke(app, *args)
    assert result.exit_code == 1
    assert result.output.startswith(
        "Error: Could not connect to the database postgresql+psycopg2://u:***@127.0.0.1:1/db: "
    )
    assert result.output.count("\n") == 1
    assert "s3cret-pw" not in result.output and "Traceback" not in result.output


# A disabled extension, and configuration errors as `flask` loads the app ------------

DISABLED = (
    "Error: flask-pgevents is disabled on this app (PGEVENTS_ENABLED is False). Set"
    " PGEVENTS_ENABLED to True, with a PostgreSQL database configured, to use"
    " 'flask pgevents'.\n"
)


@pytest.mark.parametrize("args", [
    ["install-triggers"], ["install-triggers", "--sql"], ["grant-listener", "reader"], ["uninstall-triggers"],
    ["status"], ["failed"], ["retry", "--all"], ["listen"],
])
def test_a_command_on_a_disabled_app_says_so_in_one_line(args):
    app = Flask("disabled")
    app.config.update(SQLALCHEMY_DATABASE_URI="sqlite://", PGEVENTS_ENABLED=False)
    PGEvents(app)
    result = invoke(app, *args)
    assert (result.exit_code, result.output) == (1, DISABLED)


@pytest.mark.parametrize("config, message", [
    (
        {"SQLALCHEMY_DATABASE_URI": "sqlite://"},
        "flask-pgevents needs PostgreSQL, but SQLALCHEMY_DATABASE_URI is a 'sqlite' URI"
        " (sqlite://). Set it to a 'postgresql://' URI.",
    ),
    (
        {"PGEVENTS_DATABASE_URI": NEVER_REACHED, "PGEVENTS_BATCH_SIZE": "lots"},
        "PGEVENTS_BATCH_SIZE must be an integer, got 'lots'. Remove it to use the default 500.",
    ),
])
@pytest.mark.parametrize("args", [["pgevents", "status"], ["pgevents", "install-triggers"], ["shell"]])
def test_a_configuration_error_as_flask_loads_the_app_is_one_line(config, message, args):
    def create_app() -> Flask:
        app = Flask("misconfigured")
        app.config.update(config)
        PGEvents(app)
        return app

    cli = FlaskGroup(create_app=create_app, load_dotenv=False)
    result = CliRunner().invoke(cli, args)
    assert (result.exit_code, result.output) == (1, f"Error: {message}\n")


def test_a_configuration_error_outside_the_cli_stays_a_plain_configuration_error():
    app = Flask("misconfigured")
    app.config.update(SQLALCHEMY_DATABASE_URI="sqlite://")
    with pytest.raises(ConfigurationError) as info:
        PGEvents(app)
    assert type(info.value) is ConfigurationError
