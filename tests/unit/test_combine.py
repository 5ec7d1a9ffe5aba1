from __future__ import annotations

import textwrap
from pathlib import Path

from runner.combine import combine_run
from worker.backends import open_local
from worker.bundle import pack
from worker.protocol import Layout, Manifest, Shard, ShardResult


def _run(tmp_path: Path, outputs: list[dict[str, bytes]], task_py: str | None = None):
    b = open_local(tmp_path / "store")
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.py").write_text(textwrap.dedent(task_py or "def run(shard): pass\n"))
    data, sha = pack(task)
    b.store.put(Layout.bundle(sha), data)
    run_id = "r-combine"
    shards = [Shard(id=f"s{i}", index=i) for i in range(len(outputs) + 1)]
    b.store.put(
        Layout.shard_list(run_id), "".join(s.to_json().decode() + "\n" for s in shards).encode()
    )
    manifest = Manifest(run_id=run_id, bundle=sha, entry="python", shard_count=len(shards))
    for shard, files in zip(shards, outputs, strict=False):
        prefix = Layout.outputs(run_id, shard.id, 2)
        for name, content in files.items():
            b.store.put(prefix + name, content)
        b.store.put(Layout.outputs(run_id, shard.id, 1) + "loser.csv", b"a\nnever\n")
        result = ShardResult(
            run_id=run_id,
            shard_id=shard.id,
            attempt=2,
            worker="w",
            started_at=0,
            finished_at=1,
            outputs=sorted(files),
        )
        b.store.create(Layout.result(run_id, shard.id), result.to_json())
    return b, manifest


def test_csv_headers_once_and_only_committed_attempts(tmp_path: Path) -> None:
    b, m = _run(
        tmp_path,
        [
            {"p.csv": b"id,y\n1,a\n2,b\n", "notes.txt": b"first"},
            {"p.csv": b"id,y\n3,c\n"},
        ],
    )
    combined = combine_run(b.store, m, out=tmp_path / "out")
    assert combined.shards == 2 and combined.missing == 1  # the third shard never committed
    assert (tmp_path / "out" / "p.csv").read_text() == "id,y\n1,a\n2,b\n3,c\n"
    assert (tmp_path / "out" / "notes.txt").read_text() == "first\n"
    assert not (tmp_path / "out" / "loser.csv").exists()
    assert b.store.get(Layout.combined(m.run_id) + "p.csv") == b"id,y\n1,a\n2,b\n3,c\n"


def test_user_combine_overrides(tmp_path: Path) -> None:
    b, m = _run(
        tmp_path,
        [{"n.txt": b"2\n"}, {"n.txt": b"5\n"}],
        task_py="""
        from pathlib import Path

        def run(shard):
            pass

        def combine(paths, out):
            total = sum(int(Path(p).read_text()) for p in paths)
            (Path(out) / "total.txt").write_text(f"{total}\\n")
    """,
    )
    combined = combine_run(b.store, m)
    assert combined.files == [Layout.combined(m.run_id) + "total.txt"]
    assert b.store.get(combined.files[0]) == b"7\n"
