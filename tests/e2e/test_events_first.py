"""A run's event stream is open before anything of it is published: on Google Cloud, Pub/Sub
delivers to a subscription only what is published once it exists, and a worker already up (idle
after an earlier run, or after a halted round) takes a shard, and says so, the moment it goes
out. A runner that opened its stream after publishing missed those words: it knew nothing of
what ran, and at the end waited for VMs to say they were idle instead of letting them go.

Each path that publishes is walked with the deployment's calls recorded in order: a submit, a
retry with a new task after a halt (the run's subscription went with the halted run), and the
helper run that copies parts on the workers.
"""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from runner import config as config_mod
from runner.backends.factory import open_deployment
from runner.backends.gcp.strip import strip_on_workers
from runner.cli import run as run_cli
from runner.cli.main import app
from runner.config import Config
from runner.engine.deployment import Deployment
from runner.results.parts import StripJob
from runner.submit import SubmitRequest, submit
from worker.backends.local.backend import open_local
from worker.protocol import WorkMessage
from worker.queue import EventBus

pytestmark = pytest.mark.e2e

Calls = list[tuple[str, str]]  # ("events" | "publish", run id), in the order made


def _recorded(dep: Deployment, calls: Calls) -> Deployment:
    """``dep``, its run event streams and its queue's publishes written down in ``calls``."""
    opened = dep.open_run_events
    assert opened is not None

    def open_run_events(run_id: str, since: float | None) -> EventBus:
        calls.append(("events", run_id))
        return opened(run_id, since)

    dep.open_run_events = open_run_events
    _record_publishes(dep.backends.queue, calls)
    return dep


def _record_publishes(queue: Any, calls: Calls) -> None:
    publish = queue.publish

    def recorded(messages: Iterable[WorkMessage], **kwargs: Any) -> int:
        batch = list(messages)
        calls.extend(("publish", m.run_id) for m in batch[:1])
        count: int = publish(batch, **kwargs)
        return count

    queue.publish = recorded


def _first(calls: Calls, run_id: str) -> list[str]:
    """What happened for ``run_id`` first: its events opened, or a shard published."""
    seen = [kind for kind, run in calls if run == run_id]
    assert "publish" in seen, calls
    return seen[: seen.index("publish") + 1]


def _task(folder: Path, body: str) -> Path:
    folder.mkdir()
    (folder / "task.py").write_text(textwrap.dedent(body))
    return folder


def test_submit_and_a_retry_with_a_new_task_listen_before_they_publish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: Calls = []
    config = config_mod.resolve(local=True, store_dir=tmp_path / "store")

    def opener(cfg: Config) -> Deployment:
        return _recorded(open_deployment(cfg), calls)

    broken = _task(tmp_path / "broken", "def run(shard):\n    raise ValueError('no')\n")
    done = submit(SubmitRequest(broken, shards=3, workers=1, max_attempts=1), config, opener=opener)
    run_id = done.run_id
    assert run_id is not None and done.outcome is not None and not done.outcome.ok
    assert _first(calls, run_id) == ["events", "publish"]

    @contextlib.contextmanager
    def open_dep(*_: Any) -> Iterator[Deployment]:
        dep = opener(config)
        try:
            yield dep
        finally:
            dep.close()

    monkeypatch.setattr(run_cli, "open_dep", open_dep)
    calls.clear()
    fixed = _task(tmp_path / "fixed", "def run(shard):\n    pass\n")
    argv = ["retry", run_id, "--failed", "--task", str(fixed), "--store", str(tmp_path / "store")]
    retried = CliRunner().invoke(app, argv)
    assert retried.exit_code == 0, retried.output
    assert _first(calls, run_id) == ["events", "publish"]


def test_the_helper_run_on_the_workers_listens_before_it_publishes(tmp_path: Path) -> None:
    calls: Calls = []
    b = open_local(tmp_path / "store")
    _record_publishes(b.queue, calls)
    made: list[str] = []

    def listen(run_id: str) -> EventBus:
        calls.append(("events", run_id))
        return b.events

    def make_watcher(helper: Any, shards: int, events: EventBus) -> Any:
        made.append(helper.run_id)
        raise RuntimeError("enough: the helper run is published")

    with pytest.raises(RuntimeError, match="enough"):
        strip_on_workers(
            b.store,
            b.queue,
            listen,
            make_watcher,
            run_id="r1",
            bucket="bucket",
            jobs=[StripJob("runs/r1/shards/00000/out.csv", 1, "runs/r1/strip/00000.csv", 9)],
            poll_seconds=0.1,
        )
    (helper,) = made
    assert _first(calls, helper) == ["events", "publish"]
    b.close()
