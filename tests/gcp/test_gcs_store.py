"""The Cloud Storage store beyond the contract suite: globs, paging, errors, staging inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.backends.gcp.staging import BucketStager, GcsLister
from runner.engine.shards import from_glob
from tests.emulators import Deployment
from worker.backends.base import Backends
from worker.backends.gcp.gcs import GcsStore, file_crc32c, glob_prefix, glob_regex
from worker.errors import BackendError, NotFound
from worker.protocol import Shard

pytestmark = pytest.mark.emulator


@pytest.mark.parametrize(
    ("glob", "name", "matches"),
    [
        ("data/*.csv", "data/a.csv", True),
        ("data/*.csv", "data/sub/a.csv", False),
        ("data/**.csv", "data/sub/deep/a.csv", True),
        ("data/**/a.csv", "data/a.csv", True),
        ("data/**/a.csv", "data/x/y/a.csv", True),
        ("data/?.csv", "data/ab.csv", False),
        ("data/[ab].csv", "data/b.csv", True),
        ("data/[!ab].csv", "data/b.csv", False),
        ("data/{x,y}.csv", "data/y.csv", True),
        ("data/a+b (1).csv", "data/a+b (1).csv", True),
        ("data/*.csv", "data/a.csv.gz", False),
    ],
)
def test_glob_semantics_follow_match_glob(glob: str, name: str, matches: bool) -> None:
    assert bool(glob_regex(glob).match(name)) is matches


def test_glob_prefix_is_the_literal_start() -> None:
    assert glob_prefix("data/2024-*/part-?.csv") == "data/2024-"
    assert glob_prefix("data/exact.csv") == "data/exact.csv"


def test_glob_lists_page_by_page_in_name_order(
    gcp_backends: Backends, deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = gcp_backends.store
    names = [f"data/part-{i:02d}.csv" for i in range(7)] + ["data/sub/x.csv", "data/notes.txt"]
    for name in reversed(names):
        store.put(name, b"x")
    store.put("other/part-00.csv", b"x")
    monkeypatch.setattr(store, "page_size", 3)
    bucket = f"gs://{deployment.bucket}"
    lister = GcsLister(store)  # type: ignore[arg-type]
    assert list(lister(f"{bucket}/data/*.csv")) == [f"{bucket}/{n}" for n in names[:7]]
    assert list(lister(f"{bucket}/data/**.csv")) == [f"{bucket}/{n}" for n in names[:8]]
    assert list(lister(f"{bucket}/data/notes.txt")) == [f"{bucket}/data/notes.txt"]
    shards = list(from_glob(f"{bucket}/**/part-00.csv", lister=lister))
    assert [s.input for s in shards] == [
        f"{bucket}/data/part-00.csv",
        f"{bucket}/other/part-00.csv",
    ]
    assert len({s.id for s in shards}) == 2


def test_list_with_suffix_uses_match_glob_and_still_filters(gcp_backends: Backends) -> None:
    store = gcp_backends.store
    for key in ("runs/r/shards/a/result.json", "runs/r/shards/a/attempts/1/log.txt"):
        store.put(key, b"{}")
    assert list(store.list("runs/r/shards/", suffix="/result.json")) == [
        "runs/r/shards/a/result.json"
    ]


def test_create_is_idempotent_for_its_own_retry(gcp_backends: Backends) -> None:
    """A retried upload whose first try landed sees a 412; same bytes means it won."""
    store = gcp_backends.store
    assert store.create("runs/r/shards/a/result.json", b"attempt 1")
    assert store.create("runs/r/shards/a/result.json", b"attempt 1")
    assert not store.create("runs/r/shards/a/result.json", b"attempt 2")


def test_fetch_reads_any_bucket_and_leaves_nothing_when_missing(
    gcp_backends: Backends, deployment: Deployment, tmp_path: Path
) -> None:
    store = gcp_backends.store
    assert isinstance(store, GcsStore)
    other = store.client.create_bucket(f"{deployment.bucket}-inputs")
    other.blob("in/a.csv").upload_from_string(b"id\n1\n")
    store.fetch(f"gs://{other.name}/in/a.csv", tmp_path / "a.csv")
    assert (tmp_path / "a.csv").read_bytes() == b"id\n1\n"
    with pytest.raises(NotFound):
        store.fetch(f"gs://{other.name}/in/missing.csv", tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


def test_missing_bucket_is_one_clear_error(gcp_backends: Backends) -> None:
    store = gcp_backends.store
    assert isinstance(store, GcsStore)
    missing = GcsStore("cflow-no-such-bucket", client=store.client)
    with pytest.raises(BackendError, match=r"bucket gs://cflow-no-such-bucket does not exist"):
        missing.put("runs/r/run.json", b"{}")
    with pytest.raises(BackendError, match="gs://"):
        GcsStore("gs://x")


def test_local_inputs_are_staged_once_by_checksum(gcp_backends: Backends, tmp_path: Path) -> None:
    store = gcp_backends.store
    assert isinstance(store, GcsStore)
    files = []
    for i in range(12):
        path = tmp_path / f"in-{i}.csv"
        path.write_text(f"id\n{i}\n" * (i + 1))
        files.append(path)
    shards = [Shard(id=f"s{i}", index=i, input=str(p)) for i, p in enumerate(files)]

    stager = BucketStager(store, threads=4)
    staged = [stager("r-stage", s) for s in shards]
    stager.wait()
    assert stager.uploaded == 12 and stager.skipped == 0
    for shard, path in zip(staged, files, strict=True):
        assert shard.input == store.url(f"runs/r-stage/inputs/{shard.id}/{path.name}")
        store.fetch(shard.input, tmp_path / "back")
        assert (tmp_path / "back").read_bytes() == path.read_bytes()
    sums = store.checksums("runs/r-stage/inputs/")
    assert sums[f"runs/r-stage/inputs/s0/{files[0].name}"][1] == file_crc32c(files[0])
    stager.close()

    files[3].write_text("changed\n")
    again = BucketStager(store)
    for s in shards:
        again("r-stage", s)
    again.wait()
    assert (again.uploaded, again.skipped) == (1, 11)
    remote = again("r-stage", Shard(id="g", index=0, input="gs://b/k.csv"))
    assert remote.input == "gs://b/k.csv"
    again.close()


def test_task_files_named_like_records_are_never_read_as_records(gcp_backends: Backends) -> None:
    """A task may name its outputs status.json or result.json: on Cloud Storage they sit in
    the same bucket as the store's records, and `status` must tell them apart."""
    import json

    from runner.engine.reports import iter_shard_reports
    from worker.protocol import AttemptStatus, Layout, Manifest, ShardResult

    store = gcp_backends.store
    run = "r-lookalike"
    manifest = Manifest(run_id=run, bundle="0" * 64, entry="python", shard_count=1)
    store.put(Layout.manifest(run), manifest.to_json())
    store.put(
        Layout.shard_list(run), (json.dumps(Shard(id="a", index=0).to_dict()) + "\n").encode()
    )
    status = AttemptStatus(
        run_id=run, shard_id="a", attempt=1, state="running", worker="w", started_at=1.0
    )
    store.put(Layout.status(run, "a", 1), status.to_json())
    out = Layout.outputs(run, "a", 1)
    for name in ("status.json", "result.json", "attempts/2/status.json"):
        store.put(out + name, b"[1, 2, 3]")  # not a record: a list, not an object
    result = ShardResult(
        run_id=run, shard_id="a", attempt=1, worker="w", started_at=1.0, finished_at=2.0
    )
    store.put(Layout.result(run, "a"), result.to_json())
    (report,) = iter_shard_reports(store, manifest)
    assert report.state.value == "succeeded"
    assert [a.attempt for a in report.attempts] == [1]
