"""`runner report` for a real local run with a failure, a retry and a preemption."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from tests.e2e.conftest import Cli, make_task, wait_for

pytestmark = pytest.mark.e2e

TASK = """
import os, sys, time
from pathlib import Path

def run(shard):
    kind = shard.params["kind"]
    print(kind, "attempt", shard.attempt, flush=True)
    time.sleep(0.2)
    while not os.path.exists(shard.params.get("gate", "/")):  # held until the test lets go
        time.sleep(0.02)
    if kind == "flaky" and shard.attempt == 1:
        raise RuntimeError("transient trouble on the first try")
    if kind == "poison":
        sys.exit(7)
    (Path(shard.output_dir) / "out.txt").write_text(kind + "\\n")
"""


def test_report_of_a_run_with_a_failure_a_retry_and_a_preemption(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", TASK)
    gate = tmp_path / "gate"
    kinds = [{"kind": "slow", "gate": str(gate)}, {"kind": "flaky"}, {"kind": "poison"}]
    kinds.append({"kind": "ok"})
    params = tmp_path / "p.jsonl"
    params.write_text("".join(json.dumps(k) + "\n" for k in kinds))
    proc = cli.start(
        "submit", str(task), "--params", str(params), "--workers", "2", "--max-attempts", "2"
    )
    slow = wait_for(
        lambda: next((a for a in cli.running_attempts() if a["shard_id"] == "00000"), None),
        30,
        "the slow shard to start",
    )
    os.kill(cli.workers()[slow["worker"]], signal.SIGTERM)
    key = f"runs/{slow['run_id']}/shards/00000/attempts/{slow['attempt']}/status.json"
    wait_for(lambda: cli.records(key).get(key, {}).get("state") == "preempted", 60, "preemption")
    gate.touch()  # only now can the slow shard end: on its next attempt
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err  # the poison shard failed
    run_id = out.strip()
    status = cli.status(run_id)

    target = tmp_path / "report" / "run.html"
    result = cli("report", run_id, "--out", str(target))
    assert result.code == 0, result.stderr
    assert result.stdout.strip() == str(target)
    assert "efficiency" in result.stderr and "billed VM time" in result.stderr

    with Image.open(target.with_suffix(".png")) as image:
        image.verify()
        assert image.size[0] > 800 and image.size[1] > 300
    page = target.read_text()
    assert "data:image/png;base64," in page and run_id in page

    data = json.loads(target.with_suffix(".json").read_text())
    timeline, drawn = data["timeline"], data["drawn"]
    attempts = [(s["id"], a) for s in status["shards"] for a in s["attempts"]]
    workers = {a["worker"] for _, a in attempts}
    # A lane per worker process; a name the local fleet reused after the preemption is
    # drawn as "name (1)", "name (2)".
    assert {lane.split(" (")[0] for lane in drawn["lanes"]} == workers
    assert len(drawn["lanes"]) == len(set(drawn["lanes"])) >= 2
    bars = {(b["shard"], b["attempt"]): b for b in drawn["bars"]}
    assert len(bars) == len(attempts)
    for shard_id, a in attempts:  # every attempt is drawn on its worker's lane, as it ended
        bar = bars[(shard_id, a["attempt"])]
        assert (bar["lane"].split(" (")[0], bar["outcome"]) == (a["worker"], a["state"])
    preempted = bars[("00000", slow["attempt"])]
    assert preempted["outcome"] == "preempted"
    assert preempted["lane"].split(" (")[0] == slow["worker"]
    after = [b for b in drawn["bars"] if b["start"] >= preempted["start"] + preempted["width"]]
    assert all(b["lane"] != preempted["lane"] for b in after)  # that process had stopped
    counts = Counter(b["outcome"] for b in drawn["bars"])
    assert counts["preempted"] == 1 and counts["failed"] == 3  # flaky once, poison twice
    assert counts["succeeded"] == 3  # slow (on its second try), flaky, ok
    assert timeline["summary"]["attempts"]["preempted"] == 1
    assert timeline["summary"]["shard_states"] == {
        "queued": 0,
        "running": 0,
        "succeeded": 3,
        "failed": 1,
        "cancelled": 0,
        "lost": 0,
    }
    assert set(drawn["legend"]) == {"succeeded", "failed", "preempted", "billed"}
    assert drawn["max_queue"] == 4
    recorded = {w for w in workers if (cli.store / "fleet" / w / "lifetime.json").exists()}
    billing = {lane["worker"].split(" (")[0]: lane["billing"] for lane in timeline["lanes"]}
    assert billing == {w: "lifetime" if w in recorded else "attempts" for w in workers}
    summary = timeline["summary"]
    assert 0 < summary["committed_seconds"] <= summary["task_seconds"]
    assert summary["task_seconds"] <= summary["billed_vm_seconds"] + 1e-6
    assert 0 < summary["efficiency"] <= 1


def test_report_prices_a_local_run_as_a_machine_type(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", TASK)
    params = tmp_path / "p.jsonl"
    params.write_text('{"kind": "ok"}\n')
    run_id = cli("submit", str(task), "--params", str(params)).run_id
    plain = cli("report", run_id, "--out", str(tmp_path / "a.png"))
    assert plain.code == 0, plain.stderr
    assert "not estimated" in plain.stderr
    priced = cli(
        "report", run_id, "--out", str(tmp_path / "b.png"), "--machine-type", "e2-standard-4"
    )
    assert priced.code == 0, priced.stderr
    summary = json.loads((tmp_path / "b.json").read_text())["timeline"]["summary"]
    # One worker, under a minute: billed the one-minute minimum at the Spot estimate.
    assert summary["estimated_cost"] == pytest.approx(0.134012 * 0.30 / 60, rel=1e-3)
    missing = cli("report", "r20200101-000000-abcdef")
    assert missing.code == 2 and "no run" in missing.stderr


def test_an_out_that_cannot_be_written_is_refused_in_one_line(cli: Cli, tmp_path: Path) -> None:
    """A folder named like a page, or a path under /proc, ended in a traceback
    (IsADirectoryError, FileNotFoundError) after the timeline was built."""
    task = make_task(tmp_path / "t", TASK)
    params = tmp_path / "p.jsonl"
    params.write_text('{"kind": "ok"}\n')
    run_id = cli("submit", str(task), "--params", str(params)).run_id
    (tmp_path / "isdir.html").mkdir()
    (tmp_path / "page.json").mkdir()  # the sidecar's name
    (tmp_path / "afile").write_text("")
    for target, said in (
        ("isdir.html", "isdir.html is a folder; name another file"),
        ("page.html", "page.json is a folder; name another file"),
        ("/proc/x.html", "cannot write in /proc (No such file or directory)"),
        ("afile/r.html", "cannot write in afile (not a folder)"),
    ):
        result = cli("report", run_id, "--out", target)
        assert result.code == 2, (target, result.stderr)
        assert result.stderr.startswith(f"error: report --out {target}: "), result.stderr
        assert said in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stdout == ""
    assert not (tmp_path / "page.html").exists() and not list(Path("/proc").glob("x.*"))
