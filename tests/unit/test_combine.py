from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from runner.results.combine import combine_run
from runner.results.parts import OutTarget, check_out
from worker.backends.local.backend import open_local
from worker.bundle import pack
from worker.errors import ConfigError
from worker.protocol import Layout, Manifest, Shard, ShardResult


def _run(
    tmp_path: Path,
    outputs: list[dict[str, bytes]],
    task_py: str | None = None,
    settings: str | None = None,
):
    b = open_local(tmp_path / "store")
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.py").write_text(textwrap.dedent(task_py or "def run(shard): pass\n"))
    if settings is not None:
        (task / "cflow.toml").write_text(settings)
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


def test_csv_headers_once_when_declared_and_only_committed_attempts(tmp_path: Path) -> None:
    b, m = _run(
        tmp_path,
        [
            {"p.csv": b"id,y\n1,a\n2,b\n", "notes.txt": b"first"},
            {"p.csv": b"id,y\n3,c\n"},
        ],
        settings="[combine]\nheaders = true\n",
    )
    combined = combine_run(b.store, m, out=OutTarget(path=tmp_path / "out"))
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


def test_headerless_rows_that_coincide_are_all_kept(tmp_path: Path) -> None:
    # Every part's first row is the same data row: nothing says it is a header, so none goes.
    b, m = _run(tmp_path, [{"p.csv": b"0,0\n1,a\n"}, {"p.csv": b"0,0\n2,b\n"}])
    warnings: list[str] = []
    combined = combine_run(b.store, m, warn=warnings.append)
    assert b.store.get(combined.files[0]) == b"0,0\n1,a\n0,0\n2,b\n"
    assert len(warnings) == 1 and "'0,0'" in warnings[0] and "headers = true" in warnings[0]


def test_headers_false_keeps_lines_without_a_warning(tmp_path: Path) -> None:
    b, m = _run(
        tmp_path,
        [{"p.tsv": b"a\tb\n"}, {"p.tsv": b"a\tb\n"}],
        settings="[combine]\nheaders = false\n",
    )
    warnings: list[str] = []
    combined = combine_run(b.store, m, warn=warnings.append)
    assert b.store.get(combined.files[0]) == b"a\tb\na\tb\n" and warnings == []


def test_the_headers_option_overrides_the_setting(tmp_path: Path) -> None:
    b, m = _run(tmp_path, [{"p.csv": b"h\n1\n"}, {"p.csv": b"h\n2"}])
    combined = combine_run(b.store, m, headers=True)
    assert b.store.get(combined.files[0]) == b"h\n1\n2\n"  # the missing last newline added


def test_relative_paths_are_kept_apart(tmp_path: Path) -> None:
    b, m = _run(
        tmp_path,
        [{"a.csv": b"top0\n", "sub/a.csv": b"sub0\n"}, {"a.csv": b"top1\n", "sub/a.csv": b"sub1"}],
    )
    out = tmp_path / "out"
    combined = combine_run(b.store, m, out=OutTarget(path=out))
    prefix = Layout.combined(m.run_id)
    assert combined.files == [prefix + "a.csv", prefix + "sub/a.csv"]
    assert (out / "a.csv").read_text() == "top0\ntop1\n"
    assert (out / "sub" / "a.csv").read_text() == "sub0\nsub1\n"
    assert combined.written == [str(out / "a.csv"), str(out / "sub" / "a.csv")]


def test_a_run_without_outputs_combines_to_nothing(tmp_path: Path) -> None:
    b, m = _run(tmp_path, [{}, {}])
    combined = combine_run(b.store, m, out=OutTarget(path=tmp_path / "out"))
    assert combined.files == [] and combined.written == [] and combined.shards == 2
    assert not (tmp_path / "out").exists()


def test_out_never_writes_over_a_file_of_the_users(tmp_path: Path) -> None:
    b, m = _run(tmp_path, [{"o.txt": b"0\n", "emb.bin": b"\x00"}, {"o.txt": b"1\n"}])
    out = tmp_path / "mine"
    out.mkdir()
    (out / "o.txt").write_text("my notes\n")
    with pytest.raises(ConfigError) as refused:
        combine_run(b.store, m, out=OutTarget(path=out))
    assert str(refused.value) == (
        f"--out {out}: {out / 'o.txt'} is in the way of the combined result and no combine of"
        f" run {m.run_id} wrote it; it is left as it is: give another folder (`runner combine"
        f" {m.run_id} --out DIR`), or move it away and combine again"
    )
    assert sorted(p.name for p in out.iterdir()) == ["o.txt"]  # nothing written, nothing lost
    assert (out / "o.txt").read_text() == "my notes\n"
    # A file where a name kept per shard puts its folder is the user's too, --force or not.
    (out / "o.txt").unlink()
    (out / "emb.bin").write_bytes(b"mine")
    with pytest.raises(ConfigError, match=f"{out / 'emb.bin'} is in the way"):
        combine_run(b.store, m, out=OutTarget(path=out, force=True))
    assert (out / "emb.bin").read_bytes() == b"mine"
    (out / "emb.bin").unlink()
    (out / "o.txt").mkdir()  # a folder of the user's where the combined file goes
    (out / "o.txt" / "keep.md").write_text("mine\n")
    with pytest.raises(ConfigError, match=f"{out / 'o.txt'} is in the way"):
        combine_run(b.store, m, out=OutTarget(path=out))
    assert (out / "o.txt" / "keep.md").read_text() == "mine\n"
    shutil.rmtree(out / "o.txt")
    first = combine_run(b.store, m, out=OutTarget(path=out))
    assert (out / "o.txt").read_text() == "0\n1\n" and len(first.written) == 2
    again = combine_run(b.store, m, out=OutTarget(path=out))  # this run's own: replaced
    assert again.written == first.written and (out / "o.txt").read_text() == "0\n1\n"
    elsewhere = tmp_path / "elsewhere.txt"  # a link put where the result was: never followed
    elsewhere.write_text("precious\n")
    (out / "o.txt").unlink()
    (out / "o.txt").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match=f"{out / 'o.txt'} is in the way"):
        combine_run(b.store, m, out=OutTarget(path=out))
    assert elsewhere.read_text() == "precious\n"


def test_check_out_refuses_what_cannot_be_written(tmp_path: Path) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        check_out(str(a_file), cloud=False)
    with pytest.raises(ConfigError, match="needs the Google Cloud backend"):
        check_out("gs://b/x", cloud=False)
    with pytest.raises(ConfigError, match="names no bucket"):
        check_out("gs:///x", cloud=True)
    with pytest.raises(ConfigError, match="only a local folder"):
        check_out("s3://b/x", cloud=True)
    assert check_out("gs://b/x/y", cloud=True) == OutTarget(bucket="b", prefix="x/y/")
    assert check_out(str(tmp_path / "new" / "dir"), cloud=False) == OutTarget(
        path=(tmp_path / "new" / "dir").resolve()
    )


def test_a_bad_settings_file_is_one_clear_error(tmp_path: Path) -> None:
    from worker.errors import TaskError

    b, m = _run(tmp_path, [{"p.csv": b"1\n"}], settings="[combine]\nheader = true\n")
    with pytest.raises(TaskError, match="unknown setting header"):
        combine_run(b.store, m)
