"""Combine through the CLI never changes bytes it does not understand.

Line formats are concatenated; gzip-compressed line formats are joined as gzip members (or kept
per shard when declared headers would have to be cut); everything else (.npy, .pkl, binary, a
JSON document, an unknown suffix) is kept per shard under ``combined/<name>/`` with a manifest.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import pickle
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli, make_task

pytestmark = pytest.mark.e2e

HAVE_NUMPY = importlib.util.find_spec("numpy") is not None
SHARDS = 3
PER_SHARD = ("emb.npy", "g.csv.gz", "notes.weird", "obj.pkl", "raw.bin", "summary.json")

TASK = """
import gzip
import json
import pickle
from pathlib import Path

try:
    import numpy as np
except ImportError:
    np = None


def run(shard):
    out = Path(shard.output_dir)
    i = shard.index
    if np is not None:
        np.save(out / "emb.npy", np.full((3, 2), i))
    else:
        (out / "emb.npy").write_bytes(bytes([0x93, i]) * 4)  # raw bytes, no final newline
    with open(out / "obj.pkl", "wb") as fh:
        pickle.dump({"i": i}, fh)
    (out / "raw.bin").write_bytes(bytes([i]) * 5 + b"\\x00")  # no final newline
    with gzip.open(out / "g.csv.gz", "wt") as fh:
        fh.write(f"a,b\\n{i},{i * i}\\n")
    (out / "summary.json").write_text(json.dumps({"shard": i}))
    (out / "notes.weird").write_bytes(f"note {i}".encode())
    # shard 1 forgets the header: its first line is a data row
    (out / "t.csv").write_text(("" if i == 1 else "a,b\\n") + f"{i},{i}\\n{i},{i + 1}\\n")
    (out / "rows.jsonl").write_text(json.dumps({"i": i}))  # no final newline
"""


def _submit(cli: Cli, tmp_path: Path, out: Path) -> tuple[str, str]:
    task = make_task(tmp_path / "t", TASK)
    (task / "cflow.toml").write_text("[combine]\nheaders = true\n")
    r = cli("submit", str(task), "--shards", str(SHARDS), "--workers", "2", "--out", str(out))
    assert r.code == 0, r.stderr
    return r.run_id, r.stderr


def _check_part(name: str, i: int, data: bytes) -> None:
    """One shard's part, as the task wrote it."""
    if name == "emb.npy" and HAVE_NUMPY:
        import io

        import numpy as np

        assert (np.load(io.BytesIO(data)) == np.full((3, 2), i)).all()
    elif name == "emb.npy":
        assert data == bytes([0x93, i]) * 4
    elif name == "obj.pkl":
        assert pickle.loads(data) == {"i": i}
    elif name == "raw.bin":
        assert data == bytes([i]) * 5 + b"\x00"
    elif name == "g.csv.gz":
        assert gzip.decompress(data) == f"a,b\n{i},{i * i}\n".encode()
    elif name == "summary.json":
        assert json.loads(data) == {"shard": i}
    else:
        assert data == f"note {i}".encode()


def test_binary_json_and_unknown_outputs_are_kept_per_shard_with_a_manifest(
    cli: Cli, tmp_path: Path
) -> None:
    out = tmp_path / "result"
    run_id, stderr = _submit(cli, tmp_path, out)
    combined = cli.store / "runs" / run_id / "combined"
    for name in PER_SHARD:
        listed = json.loads((combined / name / "manifest.json").read_text())
        assert [p["file"] for p in listed["parts"]] == [
            f"{i:05d}{'.csv.gz' if name == 'g.csv.gz' else Path(name).suffix}"
            for i in range(SHARDS)
        ]
        for i, part in enumerate(listed["parts"]):
            data = (combined / name / part["file"]).read_bytes()
            assert (part["shard"], part["index"], part["size"]) == (f"{i:05d}", i, len(data))
            assert part["sha256"] == hashlib.sha256(data).hexdigest()
            _check_part(name, i, data)
            assert (out / name / part["file"]).read_bytes() == data  # --out has them too
        assert f"combined: {combined / name / 'manifest.json'}" in stderr
        assert f"written: {out / name / 'manifest.json'}" in stderr
    assert sorted(p.name for p in combined.iterdir()) == sorted([*PER_SHARD, "rows.jsonl", "t.csv"])
    assert "cflow: emb.npy: kept per shard (.npy is not a line format): 3 files listed in" in stderr
    assert "cflow: notes.weird: kept per shard (.weird is not a line format)" in stderr
    assert (
        "cflow: g.csv.gz: kept per shard (declared headers are not cut out of gzip data)" in stderr
    )


def test_line_formats_are_concatenated_and_a_missing_header_is_named_not_dropped(
    cli: Cli, tmp_path: Path
) -> None:
    out = tmp_path / "result"
    _, stderr = _submit(cli, tmp_path, out)
    assert (out / "t.csv").read_text() == "a,b\n0,0\n0,1\n1,1\n1,2\n2,2\n2,3\n"  # row 1,1 kept
    assert (
        "warning: t.csv: the first line of shard 00001 is not the header 'a,b' (e.g. '1,1');"
        " kept as data, not dropped"
    ) in stderr
    assert (out / "rows.jsonl").read_text() == "".join(f'{{"i": {i}}}\n' for i in range(SHARDS))
    assert "cflow: t.csv: lines of 3 parts concatenated, the header kept once" in stderr
    assert "cflow: rows.jsonl: lines of 3 parts concatenated" in stderr


def test_without_declared_headers_gzip_parts_join_as_members(cli: Cli, tmp_path: Path) -> None:
    run_id, _ = _submit(cli, tmp_path, tmp_path / "result")
    combined = cli.store / "runs" / run_id / "combined"
    raw = cli("combine", run_id, "--no-headers")
    assert raw.code == 0, raw.stderr
    joined = combined / "g.csv.gz"
    assert joined.is_file()  # the per-shard folder of the first combine is gone
    assert gzip.decompress(joined.read_bytes()) == b"".join(
        f"a,b\n{i},{i * i}\n".encode() for i in range(SHARDS)
    )
    assert str(joined) in raw.stdout.splitlines()
    assert str(combined / "emb.npy" / "manifest.json") in raw.stdout.splitlines()
    assert "cflow: g.csv.gz: 3 gzip members concatenated" in raw.stderr
    assert (combined / "t.csv").read_text() == "a,b\n0,0\n0,1\n1,1\n1,2\na,b\n2,2\n2,3\n"


LAST_LINES = """
import gzip
from pathlib import Path

PNG = b"\\x89PNG\\r\\n\\x1a\\n\\x00\\x00\\x00\\rIHDR"


def run(shard):
    out = Path(shard.output_dir)
    i = shard.index
    (out / "z.jsonl.gz").write_bytes(gzip.compress(b'{"k":%d}' % i))  # no final newline
    (out / "img.csv").write_bytes(PNG + bytes([i]) if i == 2 else f"{i},x\\n".encode())
"""


def test_gzip_lines_end_in_newlines_and_binary_in_a_line_format_is_kept_per_shard(
    cli: Cli, tmp_path: Path
) -> None:
    task = make_task(tmp_path / "t", LAST_LINES)
    r = cli("submit", str(task), "--shards", "4", "--workers", "2")
    assert r.code == 0, r.stderr
    combined = cli.store / "runs" / r.run_id / "combined"
    joined = gzip.decompress((combined / "z.jsonl.gz").read_bytes())
    assert joined == b'{"k":0}\n{"k":1}\n{"k":2}\n{"k":3}\n'  # not {"k":0}{"k":1}...
    assert "cflow: z.jsonl.gz: 4 gzip members concatenated into one gzip file (not" in r.stderr
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x02"
    for i in range(4):
        part = (combined / "img.csv" / f"{i:05d}.csv").read_bytes()
        assert part == (png if i == 2 else f"{i},x\n".encode())  # byte for byte
    assert (
        "cflow: img.csv: kept per shard (the part of shard 00002 is not text: a NUL byte at"
        " offset 8): 4 files listed in img.csv/manifest.json"
    ) in r.stderr
