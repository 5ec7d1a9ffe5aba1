"""The embedded backend's SQLite file: its schema version, and how a writer waits for another."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from worker.backends.local import db as dbmod
from worker.backends.local.db import SCHEMA_VERSION, Db
from worker.backends.local.queue import LocalQueue
from worker.clock import FakeClock
from worker.errors import BackendError
from worker.protocol import Shard, WorkMessage


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None, timeout=30)


def _indexes(path: Path) -> set[str]:
    conn = _raw(path)
    try:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
        return {name for (name,) in rows}
    finally:
        conn.close()


def test_a_file_at_this_schema_is_not_made_again_and_one_at_another_is(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    Db(path).close()
    conn = _raw(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.execute("DROP INDEX messages_worker")  # a mark the schema script would undo
    conn.close()

    Db(path).close()  # says it is at this version: the script is not run
    assert "messages_worker" not in _indexes(path)

    conn = _raw(path)
    conn.execute("PRAGMA user_version = 0")  # a store made before versions were kept
    conn.close()
    Db(path).close()
    assert "messages_worker" in _indexes(path)
    conn = _raw(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_processes_making_one_new_file_at_once_each_find_the_whole_schema(
    tmp_path: Path,
) -> None:
    """Six processes open one new store's file at the same instant, ten times over: each finds
    the whole schema in write-ahead-log mode. The file's mode change answered "database is
    locked" at once to about one open in thirty (SQLite does not wait for that lock); the
    schema goes in as one transaction, so none sees a table without its indexes."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    with context.Pool(6) as pool:
        for i in range(10):
            path = tmp_path / str(i) / "queue.db"
            at = time.time() + 0.05
            opened = pool.starmap(_open_at, [(path, at)] * 6)
            assert opened == [(SCHEMA_VERSION, "wal")] * 6, opened
            assert {"messages_ready", "messages_worker", "events_at"} <= _indexes(path)


def _open_at(path: Path, at: float) -> tuple[int, str] | str:
    while time.time() < at:  # every process at the same instant
        pass
    try:
        db = Db(path)
    except BackendError as exc:
        return str(exc)
    try:
        conn = db.conn()
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        return version, str(conn.execute("PRAGMA journal_mode").fetchone()[0])
    finally:
        db.close()


def test_a_store_of_the_first_version_gets_its_added_columns(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    conn = _raw(path)
    conn.execute(
        "CREATE TABLE messages (id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, body TEXT NOT"
        " NULL, available_at REAL NOT NULL, deliveries INTEGER NOT NULL DEFAULT 0, lease TEXT,"
        " dead INTEGER NOT NULL DEFAULT 0)"
    )
    conn.close()
    Db(path).close()
    conn = _raw(path)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
    conn.close()
    assert {"shard_id", "worker"} <= columns


def test_a_writer_waits_for_another_and_gets_the_lock_once_it_is_let_go(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    db = Db(path)
    holder = _raw(path)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO fences (worker, at) VALUES ('w', 1)")
    got = threading.Event()

    def write() -> None:
        with db.transaction() as conn:
            conn.execute("INSERT INTO fences (worker, at) VALUES ('v', 2)")
        got.set()

    writer = threading.Thread(target=write)
    writer.start()
    assert not got.wait(0.3)  # longer than the quick steps: SQLite's own wait goes on
    holder.execute("COMMIT")
    writer.join(30)
    assert got.is_set()
    rows = holder.execute("SELECT worker FROM fences ORDER BY worker").fetchall()
    assert rows == [("v",), ("w",)]
    # The connection waits as long as before for what comes next.
    assert db.conn().execute("PRAGMA busy_timeout").fetchone()[0] == dbmod.BUSY_TIMEOUT * 1000
    holder.close()


def test_a_writer_held_off_past_the_busy_timeout_fails_with_the_file_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dbmod, "BUSY_TIMEOUT", 0.2)
    monkeypatch.setattr(dbmod, "QUICK_BUSY", 0.05)
    path = tmp_path / "queue.db"
    db = Db(path)
    holder = _raw(path)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(BackendError, match="locked") as failed, db.transaction():
            pass
        assert str(path) in str(failed.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_an_empty_poll_does_not_wait_for_a_writer(tmp_path: Path) -> None:
    """A poll that finds nothing takes no lock: a worker holding the write lock (a settlement
    being fsynced) never keeps an idle one waiting, nor the other way round."""
    path = tmp_path / "queue.db"
    clock = FakeClock()
    queue = LocalQueue(path, clock=clock)
    holder = _raw(path)
    holder.execute("BEGIN IMMEDIATE")
    try:
        assert queue.receive(1, 0, worker="local-0") == []  # no waiting for the holder
    finally:
        holder.execute("ROLLBACK")
    message = WorkMessage(run_id="r-1", shard=Shard(id="s0", index=0).to_dict())
    queue.publish([message])
    (delivery,) = queue.receive(1, 0, worker="local-0")
    assert delivery.message == message
    holder.close()
