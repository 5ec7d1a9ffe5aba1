"""A run's event stream in the embedded backend starts where it was opened, however many
events the store keeps from the last hour's runs."""

from __future__ import annotations

from pathlib import Path

from worker.backends.local.backend import local_run_events, open_local
from worker.backends.local.db import Db
from worker.backends.local.events import LocalEvents
from worker.backends.local.records import QUEUE_FILE
from worker.protocol import Event


class _Clock:
    def __init__(self, now: float):
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_stream_opened_since_a_time_reads_from_the_first_event_then(tmp_path: Path) -> None:
    clock = _Clock(1000.0)
    backends = open_local(tmp_path, clock=clock)  # type: ignore[arg-type]
    for n in range(3000):  # an hour's worth of other runs' events, and of workers' own
        clock.now = 1000.0 + n / 10
        run = None if n % 3 else f"old-{n}"
        backends.events.publish(Event(kind="idle", worker=f"local-{n}", run_id=run, at=clock.now))
    clock.now = 2000.0
    bus = local_run_events(tmp_path, "r-new", since=2000.0, clock=clock)  # type: ignore[arg-type]
    assert bus.pull() == []  # nothing since
    backends.events.publish(Event(kind="claimed", worker="local-9", run_id="r-new", at=2001.0))
    backends.events.publish(Event(kind="claimed", worker="local-9", run_id="r-other", at=2001.0))
    backends.events.publish(Event(kind="stopped", worker="local-9", at=2001.0))
    assert [(e.kind, e.run_id) for e in bus.pull()] == [("claimed", "r-new"), ("stopped", None)]
    # Opened since a time some kept events are at or after: from the first of them.
    late = local_run_events(tmp_path, "old-2997", since=1299.6, clock=clock)  # type: ignore[arg-type]
    assert [e.worker for e in late.pull()][:3] == ["local-2996", "local-2997", "local-2998"]
    bus.close()
    late.close()
    backends.close()


def test_where_a_stream_starts_is_found_by_the_index_on_time(tmp_path: Path) -> None:
    """Not by walking the kept events from the oldest: the look costs the same with an hour's
    events in the store as with none (what a store that ran many maps gains)."""
    db = Db(tmp_path / QUEUE_FILE)
    said: list[str] = []
    db.conn().set_trace_callback(said.append)
    LocalEvents(tmp_path / QUEUE_FILE, run_id="r-1", since=1000.0, db=db)
    (look,) = [sql for sql in said if "FROM events" in sql]
    plan = db.conn().execute(f"EXPLAIN QUERY PLAN {look}").fetchall()
    db.close()
    assert "USING COVERING INDEX events_at" in plan[0][3]
