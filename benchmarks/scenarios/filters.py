"""Scenario filters: what a selective ``where=`` costs the writer, against ``columns=`` and no filter."""
from __future__ import annotations

import logging
from typing import Any

import psycopg

from flask_pgevents.sql import quote_literal

from .common import (
    BULK_INSERT,
    EVENT_TABLE,
    ITEM_DDL,
    OURS,
    SINGLE_INSERT,
    BenchServer,
    ScenarioResult,
    Settings,
    connect,
    item_table,
    sqlalchemy_url,
    timed_statement,
)
from .write_cost import capture_function_header

logger = logging.getLogger("benchmarks.filters")

#: One row in a hundred matches the filter after the UPDATE below (n = n + 1).
SELECTIVE = "n % 100 = 0"

# The same simplified capture (new rows of an UPDATE that match a condition)
# with the condition written into the function, and passed as a trigger
# argument and run with EXECUTE: the two ways a filter can reach the SQL.
STATIC_DDL = """{header}
BEGIN
    INSERT INTO {event_table} (table_schema, table_name, op, new)
    SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME, 'update', to_json(x.*) FROM pgevents_new AS x WHERE x.{condition};
    RETURN NULL;
END
$pgevents$;
CREATE TRIGGER bench_static AFTER UPDATE ON fc_static REFERENCING NEW TABLE AS pgevents_new
FOR EACH STATEMENT EXECUTE FUNCTION public.bench_capture_static();
"""
EXECUTE_DDL = """{header}
BEGIN
    EXECUTE 'INSERT INTO {event_table} (table_schema, table_name, op, new)'
        ' SELECT $1, $2, ''update'', to_json(x.*) FROM pgevents_new AS x WHERE x.' || TG_ARGV[0]
        USING TG_TABLE_SCHEMA, TG_TABLE_NAME;
    RETURN NULL;
END
$pgevents$;
CREATE TRIGGER bench_execute AFTER UPDATE ON fc_execute REFERENCING NEW TABLE AS pgevents_new
FOR EACH STATEMENT EXECUTE FUNCTION public.bench_capture_execute({condition});
"""


def scenario_filters(server: BenchServer, settings: Settings) -> ScenarioResult:
    """A bulk UPDATE of every row, and single-row UPDATEs, on tables captured
    with no filter, with ``columns=`` naming a column the UPDATE leaves alone,
    with a ``where=`` that one row in a hundred matches, and without triggers
    (the anchor). Also the same simplified filtered capture written into the
    function (as the library does) and run with ``EXECUTE`` from a trigger
    argument (the alternative), to compare their planning cost per statement.
    """
    from flask import Flask

    from flask_pgevents import PGEvents

    name = "pgevents_bench_filters"
    url = server.create_database(name)
    rows = settings.write_rows
    singles = max(200, rows // 50)
    variants = {
        "fc_plain": "no triggers",
        "fc_all": f"{OURS}, no filter",
        "fc_columns": f"{OURS}, columns=['payload'] (no event)",
        "fc_where": f"{OURS}, where= (1 row in 100)",
        "fc_static": "filter in the function (simplified)",
        "fc_execute": "filter run with EXECUTE (simplified)",
    }
    result = ScenarioResult(params={"rows": rows, "single_updates": singles}, measurements=[])
    with connect(url) as conn:
        for table in variants:
            conn.execute(ITEM_DDL.format(name=table))
        conn.execute(STATIC_DDL.format(
            header=capture_function_header("public", "bench_capture_static"), event_table=EVENT_TABLE,
            condition=SELECTIVE,
        ))
    app = Flask("pgevents_bench_filters")
    app.config.update(PGEVENTS_DATABASE_URI=sqlalchemy_url(url, settings.driver), PGEVENTS_AUTOSTART=False)
    pgevents = PGEvents()
    fc_all, fc_columns, fc_where = (item_table(t) for t in ("fc_all", "fc_columns", "fc_where"))
    pgevents.listen(fc_all, "after_update", lambda event: None)
    pgevents.listen(fc_columns, "after_update", lambda event: None, columns=["payload"])
    pgevents.listen(fc_where, "after_update", lambda event: None, where=fc_where.c.n % 100 == 0)
    pgevents.init_app(app)
    pgevents.install_triggers(app)
    with connect(url) as conn:
        conn.execute(EXECUTE_DDL.format(
            header=capture_function_header("public", "bench_capture_execute"), event_table=EVENT_TABLE,
            condition=quote_literal(SELECTIVE),
        ))

    def reset(conn: psycopg.Connection[Any]) -> None:
        conn.execute(f"TRUNCATE {EVENT_TABLE}")
        conn.execute("CHECKPOINT")

    def measure(conn: psycopg.Connection[Any], table: str) -> None:
        variant = variants[table]
        anchor = None if table == "fc_plain" else variants["fc_plain"]
        conn.execute(f"TRUNCATE {table}")
        conn.execute(BULK_INSERT.format(table=table), ("", rows))
        reset(conn)
        update = timed_statement(conn, f"UPDATE {table} SET n = n + 1")
        events = conn.execute(f"SELECT count(*) FROM {EVENT_TABLE}").fetchone()
        result.add(f"UPDATE {rows:,} rows", variant, "s", anchor).values.append(update)
        result.add(f"events stored per UPDATE of {rows:,} rows", variant, "rows").values.append(
            float(events[0] if events else 0)
        )
        reset(conn)
        seconds = sum(
            timed_statement(conn, f"UPDATE {table} SET n = n + 1 WHERE id = %s", (i,))
            for i in range(1, singles + 1)
        )
        result.add("single-row UPDATE", variant, "ms", anchor).values.append(1000 * seconds / singles)
        logger.info("filters %s: bulk %.3f s, single %.3f ms", variant, update, 1000 * seconds / singles)

    tables = list(variants)
    try:
        with connect(url) as conn:
            for table in tables:  # warm-up
                conn.execute(SINGLE_INSERT.format(table=table), (1, ""))
            for run in range(settings.runs):
                shift = run % len(tables)
                for table in tables[shift:] + tables[:shift]:
                    measure(conn, table)
    finally:
        server.drop_database(name)
    return result
