"""sql/: the named blocks of schema.sql and queries.sql, rendering, and quoting."""
from __future__ import annotations

import re
import string
from importlib import resources

import pytest
from conftest import raises

from flask_pgevents.sql import BLOCKS, dollar_tag, parse_blocks, quote_ident, quote_literal, render


def placeholders(sql: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(sql) if field}


def sql_file(name: str) -> str:
    return resources.files("flask_pgevents.sql").joinpath(name).read_text(encoding="utf-8")


# parse_blocks -------------------------------------------------------------------------


def test_blocks_run_from_their_name_line_to_the_next_without_leading_comments():
    text = (
        "-- The file's own header, before any block, is not a block.\n"
        "\n"
        "-- name: first\n"
        "-- What the first block does.\n"
        "--\n"
        "\n"
        "SELECT 1;\n"
        "-- A comment inside the block stays.\n"
        "SELECT 2;   \n"
        "\n"
        "\n"
        "-- name: second\n"
        "SELECT 3\n"
        "-- name: empty\n"
        "-- Only a comment.\n"
    )
    assert parse_blocks(text) == {
        "first": "SELECT 1;\n-- A comment inside the block stays.\nSELECT 2;",
        "second": "SELECT 3",
        "empty": "",
    }


def test_a_name_line_must_start_the_line():
    assert parse_blocks("-- name: outer\nSELECT '-- name: inner'\n  -- name: indented\n") == {
        "outer": "SELECT '-- name: inner'\n  -- name: indented",
    }


def test_text_without_blocks_has_none():
    assert parse_blocks("-- just a comment\nSELECT 1;\n") == {}


def test_a_block_defined_twice_is_refused():
    with raises(ValueError, "The SQL block 'twice' is defined twice."):
        parse_blocks("-- name: twice\nSELECT 1\n-- name: other\nSELECT 2\n-- name: twice\nSELECT 3\n")


# The package's blocks ---------------------------------------------------------------


def test_blocks_holds_every_block_of_both_files_and_no_name_is_in_both():
    schema, queries = parse_blocks(sql_file("schema.sql")), parse_blocks(sql_file("queries.sql"))
    assert not schema.keys() & queries.keys()
    assert {**schema, **queries} == BLOCKS
    assert {"create_schema", "create_trigger", "listener_grants"} <= schema.keys()
    assert {"claim_batch", "record_failure", "installed_triggers"} <= queries.keys()


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_every_block_is_sql_without_its_leading_comments(name):
    sql = BLOCKS[name]
    assert sql.strip(), name
    assert not sql.startswith(("--", "\n")), name
    assert sql == sql.rstrip(), name


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_every_block_renders_with_the_placeholders_it_uses(name):
    wanted = placeholders(BLOCKS[name])
    fragments = {field: f"<{field} fragment>" for field in wanted}
    sql = render(name, **fragments)
    assert not placeholders(sql), name
    for fragment in fragments.values():
        assert fragment in sql
    for missing in wanted if len(wanted) > 1 else ():
        with pytest.raises(KeyError):
            render(name, **dict.fromkeys(wanted - {missing}, "x"))


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_no_placeholder_is_inside_quotes(name):
    # Identifiers and literals are quoted by quote_ident and quote_literal, never by the block.
    code = re.sub(r"--[^\n]*", "", BLOCKS[name])
    quoted = re.findall(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"", code)
    assert [span for span in quoted if "{" in span] == [], name


def test_blocks_without_placeholders_render_as_they_are():
    assert render("begin") == "BEGIN"
    assert render("safe_search_path") == "SET search_path = pg_catalog, pg_temp"
    assert render("notify") == "SELECT pg_catalog.pg_notify(%s, %s)"


def test_render_fills_in_quoted_fragments():
    assert render("drop_trigger", trigger=quote_ident("pgevents_insert"), table='"public"."user"') == (
        'DROP TRIGGER IF EXISTS "pgevents_insert" ON "public"."user";'
    )
    assert render("listen", channel=quote_ident('my "events"')) == 'LISTEN "my ""events"""'


def test_render_of_an_unknown_block_fails():
    with pytest.raises(KeyError):
        render("no_such_block")


def test_every_schema_query_names_the_event_schema_only_through_its_placeholder():
    for name in ("claim_batch", "record_failure", "purge_broadcast", "register_listener"):
        sql = BLOCKS[name]
        assert placeholders(sql) == {"schema"}, name
        assert "pgevents." not in sql and '"pgevents"' not in sql, name


# Quoting ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, quoted", [
    ("user", '"user"'),
    ("Mixed Case", '"Mixed Case"'),
    ('say "hi"', '"say ""hi"""'),
    ("back\\slash", '"back\\slash"'),
    ("it's", '"it\'s"'),
    ("\u00e9v\u00e9nements", '"\u00e9v\u00e9nements"'),
    ("", '""'),
])
def test_quote_ident(name, quoted):
    assert quote_ident(name) == quoted


@pytest.mark.parametrize("value, quoted", [
    ("pgevents", "'pgevents'"),
    ("it's", "'it''s'"),
    ('say "hi"', "'say \"hi\"'"),
    # A backslash makes an escape string, read alike whatever standard_conforming_strings is.
    ("pg\\events", "E'pg\\\\events'"),
    ("it's \\", "E'it''s \\\\'"),
    ("\\'", "E'\\\\'''"),
    ("", "''"),
])
def test_quote_literal(value, quoted):
    assert quote_literal(value) == quoted


def test_a_nul_character_can_be_neither_an_identifier_nor_a_literal():
    with raises(ValueError, "Identifier 'a\\x00b' contains a NUL character."):
        quote_ident("a\x00b")
    with raises(ValueError, "Literal 'a\\x00b' contains a NUL character."):
        quote_literal("a\x00b")


def test_a_block_rendered_without_its_fragments_is_an_error():
    # Never SQL with a literal "{schema}" in it.
    with pytest.raises(KeyError, match="schema"):
        render("backlog")


def test_dollar_tags_avoid_every_text_they_quote():
    assert dollar_tag("plain", "") == "$pgevents$"
    assert dollar_tag('"t$pgevents$"', "app") == "$pgevents1$"
    assert dollar_tag("$pgevents$", "$pgevents1$ $pgevents2$") == "$pgevents3$"
