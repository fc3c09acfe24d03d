#!/usr/bin/env python
"""Benchmarks for flask-pgevents, each scenario beside its anchor on the same server.

Usage::

    python benchmarks/run.py [--dsn DSN] [--runs N] [--quick] [--only SCENARIO[,...]]
                             [--json PATH] [--driver psycopg|psycopg2] [-v]

Without ``--dsn`` an embedded PostgreSQL is started (the ``embedded`` extra) and
deleted afterwards. With ``--dsn``, its role must be allowed to create databases:
every scenario runs in a fresh database ``pgevents_bench_<scenario>`` that is
dropped at the end. Each measurement is repeated ``--runs`` times (default 5,
3 with ``--quick``; backlog, latency_history and pgbench, whose set-up is
long, 3, and pgbench 1 with ``--quick``), variants interleaved within each run
so that noise from a shared machine hits them alike; the table shows the
median and the min-max spread over the runs, and the JSON (default
``benchmarks/results/latest.json``) holds the per-run values, percentile
curves and the machine description.

Scenarios: latency, throughput, write_cost, writers, memory, backlog,
latency_history, signals, filters, pgbench, one module each in ``benchmarks/scenarios/``; this
script only runs them and reports. pgbench restarts the embedded server with
``wal_level = logical`` for its logical decoding anchor, and back.
``benchmarks/plot.py`` turns the JSON into ``docs/latency.png``,
``docs/writers.png`` and ``docs/drain.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from typing import Any, Callable, Iterable, Optional, Sequence

import psycopg
import psycopg2

import flask_pgevents

# The scenarios package sits beside this script: importable however it is run
# (python benchmarks/run.py, python -m benchmarks.run) and in spawned children.
BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

from scenarios.backlog import scenario_backlog  # noqa: E402
from scenarios.common import FULL, QUICK, BenchServer, ScenarioResult, Settings, connect, scalar  # noqa: E402
from scenarios.filters import scenario_filters  # noqa: E402
from scenarios.latency import scenario_latency  # noqa: E402
from scenarios.latency_history import scenario_latency_history  # noqa: E402
from scenarios.memory import scenario_memory  # noqa: E402
from scenarios.pgbench import scenario_pgbench  # noqa: E402
from scenarios.signals import scenario_signals  # noqa: E402
from scenarios.throughput import scenario_throughput  # noqa: E402
from scenarios.write_cost import scenario_write_cost  # noqa: E402
from scenarios.writers import scenario_writers  # noqa: E402

logger = logging.getLogger("benchmarks")

ROOT = os.path.dirname(BENCHMARKS)
DEFAULT_JSON = os.path.join(ROOT, "benchmarks", "results", "latest.json")


# Machine description and reporting -------------------------------------------------------

SCENARIOS: dict[str, Callable[[BenchServer, Settings], ScenarioResult]] = {
    "latency": scenario_latency,
    "throughput": scenario_throughput,
    "write_cost": scenario_write_cost,
    "writers": scenario_writers,
    "memory": scenario_memory,
    "backlog": scenario_backlog,
    "latency_history": scenario_latency_history,
    "signals": scenario_signals,
    "filters": scenario_filters,
    # Last: it may restart the embedded server (wal_level) and restores it after.
    "pgbench": scenario_pgbench,
}


def _version(distribution: str) -> Optional[str]:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_state() -> dict[str, Any]:
    def git(*args: str) -> Optional[str]:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--", "flask_pgevents")
    return {"commit": git("rev-parse", "HEAD"), "library_modified": bool(status) if status is not None else None}


def machine_info(server: BenchServer) -> dict[str, Any]:
    """CPU, Python, PostgreSQL and driver versions: what a number depends on."""
    import psutil

    with connect(server.admin_url) as conn:
        version = scalar(conn, "SELECT version()")
        settings = {
            name: scalar(conn, f"SHOW {name}")
            for name in ("shared_buffers", "synchronous_commit", "fsync", "max_connections", "wal_level")
        }
    return {
        "cpu_model": _cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "postgres": version,
        "postgres_settings": settings,
        "embedded_postgres": server.embedded,
        "drivers": {
            "psycopg": psycopg.__version__,
            "libpq (psycopg)": psycopg.pq.version(),
            "psycopg2": psycopg2.__version__.split()[0],
            "libpq (psycopg2)": psycopg2.__libpq_version__,
        },
        "packages": {
            "flask-pgevents": flask_pgevents.__version__,
            "Flask": _version("flask"),
            "SQLAlchemy": _version("sqlalchemy"),
            "embedded-postgres": _version("embedded-postgres"),
        },
        "git": _git_state(),
    }


def _format_number(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def render_table(report: dict[str, Any]) -> str:
    """The results as a fixed-width text table: median, min-max, ratio to the anchor."""
    header = ("scenario", "metric", "variant", "median", "min–max", "unit", "vs anchor")  # noqa: RUF001
    lines: list[tuple[str, ...]] = []
    for scenario, data in report["scenarios"].items():
        if "error" in data:
            lines.append((scenario, "ERROR", data["error"][:60], "", "", "", ""))
            continue
        for m in data["measurements"]:
            spread = f"{_format_number(m['min'])}–{_format_number(m['max'])}"  # noqa: RUF001
            versus = ""
            if m.get("ratio_to_anchor") is not None:
                versus = f"{m['ratio_to_anchor']:.2f}x"
            elif m.get("difference_to_anchor") is not None:
                versus = f"{m['difference_to_anchor']:+.2f} {m['unit']}"
            lines.append((scenario, m["metric"], m["variant"], _format_number(m["median"]), spread, m["unit"], versus))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    out = []
    for index, row in enumerate([header, *lines]):
        cells = [cell.rjust(widths[i]) if i in (3, 4, 6) else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        out.append("  ".join(cells).rstrip())
        if index == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def run_benchmarks(args: argparse.Namespace) -> dict[str, Any]:
    """Start the server, run the selected scenarios one after the other, and return the report."""
    base = QUICK if args.quick else FULL
    # --runs sets every repetition count, those of the long scenarios included.
    runs = {"runs": args.runs, "long_runs": args.runs, "pgbench_runs": args.runs} if args.runs else {}
    settings = dataclasses.replace(base, driver=args.driver, **runs)
    names = list(SCENARIOS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"Unknown scenario {unknown[0]!r}. Expected one of {', '.join(map(repr, SCENARIOS))}.")
    server = BenchServer(args.dsn)
    report: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "settings": dataclasses.asdict(settings),
        "scenarios": {},
    }
    try:
        report["machine"] = machine_info(server)
        report["machine"]["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
        for name in names:
            logger.info("Scenario %s ...", name)
            function = SCENARIOS[name]
            load_before = os.getloadavg()[0]
            started = time.perf_counter()
            try:
                result = function(server, settings)
            except Exception as exc:  # one broken scenario must not lose the others
                logger.exception("Scenario %s failed.", name)
                report["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            report["scenarios"][name] = {
                "description": " ".join((function.__doc__ or "").split()),
                "params": result.params,
                "seconds": round(time.perf_counter() - started, 1),
                "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "measurements": [m.as_json(result.comparison(m)) for m in result.sorted_measurements()],
                "extra": result.extra,
            }
            logger.info("Scenario %s done in %.0f s.", name, time.perf_counter() - started)
        report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        server.stop()
    report["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return report


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--dsn", help="PostgreSQL URI of a role that may create databases"
                        " (default: start an embedded server)")
    parser.add_argument("--runs", type=int, help="repetitions of each measurement (default 5, quick 3;"
                        " backlog, latency_history and pgbench 3, pgbench 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer and smaller measurements (about 5 min for all scenarios)")
    parser.add_argument("--only", help=f"comma-separated scenarios: {', '.join(SCENARIOS)}")
    parser.add_argument("--json", default=DEFAULT_JSON, help="where to write the results (default: %(default)s)")
    parser.add_argument("--driver", choices=("psycopg", "psycopg2"), default="psycopg",
                        help="the driver flask-pgevents uses (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every measurement")
    return parser.parse_args(argv)


def main(argv: Optional[Iterable[str]] = None) -> int:
    """Run the benchmarks, write the JSON, print the table; 1 if a scenario failed."""
    args = parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logger.setLevel(logging.INFO)  # scenario progress, always
    report = run_benchmarks(args)
    directory = os.path.dirname(os.path.abspath(args.json))
    os.makedirs(directory, exist_ok=True)
    with open(args.json, "w") as output:
        json.dump(report, output, indent=1)
    print(render_table(report))
    print(f"\nResults: {args.json}")
    return 1 if any("error" in s for s in report["scenarios"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
