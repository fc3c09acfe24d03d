"""suppression.py: the statement that turns capture off and on, without a database.

What it does to writes runs in tests/integration/test_suppression.py."""
from __future__ import annotations

from flask_pgevents.suppression import set_suppress


def test_the_setting_is_local_to_the_transaction_and_named_for_every_schema():
    assert str(set_suppress(True)) == "SELECT pg_catalog.set_config('pgevents.suppress', 'on', true)"
    assert str(set_suppress(False)) == "SELECT pg_catalog.set_config('pgevents.suppress', 'off', true)"
