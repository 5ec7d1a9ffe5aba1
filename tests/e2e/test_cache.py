"""The cross-run cache through the CLI (`runner submit --cache`), on the local backend."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from runner import config as config_mod
from runner.backends.factory import open_deployment
from runner.engine import runs
from runner.engine.cache import ShardCache
from runner.engine.fingerprint import code_digest
from runner.engine.shards import from_count
from runner.finish import resume_publishing
from runner.observe.timeline import build_timeline
from tests.e2e.conftest import Cli, make_inputs, make_task
from worker import defaults
from worker.backends.local.backend import open_local
from worker.backends.local.store import LocalStore
from worker.protocol import Layout, Manifest, RunOptions, Shard, ShardResult

pytestmark = pytest.mark.e2e

TASK = """
from pathlib import Path

def run(shard):
    rows = Path(shard.input).read_text().splitlines()[1:]
    (Path(shard.output_dir) / "counts.csv").write_text(f"{Path(shard.input).name},{len(rows)}\\n")
    return {"rows": len(rows)}
"""


# The task rewrites its input once, while it runs, as another writer could between the submit
# (which hashed the input) and the attempt: it then reads other content than its key covers.
REWRITES = """
from pathlib import Path

def run(shard):
    gate = Path(shard.input).with_name("rewrite")
    if gate.exists():
        gate.unlink()
        Path(shard.input).write_text("B\\n")
    (Path(shard.output_dir) / "o.txt").write_text(Path(shard.input).read_text())
"""


def _shards(cli: Cli, run_id: str) -> dict[str, dict[str, Any]]:
    return {s["input"].rsplit("/", 1)[-1]: s for s in cli.status(run_id)["shards"]}


def _combined(cli: Cli, run_id: str) -> list[str]:
    path = cli.store / "runs" / run_id / "combined" / "counts.csv"
    return sorted(path.read_text().splitlines())


def _submit(cli: Cli, task: Path, data: Path, *extra: str) -> str:
    r = cli("submit", str(task), "--inputs", f"{data}/*.csv", "--workers", "2", *extra)
    assert r.code == 0, r.stderr
    return r.run_id


def test_unchanged_shards_are_reused_and_a_changed_input_reruns_alone(
    cli: Cli, tmp_path: Path
) -> None:
    task = make_task(tmp_path / "task", TASK)
    data = make_inputs(tmp_path / "data", ["a.csv", "b.csv", "c.csv"])
    first = _submit(cli, task, data, "--cache")
    assert all(s["cached_from"] is None and s["attempts"] for s in _shards(cli, first).values())

    r = cli("submit", str(task), "--inputs", f"{data}/*.csv", "--workers", "2", "--cache")
    assert r.code == 0, r.stderr
    second = r.run_id
    assert "cache: 3 of 3 shards reused" in r.stderr
    assert "3/3 shards succeeded (3 cached)" in r.stderr
    reused = _shards(cli, second)
    for shard in reused.values():
        assert shard["attempts"] == []  # never run in this run
        assert shard["cached_from"] == f"{first}/{shard['id']}"
        assert shard["value"] == {"rows": 3}
    assert _combined(cli, second) == _combined(cli, first)
    status = cli.status(second)
    assert status["counts"]["succeeded"] == 3 and status["counts"]["cached"] == 3
    table = cli("status", second)
    assert table.stdout.count("cached") >= 3, table.stdout
    report = build_timeline(LocalStore(cli.store), second).summary
    assert report.shard_states["cached"] == 3 and report.attempts["succeeded"] == 0

    (data / "b.csv").write_text("id,value\nb-0,1\n")  # one input changes
    third = _submit(cli, task, data, "--cache")
    shards = _shards(cli, third)
    assert shards["b.csv"]["cached_from"] is None and shards["b.csv"]["attempts"]
    assert shards["b.csv"]["value"] == {"rows": 1}
    assert {n for n, s in shards.items() if s["cached_from"]} == {"a.csv", "c.csv"}
    assert _combined(cli, third) == ["a.csv,3", "b.csv,1", "c.csv,3"]

    listed = json.loads(cli("runs", "--json").stdout)
    assert [(r["run_id"], r["committed"], r["cached"]) for r in listed] == [
        (first, 3, 0),
        (second, 3, 3),
        (third, 3, 2),
    ]


def test_a_changed_function_body_reruns_every_shard(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "task", TASK)
    data = make_inputs(tmp_path / "data", ["a.csv", "b.csv"])
    _submit(cli, task, data, "--cache")
    make_task(task, TASK.replace("len(rows)}\\n", "len(rows) * 10}\\n"))
    changed = _submit(cli, task, data, "--cache")
    shards = _shards(cli, changed)
    assert all(s["cached_from"] is None and s["attempts"] for s in shards.values())
    assert _combined(cli, changed) == ["a.csv,30", "b.csv,30"]
    plain = _submit(cli, task, data)  # without --cache nothing is reused
    assert all(s["attempts"] for s in _shards(cli, plain).values())
    cli.env["TASK_SETTING"] = "other"  # what reaches the task changes: every shard runs
    moved = _submit(cli, task, data, "--cache")
    assert all(s["cached_from"] is None for s in _shards(cli, moved).values())


def test_rm_drops_the_runs_cache_entries_and_keeps_the_others(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "task", TASK)
    data = make_inputs(tmp_path / "data", ["a.csv", "b.csv"])
    first = _submit(cli, task, data, "--cache")
    second = _submit(cli, task, data, "--cache")
    assert len(cli.records(f"cache/*/{first}/*")) == 2

    gone = cli("rm", first)
    assert gone.code == 0, gone.stderr
    assert "2 cache entries" in gone.stderr and "freed" in gone.stderr
    freed = int(gone.stderr.split("freed ")[1].split(" bytes")[0].replace(",", ""))
    assert freed > 0
    assert cli.records(f"cache/*/{first}/*") == {}
    assert len(cli.records(f"cache/*/{second}/*")) == 2

    # The second run's copies outlive the first run: a third run reuses them.
    third = _submit(cli, task, data, "--cache")
    assert {s["cached_from"] for s in _shards(cli, third).values()} == {
        f"{second}/{s['id']}" for s in _shards(cli, second).values()
    }
    assert _combined(cli, third) == ["a.csv,3", "b.csv,3"]

    pruned = cli("prune", "--older-than", "0s")  # prune drops the entries of what it deletes
    assert pruned.code == 0 and "4 cache entries" in pruned.stderr, pruned.stderr
    assert cli.records("cache/*") == {}
    fourth = _submit(cli, task, data, "--cache")
    assert all(s["attempts"] for s in _shards(cli, fourth).values())  # nothing left to reuse


def test_an_index_entry_is_trusted_only_with_its_commit_and_outputs(tmp_path: Path) -> None:
    """The library under the CLI, on a real local store: a candidate whose commit record is
    gone, or whose outputs are gone, is passed over for the next one, or the shard runs."""
    task = make_task(tmp_path / "task", TASK)
    backends = open_local(tmp_path / ".cflow")
    store = backends.store

    def submit() -> tuple[str, ShardCache]:
        cache = ShardCache(store, code=code_digest(task))
        manifest = runs.create_run(
            store=store,
            queue=backends.queue,
            task_dir=task,
            shards=cache.keyed(from_count(3)),
            options=RunOptions(),
            reuse=cache.reuse,
        )
        return manifest.run_id, cache

    def commit(run_id: str) -> None:  # what a worker's winning attempt leaves
        for shard in runs.iter_shards(store, run_id):
            store.put(Layout.outputs(run_id, shard.id, 1) + "out.txt", shard.id.encode())
            record = ShardResult(run_id, shard.id, 1, "w", 0.0, 1.0, outputs=["out.txt"])
            store.create(Layout.result(run_id, shard.id), record.to_json())

    older, cache = submit()
    assert cache.cached == 0 and backends.queue.stats(older).queued == 3
    commit(older)
    newer, cache = submit()  # never run: every shard of it is only an index entry
    assert cache.cached == 3 and backends.queue.stats(newer).queued == 0
    store.delete(Layout.result(newer, "00000"))  # a commit record gone
    store.delete(Layout.outputs(newer, "00001", 0) + "out.txt")  # an output gone
    third, cache = submit()
    found = {
        s.id: ShardResult.from_json(store.get(Layout.result(third, s.id))).cached_from
        for s in runs.iter_shards(store, third)
    }
    # 00000 and 00001 fall back to the older run; 00002 may come from either.
    assert found["00000"] == f"{older}/00000" and found["00001"] == f"{older}/00001"
    assert found["00002"] in (f"{older}/00002", f"{newer}/00002")
    assert store.get(Layout.outputs(third, "00001", 0) + "out.txt") == b"00001"

    for run_id in (older, newer):  # with no commit left anywhere, the shards run
        for shard in runs.iter_shards(store, run_id):
            store.delete(Layout.result(run_id, shard.id))
    store.delete(Layout.result(third, "00000"))
    fourth, cache = submit()
    assert cache.cached == 2 and backends.queue.stats(fourth).queued == 1
    backends.close()


def test_a_cut_off_cache_submit_still_reuses_when_publishing_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`runner watch` finishing the publishing of an interrupted `--cache` submit reuses the
    rest of its shards from the keys the submit recorded."""
    monkeypatch.setattr(defaults, "PUBLISH_BATCH", 2)
    task = make_task(tmp_path / "task", TASK)
    dep = open_deployment(config_mod.resolve(local=True, store_dir=tmp_path / ".cflow"))
    store, queue = dep.backends.store, dep.backends.queue
    try:
        first = ShardCache(store, code=code_digest(task))
        older = runs.create_run(
            store=store,
            queue=queue,
            task_dir=task,
            shards=first.keyed(from_count(5)),
            options=RunOptions(),
            reuse=first.reuse,
        )
        assert queue.stats(older.run_id).queued == 5
        for shard in runs.iter_shards(store, older.run_id):
            record = ShardResult(older.run_id, shard.id, 1, "w", 0.0, 1.0, value=shard.index)
            store.create(Layout.result(older.run_id, shard.id), record.to_json())

        cache = ShardCache(store, code=code_digest(task))
        calls: list[str] = []

        def cut_off(run_id: str, batch: list[Shard]) -> set[str]:
            calls.append(run_id)
            if len(calls) == 2:  # the runner dies after the first batch went out
                raise KeyboardInterrupt
            return cache.reuse(run_id, batch)

        made: list[Manifest] = []
        with pytest.raises(KeyboardInterrupt):
            runs.create_run(
                store=store,
                queue=queue,
                task_dir=task,
                shards=cache.keyed(from_count(5)),
                options=RunOptions(),
                reuse=cut_off,
                on_created=made.append,
            )
        run_id = made[0].run_id
        manifest = runs.load_manifest(store, run_id)
        assert manifest.published == 2 and manifest.publishing

        resume_publishing(dep, manifest)
        assert queue.stats(run_id).queued == 0  # nothing published: all five reused
        reused = [
            ShardResult.from_json(store.get(Layout.result(run_id, s.id)))
            for s in runs.iter_shards(store, run_id)
        ]
        assert [r.cached_from for r in reused] == [f"{older.run_id}/{r.shard_id}" for r in reused]
        assert [r.value for r in reused] == [0, 1, 2, 3, 4]
    finally:
        dep.close()


def test_a_store_or_result_folder_inside_the_task_folder_stays_out_of_its_bundle(
    cli: Cli, tmp_path: Path
) -> None:
    """Bundled, each run's bundle held the last run's store or combined result: it doubled
    with every run, and the cache never found the same task twice."""
    body = "from pathlib import Path\n\ndef run(shard):\n    (Path(shard.output_dir) / 'o.csv')"
    task = make_task(tmp_path / "t", body + ".write_text('1\\n')\n")
    cli.env["CFLOW_STORE"] = str(task / "mystore")
    done = []
    for n in range(3):
        r = cli("submit", str(task), "--shards", "2", "--cache", "--out", str(task / f"out{n}"))
        assert r.code == 0, r.stderr
        done.append(r.stderr)
    assert "cache: 2 of 2 shards reused" in done[1] and "cache: 2 of 2 shards reused" in done[2]


def test_a_commit_of_an_input_that_changed_after_it_was_keyed_is_not_reused(
    cli: Cli, tmp_path: Path
) -> None:
    """The first run keys its input's content (A), but its task reads B: its commit is never
    reused for A, as its attempt found the input changed. The rerun's own commit is."""
    task = make_task(tmp_path / "task", REWRITES)
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.txt").write_text("A\n")
    (data / "rewrite").touch()

    def submit() -> tuple[str, str]:
        r = cli("submit", str(task), "--inputs", str(data / "x.txt"), "--cache")
        assert r.code == 0, r.stderr
        return (cli.store / "runs" / r.run_id / "combined" / "o.txt").read_text(), r.stderr

    assert submit()[0] == "B\n"  # what the task read, under the key of A
    (data / "x.txt").write_text("A\n")  # A again: the first run's key
    text, said = submit()
    assert text == "A\n" and "cache: 0 of 1 shards reused" in said, said
    os.utime(data / "x.txt")  # touched, the same content: reused
    text, said = submit()
    assert text == "A\n" and "cache: 1 of 1 shards reused" in said, said


def test_a_commit_of_a_named_file_that_changed_while_it_ran_is_not_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for a file a ``cflow`` item names (keyed by its size and modification time):
    put back with the time it had when keyed, it has the first run's key, but the commit of
    the attempt that saw it change is not reused."""
    import cflow
    from cflow.driver import let_go

    for name in ("CFLOW_DEPLOYMENT", "CFLOW_BACKEND", "CFLOW_STORE"):
        monkeypatch.delenv(name, raising=False)
    data, gate = tmp_path / "x.txt", tmp_path / "rewrite"
    data.write_text("A")
    keyed = data.stat()
    gate.touch()

    def read(path: Path) -> str:
        if gate.exists():
            gate.unlink()
            path.write_text("B")
        return path.read_text()

    def mapped() -> tuple[list[str], int]:
        run = cflow.submit(read, [data], cache=True, store=str(tmp_path / ".cflow"), workers=1)
        return list(run.results()), run.progress().cached

    try:
        assert mapped() == (["B"], 0)
        data.write_text("A")
        os.utime(data, ns=(keyed.st_atime_ns, keyed.st_mtime_ns))  # as `cp -p` would
        assert mapped() == (["A"], 0)
        assert mapped() == (["A"], 1)
    finally:
        assert let_go(), "a run's workers were not let go"
