#!/usr/bin/env python
"""Draw the benchmark results: docs/latency.png, docs/writers.png and docs/drain.png.

Usage::

    python benchmarks/plot.py [RESULTS_JSON] [--out DIRECTORY]

Reads the JSON written by ``benchmarks/run.py`` (default
``benchmarks/results/latest.json``). Needs matplotlib (the ``bench`` extra).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

logger = logging.getLogger("benchmarks.plot")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_JSON = os.path.join(ROOT, "benchmarks", "results", "latest.json")
DEFAULT_OUT = os.path.join(ROOT, "docs")

#: The library first, anchors after, in stable colours.
COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]


def subtitle(report: dict[str, Any]) -> str:
    """One line saying where the numbers come from."""
    machine = report.get("machine", {})
    postgres = (machine.get("postgres") or "PostgreSQL ?").split(" on ")[0]
    return (
        f"{machine.get('cpu_model', '?')}, {machine.get('cores_logical', '?')} cores, "
        f"{machine.get('python', '?')}, {postgres}; {report.get('mode', '?')} run, {report.get('started', '')}"
    )


def plot_latency(report: dict[str, Any], path: str) -> bool:
    """Commit → handler latency distribution (pooled over runs), ours vs the raw LISTEN loop."""
    scenario = report.get("scenarios", {}).get("latency")
    if not scenario or "extra" not in scenario:
        logger.warning("No latency results in the JSON; %s not written.", path)
        return False
    extra = scenario["extra"]
    # In-process curves (from commit) solid; listener processes (from send), when measured, dashed.
    curves = [(variant, curve, "-") for variant, curve in extra["latency_ms_percentiles"].items()]
    curves += [(f"{variant}, listener process, from send", curve, "--")
               for variant, curve in extra.get("latency_from_send_ms_percentiles", {}).items()]
    samples = extra.get("samples", {})
    params = scenario.get("params", {})
    figure, (cdf_axis, tail_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
    left_edge, right_edge = 0.0, 0.0
    for colour, (variant, curve, style) in zip(COLOURS, curves):
        label = f"{variant} (n={samples[variant]:,})" if variant in samples else variant
        cdf_axis.plot([v for _, v in curve], [q for q, _ in curve], label=label, color=colour, linestyle=style)
        by_percentile = dict(curve)
        left_edge = min(left_edge, by_percentile.get(1.0, 0.0))
        right_edge = max(right_edge, by_percentile.get(99.5, 0.0))
        tail = [(q, v) for q, v in curve if q >= 50]
        # Distance to 100 on a log axis spreads the nines: p50, p90, p99, p99.9.
        tail_axis.plot([100 - q for q, _ in tail], [max(v, 0.01) for _, v in tail], color=colour,
                       linestyle=style, label=variant)
    cdf_axis.set_xlim(left_edge * 1.1, right_edge * 1.1 or None)
    cdf_axis.set_xlabel("commit (solid) or send (dashed) → handler call (ms), p1 to p99.5")
    cdf_axis.set_ylabel("percentile")
    cdf_axis.set_title("Latency distribution (CDF)")
    cdf_axis.grid(True, alpha=0.3)
    cdf_axis.legend(fontsize=7, loc="center right")
    tail_axis.set_xscale("log")
    tail_axis.set_yscale("log")
    ticks = [50, 10, 1, 0.1]
    tail_axis.set_xticks(ticks)
    tail_axis.set_xticklabels([f"p{100 - t:g}" for t in ticks])
    tail_axis.set_xlim(60, 0.05)
    tail_axis.set_ylabel("latency (ms, log scale)")
    tail_axis.set_title("Tail, p50 → max")
    tail_axis.grid(True, which="both", alpha=0.3)
    figure.suptitle(
        f"flask-pgevents latency at {params.get('rate_per_s', '?'):g} single-row commits/s\n{subtitle(report)}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


Series = dict[str, dict[str, dict[str, Any]]]


def plot_series(
    series: Series, path: str, title: str, xlabel: str, ylabel: str, base: int, dashed: str,
) -> None:
    """Medians with min-max bars against a log x axis, one line per variant.

    :param series: variant → x value (as a string) → a measurement's JSON record.
    :param base: the x axis's log base.
    :param dashed: variants whose name contains this are drawn dashed (diagnostics, anchors).
    """
    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    for colour, (variant, by_x) in zip(COLOURS, series.items()):
        xs = sorted(int(x) for x in by_x)
        medians = [by_x[str(x)]["median"] for x in xs]
        lower = [m - by_x[str(x)]["min"] for m, x in zip(medians, xs)]
        upper = [by_x[str(x)]["max"] - m for m, x in zip(medians, xs)]
        axis.errorbar(xs, medians, yerr=[lower, upper], label=variant, color=colour,
                      linestyle="--" if dashed in variant else "-", marker="o", capsize=3)
    axis.set_xscale("log", base=base)
    axis.minorticks_off()  # the measured sizes are the ticks
    ticks = sorted({int(x) for by_x in series.values() for x in by_x})
    axis.set_xticks(ticks)
    axis.set_xticklabels([f"{x:,}" for x in ticks])
    axis.set_xlabel(xlabel)
    axis.set_ylabel(f"{ylabel} (median, bars: min–max)")  # noqa: RUF001
    axis.set_ylim(bottom=0)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_writers(report: dict[str, Any], path: str) -> bool:
    """Writer TPS against the number of concurrent writers, per variant, with min-max bars."""
    scenario = report.get("scenarios", {}).get("writers")
    if not scenario or "extra" not in scenario:
        logger.warning("No writers results in the JSON; %s not written.", path)
        return False
    plot_series(
        scenario["extra"]["tps"], path, f"Writer throughput with and without capture\n{subtitle(report)}",
        xlabel="concurrent single-row writers", ylabel="commits/s", base=2, dashed="diagnostic",
    )
    return True


def plot_drain(report: dict[str, Any], path: str) -> bool:
    """Drain throughput against the size of the committed backlog, per variant, with min-max bars."""
    scenario = report.get("scenarios", {}).get("backlog")
    if not scenario or "extra" not in scenario:
        logger.warning("No backlog results in the JSON; %s not written.", path)
        return False
    series = {variant: by_size for variant, by_size in scenario["extra"]["drain"].items() if by_size}
    plot_series(
        series, path, f"Draining a committed backlog\n{subtitle(report)}",
        xlabel="events committed before the drain (log scale)", ylabel="events/s", base=10, dashed="raw",
    )
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Draw docs/latency.png, docs/writers.png and docs/drain.png.")
    parser.add_argument("results", nargs="?", default=DEFAULT_JSON, help="default: %(default)s")
    parser.add_argument("--out", default=DEFAULT_OUT, help="directory for the PNGs (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    with open(args.results) as results:
        report = json.load(results)
    os.makedirs(args.out, exist_ok=True)
    written = 0
    for filename, plot in (("latency.png", plot_latency), ("writers.png", plot_writers), ("drain.png", plot_drain)):
        path = os.path.join(args.out, filename)
        if plot(report, path):
            logger.info("Wrote %s.", path)
            written += 1
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
