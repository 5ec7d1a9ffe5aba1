"""Combine in the bucket never changes bytes it does not understand (fake-gcs-server).

The same rule as on this machine: line formats composed, gzip-compressed line formats composed as
gzip members, everything else copied server-side per shard under ``combined/<name>/`` with a
manifest that lists each part's size and the bucket's crc32c.
"""

from __future__ import annotations

import base64
import gzip
import json
import pickle
from pathlib import Path

import google_crc32c
import pytest

from runner.backends.gcp.combine import BucketCombiner
from runner.results.combine import combine_run
from runner.results.parts import OutTarget
from tests.e2e.conftest import make_task
from tests.e2e.test_combine_formats import PER_SHARD, TASK, _check_part
from tests.emulators import PROJECT, Deployment
from tests.gcp.conftest import MakeCompute
from tests.gcp.test_gcp_e2e import _cloud
from worker.backends.gcp.gcs import GcsStore, make_client
from worker.bundle import pack
from worker.protocol import Layout, Manifest, Shard, ShardResult

pytestmark = [pytest.mark.emulator]


def _crc32c(data: bytes) -> str:
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


def test_submit_keeps_what_it_cannot_join_per_shard_in_the_bucket(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    task = make_task(tmp_path / "task", TASK)
    (task / "cflow.toml").write_text("[combine]\nheaders = true\n")
    cloud = _cloud(deployment, fake_compute, tmp_path)
    target = f"gs://{deployment.bucket}/exports/latest"
    result = cloud.run(
        "submit", str(task), "--shards", "3", "--workers", "2", "--out", target, timeout=240
    )
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.strip()
    store = GcsStore(deployment.bucket, client=make_client(PROJECT))
    base = Layout.combined(run_id)
    for name in PER_SHARD:
        listed = json.loads(store.get(f"{base}{name}/manifest.json"))
        assert [(p["shard"], p["index"]) for p in listed["parts"]] == [
            (f"{i:05d}", i) for i in range(3)
        ]
        for i, part in enumerate(listed["parts"]):
            data = store.get(f"{base}{name}/{part['file']}")
            assert part["size"] == len(data) and part["crc32c"] == _crc32c(data)
            _check_part(name, i, data)
            assert store.get(f"exports/latest/{name}/{part['file']}") == data
        assert f"written: {target}/{name}/manifest.json" in result.stderr
    rows = store.get(f"{base}t.csv").decode()
    assert rows == "a,b\n0,0\n0,1\n1,1\n1,2\n2,2\n2,3\n"  # shard 1's first row kept
    assert "the first line of shard 00001 is not the header 'a,b'" in result.stderr
    assert store.get(f"{base}rows.jsonl") == b"".join(b'{"i": %d}\n' % i for i in range(3))
    assert "cflow: emb.npy: kept per shard (.npy is not a line format)" in result.stderr
    assert list(store.list(f"runs/{run_id}/combine-scratch/")) == []


def _planted(store: GcsStore, outputs: list[dict[str, bytes]], task: Path) -> Manifest:
    """A run in the bucket whose shards committed ``outputs``, as the workers leave them."""
    make_task(task, "def run(shard):\n    pass\n")
    data, sha = pack(task)
    store.put(Layout.bundle(sha), data)
    run_id = "r-formats"
    shards = [Shard(id=f"{i:05d}", index=i) for i in range(len(outputs))]
    store.put(Layout.shard_list(run_id), b"".join(s.to_json() + b"\n" for s in shards))
    for shard, files in zip(shards, outputs, strict=True):
        for name, content in files.items():
            store.put(Layout.outputs(run_id, shard.id, 1) + name, content)
        result = ShardResult(run_id, shard.id, 1, "w", 0.0, 1.0, outputs=sorted(files))
        store.create(Layout.result(run_id, shard.id), result.to_json())
    return Manifest(run_id=run_id, bundle=sha, entry="python", shard_count=len(shards))


def test_gzip_members_compose_and_per_shard_parts_never_pass_through_the_runner(
    deployment: Deployment, tmp_path: Path
) -> None:
    store = GcsStore(deployment.bucket, client=make_client(PROJECT))
    gz = [gzip.compress(f"a,b\n{i},{i}\n".encode()) for i in range(4)]
    blobs = [pickle.dumps({"i": i, "pad": bytes(4096)}) for i in range(4)]
    m = _planted(
        store, [{"g.csv.gz": gz[i], "obj.pkl": blobs[i]} for i in range(4)], tmp_path / "task"
    )
    base = Layout.combined(m.run_id)
    said: list[str] = []
    joined = combine_run(store, m, headers=False, combiner=BucketCombiner(), say=said.append)
    assert joined.files == [f"{base}g.csv.gz", f"{base}obj.pkl/manifest.json"]
    assert store.get(f"{base}g.csv.gz") == b"".join(gz)  # one member per part, nothing added
    assert gzip.decompress(store.get(f"{base}g.csv.gz")).count(b"a,b\n") == 4
    assert [pickle.loads(store.get(f"{base}obj.pkl/{i:05d}.pkl"))["i"] for i in range(4)] == [
        0,
        1,
        2,
        3,
    ]
    # Two bytes of each gzip part are read to see it is gzip data; the pickles not at all.
    assert joined.traffic.downloaded == 4 * 2 and joined.traffic.uploaded == 0
    assert said == [
        "g.csv.gz: 4 gzip members concatenated into one gzip file (not decompressed)",
        "obj.pkl: kept per shard (.pkl is not a line format): 4 files listed in"
        " obj.pkl/manifest.json",
    ]

    # With declared headers the .csv.gz cannot be joined without repeating them: per shard,
    # and the joined object of the first combine is gone.
    out = tmp_path / "out"
    kept = combine_run(store, m, headers=True, combiner=BucketCombiner(), out=OutTarget(path=out))
    assert kept.files == [f"{base}g.csv.gz/manifest.json", f"{base}obj.pkl/manifest.json"]
    assert not store.exists(f"{base}g.csv.gz")
    assert [(out / "g.csv.gz" / f"{i:05d}.csv.gz").read_bytes() for i in range(4)] == gz
    assert kept.written == [
        str(out / "g.csv.gz" / "manifest.json"),
        str(out / "obj.pkl" / "manifest.json"),
    ]


def test_a_gzip_name_with_a_plain_part_is_kept_per_shard(
    deployment: Deployment, tmp_path: Path
) -> None:
    store = GcsStore(deployment.bucket, client=make_client(PROJECT))
    parts = [{"r.jsonl.gz": gzip.compress(b"{}\n")}, {"r.jsonl.gz": b"{}\n"}]
    m = _planted(store, parts, tmp_path / "task")
    combined = combine_run(store, m, combiner=BucketCombiner())
    base = Layout.combined(m.run_id)
    assert combined.files == [f"{base}r.jsonl.gz/manifest.json"]
    assert store.get(f"{base}r.jsonl.gz/00001.jsonl.gz") == b"{}\n"
    assert "the part of shard 00001 is not gzip data" in combined.how["r.jsonl.gz"]
