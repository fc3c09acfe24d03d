"""The embedded server that examples and tests start: restart and stop leave nothing running."""
from __future__ import annotations

import time
from pathlib import Path

import psycopg

from flask_pgevents.embedded import EmbeddedPostgres


def _postmaster_pid(pgdata: str) -> int:
    return int(Path(pgdata, "postmaster.pid").read_text().split("\n", 1)[0])


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process, waiting up to 10 s for it to end.

    The postmaster removes its pid file just before it exits, so ``pg_ctl -w
    stop`` can return a moment early; and a postmaster that ``pg_ctl`` started
    is reparented, so where nothing reaps orphans it stays a zombie.
    """
    deadline = time.monotonic() + 10
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state in ("Z", "X"):
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.05)


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
