"""Scenario signals: what signals, counters and stats() cost the drain."""
from __future__ import annotations

import logging
import time
from typing import Any

from flask_pgevents import event_handled

from .common import (
    BULK_INSERT,
    ITEM_DDL,
    BenchServer,
    ScenarioResult,
    Settings,
    build_app,
    connect,
    item_table,
    sqlalchemy_url,
)

logger = logging.getLogger("benchmarks.signals")

NO_RECEIVER = "no receiver"
ONE_RECEIVER = "one event_handled receiver"


def scenario_signals(server: BenchServer, settings: Settings) -> ScenarioResult:
    """Drain throughput with no signal receiver against one receiver connected.

    A bulk INSERT of ``bulk_rows`` rows drained by ``process_pending()`` (the
    dispatch loop alone, no listener thread), once with nothing connected to
    any signal and once with a no-op receiver on ``event_handled``, the
    variants interleaved in each run. The in-process counters are always on,
    so "no receiver" is the cost users pay by default. Also times one
    ``stats()`` call with the backlog still pending (an administration query).
    """
    name = "pgevents_bench_signals"
    url = server.create_database(name)
    rows = settings.bulk_rows
    result = ScenarioResult(params={"bulk_rows": rows, "driver": settings.driver}, measurements=[])
    with connect(url) as conn:
        conn.execute(ITEM_DDL.format(name="sig_item"))
    app, pgevents = build_app(
        sqlalchemy_url(url, settings.driver), [item_table("sig_item")], ["after_insert"], lambda event: None,
    )
    received = [0]

    def receiver(sender: Any, **kwargs: Any) -> None:
        received[0] += 1

    writer = connect(url)
    try:
        def drain(variant: str) -> None:
            writer.execute(BULK_INSERT.format(table="sig_item"), ("", rows))
            if variant == ONE_RECEIVER:
                event_handled.connect(receiver, sender=app)
            try:
                started = time.perf_counter()
                handled = pgevents.process_pending(app=app)
                elapsed = time.perf_counter() - started
            finally:
                event_handled.disconnect(receiver, sender=app)
            anchor = None if variant == NO_RECEIVER else NO_RECEIVER
            result.add("drain: events/s", variant, "events/s", anchor).values.append(handled / elapsed)
            logger.info("drain, %s: %d events, %.0f events/s", variant, handled, handled / elapsed)

        def stats_call() -> None:
            writer.execute(BULK_INSERT.format(table="sig_item"), ("", rows))
            started = time.perf_counter()
            pgevents.stats(app)
            result.add(f"stats() with {rows} pending", NO_RECEIVER, "ms").values.append(
                (time.perf_counter() - started) * 1e3)
            pgevents.process_pending(app=app)

        variants = [NO_RECEIVER, ONE_RECEIVER]
        for run_index in range(settings.runs):
            for variant in variants[run_index % 2:] + variants[:run_index % 2]:
                drain(variant)
            stats_call()
        result.extra["receiver_calls"] = received[0]
    finally:
        writer.close()
        server.drop_database(name)
    return result
