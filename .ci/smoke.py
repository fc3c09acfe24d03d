"""Smoke test of an installed flask-pgevents, run by .ci/package-check.

It runs in a fresh virtual environment, from a directory outside the
checkout, so that it sees only what the wheel or the sdist installed: the
package, its SQL files and ``py.typed``, its entry points and the
``flask pgevents`` commands. It needs no database.

Usage: python smoke.py VERSION [--migrate]
"""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import sysconfig
from importlib import resources
from pathlib import Path

APP = """\
from flask import Flask

from flask_pgevents import PGEvents

app = Flask(__name__)
# Never connected to: --help reads no database.
app.config["PGEVENTS_DATABASE_URI"] = "postgresql://smoke@127.0.0.1:1/smoke"
pgevents = PGEvents(app)


@pgevents.listens_for("public.thing", "after_insert")
def thing_added(event):
    pass
"""

COMMANDS = (
    "install-triggers", "uninstall-triggers", "grant-listener", "status", "failed", "retry", "discard", "listen",
)


def check(condition: bool, message: str) -> None:
    if not condition:
        sys.exit(f"smoke test failed: {message}")
    print(f"ok: {message}")


def main(version: str, *, migrate: bool) -> None:
    import flask_pgevents
    from flask_pgevents import sql

    installed = Path(flask_pgevents.__file__).resolve().parent
    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    check(installed.parent == site_packages, f"flask_pgevents is imported from {site_packages}")
    check(flask_pgevents.__version__ == version, f"__version__ is {version}")
    check(importlib.metadata.version("flask-pgevents") == version, f"the distribution's version is {version}")

    package = resources.files("flask_pgevents")
    check(package.joinpath("py.typed").is_file(), "py.typed is installed")
    template = package.joinpath("templates", "pgevents", "dashboard.html")
    check(template.is_file(), "the dashboard's template is installed")
    check_dashboard()
    for filename in ("schema.sql", "queries.sql"):
        blocks = sql.parse_blocks(package.joinpath("sql", filename).read_text(encoding="utf-8"))
        loaded = bool(blocks) and all(name in sql.BLOCKS for name in blocks)
        check(loaded, f"sql/{filename} loads ({len(blocks)} blocks)")

    plugins = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="pytest11")}
    check(plugins.get("pgevents") == "flask_pgevents.pytest_plugin", "the pytest11 entry point names the plugin")

    Path("smoke_app.py").write_text(APP, encoding="utf-8")
    flask = Path(sys.executable).with_name("flask")
    result = subprocess.run(
        [str(flask), "--app", "smoke_app", "pgevents", "--help"], capture_output=True, text=True, check=False
    )
    check(
        result.returncode == 0 and all(command in result.stdout for command in COMMANDS),
        f"'flask pgevents --help' lists {', '.join(COMMANDS)}",
    )
    result = subprocess.run(
        [str(flask), "--app", "smoke_app", "pgevents", "install-triggers", "--help"],
        capture_output=True, text=True, check=False,
    )
    check(result.returncode == 0 and "--prune" in result.stdout, "'flask pgevents install-triggers --help' works")

    if migrate:
        from alembic.operations import Operations

        import flask_pgevents.migrations

        check(hasattr(Operations, "create_pgevents_trigger"), "the Alembic operations are registered")


def check_dashboard() -> None:
    """The dashboard blueprint renders from the installed template (the app is disabled: no database)."""
    from flask import Flask

    from flask_pgevents import PGEvents

    app = Flask("smoke_dashboard")
    app.config.update(SECRET_KEY="smoke", PGEVENTS_ENABLED=False)
    pgevents = PGEvents(app)
    blueprint = pgevents.dashboard_blueprint(authorize=lambda request: request.args.get("operator") == "yes")
    app.register_blueprint(blueprint, url_prefix="/events")
    client = app.test_client()
    refused = client.get("/events/")
    page = client.get("/events/?operator=yes")
    check(
        refused.status_code == 403 and page.status_code == 503 and b"flask-pgevents is disabled" in page.data,
        "the dashboard answers 403, and renders its template for an authorized request",
    )


if __name__ == "__main__":
    main(sys.argv[1], migrate="--migrate" in sys.argv[2:])
