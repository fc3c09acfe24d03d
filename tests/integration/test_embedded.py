"""The embedded server that examples and tests start: restart and stop leave nothing running."""
from __future__ import annotations

import os
from pathlib import Path

import psycopg

from flask_pgevents.embedded import EmbeddedPostgres


def _postmaster_pid(pgdata: str) -> int:
    return int(Path(pgdata, "postmaster.pid").read_text().split("\n", 1)[0])


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_restarted_server_is_stopped_by_stop_and_its_directory_removed():
    server = EmbeddedPostgres()
    try:
        first = _postmaster_pid(server.pgdata)
        server.restart()
        second = _postmaster_pid(server.pgdata)
        assert second != first
        with psycopg.connect(server.url()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        server.stop()
    # The server it restarted is gone too, not left running on a deleted directory.
    assert not _running(second)
    assert not Path(server.directory).exists()
