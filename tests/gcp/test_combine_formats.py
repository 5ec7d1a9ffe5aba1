"""Combine in the bucket never changes bytes it does not understand (fake-gcs-server).

The same rule as on this machine: line formats composed, gzip-compressed line formats composed as
gzip members (a newline member after a part whose content lacks a final newline), everything else
copied server-side per shard under ``combined/<name>/`` with a manifest that lists each part's
size and the bucket's crc32c; so is a line format one of whose parts is not text, and a gzip
name one of whose parts is not whole gzip data.
"""

from __future__ import annotations

import base64
import gzip
import json
import pickle
from pathlib import Path

import google_crc32c
import pytest

from runner.backends.gcp import combine as bucket_combine
from runner.backends.gcp.combine import BucketCombiner
from runner.results.combine import combine_run
from runner.results.formats import NEWLINE_MEMBER, TEXT_PROBE, kept_suffix
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
    # Each gzip part is read once, to decompress it as it comes; the pickles not at all.
    assert joined.traffic.downloaded == sum(map(len, gz)) and joined.traffic.uploaded == 0
    assert said == [
        "g.csv.gz: 4 gzip members concatenated into one gzip file (not recompressed)",
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


def test_gzip_parts_without_a_final_newline_get_a_newline_member(
    deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bucket_combine, "READ_CHUNK", 16)  # each part in many ranged reads
    store = GcsStore(deployment.bucket, client=make_client(PROJECT))
    parts = [
        gzip.compress(b'{"k":0}'),
        gzip.compress(b'{"k":1}\n'),  # ends in a newline already: nothing added
        b"",  # adds no member
        gzip.compress(b'{"k":2}\n') + gzip.compress(b'{"k":3}') + gzip.compress(b""),
        gzip.compress(b'{"k":4}'),  # the last part too, as a line format's
    ]
    m = _planted(store, [{"z.jsonl.gz": p} for p in parts], tmp_path / "task")
    said: list[str] = []
    combined = combine_run(store, m, combiner=BucketCombiner(), say=said.append)
    data = store.get(combined.files[0])
    assert gzip.decompress(data) == b"".join(b'{"k":%d}\n' % i for i in range(5))
    nl = NEWLINE_MEMBER
    assert data == parts[0] + nl + parts[1] + parts[3] + nl + parts[4] + nl  # parts unchanged
    assert said == [
        "z.jsonl.gz: 4 gzip members concatenated into one gzip file (not recompressed), a newline"
        " member added after the 3 whose content lacked one"
    ]
    assert combined.traffic.downloaded == sum(map(len, parts))  # each part once, no more
    assert combined.traffic.uploaded == 0
    assert list(store.list(f"runs/{m.run_id}/combine-scratch/")) == []


ONE = gzip.compress(b"1\n2\n", mtime=0)


@pytest.mark.parametrize(
    ("part", "why"),
    [
        (ONE[:-5], "truncated: its last member is not complete"),
        (ONE + b"\0\0", "bytes after its last member: Error -3"),  # gzip -d stops there
        (ONE[:-8] + b"\0" * 8, "corrupt: Error -3"),  # a wrong CRC and length
    ],
    ids=["truncated", "zero-padded", "bad-crc"],
)
def test_a_gzip_part_that_is_not_whole_is_kept_per_shard(
    deployment: Deployment, tmp_path: Path, part: bytes, why: str
) -> None:
    store = GcsStore(deployment.bucket, client=make_client(PROJECT))
    m = _planted(store, [{"g.txt.gz": gzip.compress(b"x")}, {"g.txt.gz": part}], tmp_path / "t")
    combined = combine_run(store, m, combiner=BucketCombiner())
    base = Layout.combined(m.run_id)
    assert combined.files == [f"{base}g.txt.gz/manifest.json"]
    assert store.get(f"{base}g.txt.gz/00001.txt.gz") == part
    assert combined.how["g.txt.gz"].startswith(
        f"kept per shard (the part of shard 00001 is not gzip data ({why}"
    )


PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01"  # no final newline


@pytest.mark.parametrize(
    ("name", "odd", "why"),
    [
        ("x.csv", PNG, "a NUL byte at offset 8"),
        ("x.txt", b"caf\xe9\n", "byte 0xe9 at offset 3 is not UTF-8"),  # Latin-1
        ("x.jsonl.gz", gzip.compress(PNG, mtime=0), "a NUL byte at offset 8"),
    ],
    ids=["png-in-csv", "latin-1-txt", "png-in-jsonl-gz"],
)
def test_a_line_format_part_that_is_not_text_keeps_the_name_per_shard(
    deployment: Deployment, tmp_path: Path, name: str, odd: bytes, why: str
) -> None:
    store = GcsStore(deployment.bucket, client=make_client(PROJECT))
    text = gzip.compress if name.endswith(".gz") else bytes
    parts = [text(b"a\n"), odd, text(b"b\n"), text(b"c")]
    m = _planted(store, [{name: p} for p in parts], tmp_path / "task")
    said: list[str] = []
    out = tmp_path / "out"
    combined = combine_run(
        store, m, headers=True, combiner=BucketCombiner(), say=said.append, out=OutTarget(path=out)
    )
    base = Layout.combined(m.run_id)
    suffix = kept_suffix(name)
    assert combined.files == [f"{base}{name}/manifest.json"]
    for i, part in enumerate(parts):  # byte for byte, no newline added
        assert store.get(f"{base}{name}/{i:05d}{suffix}") == part
        assert (out / name / f"{i:05d}{suffix}").read_bytes() == part
    listed = json.loads(store.get(f"{base}{name}/manifest.json"))
    assert listed["why"] == f"the part of shard 00001 is not text: {why}"
    assert [(p["file"], p["size"], p["crc32c"]) for p in listed["parts"]] == [
        (f"{i:05d}{suffix}", len(part), _crc32c(part)) for i, part in enumerate(parts)
    ]
    assert said == [
        f"{name}: kept per shard (the part of shard 00001 is not text: {why}): 4 files listed in"
        f" {name}/manifest.json"
    ]
    assert list(store.list(f"runs/{m.run_id}/combine-scratch/")) == []


def test_text_is_judged_on_its_first_bytes_and_a_cut_character_is_no_fault(
    deployment: Deployment, tmp_path: Path
) -> None:
    store = GcsStore(deployment.bucket, client=make_client(PROJECT))
    cut = b"a" * (TEXT_PROBE - 1) + "é".encode() + b"\n"  # the probe ends inside the é
    late = b"a\n" * TEXT_PROBE + b"\0"  # past the probe: not looked at
    m = _planted(store, [{"t.txt": cut}, {"t.txt": late}], tmp_path / "task")
    combined = combine_run(store, m, combiner=BucketCombiner())
    assert store.get(combined.files[0]) == cut + late + b"\n"
    # The first TEXT_PROBE + 1 bytes of each part, and the last byte of both (longer than that).
    assert combined.traffic.downloaded == 2 * (TEXT_PROBE + 1) + 2


def test_a_header_and_a_last_byte_past_the_probe_are_read_on_their_own(
    deployment: Deployment, tmp_path: Path
) -> None:
    store = GcsStore(deployment.bucket, client=make_client(PROJECT))
    header = b"h" * (TEXT_PROBE + 100) + b"\n"  # longer than the probe
    tail = b"3" * TEXT_PROBE  # no final newline, past the probe
    parts = [header + b"1\n", header + b"2\n" + tail, b"h\n4\n"]
    m = _planted(store, [{"t.csv": p} for p in parts], tmp_path / "task")
    warnings: list[str] = []
    combined = combine_run(store, m, headers=True, combiner=BucketCombiner(), warn=warnings.append)
    assert store.get(combined.files[0]) == header + b"1\n2\n" + tail + b"\nh\n4\n"
    assert combined.how["t.csv"] == "lines of 3 parts concatenated, the header kept once"
    assert len(warnings) == 1
    assert warnings[0].startswith("t.csv: the first line of shard 00002 is not the header 'hhh")
