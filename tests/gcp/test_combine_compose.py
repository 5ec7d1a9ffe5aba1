"""Combine in the bucket on fake-gcs-server: compose in a tree, headers, paths, ``--out``.

fake-gcs-server refuses a compose of more than 32 sources with the real service's 400, so these
runs of more than 32 parts only pass when the parts are composed in a tree.
"""

from __future__ import annotations

import json
from pathlib import Path

import google.cloud.storage as storage
import pytest
from google.api_core import exceptions as gexc

from runner.backends.gcp.compose import MAX_COMPOSE_SOURCES, compose_tree
from runner.results.parts import Traffic
from tests.e2e.conftest import make_task
from tests.emulators import PROJECT, Deployment
from tests.gcp.conftest import MakeCompute
from tests.gcp.test_gcp_e2e import _cloud
from worker.backends.gcp.gcs import GcsStore, make_client

pytestmark = [pytest.mark.emulator]

SHARDS = 40  # more than one compose call's 32 sources

TASK = """
from pathlib import Path

def run(shard):
    out = Path(shard.output_dir)
    i = shard.index
    (out / "rows.csv").write_text(f"id,value\\n{i},{i * i}\\n")
    (out / "sub").mkdir()
    (out / "sub" / "rows.txt").write_text(f"0,0\\n{i}")  # not a CSV, no final newline
"""


def test_the_emulator_refuses_33_sources_like_the_real_service(deployment: Deployment) -> None:
    bucket = storage.Client(project=PROJECT).bucket(deployment.bucket)
    for i in range(MAX_COMPOSE_SOURCES + 1):
        bucket.blob(f"p/{i:03d}").upload_from_string(b"x")
    with pytest.raises(gexc.BadRequest, match="exceeds the maximum"):
        bucket.blob("all").compose(
            [bucket.blob(f"p/{i:03d}") for i in range(MAX_COMPOSE_SOURCES + 1)]
        )


def test_compose_tree_joins_100_parts_in_order_and_cleans_up(deployment: Deployment) -> None:
    store = GcsStore(deployment.bucket, client=make_client(PROJECT))
    keys = []
    for i in range(100):
        store.put(f"parts/{i:03d}", f"{i}\n".encode())
        keys.append(f"parts/{i:03d}")
    traffic = Traffic()
    compose_tree(store, keys, "joined.txt", "scratch/", traffic)
    assert store.get("joined.txt") == "".join(f"{i}\n" for i in range(100)).encode()
    assert traffic.compose_calls == 4 + 1  # 100 -> 4 composites of <= 32 -> 1
    assert traffic.downloaded == 0
    assert list(store.list("scratch/")) == []


def test_submit_combines_in_the_bucket_and_writes_to_a_bucket_path(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    task = make_task(tmp_path / "task", TASK)
    (task / "cflow.toml").write_text("[combine]\nheaders = true\n")
    cloud = _cloud(deployment, fake_compute, tmp_path)
    target = f"gs://{deployment.bucket}/exports/latest"
    result = cloud.run(
        "submit", str(task), "--shards", str(SHARDS), "--workers", "3", "--out", target,
        timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.strip()
    store = GcsStore(deployment.bucket, client=make_client(PROJECT))
    rows = store.get("exports/latest/rows.csv").decode()
    assert rows == "id,value\n" + "".join(f"{i},{i * i}\n" for i in range(SHARDS))
    sub = store.get("exports/latest/sub/rows.txt").decode()
    assert sub == "".join(f"0,0\n{i}\n" for i in range(SHARDS))  # every row, each on its line
    assert store.get(f"runs/{run_id}/combined/rows.csv").decode() == rows
    assert f"written: {target}/rows.csv" in result.stderr
    assert list(store.list(f"runs/{run_id}/combine-scratch/")) == []

    # combine again, into a local folder: only the combined files come down.
    local = tmp_path / "local"
    again = cloud.run("combine", run_id, "--out", str(local))
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == [str(local / "rows.csv"), str(local / "sub" / "rows.txt")]
    assert (local / "rows.csv").read_text() == rows
    traffic = json.loads(again.stderr.rsplit("traffic: ", 1)[1].splitlines()[0])
    combined_bytes = len(rows) + len(sub)
    # The parts (40 shards x 2 files) are read only for first lines and last bytes, plus the
    # header-stripped bodies of the headed file; the downloads are the combined result itself.
    assert traffic["downloaded_for_copy"] == combined_bytes
    assert traffic["compose_calls"] >= 2 * 2  # two files, each more than 32 parts: a tree
    # status reads the bucket's records with reads in flight, in shard order.
    status = cloud.run("status", run_id, "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["counts"]["succeeded"] == SHARDS
    assert [s["index"] for s in data["shards"]] == list(range(SHARDS))
    assert all(s["attempts"][-1]["state"] == "succeeded" for s in data["shards"])


def test_big_headed_parts_lose_their_headers_on_the_workers(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    task = make_task(tmp_path / "task", TASK)
    (task / "cflow.toml").write_text("[combine]\nheaders = true\n")
    cloud = _cloud(deployment, fake_compute, tmp_path)
    result = cloud.run("submit", str(task), "--shards", "6", "--workers", "2", timeout=240)
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.strip()
    cloud.env["CFLOW_COMBINE_ON_WORKERS_BYTES"] = "0"  # every header-less copy on the workers
    again = cloud.run("combine", run_id, timeout=240)
    assert again.returncode == 0, again.stderr
    assert "copying 5 parts without their headers on the workers" in again.stderr
    store = GcsStore(deployment.bucket, client=make_client(PROJECT))
    rows = store.get(f"runs/{run_id}/combined/rows.csv").decode()
    assert rows == "id,value\n" + "".join(f"{i},{i * i}\n" for i in range(6))
    traffic = json.loads(again.stderr.rsplit("traffic: ", 1)[1].splitlines()[0])
    assert traffic["uploaded"] == 0  # no part passed through the runner
    assert traffic["downloaded"] <= 6 * 2 * 512 + 12  # first lines and last bytes only
    listed = json.loads(cloud.run("runs", "--json").stdout)
    assert [r["run_id"] for r in listed] == [run_id]  # the helper run is gone
    assert list(store.list(f"runs/{run_id}/combine-scratch/")) == []
