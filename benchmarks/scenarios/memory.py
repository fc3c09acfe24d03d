"""Scenario memory: the listener process's RSS before and after handling many events."""
from __future__ import annotations

import gc
import logging
import multiprocessing
import multiprocessing.connection
import resource
import time
from typing import Any

from flask_pgevents import Event

from .common import (
    BULK_INSERT,
    ITEM_DDL,
    OURS,
    ArrivalLog,
    BenchServer,
    ScenarioResult,
    Settings,
    build_app,
    connect,
    item_table,
    sqlalchemy_url,
)

logger = logging.getLogger("benchmarks.memory")


def memory_child_main(pipe: multiprocessing.connection.Connection, url: str) -> None:
    """The listener process of the memory scenario: handles events, reports its RSS on request."""
    import psutil

    logging.basicConfig(level=logging.WARNING)
    log = ArrivalLog()

    def handler(event: Event) -> None:
        log.record(len((event.new or {})["payload"]))  # a handler reads the row

    app, pgevents = build_app(url, [item_table("mem_item")], ["after_insert"], handler)
    pgevents.start(app)
    process = psutil.Process()
    pipe.send("ready")
    while True:
        command = pipe.recv()
        if command[0] == "stop":
            pgevents.stop(timeout=10, app=app)
            pipe.send("stopped")
            return
        _, count, timeout = command
        complete = log.wait_for(count, timeout)
        gc.collect()
        pipe.send({
            "complete": complete,
            "handled": log.count,
            "rss": process.memory_info().rss,
            "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "time": time.perf_counter(),
        })


def scenario_memory(server: BenchServer, settings: Settings) -> ScenarioResult:
    """Listener RSS before and after handling many events: does it leak or grow with volume?

    A spawned process runs only the app and its listener thread (handler
    reads ``event.new``). After 1,000 warm-up events and a ``gc.collect()``
    its RSS (psutil) is the baseline; then ``memory_events`` events arrive in
    ``memory_chunks`` equal chunks (bulk INSERTs of at most 50,000 rows), each
    chunk handled completely before RSS is read again. Reports the total
    growth, and the growth per chunk as the repeated measurement (median and
    spread over the chunks after the first). No anchor: the expectation is a
    flat line.
    """
    import psutil  # noqa: F401 - fail early if the bench extra is missing

    name = "pgevents_bench_memory"
    url = server.create_database(name)
    chunk = max(1, settings.memory_events // settings.memory_chunks)
    result = ScenarioResult(
        params={"events": chunk * settings.memory_chunks, "chunks": settings.memory_chunks,
                "driver": settings.driver},
        measurements=[],
    )
    with connect(url) as conn:
        conn.execute(ITEM_DDL.format(name="mem_item"))
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    child = context.Process(target=memory_child_main, args=(child_end, sqlalchemy_url(url, settings.driver)),
                            name="bench-memory-listener", daemon=True)
    child.start()
    series: list[dict[str, Any]] = []
    try:
        if not parent_end.poll(60) or parent_end.recv() != "ready":
            raise RuntimeError("The memory benchmark's listener process did not start.")
        total = 0
        with connect(url) as conn:

            def insert_and_wait(count: int) -> dict[str, Any]:
                nonlocal total
                remaining = count
                while remaining:
                    step = min(remaining, 50_000)
                    conn.execute(BULK_INSERT.format(table="mem_item"), ("", step))
                    remaining -= step
                total += count
                parent_end.send(("wait", total, settings.drain_timeout + count / 1000))
                report: dict[str, Any] = parent_end.recv()
                if not report["complete"]:
                    raise RuntimeError(f"The listener handled {report['handled']} of {total} events in time.")
                report["events"] = total
                return report

            baseline = insert_and_wait(1_000)
            series.append(baseline)
            logger.info("memory: baseline RSS %.1f MB", baseline["rss"] / 2**20)
            started = baseline["time"]
            for index in range(settings.memory_chunks):
                report = insert_and_wait(chunk)
                series.append(report)
                logger.info("memory: %d events, RSS %.1f MB", report["events"], report["rss"] / 2**20)
                if index > 0:
                    result.add("RSS growth per chunk", OURS, "MB").values.append(
                        (report["rss"] - series[-2]["rss"]) / 2**20)
        last = series[-1]
        handled = last["events"] - baseline["events"]
        result.add("RSS baseline", OURS, "MB").values.append(baseline["rss"] / 2**20)
        result.add(f"RSS after {handled:,} events", OURS, "MB").values.append(last["rss"] / 2**20)
        result.add("RSS growth", OURS, "MB").values.append((last["rss"] - baseline["rss"]) / 2**20)
        result.add("peak RSS", OURS, "MB").values.append(last["max_rss"] / 2**20)
        result.add("events/s (insert, then handle)", OURS, "events/s").values.append(
            handled / (last["time"] - started))
        result.extra["rss_series_mb"] = [[s["events"], round(s["rss"] / 2**20, 2)] for s in series]
        parent_end.send(("stop",))
        parent_end.poll(15)
    finally:
        child.join(15)
        if child.is_alive():
            child.terminate()
        server.drop_database(name)
    return result

