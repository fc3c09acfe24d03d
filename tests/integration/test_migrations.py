"""A real Flask-Migrate project: ``flask db init``, ``migrate``, ``upgrade`` and
``downgrade``, run as subprocesses the way a user runs them, on a fresh database.

The app's handlers are chosen by the ``HANDLERS`` environment variable, so
that one project can stand for successive releases of the code.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest

APP = '''
import os

import sqlalchemy as sa
from flask import Flask
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy

from flask_pgevents import PGEvents

db = SQLAlchemy()
migrate = Migrate()
pgevents = PGEvents()


class User(db.Model):
    __tablename__ = "user"
    id = sa.Column(sa.Integer, primary_key=True)
    email = sa.Column(sa.String, nullable=False)
    name = sa.Column(sa.String)


class Invoice(db.Model):
    """A model in another schema: the reason for include_schemas=True."""

    __table_args__ = {"schema": "billing"}
    id = sa.Column(sa.Integer, primary_key=True)
    total = sa.Column(sa.Numeric)


def handle(event):
    pass


# "insert", "update:email+name", "delete", "broadcast-insert", separated by commas.
for spec in filter(None, os.environ.get("HANDLERS", "").split(",")):
    kind, _, columns = spec.partition(":")
    broadcast = kind.startswith("broadcast-")
    pgevents.listen(
        User, "after_" + kind.removeprefix("broadcast-"), handle,
        columns=columns.split("+") if columns else None, broadcast=broadcast,
    )


def create_app():
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["DATABASE_URL"]
    app.config["PGEVENTS_AUTOSTART"] = False
    db.init_app(app)
    migrate.init_app(app, db, include_schemas=True)
    pgevents.init_app(app)
    return app
'''


class Project:
    """A Flask-Migrate project in a directory of its own."""

    def __init__(self, root: Path, database_url: str) -> None:
        self.root = root
        (root / "migapp.py").write_text(APP)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLASK_")}
        self.env.update(DATABASE_URL=database_url, PYTHONPATH=str(root))

    def flask(self, *args: str, handlers: str = "", ok: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "migapp:create_app", *args],
            cwd=self.root, env={**self.env, "HANDLERS": handlers}, capture_output=True, text=True, timeout=120,
        )
        output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        assert (result.returncode == 0) == ok, output
        assert "Did not recognize type" not in result.stderr, output
        return result

    def migrate(self, message: str, handlers: str = "") -> str:
        """Autogenerate a revision; return its upgrade and downgrade functions' text."""
        before = set(self.versions())
        self.flask("db", "migrate", "-m", message, handlers=handlers)
        (new,) = set(self.versions()) - before
        return new.read_text()

    def versions(self) -> list[Path]:
        return sorted((self.root / "migrations" / "versions").glob("*.py"))

    def write_revision(self, revision: str, down_revision: str, upgrade: str) -> None:
        """A hand-written revision whose ``upgrade`` runs ``upgrade`` (Python statements)."""
        (self.root / "migrations" / "versions" / f"{revision}.py").write_text(
            "from alembic import op\n"
            "import sqlalchemy as sa\n"
            "import flask_pgevents.migrations  # noqa: F401\n\n"
            f"revision = {revision!r}\ndown_revision = {down_revision!r}\n"
            "branch_labels = None\ndepends_on = None\n\n\n"
            "def upgrade():\n" + textwrap.indent(textwrap.dedent(upgrade).strip(), "    ") + "\n\n\n"
            "def downgrade():\n    pass\n"
        )


def body(script: str, function: str) -> str:
    """The statements of ``upgrade`` or ``downgrade`` in a revision's text."""
    text = script.split(f"def {function}():\n", 1)[1]
    lines = []
    for line in text.splitlines():
        if line.startswith("def "):
            break
        if line.strip() and not line.strip().startswith("#"):
            lines.append(line.strip())
    return "\n".join(lines)


def triggers(conn: psycopg.Connection) -> list[tuple[str, str, list[str]]]:
    """(table, trigger, watched columns) of every trigger, sorted."""
    rows = conn.execute(
        "SELECT c.relname, t.tgname, t.tgargs, t.tgnargs FROM pg_trigger AS t"
        " JOIN pg_class AS c ON c.oid = t.tgrelid WHERE NOT t.tgisinternal ORDER BY 1, 2"
    ).fetchall()
    return [
        (table, name, [a.decode() for a in bytes(args).split(b"\x00")[:count]])
        for table, name, args, count in rows
    ]


def version(conn: psycopg.Connection) -> str | None:
    if conn.execute("SELECT to_regclass('alembic_version')").fetchone() == (None,):
        return None
    row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    return row[0] if row else None


@pytest.fixture
def project(tmp_path: Path, database_url: str, other_service: psycopg.Connection) -> Project:
    other_service.execute("CREATE SCHEMA billing")
    project = Project(tmp_path, database_url)
    project.flask("db", "init")
    return project


def test_autogenerate_writes_trigger_operations_and_downgrade_reverses_them(project, other_service):
    script = project.migrate("tables")
    assert "op.create_table('user'" in script
    assert "op.create_table('invoice'" in script
    assert "pgevents" not in script
    project.flask("db", "upgrade")

    handlers = "insert,update:email"
    script = project.migrate("triggers", handlers)
    assert body(script, "upgrade") == (
        "op.create_pgevents_trigger('user', 'after_insert', schema='public')\n"
        "op.create_pgevents_trigger('user', 'after_update', schema='public', columns=['email'])"
    )
    assert body(script, "downgrade") == (
        "op.drop_pgevents_trigger('user', 'after_update', schema='public', columns=['email'])\n"
        "op.drop_pgevents_trigger('user', 'after_insert', schema='public')"
    )
    assert "import flask_pgevents.migrations" in script
    project.flask("db", "upgrade", handlers=handlers)
    first = [("user", "pgevents_insert", []), ("user", "pgevents_update", ["email"])]
    assert triggers(other_service) == first

    # Installed and current: nothing to propose, and the event schema's own
    # tables (reflected under include_schemas=True) are not dropped.
    result = project.flask("db", "migrate", "-m", "nothing", handlers=handlers)
    assert "No changes in schema detected." in result.stderr + result.stdout
    assert len(project.versions()) == 2

    # The next release watches other columns, drops a handler, adds two:
    # 'flask db check' (in CI) sees that a migration is missing.
    handlers = "update:email+name,delete,broadcast-insert"
    result = project.flask("db", "check", handlers=handlers, ok=False)
    assert "('alter_trigger', 'public.user', 'update', frozenset({" in result.stderr, result.stderr
    script = project.migrate("new handlers", handlers)
    assert body(script, "upgrade") == (
        "op.drop_pgevents_trigger('user', 'after_insert', schema='public')\n"
        "op.create_pgevents_trigger('user', 'after_insert', schema='public', broadcast=True)\n"
        "op.create_pgevents_trigger('user', 'after_delete', schema='public')\n"
        "op.alter_pgevents_trigger('user', 'after_update', schema='public', columns=['email', 'name'],"
        " existing_columns=['email'])"
    )
    project.flask("db", "upgrade", handlers=handlers)
    second = [
        ("user", "pgevents_broadcast_insert", []),
        ("user", "pgevents_delete", []),
        ("user", "pgevents_update", ["email", "name"]),
    ]
    assert triggers(other_service) == second

    # The downgrade runs the frozen operations, whatever handlers the code has.
    project.flask("db", "downgrade")
    assert triggers(other_service) == first
    project.flask("db", "downgrade", "base")
    assert triggers(other_service) == []
    assert version(other_service) is None
    project.flask("db", "upgrade")
    assert triggers(other_service) == second
    heads = [path.name for path in project.versions()]
    assert version(other_service) is not None and any(name.startswith(version(other_service)) for name in heads)


def test_a_failed_migration_leaves_no_trigger_and_the_version_unchanged(project, other_service):
    project.migrate("tables")
    project.flask("db", "upgrade")
    (first,) = project.versions()
    before = version(other_service)
    project.write_revision("f0000000000a", before, '''
        op.install_pgevents_triggers()
        op.create_pgevents_trigger("user", "after_delete", schema="public")
        op.execute("SELECT 1 / 0")
    ''')

    result = project.flask("db", "upgrade", handlers="insert,update:email", ok=False)

    assert "division by zero" in result.stderr
    assert triggers(other_service) == []
    assert other_service.execute("SELECT to_regnamespace('pgevents')").fetchone() == (None,)
    assert version(other_service) == before
    assert first.exists()


def test_hand_written_operations_install_and_uninstall_what_the_handlers_need(project, other_service):
    project.migrate("tables")
    project.flask("db", "upgrade")
    before = version(other_service)
    project.write_revision("f0000000000b", before, '''
        op.install_pgevents_triggers()
        # Unqualified: in the schema of the migration's own search_path.
        op.create_table("after_install", sa.Column("id", sa.Integer, primary_key=True))
    ''')
    project.write_revision("f0000000000c", "f0000000000b", '''
        op.uninstall_pgevents_triggers(drop_schema=True)
    ''')

    project.flask("db", "upgrade", "f0000000000b", handlers="insert,update:email")
    assert triggers(other_service) == [("user", "pgevents_insert", []), ("user", "pgevents_update", ["email"])]
    assert other_service.execute("SELECT to_regclass('public.after_install')").fetchone() != (None,)
    project.flask("db", "upgrade", handlers="insert,update:email")
    assert triggers(other_service) == []
    assert other_service.execute("SELECT to_regnamespace('pgevents')").fetchone() == (None,)
