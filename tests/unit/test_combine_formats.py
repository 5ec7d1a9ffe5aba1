"""Combine never changes bytes it does not understand: the rule per name, on a real local store."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
from pathlib import Path

import pytest

from runner.results import formats
from runner.results.combine import combine_run
from runner.results.formats import (
    NEWLINE_MEMBER,
    TEXT_PROBE,
    GzipScan,
    Method,
    kept_suffix,
    plan_for,
    scan_gzip,
)
from runner.results.parts import OutTarget
from worker.backends.local.backend import open_local
from worker.bundle import pack
from worker.protocol import Layout, Manifest, Shard, ShardResult
from worker.store import Store


def _run(
    tmp_path: Path, outputs: list[dict[str, bytes]], settings: str | None = None
) -> tuple[Store, Manifest]:
    """A run whose shards ``s0``, ``s1`` ... committed ``outputs`` (one dict per shard)."""
    b = open_local(tmp_path / "store")
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.py").write_text("def run(shard):\n    pass\n")
    if settings is not None:
        (task / "cflow.toml").write_text(settings)
    data, sha = pack(task)
    b.store.put(Layout.bundle(sha), data)
    run_id = "r-formats"
    shards = [Shard(id=f"s{i}", index=i) for i in range(len(outputs))]
    listing = "".join(s.to_json().decode() + "\n" for s in shards)
    b.store.put(Layout.shard_list(run_id), listing.encode())
    for shard, files in zip(shards, outputs, strict=True):
        prefix = Layout.outputs(run_id, shard.id, 1)
        for name, content in files.items():
            b.store.put(prefix + name, content)
        result = ShardResult(run_id, shard.id, 1, "w", 0.0, 1.0, outputs=sorted(files))
        b.store.create(Layout.result(run_id, shard.id), result.to_json())
    return b.store, Manifest(run_id=run_id, bundle=sha, entry="python", shard_count=len(shards))


@pytest.mark.parametrize(
    ("name", "headers", "method"),
    [
        ("p.csv", True, Method.LINES),
        ("P.TSV", None, Method.LINES),
        ("rows.jsonl", None, Method.LINES),
        ("rows.ndjson", None, Method.LINES),
        ("sub/notes.txt", True, Method.LINES),
        ("g.csv.gz", None, Method.GZIP),
        ("g.csv.gz", False, Method.GZIP),
        ("g.jsonl.gz", True, Method.GZIP),  # no header to cut in a jsonl
        ("g.csv.gz", True, Method.PER_SHARD),  # a header inside gzip data is not cut
        ("summary.json", None, Method.PER_SHARD),
        ("emb.npy", None, Method.PER_SHARD),
        ("obj.pkl", None, Method.PER_SHARD),
        ("doc.json.gz", None, Method.PER_SHARD),
        ("t.parquet", None, Method.PER_SHARD),
        ("README", None, Method.PER_SHARD),
        ("data.csv.bak", None, Method.PER_SHARD),
    ],
)
def test_the_rule_per_name(name: str, headers: bool | None, method: Method) -> None:
    assert plan_for(name, headers).method is method


def test_kept_suffix() -> None:
    assert [kept_suffix(n) for n in ("a.npy", "m.v2.pkl", "x.tar.gz", "README", "d/b.bin")] == [
        ".npy",
        ".pkl",
        ".tar.gz",
        "",
        ".bin",
    ]


def test_binary_and_json_parts_are_kept_per_shard_byte_for_byte(tmp_path: Path) -> None:
    blobs = [b"\x00\x01" + bytes([i]) * 7 for i in range(3)]  # no trailing newline
    outputs = [
        {
            "raw.bin": blobs[i],
            "obj.pkl": pickle.dumps({"i": i}),
            "summary.json": json.dumps({"shard": i}).encode(),
            "notes.weird": f"shard {i}".encode(),
        }
        for i in range(3)
    ]
    store, m = _run(tmp_path, outputs)
    said: list[str] = []
    out = tmp_path / "out"
    combined = combine_run(store, m, out=OutTarget(path=out), say=said.append)
    base = Layout.combined(m.run_id)
    assert combined.files == [
        f"{base}{n}/manifest.json" for n in ("notes.weird", "obj.pkl", "raw.bin", "summary.json")
    ]
    for i in range(3):
        assert store.get(f"{base}raw.bin/s{i}.bin") == blobs[i]
        assert pickle.loads(store.get(f"{base}obj.pkl/s{i}.pkl")) == {"i": i}
        assert json.loads(store.get(f"{base}summary.json/s{i}.json")) == {"shard": i}
        assert store.get(f"{base}notes.weird/s{i}.weird") == f"shard {i}".encode()
        assert (out / "raw.bin" / f"s{i}.bin").read_bytes() == blobs[i]
    listed = json.loads(store.get(f"{base}raw.bin/manifest.json"))
    assert listed["name"] == "raw.bin" and listed["kept"] == "per shard"
    assert listed["parts"] == [
        {
            "shard": f"s{i}",
            "index": i,
            "file": f"s{i}.bin",
            "size": len(blobs[i]),
            "sha256": hashlib.sha256(blobs[i]).hexdigest(),
        }
        for i in range(3)
    ]
    names = ("notes.weird", "obj.pkl", "raw.bin", "summary.json")
    assert combined.written == [str(out / n / "manifest.json") for n in names]
    assert "raw.bin: kept per shard (.bin is not a line format): 3 files listed in" in said[2]
    assert len(said) == 4


def test_gzip_parts_join_as_members_and_decompress_to_every_line(tmp_path: Path) -> None:
    parts = [gzip.compress(f"a,b\n{i},{i * i}\n".encode()) for i in range(3)]
    store, m = _run(tmp_path, [{"g.csv.gz": p} for p in parts] + [{"g.csv.gz": b""}])
    said: list[str] = []
    combined = combine_run(store, m, say=said.append)
    data = store.get(combined.files[0])
    assert combined.files == [Layout.combined(m.run_id) + "g.csv.gz"]
    assert data == b"".join(parts)  # not a byte added
    assert gzip.decompress(data) == b"".join(f"a,b\n{i},{i * i}\n".encode() for i in range(3))
    assert said == ["g.csv.gz: 3 gzip members concatenated into one gzip file (not recompressed)"]


def test_gzip_parts_without_a_final_newline_get_a_newline_member(tmp_path: Path) -> None:
    parts = [
        gzip.compress(b'{"k":0}'),
        gzip.compress(b'{"k":1}\n'),  # ends in a newline already: nothing added
        b"",  # adds no member
        gzip.compress(b'{"k":2}\n') + gzip.compress(b'{"k":3}') + gzip.compress(b""),
        gzip.compress(b'{"k":4}'),  # the last part too, as a line format's
    ]
    store, m = _run(tmp_path, [{"z.jsonl.gz": p} for p in parts])
    said: list[str] = []
    combined = combine_run(store, m, say=said.append)
    data = store.get(combined.files[0])
    assert gzip.decompress(data) == b"".join(b'{"k":%d}\n' % i for i in range(5))
    nl = NEWLINE_MEMBER
    assert data == parts[0] + nl + parts[1] + parts[3] + nl + parts[4] + nl  # parts unchanged
    assert said == [
        "z.jsonl.gz: 4 gzip members concatenated into one gzip file (not recompressed), a newline"
        " member added after the 3 whose content lacked one"
    ]


def test_undeclared_gzip_headers_stay_on_lines_of_their_own(tmp_path: Path) -> None:
    parts = [gzip.compress(f"a,b\n{i},{i}".encode()) for i in range(2)]
    store, m = _run(tmp_path, [{"g.csv.gz": p} for p in parts])
    combined = combine_run(store, m)
    assert gzip.decompress(store.get(combined.files[0])) == b"a,b\n0,0\na,b\n1,1\n"


def test_a_gzip_scan_keeps_only_the_first_and_last_bytes() -> None:
    content = b"a" * (3 << 20) + b"z"  # inflates past the 1 MiB a call gives out
    scan = scan_gzip(io.BytesIO(gzip.compress(content)), chunk=4096)
    assert scan == GzipScan(b"a" * TEXT_PROBE, b"z", whole=False)
    assert scan_gzip(io.BytesIO(gzip.compress(b"x\n"))) == GzipScan(b"x\n", b"\n", True)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_a_gzip_scan_reads_members_in_any_slices(
    monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(formats, "_INFLATE_OUT", 100)  # output cut often, input left over
    content = b"".join(b"%d,%s\n" % (i, b"x" * (i % 50)) for i in range(2000)) + b"end"
    members = b"".join(gzip.compress(content[i : i + 9000]) for i in range(0, len(content), 9000))
    scan = scan_gzip(io.BytesIO(members), chunk=chunk)
    assert scan == GzipScan(content[:TEXT_PROBE], b"d", whole=False)


ONE = gzip.compress(b"1\n2\n", mtime=0)


@pytest.mark.parametrize(
    ("part", "why"),
    [
        (ONE[:-5], "truncated: its last member is not complete"),
        (ONE + b"\0\0", "bytes after its last member: Error -3"),  # gzip -d stops there
        (ONE + b"junk", "bytes after its last member: Error -3"),
        (ONE[:-8] + b"\0" * 8, "corrupt: Error -3"),  # a wrong CRC and length
    ],
    ids=["truncated", "zero-padded", "trailing-junk", "bad-crc"],
)
def test_a_gzip_part_that_is_not_whole_is_kept_per_shard(
    tmp_path: Path, part: bytes, why: str
) -> None:
    store, m = _run(tmp_path, [{"g.txt.gz": gzip.compress(b"x")}, {"g.txt.gz": part}])
    combined = combine_run(store, m)
    base = Layout.combined(m.run_id)
    assert combined.files == [f"{base}g.txt.gz/manifest.json"]
    assert store.get(f"{base}g.txt.gz/s1.txt.gz") == part
    assert combined.how["g.txt.gz"].startswith(
        f"kept per shard (the part of shard s1 is not gzip data ({why}"
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
    tmp_path: Path, name: str, odd: bytes, why: str
) -> None:
    text = gzip.compress if name.endswith(".gz") else bytes
    parts = [text(b"a\n"), odd, text(b"b\n"), text(b"c")]
    store, m = _run(tmp_path, [{name: p} for p in parts], "[combine]\nheaders = true\n")
    said: list[str] = []
    combined = combine_run(store, m, say=said.append, out=OutTarget(path=tmp_path / "out"))
    base = Layout.combined(m.run_id)
    suffix = kept_suffix(name)
    assert combined.files == [f"{base}{name}/manifest.json"]
    for i, part in enumerate(parts):  # byte for byte, no newline added
        assert store.get(f"{base}{name}/s{i}{suffix}") == part
        assert (tmp_path / "out" / name / f"s{i}{suffix}").read_bytes() == part
    assert said == [
        f"{name}: kept per shard (the part of shard s1 is not text: {why}): 4 files listed in"
        f" {name}/manifest.json"
    ]


def test_text_is_judged_on_its_first_bytes_and_a_cut_character_is_no_fault(
    tmp_path: Path,
) -> None:
    cut = b"a" * (TEXT_PROBE - 1) + "é".encode() + b"\n"  # the probe ends inside the é
    late = b"a\n" * TEXT_PROBE + b"\0"  # past the probe: not looked at
    store, m = _run(tmp_path, [{"t.txt": cut}, {"t.txt": late}])
    combined = combine_run(store, m)
    assert store.get(combined.files[0]) == cut + late + b"\n"


def test_a_gzip_name_with_a_part_that_is_not_gzip_is_kept_per_shard(tmp_path: Path) -> None:
    store, m = _run(tmp_path, [{"g.txt.gz": gzip.compress(b"x\n")}, {"g.txt.gz": b"plain text\n"}])
    said: list[str] = []
    combined = combine_run(store, m, say=said.append)
    base = Layout.combined(m.run_id)
    assert combined.files == [f"{base}g.txt.gz/manifest.json"]
    assert store.get(f"{base}g.txt.gz/s1.txt.gz") == b"plain text\n"
    assert said == [
        "g.txt.gz: kept per shard (the part of shard s1 is not gzip data):"
        " 2 files listed in g.txt.gz/manifest.json"
    ]


def test_declared_headers_in_gzip_are_kept_per_shard_not_repeated(tmp_path: Path) -> None:
    parts = [gzip.compress(f"a,b\n{i},{i}\n".encode()) for i in range(2)]
    store, m = _run(tmp_path, [{"g.csv.gz": p} for p in parts], "[combine]\nheaders = true\n")
    combined = combine_run(store, m)
    base = Layout.combined(m.run_id)
    assert combined.files == [f"{base}g.csv.gz/manifest.json"]
    assert [store.get(f"{base}g.csv.gz/s{i}.csv.gz") for i in range(2)] == parts
    assert "declared headers are not cut out of gzip data" in combined.how["g.csv.gz"]


def test_a_first_line_that_is_not_the_header_is_kept_and_its_shard_named(tmp_path: Path) -> None:
    store, m = _run(
        tmp_path,
        [{"t.csv": b"a,b\n0,0\n"}, {"t.csv": b"1,2\n1,3\n"}, {"t.csv": b"a,b\n2,4\n"}],
        "[combine]\nheaders = true\n",
    )
    warnings: list[str] = []
    combined = combine_run(store, m, warn=warnings.append)
    assert store.get(combined.files[0]) == b"a,b\n0,0\n1,2\n1,3\n2,4\n"  # row 1,2 kept
    assert warnings == [
        "t.csv: the first line of shard s1 is not the header 'a,b' (e.g. '1,2'); kept as data,"
        " not dropped"
    ]
    assert combined.how["t.csv"] == "lines of 3 parts concatenated, the header kept once"


def test_many_differing_shards_are_named_a_few_then_counted(tmp_path: Path) -> None:
    outputs = [{"t.tsv": b"h\n0\n"}] + [{"t.tsv": f"{i}\n".encode()} for i in range(1, 7)]
    store, m = _run(tmp_path, outputs, "[combine]\nheaders = true\n")
    warnings: list[str] = []
    combine_run(store, m, warn=warnings.append)
    assert warnings[0].startswith("t.tsv: the first line of shards s1, s2, s3 and 3 more is not")


def test_crlf_headers_match_and_a_header_only_part_adds_no_blank_line(tmp_path: Path) -> None:
    store, m = _run(
        tmp_path,
        [{"p.csv": b"id,v\r\n1,a\r\n"}, {"p.csv": b"id,v"}, {"p.csv": b"id,v\n2,b"}, {}],
        "[combine]\nheaders = true\n",
    )
    warnings: list[str] = []
    combined = combine_run(store, m, warn=warnings.append)
    assert store.get(combined.files[0]) == b"id,v\r\n1,a\r\n2,b\n"
    assert warnings == []


def test_line_formats_get_a_newline_only_where_one_is_missing(tmp_path: Path) -> None:
    store, m = _run(
        tmp_path,
        [{"r.jsonl": b'{"a": 1}'}, {"r.jsonl": b""}, {"r.jsonl": b'{"a": 2}\n'}],
    )
    combined = combine_run(store, m)
    assert store.get(combined.files[0]) == b'{"a": 1}\n{"a": 2}\n'


def test_a_recombine_that_changes_a_names_shape_replaces_it(tmp_path: Path) -> None:
    parts = [gzip.compress(f"a,b\n{i},{i}\n".encode()) for i in range(2)]
    store, m = _run(tmp_path, [{"g.csv.gz": p} for p in parts])
    base = Layout.combined(m.run_id)
    out = OutTarget(path=tmp_path / "out")  # its copies there too: this run's own, replaced
    joined = combine_run(store, m, headers=False, out=out)
    assert joined.files == [f"{base}g.csv.gz"]
    kept = combine_run(store, m, headers=True, out=out)  # now a folder where the file was
    assert kept.files == [f"{base}g.csv.gz/manifest.json"]
    assert sorted(store.list(base)) == [
        f"{base}g.csv.gz/{n}" for n in ("manifest.json", "s0.csv.gz", "s1.csv.gz")
    ]
    again = combine_run(store, m, headers=False, out=out)  # and a file where the folder was
    assert again.files == [f"{base}g.csv.gz"]
    assert list(store.list(base)) == [f"{base}g.csv.gz"]
    assert store.get(f"{base}g.csv.gz") == b"".join(parts)
    assert (tmp_path / "out" / "g.csv.gz").read_bytes() == b"".join(parts)
