"""store.py: how a claim names the subscribed tables and ops (the rest runs queries
and is tested against PostgreSQL)."""
from __future__ import annotations

import itertools

import pytest

from flask_pgevents.registry import OPS, TableKey
from flask_pgevents.sql import BLOCKS
from flask_pgevents.store import subscription_key


def test_a_subscription_key_is_the_schema_length_schema_table_and_op():
    assert subscription_key(TableKey("public", "user"), "insert") == "6:publicuser:insert"
    assert subscription_key(TableKey("audit", "entry"), "delete") == "5:auditentry:delete"


def test_the_claim_builds_the_same_key_from_each_event_row():
    # subscription_key in SQL: length() counts characters, as len() does.
    assert "length(table_schema) || ':' || table_schema || table_name || ':' || op = ANY(%s)" in BLOCKS["claim_batch"]
    assert len("\u00e9v\u00e9nements") == 10
    assert subscription_key(TableKey("\u00e9v\u00e9nements", "t"), "update") == "10:\u00e9v\u00e9nementst:update"


NAMES = ["a", "ab", "b", "a:1", "1:a", ":", "", "a.b", "6:public"]


def test_no_two_tables_share_a_key():
    tables = [TableKey(schema, name) for schema, name in itertools.product(NAMES, NAMES) if name]
    keys = [subscription_key(table, op) for table in tables for op in OPS]
    assert len(set(keys)) == len(keys) == len(tables) * len(OPS)


@pytest.mark.parametrize("first, second", [
    (TableKey("ab", "c"), TableKey("a", "bc")),
    (TableKey("a:1", "b"), TableKey("a", ":1b")),
    (TableKey("public", "user:insert"), TableKey("public", "user")),
])
def test_tables_whose_names_run_together_have_different_keys(first, second):
    assert subscription_key(first, "insert") != subscription_key(second, "insert")
