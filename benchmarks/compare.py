#!/usr/bin/env python
"""The drain of two versions of flask-pgevents, side by side on one machine.

Usage::

    python benchmarks/compare.py BASE_TREE [NEW_TREE] [--runs N] [--events N]
                                 [--driver psycopg2|psycopg] [--json PATH]

``BASE_TREE`` and ``NEW_TREE`` (default: this checkout) are source trees
holding a ``flask_pgevents`` package, for instance a worktree of an older
commit (``git worktree add /tmp/base v0.2.0``). Each run starts one child
process per tree, alternating which goes first; a child starts an embedded
PostgreSQL, installs an insert trigger on a table of about 120-byte rows,
then three times commits ``--events`` rows in one INSERT and drains them
with ``process_pending()`` and a no-op handler. It reports the median of
the last two drains (the first warms the caches). The table shows each
tree's median over the runs and the median of the per-run ratios, which a
busy machine disturbs less than the absolute rates.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def drain(tree: str, driver: str, events: int) -> float:
    """In a child process: events/s of ``process_pending()`` with the package from ``tree``."""
    sys.path.insert(0, tree)
    import flask_pgevents

    if not flask_pgevents.__file__ or not flask_pgevents.__file__.startswith(tree):
        raise RuntimeError(f"flask_pgevents came from {flask_pgevents.__file__}, not from {tree}.")
    sys.path.insert(0, HERE)
    import logging

    from scenarios.common import (
        BULK_INSERT,
        BenchServer,
        build_app,
        connect,
        create_anchor_tables,
        item_table,
        sqlalchemy_url,
    )

    logging.disable(logging.WARNING)  # the superuser install's warning
    server = BenchServer(None)
    try:
        url = server.create_database("pgevents_bench_compare")
        create_anchor_tables(url, "compare_item", "compare_raw")
        app, pgevents = build_app(
            sqlalchemy_url(url, driver), [item_table("compare_item")], ["after_insert"], lambda event: None
        )
        rates = []
        for _ in range(3):
            with connect(url) as conn:
                conn.execute(BULK_INSERT.format(table="compare_item"), ("x" * 60, events))
            started = time.perf_counter()
            with app.app_context():
                handled = pgevents.process_pending()
            rates.append(handled / (time.perf_counter() - started))
            if handled != events:
                raise RuntimeError(f"Drained {handled} events of {events}.")
        return statistics.median(rates[1:])
    finally:
        server.stop()


def child_rate(tree: str, driver: str, events: int) -> float:
    child = subprocess.run(
        [sys.executable, __file__, "--child", tree, "--driver", driver, "--events", str(events)],
        capture_output=True, text=True,
    )
    if child.returncode != 0:
        raise RuntimeError(f"The drain of {tree} failed:\n{child.stderr}")
    return float(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", nargs="?", help="the source tree to compare against")
    parser.add_argument("new", nargs="?", default=ROOT, help="the source tree to measure (default: this one)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--driver", choices=["psycopg2", "psycopg"], default="psycopg2")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "compare.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(drain(os.path.abspath(args.child), args.driver, args.events))
        return
    if args.base is None:
        parser.error("name the source tree to compare against, e.g. a 'git worktree' of an older commit")
    trees = {"base": os.path.abspath(args.base), "new": os.path.abspath(args.new)}
    rates: dict[str, list[float]] = {"base": [], "new": []}
    for run in range(args.runs):
        order = ["base", "new"] if run % 2 == 0 else ["new", "base"]
        for name in order:
            rates[name].append(child_rate(trees[name], args.driver, args.events))
        print(f"run {run + 1}: base {rates['base'][-1]:,.0f}/s, new {rates['new'][-1]:,.0f}/s", file=sys.stderr)
    ratios = [new / base for base, new in zip(rates["base"], rates["new"])]
    commits = {
        name: subprocess.run(["git", "-C", tree, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        for name, tree in trees.items()
    }
    result: dict[str, Any] = {
        "trees": trees, "commits": commits, "driver": args.driver, "events": args.events, "runs": args.runs,
        "rates": rates, "ratios": ratios,
        "median": {name: statistics.median(values) for name, values in rates.items()},
        "median_ratio": statistics.median(ratios),
        "load_average": os.getloadavg(),
    }
    print(f"process_pending() drain of {args.events:,} events, {args.driver}, {args.runs} runs")
    print(f"{'tree':<6} {'median events/s':>16} {'min-max':>20}")
    for name, values in rates.items():
        print(f"{name:<6} {result['median'][name]:>16,.0f} {min(values):>9,.0f}-{max(values):,.0f}")
    print(f"new / base, median of the per-run ratios: {result['median_ratio']:.2f}"
          f" ({min(ratios):.2f}-{max(ratios):.2f})")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as out:
        json.dump(result, out, indent=1)


if __name__ == "__main__":
    main()
