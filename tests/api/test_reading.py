"""How ``results()`` reads a run's values back: each chunk's as it commits while the others
run, the rest once every chunk is committed, returned once the run is recorded finished."""

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
    took = time.monotonic() - started
    progress = run.progress()
    assert read[:1] == ["0000000"] and took < 20, (read, f"{took:.1f}s", progress)


def test_the_values_are_read_before_the_run_is_finished_and_its_workers_go(
    local_backend: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once every chunk is committed the caller's thread reads the values while the run's end
    (its record finished, its workers stopped) waits for it: on a machine of few cores the two
    would otherwise share it. The read here takes a while; the run stays active meanwhile, and
    is finished once the values are back."""
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
    assert runs.load_manifest(run._store, run.id).state == "finished"


def test_a_script_that_ends_at_once_after_its_values_leaves_its_run_finished(
    tmp_path: Path,
) -> None:
    """``results()`` returns once the run is recorded finished: a script that ends the moment
    it has its values (``os._exit``, as a forked child ends, or a SIGTERM: no exit handler
    runs) leaves a finished run, not one active for ever with every shard done."""
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, os, signal, sys
            import cflow

            values = list(cflow.map(abs, range(-50, 50), store=sys.argv[1], progress=False))
            print(json.dumps(values), flush=True)
            if sys.argv[2] == "exit":
                os._exit(0)
            os.kill(os.getpid(), signal.SIGTERM)
            """
        )
    )
    for how, code in (("exit", 0), ("term", -15)):
        store = tmp_path / how
        done = run_script(script, str(store), how, cwd=tmp_path)
        assert done.returncode == code, done.stderr
        assert json.loads(done.stdout) == [abs(x) for x in range(-50, 50)]
        (manifest,) = store.glob("runs/*/run.json")
        assert json.loads(manifest.read_text())["state"] == "finished", how


def test_the_caller_closes_its_store_before_the_runs_thread_finishes_the_run(
    local_backend: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller's thread reads the values and closes its store connections before it lets
    the run's thread finish the run: closed after, each blocking call of the close handed the
    run's thread the turn for up to the interpreter's switch interval (5 ms). The close is
    slowed here: the run is not finished meanwhile, and is by the time the values are back."""
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
    assert runs.load_manifest(run._store, run.id).state == "finished"
    assert order[:2] == ["closed", "finish"], order
