"""A local watch looks quickly while a run's shards are settling (a short run's last commit is
seen at once) and slows down again once none has settled for its quiet pace."""

from __future__ import annotations

from pathlib import Path

from runner.engine.watch import BUSY_POLL_SECONDS, Watcher
from tests.unit.test_watch import _commit, _run
from worker.backends.local.backend import open_local
from worker.clock import FakeClock
from worker.protocol import Event


def test_the_pace_is_quick_while_shards_settle_and_slows_once_they_stop(tmp_path: Path) -> None:
    b = open_local(tmp_path / "store")
    m = _run(b, tmp_path, 3)
    naps: list[float] = []

    def say(kind: str, shard: str) -> None:
        if kind == "succeeded":
            _commit(b, m.run_id, shard)
        b.events.publish(Event(kind=kind, worker="w", run_id=m.run_id, shard_id=shard))

    class Recording(FakeClock):
        def sleep(self, seconds: float) -> None:
            naps.append(round(seconds, 4))
            if len(naps) == 1:  # two workers start a shard each
                say("started", "s000")
                say("started", "s001")
            if len(naps) == 3:  # one ends; s001 runs on
                say("succeeded", "s000")
                say("started", "s002")
            if len(naps) == 80:  # long after: the last two end
                say("succeeded", "s001")
                say("succeeded", "s002")
            super().sleep(seconds)

    w = Watcher(
        manifest=m,
        store=b.store,
        queue=b.queue,
        events=b.events,
        clock=Recording(),
        quiet_poll_seconds=0.25,
    )
    assert w.watch(poll_seconds=0.02).finished
    # Started but none settled yet: the quick pace, slowing while nothing is heard.
    assert naps[:3] == [0.03, 0.02, 0.03]
    # s000 settled: looks every few milliseconds while shards run, for the quiet pace...
    quick = next(i for i in range(3, len(naps)) if naps[i] != BUSY_POLL_SECONDS) - 3
    assert quick * BUSY_POLL_SECONDS >= 0.25 - 2 * BUSY_POLL_SECONDS
    # ...then, none settling, slows down again to the quiet pace.
    slowing = naps[3 + quick : 79]
    assert slowing[0] == round(BUSY_POLL_SECONDS * 1.5, 4) and slowing[-1] == 0.25
    assert slowing == sorted(slowing)


def test_while_shards_are_queued_a_settled_shard_keeps_the_usual_pace(tmp_path: Path) -> None:
    """Many short shards keep settling through a long run: polling every few milliseconds all
    along would take the workers' CPU. The quick look waits until nothing is queued."""
    b = open_local(tmp_path / "store")
    m = _run(b, tmp_path, 5)
    naps: list[float] = []

    class Recording(FakeClock):
        def sleep(self, seconds: float) -> None:
            naps.append(round(seconds, 4))
            if len(naps) == 1:
                for shard in ("s000", "s001"):
                    b.events.publish(Event("started", "w", m.run_id, shard))
            if len(naps) == 3:  # one ends; three are still queued
                _commit(b, m.run_id, "s000")
                b.events.publish(Event("succeeded", "w", m.run_id, "s000"))
            if len(naps) == 10:  # the rest end
                for shard in ("s001", "s002", "s003", "s004"):
                    _commit(b, m.run_id, shard)
                    b.events.publish(Event("succeeded", "w", m.run_id, shard))
            super().sleep(seconds)

    w = Watcher(
        manifest=m,
        store=b.store,
        queue=b.queue,
        events=b.events,
        clock=Recording(),
        quiet_poll_seconds=0.25,
    )
    assert w.watch(poll_seconds=0.02).finished
    assert BUSY_POLL_SECONDS not in naps[:10], naps
