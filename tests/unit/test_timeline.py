"""The run report's data from records in a real store (local, and GCS on its emulator); prices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.observe.prices import PriceTable, load_prices
from runner.observe.render import render
from runner.observe.timeline import ATTEMPTS, LIFETIME, Timeline, build_timeline, lifetime_key
from tests.contract.conftest import backends
from worker.backends.base import Backends
from worker.backends.local.store import LocalStore
from worker.errors import ConfigError
from worker.protocol import (
    AttemptStatus,
    Layout,
    Manifest,
    RunOptions,
    RunState,
    Shard,
    ShardFailure,
    ShardResult,
)
from worker.store import Store

__all__ = ["backends"]  # the contract suite's fixture: the local and the emulated GCS store
RUN = "r20260101-000000-abcdef"
T0 = 1_000_000.0


def _status(shard: str, n: int, state: str, worker: str, start: float, end: float | None):
    return AttemptStatus(
        run_id=RUN,
        shard_id=shard,
        attempt=n,
        state=state,
        worker=worker,
        started_at=T0 + start,
        finished_at=None if end is None else T0 + end,
        reason=None if state != "failed" else "exited with code 1",
    )


def _write_run(st: Store) -> None:
    """A run of four shards on three worker names, two slots each:

    a: w1 fails (2.5-3), w2 succeeds (4-6)            -> a retry
    b: w3 preempted (1-2), w2 succeeds (3-5)           -> a preemption; w3 stops
    c: w2 succeeds (1-2), a backup on w1 discarded (1.5-2.5)
    d: w1 fails (3-4), a new process named w3 fails (5-6): failed for good
    """
    shards = [Shard(id=s, index=i) for i, s in enumerate("abcd")]
    st.put(Layout.shard_list(RUN), "".join(json.dumps(s.to_dict()) + "\n" for s in shards).encode())
    manifest = Manifest(
        run_id=RUN,
        bundle="0" * 64,
        entry="python",
        shard_count=4,
        options=RunOptions(slots=2).to_dict(),
        created_at=T0,
    )
    st.put(Layout.manifest(RUN), manifest.to_json())
    attempts = [
        _status("a", 1, "failed", "w1", 2.5, 3),
        _status("a", 2, "running", "w2", 4, None),  # the winner's status stays "running"
        _status("b", 1, "preempted", "w3", 1, 2),
        _status("b", 2, "running", "w2", 3, None),
        _status("c", 1, "running", "w2", 1, None),
        _status("c", 2, "discarded", "w1", 1.5, 2.5),
        _status("d", 1, "failed", "w1", 3, 4),
        _status("d", 2, "failed", "w3", 5, 6),
    ]
    for a in attempts:
        st.put(Layout.status(RUN, a.shard_id, a.attempt), a.to_json())
    for shard, n, worker, start, end in (
        ("a", 2, "w2", 4, 6),
        ("b", 2, "w2", 3, 5),
        ("c", 1, "w2", 1, 2),
    ):
        result = ShardResult(RUN, shard, n, worker, T0 + start, T0 + end)
        st.put(Layout.result(RUN, shard), result.to_json())
    failure = ShardFailure(RUN, "d", 2, 2, 1, "exited with code 1", at=T0 + 6)
    st.put(Layout.failure(RUN, "d"), failure.to_json())


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    st = LocalStore(tmp_path / "store")
    _write_run(st)
    return st


def _comparable(timeline: Timeline) -> dict[str, object]:
    data = timeline.to_dict()
    data.pop("generated_at")
    return data


def test_every_backend_gives_the_same_timeline(store: LocalStore, backends: Backends) -> None:
    _write_run(backends.store)
    lifetime = {"worker": "w1", "started_at": T0, "stopped_at": T0 + 8, "machine_type": "e2-small"}
    for st in (store, backends.store):
        st.put(lifetime_key("w1"), json.dumps(lifetime).encode())
    local = build_timeline(store, RUN, now=T0 + 100)
    other = build_timeline(backends.store, RUN, now=T0 + 100)
    assert _comparable(other) == _comparable(local)
    assert local.lanes[2].billing == LIFETIME
    # Only w1's machine type is known: 8 s of an e2-small, billed the one-minute minimum at
    # the Spot estimate (30% of the list price); the other three lanes stay unpriced.
    assert local.summary.estimated_cost == pytest.approx(0.016751 * 0.30 / 60, rel=1e-3)
    assert "3 workers unpriced" in local.summary.cost_note


def test_lanes_bars_and_outcomes(store: LocalStore) -> None:
    timeline = build_timeline(store, RUN, now=T0 + 100)
    # w3 was preempted (it stopped): the later w3 is another process with a lane of its own.
    assert [lane.worker for lane in timeline.lanes] == ["w2", "w3 (1)", "w1", "w3 (2)"]
    w2, w3a, w1, w3b = timeline.lanes
    assert sorted((b.shard_id, b.attempt, b.outcome) for b in w1.bars) == [
        ("a", 1, "failed"),
        ("c", 2, "discarded"),
        ("d", 1, "failed"),
    ]
    assert sorted((b.shard_id, b.outcome, b.start, b.end) for b in w2.bars) == [
        ("a", "succeeded", 4, 6),
        ("b", "succeeded", 3, 5),
        ("c", "succeeded", 1, 2),
    ]
    assert [(b.shard_id, b.outcome) for b in w3a.bars] == [("b", "preempted")]
    assert [(b.shard_id, b.outcome) for b in w3b.bars] == [("d", "failed")]
    assert (w2.slots, w3a.slots, w1.slots, w3b.slots) == (2, 1, 1, 1)  # w2 ran a and b at once
    s = timeline.summary
    assert s.attempts == {
        "succeeded": 3,
        "failed": 3,
        "preempted": 1,
        "discarded": 1,
        "running": 0,
        "lost": 0,
    }
    assert s.shard_states == {
        "queued": 0,
        "running": 0,
        "succeeded": 3,
        "failed": 1,
        "cancelled": 0,
        "lost": 0,  # only `runner status` finds lost shards (their worker is gone)
    }
    assert s.task_seconds == pytest.approx(0.5 + 2 + 1 + 2 + 1 + 1 + 1 + 1)
    assert s.committed_seconds == pytest.approx(2 + 2 + 1)
    assert s.wall_seconds == pytest.approx(6)


def test_billing_falls_back_to_attempt_spans_and_says_so(store: LocalStore) -> None:
    timeline = build_timeline(store, RUN, now=T0 + 100)
    spans = [(lane.billing, lane.billed_start, lane.billed_end) for lane in timeline.lanes]
    assert spans == [(ATTEMPTS, 1, 6), (ATTEMPTS, 1, 2), (ATTEMPTS, 1.5, 4), (ATTEMPTS, 5, 6)]
    s = timeline.summary
    assert s.billed_vm_seconds == pytest.approx(9.5)
    assert s.efficiency == pytest.approx(5 / (9.5 * 2))
    assert "first attempt start to its last attempt end" in s.billing_note
    assert s.estimated_cost is None and "--machine-type" in s.cost_note


def test_lifetime_records_give_billed_time_and_machine_type(store: LocalStore) -> None:
    w1 = {
        "worker": "w1",
        "started_at": T0 - 30,  # booted before the run: that part is not this run's
        "last_seen": T0 + 9,
        "stopped_at": T0 + 10,
        "machine_type": "n2-standard-4",
    }
    w3 = {"worker": "w3", "started_at": T0 + 4.5, "last_seen": T0 + 7, "stopped_at": None}
    store.put(lifetime_key("w1"), json.dumps(w1).encode())
    store.put(lifetime_key("w3"), json.dumps(w3).encode())  # the second process named w3
    timeline = build_timeline(store, RUN, now=T0 + 100, machine_type="e2-standard-2")
    lanes = {lane.worker: lane for lane in timeline.lanes}
    assert (lanes["w1"].billing, lanes["w1"].billed_start, lanes["w1"].billed_end) == (
        LIFETIME,
        0,
        10,
    )
    assert lanes["w1"].machine_type == "n2-standard-4"
    assert (lanes["w3 (2)"].billing, lanes["w3 (2)"].billed_end) == (LIFETIME, 7)  # last seen
    assert lanes["w3 (1)"].billing == ATTEMPTS and lanes["w2"].billing == ATTEMPTS
    assert lanes["w2"].machine_type == "e2-standard-2"
    table = PriceTable()
    expected = sum(
        table.cost(kind, seconds) or 0.0
        for kind, seconds in (
            ("n2-standard-4", 10),
            ("e2-standard-2", 5),
            ("e2-standard-2", 1),
            ("e2-standard-2", 2.5),
        )
    )
    assert timeline.summary.estimated_cost == pytest.approx(expected)
    note = timeline.summary.billing_note
    assert "lifetime records for 2 workers, from attempt spans for 2" in note


def test_an_attempt_whose_worker_died_is_lost_once_the_run_is_over(store: LocalStore) -> None:
    stale = _status("c", 3, "running", "w4", 2, None)  # SIGKILLed: it never wrote an end
    store.put(Layout.status(RUN, "c", 3), stale.to_json())
    live = build_timeline(store, RUN, now=T0 + 100)
    (bar,) = [b for lane in live.lanes for b in lane.bars if b.attempt == 3]
    assert (bar.outcome, bar.end) == ("running", 100)
    manifest = Manifest.from_json(store.get(Layout.manifest(RUN)))
    store.put(Layout.manifest(RUN), manifest.with_state(RunState.FINISHED).to_json())
    over = build_timeline(store, RUN, now=T0 + 100)
    (bar,) = [b for lane in over.lanes for b in lane.bars if b.attempt == 3]
    assert (bar.outcome, bar.end) == ("lost", 6)  # the run's last recorded moment
    assert over.summary.attempts["lost"] == 1 and over.queue[-1] == (5.0, 0)


def test_queue_depth_over_time(store: LocalStore) -> None:
    queue = dict(build_timeline(store, RUN, now=T0 + 100).queue)
    # a waits 0-2.5 and 3-4, b 0-1 and 2-3, c 0-1, d 0-3 and 4-5 (between its tries).
    assert queue == {0.0: 4, 1.0: 2, 2.0: 3, 2.5: 2, 3.0: 1, 4.0: 1, 5.0: 0}


def test_render_writes_png_html_and_what_was_drawn(store: LocalStore, tmp_path: Path) -> None:
    timeline = build_timeline(store, RUN, now=T0 + 100)
    rendered = render(timeline, tmp_path / "out" / "report.html")
    assert rendered.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = rendered.html.read_text() if rendered.html else ""
    assert "data:image/png;base64," in page and RUN in page and "efficiency" in page
    drawn = json.loads(rendered.sidecar.read_text())["drawn"]
    assert drawn["lanes"] == ["w2", "w3 (1)", "w1", "w3 (2)"] and drawn["rows"] == 5
    assert sorted(b["outcome"] for b in drawn["bars"]) == sorted(
        ["failed"] * 3 + ["preempted", "discarded"] + ["succeeded"] * 3
    )
    assert drawn["legend"] == ["succeeded", "failed", "preempted", "discarded", "billed"]


def test_prices_table_and_overrides(tmp_path: Path) -> None:
    table = PriceTable()
    price = table.lookup("e2-standard-2")
    assert price is not None and price.standard == pytest.approx(0.067006)
    assert table.lookup("n1-standard-1").standard == pytest.approx(0.0475)  # type: ignore[union-attr]
    assert table.lookup("a3-megagpu-8g") is None
    assert table.cost("e2-standard-2", 10, spot=False) == pytest.approx(0.067006 / 60)  # 1 min min
    override = tmp_path / "prices.toml"
    override.write_text(
        '[machine_types."a3-megagpu-8g"]\nstandard = 88.0\nspot = 30.0\n'
        "[families.e2]\nvcpu = 0.03\nmemory_gib = 0.004\nspot_fraction = 0.5\n"
    )
    custom = load_prices(override, env={})
    assert custom.cost("a3-megagpu-8g", 3600) == pytest.approx(30.0)
    e2 = custom.lookup("e2-standard-2")
    assert (
        e2 is not None and e2.standard == pytest.approx(0.092) and e2.spot == pytest.approx(0.046)
    )
    (tmp_path / "bad.json").write_text('{"machine_types": {"x": {"spot": 1}}}')
    with pytest.raises(ConfigError, match=r"machine_types\.x needs a number `standard`"):
        load_prices(tmp_path / "bad.json", env={})
    with pytest.raises(ConfigError, match="cannot be read"):
        load_prices(tmp_path / "missing.toml", env={})


def test_a_run_nobody_started_yet_still_renders(tmp_path: Path) -> None:
    st = LocalStore(tmp_path / "store")
    shard_list = "".join(json.dumps(Shard(id=f"s{i}", index=i).to_dict()) + "\n" for i in range(3))
    st.put(Layout.shard_list(RUN), shard_list.encode())
    manifest = Manifest(run_id=RUN, bundle="0" * 64, entry="python", shard_count=3, created_at=T0)
    st.put(Layout.manifest(RUN), manifest.to_json())
    timeline = build_timeline(st, RUN, now=T0 + 10)
    assert timeline.lanes == [] and timeline.queue == [(0.0, 3), (10.0, 0)]
    assert timeline.summary.cost_note == "no attempts yet" and timeline.summary.efficiency is None
    drawn = json.loads(render(timeline, tmp_path / "r.png").sidecar.read_text())["drawn"]
    assert drawn["lanes"] == [] and drawn["bars"] == [] and drawn["max_queue"] == 3
