"""What every EventBus must do: events published by workers reach the runner once."""

from __future__ import annotations

import time

from worker.backends.base import Backends
from worker.protocol import Event, EventKind


def test_events_arrive_once_with_their_fields(backends: Backends) -> None:
    sent = [
        Event(kind=EventKind.STARTED.value, worker="w1", run_id="r-ev", shard_id=f"s{i}", attempt=1)
        for i in range(5)
    ]
    for event in sent:
        backends.events.publish(event)
    got: list[Event] = []
    deadline = time.monotonic() + 20
    while len(got) < 5 and time.monotonic() < deadline:
        got += backends.events.pull(100, timeout=1.0)
    assert sorted(e.shard_id or "" for e in got) == [f"s{i}" for i in range(5)]
    assert all(e.kind == "started" and e.worker == "w1" and e.attempt == 1 for e in got)
    assert backends.events.pull(100, timeout=0.5) == []
