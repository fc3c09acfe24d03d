"""The examples run as a new user runs them: a subprocess, its output and exit code."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.py"


def run_example(path: Path, database_url: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "FLASK_APP")}
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    # -W error: an example that warns fails, as the tests do.
    return subprocess.run(
        [sys.executable, "-W", "error", str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=90,
    )


def assert_quickstart_output(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    lines = [line for line in result.stdout.splitlines() if line.startswith("after_")]
    assert sorted(lines) == sorted([
        "after_insert: op=insert new={'id': 1, 'name': 'Ada', 'email': 'ada@example.com'}"
        " target=<User 1 Ada ada@example.com>",
        "after_insert: op=insert new={'id': 2, 'name': 'Grace', 'email': 'grace@example.com'}"
        " target=<User 2 Grace grace@example.com>",
        # Only the e-mail change: the name-only update does not call the handler.
        "after_update: op=update old=ada@example.com new=ada@example.org changed=['email']"
        " target=<User 1 Ada ada@example.org>",
        "after_delete: op=delete old={'id': 2, 'name': 'Grace Hopper', 'email': 'grace@example.com'}"
        " target=<User 2 Grace Hopper grace@example.com>",
    ]), result.stdout
    assert "All 4 changes were handled." in result.stdout
    assert "Traceback" not in result.stderr, result.stderr


def test_quickstart_with_database_url(database_url, libpq_url):
    """DATABASE_URL as 'postgresql+psycopg://' and as 'postgresql+psycopg2://'."""
    result = run_example(QUICKSTART, database_url)
    assert_quickstart_output(result)
    assert "embedded" not in result.stdout
    # It leaves the database as it found it.
    with psycopg.connect(libpq_url) as conn:
        leftovers = conn.execute(
            "SELECT to_regclass('public.quickstart_user'), to_regnamespace('pgevents_quickstart')"
        ).fetchone()
    assert leftovers == (None, None)


def test_quickstart_accepts_a_postgres_scheme_url(libpq_url):
    """Hosting services hand out 'postgres://' URIs, which SQLAlchemy does not accept."""
    assert libpq_url.startswith("postgresql://")
    result = run_example(QUICKSTART, "postgres://" + libpq_url[len("postgresql://"):])
    assert_quickstart_output(result)


def test_quickstart_without_database_url_starts_an_embedded_server():
    result = run_example(QUICKSTART, None)
    assert result.stdout.startswith("DATABASE_URL is not set: starting an embedded PostgreSQL server.")
    assert_quickstart_output(result)
    # It runs as a table-owning role with CREATEROLE, as the README advises: no superuser warning.
    assert "superuser" not in result.stderr, result.stderr


def test_the_audit_log_example_records_who_made_each_change(database_url):
    result = run_example(ROOT / "examples" / "audit_log.py", database_url)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert [line.split(" {")[0] for line in result.stdout.splitlines() if line.startswith("audit:")] == [
        "audit: insert by admin-7 (request r-1)",
        "audit: update by nightly-job (request None)",
        "audit: delete by dba (request None)",
    ]


def test_the_backfill_example_resumes_and_emits_each_row_once(database_url):
    result = run_example(ROOT / "examples" / "backfill.py", database_url)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "backfill 1 resumed=True: 2501 rows emitted" in result.stdout
    assert "handled: 2501 backfilled rows, 1 new insert" in result.stdout
