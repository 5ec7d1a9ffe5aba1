"""The cross-run cache on the Google Cloud path: the bucket's side of it on the emulator, and
whole `runner submit --cache` runs with real workers in a fake group."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import make_task
from tests.emulators import Deployment
from tests.gcp.conftest import MakeCompute
from tests.gcp.test_gcp_e2e import Cloud, _cloud
from worker.backends.base import Backends
from worker.backends.gcp.gcs import GcsStore

pytestmark = [pytest.mark.e2e, pytest.mark.emulator]

TASK = """
from pathlib import Path

def run(shard):
    rows = Path(shard.input).read_text().splitlines()
    (Path(shard.output_dir) / "n.csv").write_text(f"{Path(shard.input).name},{len(rows)}\\n")
    return len(rows)
"""


def test_the_bucket_copies_lists_and_fingerprints_in_batches(gcp_backends: Backends) -> None:
    store = gcp_backends.store
    assert isinstance(store, GcsStore)
    store.put("src/a.txt", b"alpha")
    store.put("src/b.txt", b"beta")
    missing = store.copy_many([("src/a.txt", "dst/a.txt"), ("src/gone.txt", "dst/gone.txt")])
    assert missing == {"src/gone.txt"}
    assert store.get("dst/a.txt") == b"alpha" and not store.exists("dst/gone.txt")
    assert store.create_many({"idx/k1/r/s": b"{}", "src/a.txt": b"other"}) == {"idx/k1/r/s"}
    assert store.list_many(["idx/k1/", "idx/k2/"]) == {"idx/k1/": ["idx/k1/r/s"], "idx/k2/": []}
    assert store.usage("src/") == (2, len(b"alpha") + len(b"beta"))
    bucket = store.bucket_name
    uris = [f"gs://{bucket}/src/a.txt", f"gs://{bucket}/dst/a.txt", f"gs://{bucket}/src/no.txt"]
    prints = store.fingerprints(uris)
    assert set(prints) == set(uris[:2])  # an object that is not there has no fingerprint
    assert prints[uris[0]] == prints[uris[1]] and prints[uris[0]].startswith("crc32c:")
    store.put("src/a.txt", b"alpha, changed")
    assert store.fingerprints(uris[:1])[uris[0]] != prints[uris[0]]
    store.delete_many(["dst/a.txt", "idx/k1/r/s"])
    assert store.list_many(["dst/", "idx/"]) == {"dst/": [], "idx/": []}


def _shards(cloud: Cloud, run_id: str) -> dict[str, dict[str, Any]]:
    return {s["input"].rsplit("/", 1)[-1]: s for s in cloud.status(run_id)["shards"]}


def _commits(store: GcsStore, run_id: str) -> dict[str, dict[str, Any]]:
    """The run's commit records, read from the bucket: input file name -> record."""
    names = {}
    for line in store.get(f"runs/{run_id}/shards.jsonl").decode().splitlines():
        shard = json.loads(line)
        names[shard["id"]] = shard["input"].rsplit("/", 1)[-1]
    out = {}
    for key in store.list(f"runs/{run_id}/shards/", suffix="/result.json"):
        record = json.loads(store.get(key))
        out[names[record["shard_id"]]] = record
    return out


def _submit(cloud: Cloud, task: Path, glob: str) -> tuple[str, str]:
    r = cloud.run("submit", str(task), "--inputs", glob, "--workers", "2", "--cache")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip(), r.stderr


def test_submit_cache_reuses_unchanged_shards_on_google_cloud(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    cloud = _cloud(deployment, fake_compute, tmp_path, idle_timeout=1.0)
    store = GcsStore(deployment.bucket)
    for name, rows in (("a.csv", 2), ("b.csv", 3), ("c.csv", 4)):
        store.put(f"data/{name}", "".join(f"{name}-{i}\n" for i in range(rows)).encode())
    task = make_task(tmp_path / "task", TASK)
    glob = f"gs://{deployment.bucket}/data/*.csv"

    first, _ = _submit(cloud, task, glob)
    assert [r["attempt"] for r in _commits(store, first).values()] == [1, 1, 1]
    grown = len(cloud.fake.resizes)

    second, said = _submit(cloud, task, glob)
    assert "3/3 shards succeeded (3 cached)" in said
    reused = _shards(cloud, second)
    assert all(s["attempts"] == [] and s["cached_from"] for s in reused.values())
    assert {s["value"] for s in reused.values()} == {2, 3, 4}
    assert len(cloud.fake.resizes) == grown  # nothing to run: no VM was asked for
    # The outputs were copied in the bucket into the new run, under attempt 0.
    copies = sorted(store.list(f"runs/{second}/shards/", suffix="/n.csv"))
    assert len(copies) == 3 and all("/attempts/0/out/" in key for key in copies)
    combined = store.get(f"runs/{second}/combined/n.csv").decode().splitlines()
    assert sorted(combined) == ["a.csv,2", "b.csv,3", "c.csv,4"]

    store.put("data/b.csv", b"b-0\n")  # one input changes: its shard alone runs
    third, _ = _submit(cloud, task, glob)
    commits = _commits(store, third)
    assert {n for n, r in commits.items() if r["cached_from"]} == {"a.csv", "c.csv"}
    assert commits["b.csv"]["attempt"] == 1 and commits["b.csv"]["value"] == 1

    make_task(task, TASK.replace("len(rows)}\\n", "len(rows) + 100}\\n"))  # the code changes
    fourth, _ = _submit(cloud, task, glob)
    assert all(r["cached_from"] is None for r in _commits(store, fourth).values())
    combined = store.get(f"runs/{fourth}/combined/n.csv").decode().splitlines()
    assert sorted(combined) == ["a.csv,102", "b.csv,101", "c.csv,104"]

    gone = cloud.run("rm", first, second)
    assert gone.returncode == 0, gone.stderr
    assert "6 cache entries" in gone.stderr
    listed = json.loads(cloud.run("runs", "--json").stdout)
    assert [(r["run_id"], r["cached"]) for r in listed] == [(third, 2), (fourth, 0)]
