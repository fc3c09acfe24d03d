"""Scenario write_cost: what capture costs the writer of bulk INSERT, UPDATE and DELETE statements."""
from __future__ import annotations

import logging
from typing import Any, Optional

import psycopg

from flask_pgevents.sql import quote_ident, quote_literal, render

from .common import (
    BULK_INSERT,
    EVENT_TABLE,
    ITEM_DDL,
    OURS,
    SCHEMA,
    BenchServer,
    ScenarioResult,
    Settings,
    build_app,
    connect,
    item_table,
    round_value,
    scalar,
    sqlalchemy_url,
    timed_statement,
)

logger = logging.getLogger("benchmarks.write_cost")


def capture_function_header(schema: str, function: str) -> str:
    """``CREATE FUNCTION ... AS $pgevents$`` exactly as the library writes its own.

    The variant functions below share the library's header (SECURITY DEFINER
    and the pinned settings, which PostgreSQL sets and restores on every
    call) so that only what they compare differs.

    :param function: a plain identifier, written unquoted as the library does.
    """
    return render("capture_function_header", schema=quote_ident(schema), function=function)


# The same event table, written once per row instead of once per statement.
PER_ROW_CAPTURE_DDL = """{header}
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO {event_table} (table_schema, table_name, op, new)
        VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, 'insert', to_json(NEW));
    ELSIF TG_OP = 'UPDATE' THEN
        IF OLD IS NOT DISTINCT FROM NEW THEN
            RETURN NULL;
        END IF;
        INSERT INTO {event_table} (table_schema, table_name, op, old, new)
        VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, 'update', to_json(OLD), to_json(NEW));
    ELSE
        INSERT INTO {event_table} (table_schema, table_name, op, old)
        VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, 'delete', to_json(OLD));
    END IF;
    PERFORM pg_notify({channel}, '');
    RETURN NULL;
END
$pgevents$;
CREATE TRIGGER bench_capture_row AFTER INSERT OR UPDATE OR DELETE ON wc_row
FOR EACH ROW EXECUTE FUNCTION public.bench_capture_row();
"""

# Statement-level insert capture like the library's, storing the row as
# ``json`` or as the row's text form in a copy of the event table.
FORMAT_SCHEMA_DDL = "CREATE SCHEMA bench_fmt"
FORMAT_CAPTURE_DDL = """
CREATE TABLE bench_fmt.event_{kind} (LIKE {event_table} INCLUDING ALL);
ALTER TABLE bench_fmt.event_{kind} ALTER COLUMN old TYPE {column_type} USING old::text::{column_type},
                                   ALTER COLUMN new TYPE {column_type} USING new::text::{column_type};
{header}
BEGIN
    INSERT INTO bench_fmt.event_{kind} (table_schema, table_name, op, new)
    SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME, 'insert', {expression}
    FROM pgevents_new AS n;
    IF FOUND THEN
        PERFORM pg_notify('bench_fmt', '');
    END IF;
    RETURN NULL;
END
$pgevents$;
CREATE TRIGGER bench_capture_{kind} AFTER INSERT ON wc_{kind}
REFERENCING NEW TABLE AS pgevents_new
FOR EACH STATEMENT EXECUTE FUNCTION bench_fmt.capture_insert_{kind}();
"""
FORMATS = {
    # kind: (column type, expression, label)
    "jsonb": ("jsonb", "to_jsonb(n.*)", "to_jsonb"),
    "text": ("text", "(n.*)::text", "row::text"),
}


def scenario_write_cost(server: BenchServer, settings: Settings) -> ScenarioResult:
    """What capture costs the writer: bulk INSERT, UPDATE, DELETE with and without triggers.

    Each of ``write_rows`` rows is inserted by one ``INSERT ... SELECT``, then
    updated by one ``UPDATE`` (every row changes), then deleted by one
    ``DELETE``; each statement is timed with its commit, after a CHECKPOINT and
    with the event tables emptied. Variants: flask-pgevents' statement-level
    triggers (listener not running, events accumulate); no triggers (the
    anchor); a per-row trigger (FOR EACH ROW) writing the same event table.

    Also the stored format of the statement-level insert capture: the
    library's ``to_json`` against ``to_jsonb`` and ``row::text`` (temporary
    copies of the event table and function, created here only), with the
    event table's size per row.
    """
    name = "pgevents_bench_write_cost"
    url = server.create_database(name)
    rows = settings.write_rows
    plain, ours, per_row = "no triggers", f"{OURS} (statement-level)", "per-row trigger"
    result = ScenarioResult(params={"rows": rows}, measurements=[])
    with connect(url) as conn:
        for table in ("wc_plain", "wc_stmt", "wc_row", "wc_jsonb", "wc_text"):
            conn.execute(ITEM_DDL.format(name=table))
    # Installs the library's triggers on wc_stmt; its listener never runs here.
    build_app(
        sqlalchemy_url(url, settings.driver), [item_table("wc_stmt")],
        ["after_insert", "after_update", "after_delete"], lambda event: None,
    )
    with connect(url) as conn:
        conn.execute(PER_ROW_CAPTURE_DDL.format(
            header=capture_function_header("public", "bench_capture_row"),
            event_table=EVENT_TABLE, channel=quote_literal(SCHEMA),
        ))
        conn.execute(FORMAT_SCHEMA_DDL)
        for kind, (column_type, expression, _) in FORMATS.items():
            conn.execute(FORMAT_CAPTURE_DDL.format(
                kind=kind, column_type=column_type, expression=expression, event_table=EVENT_TABLE,
                header=capture_function_header("bench_fmt", f"capture_insert_{kind}"),
            ))

    event_tables = [EVENT_TABLE] + [f"bench_fmt.event_{kind}" for kind in FORMATS]
    # The format variants also go in the table under their own labels.
    format_label = {"wc_stmt": f"to_json ({OURS})", "wc_jsonb": "to_jsonb", "wc_text": "row::text"}
    format_event_table = {"wc_stmt": EVENT_TABLE, "wc_jsonb": "bench_fmt.event_jsonb",
                          "wc_text": "bench_fmt.event_text"}
    variant_of = {"wc_plain": plain, "wc_stmt": ours, "wc_row": per_row}
    bulk_insert = BULK_INSERT

    def reset(conn: psycopg.Connection[Any], table: Optional[str] = None) -> None:
        if table:
            conn.execute(f"TRUNCATE {table}")
        conn.execute(f"TRUNCATE {', '.join(event_tables)}")
        conn.execute("CHECKPOINT")

    def measure(conn: psycopg.Connection[Any], table: str) -> None:
        reset(conn, table)
        insert = timed_statement(conn, bulk_insert.format(table=table), ("", rows))
        if table in format_event_table:
            size = scalar(conn, "SELECT pg_total_relation_size(%s)", (format_event_table[table],))
            anchor_label = format_label["wc_stmt"]
            label = format_label[table]
            result.add(f"format: INSERT {rows:,} rows", label, "s",
                       None if table == "wc_stmt" else anchor_label).values.append(insert)
            result.add("format: event table size", label, "bytes/row",
                       None if table == "wc_stmt" else anchor_label).values.append(size / rows)
        if table not in variant_of:
            return
        variant = variant_of[table]
        anchor = None if variant == plain else plain
        result.add(f"INSERT {rows:,} rows", variant, "s", anchor).values.append(insert)
        reset(conn)
        update = timed_statement(conn, f"UPDATE {table} SET n = n + 1")
        result.add(f"UPDATE {rows:,} rows", variant, "s", anchor).values.append(update)
        reset(conn)
        delete = timed_statement(conn, f"DELETE FROM {table}")
        result.add(f"DELETE {rows:,} rows", variant, "s", anchor).values.append(delete)
        logger.info("write cost %s: insert %.3f s, update %.3f s, delete %.3f s",
                    variant, insert, update, delete)

    tables = ["wc_plain", "wc_stmt", "wc_row", "wc_jsonb", "wc_text"]
    try:
        with connect(url) as conn:
            for table in tables:  # warm-up: caches, plans, file extension
                conn.execute(bulk_insert.format(table=table), ("", min(rows, 10_000)))
                reset(conn, table)
            for run in range(settings.runs):
                shift = run % len(tables)
                for table in tables[shift:] + tables[:shift]:
                    measure(conn, table)
        # Per-row over statement-level, from the same runs.
        for op in ("INSERT", "UPDATE", "DELETE"):
            metric = f"{op} {rows:,} rows"
            stmt = next(m for m in result.measurements if m.metric == metric and m.variant == ours)
            row = next(m for m in result.measurements if m.metric == metric and m.variant == per_row)
            result.extra.setdefault("per_row_over_statement", {})[op] = round_value(row.median / stmt.median)
    finally:
        server.drop_database(name)
    return result

