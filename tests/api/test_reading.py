"""How ``results()`` reads a run's values back: each chunk's as it commits while the others
run, the rest once every chunk is committed, returned without waiting for the run to be
recorded finished (which ``wait()`` and the script's exit wait for)."""

from __future__ import annotations

import json
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import cflow
import cflow.reading
from runner.engine import runs
from tests.api.clean import run_script

pytestmark = pytest.mark.e2e


def test_each_chunk_is_read_as_it_commits_while_the_others_run(
    local_backend: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second chunk's items wait until the first chunk's values were read: they are read
    as that chunk commits, not once every chunk has (the caller's wait after the last commit
    is then the reading of that one chunk)."""
    go = tmp_path / "go"
    read: list[str] = []
    first_read = threading.Event()
    real = cflow.reading.committed_values

    def recording(store: Any, run_id: str, shard: Any, record: Any) -> Any:
        read.append(shard.id)
        first_read.set()
        return real(store, run_id, shard, record)

    monkeypatch.setattr(cflow.reading, "committed_values", recording)

    def waits(x: int) -> int:
        deadline = time.monotonic() + 30
        while x >= 2 and not go.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return x * 10

    opener = threading.Thread(target=lambda: first_read.wait(30) and go.touch())
    opener.start()
    started = time.monotonic()
    run = cflow.submit(waits, range(4), chunk_size=2, **local_backend)
    assert list(run.results()) == [0, 10, 20, 30]
    opener.join()
    assert read[:1] == ["0000000"] and time.monotonic() - started < 20


def test_the_values_are_read_before_the_run_is_finished_and_its_workers_go(
    local_backend: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once every chunk is committed the caller's thread reads the values while the run's end
    (its record finished, its workers stopped) waits for it: on a machine of few cores the two
    would otherwise share it. The read here takes a while; the run stays active meanwhile, and
    is recorded finished once the values are back (``results()`` does not wait for that:
    ``wait()`` does)."""
    seen: list[str] = []

    def slow_collect(store: Any, run_id: str, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)  # the run's end, not held, is over well within this
        seen.append(runs.load_manifest(store, run_id).state)
        return collect(store, run_id, *args, **kwargs)

    collect = cflow.reading.collect
    monkeypatch.setattr(cflow.reading, "collect", slow_collect)
    run = cflow.submit(lambda x: x + 1, range(20), chunk_size=5, **local_backend)
    assert list(run.results()) == list(range(1, 21))
    assert seen == ["active"]
    assert run.wait().succeeded == 20
    assert runs.load_manifest(run._store, run.id).state == "finished"


def test_values_come_back_before_the_run_is_recorded_finished_and_exit_waits_for_it(
    tmp_path: Path,
) -> None:
    """``results()`` returns once it has read every value, not once the run's thread has
    recorded the run finished (its finishing is slowed to a second here): the script has its
    values while the run is still ``active``, and its exit waits for the finish without a word
    (no "waiting for run" line, which is for runs whose values nobody read)."""
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, pathlib, sys, time
            import cflow
            import runner.finish

            finish = runner.finish._finish

            def slow_finish(*args, **kwargs):
                time.sleep(1.0)
                return finish(*args, **kwargs)

            runner.finish._finish = slow_finish
            store = pathlib.Path(sys.argv[1])
            values = list(cflow.map(abs, range(-3, 3), store=store, progress=False))
            (manifest,) = store.glob("runs/*/run.json")
            print(json.dumps([values, json.loads(manifest.read_text())["state"]]))
            """
        )
    )
    store = tmp_path / ".cflow"
    done = run_script(script, str(store), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [[3, 2, 1, 0, 1, 2], "active"]
    assert "waiting for run" not in done.stderr, done.stderr
    (manifest,) = store.glob("runs/*/run.json")
    assert json.loads(manifest.read_text())["state"] == "finished"


def test_the_runs_thread_finishes_the_run_only_once_the_values_are_handed_back(
    local_backend: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's thread, let go while ``results()`` still had work of its own, ran in each of
    that thread's blocking calls for up to the interpreter's switch interval (5 ms): the
    values came back that much later. It is let go as ``results()`` returns (its last step,
    closing its store connections, is slowed here: the run is not finished meanwhile)."""
    import runner.finish

    order: list[str] = []
    finish, close = runner.finish._finish, cflow.Run._close_here

    def finishing(*args: Any, **kwargs: Any) -> Any:
        order.append("finish")
        return finish(*args, **kwargs)

    def closing(self: cflow.Run) -> None:
        time.sleep(0.2)  # a blocking call: the run's thread would run now if it were let go
        order.append("closed")
        close(self)

    monkeypatch.setattr(runner.finish, "_finish", finishing)
    monkeypatch.setattr(cflow.Run, "_close_here", closing)
    run = cflow.submit(lambda x: x, range(6), chunk_size=2, **local_backend)
    assert list(run.results()) == list(range(6))
    assert run.wait().succeeded == 6
    assert order[:2] == ["closed", "finish"], order
