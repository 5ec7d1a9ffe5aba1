"""``--inputs`` through the CLI: repeated globs add up, lists from a file or stdin, links keep
their names, a file reached twice runs once, what is not a file is refused before anything
starts, readable ids for non-ASCII names; and the same on Google Cloud (the emulators)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli, make_inputs, make_task
from tests.emulators import Deployment
from tests.gcp.conftest import MakeCompute, deployment, fake_compute  # noqa: F401 (fixtures)
from tests.gcp.test_gcp_e2e import _cloud
from worker.backends.gcp.gcs import GcsStore, make_client

pytestmark = pytest.mark.e2e

# Each shard writes the name it was given and the first line it read through that name.
NAME_TASK = """
from pathlib import Path

def run(shard):
    with open(shard.input, encoding="utf-8") as fh:
        first = fh.readline().strip()
    (Path(shard.output_dir) / "names.csv").write_text(f"{Path(shard.input).name},{first}\\n")
"""


def _names(out: Path) -> list[str]:
    return sorted((out / "names.csv").read_text().splitlines())


def _listed(stdout: str) -> list[str]:
    """A dry run's inputs, one a line (``id<TAB>input``)."""
    return [line.split("\t")[1] for line in stdout.splitlines()]


def test_repeated_inputs_add_up(cli: Cli, tmp_path: Path) -> None:
    make_inputs(tmp_path / "data", [f"region-{i:03d}.csv" for i in (0, 1, 10, 11)])
    task = make_task(tmp_path / "task", NAME_TASK)
    r = cli(
        "submit", str(task), "--inputs", "data/region-00[0-1].csv",
        "--inputs", "data/region-01[0-1].csv", "--workers", "2", "--out", "out",
    )  # fmt: skip
    assert r.code == 0, r.stderr
    assert cli.status(r.run_id)["counts"]["succeeded"] == 4
    assert _names(tmp_path / "out") == [
        f"region-{i}.csv,id,value" for i in ("000", "001", "010", "011")
    ]


def test_inputs_from_a_list_file_and_from_stdin(cli: Cli, tmp_path: Path) -> None:
    data = make_inputs(tmp_path / "data", ["a.csv", "b.csv", "c.csv"])
    task = make_task(tmp_path / "task", NAME_TASK)
    (data / "todo.txt").write_text("# this week\nc.csv\n\na.csv\n")
    from_file = cli("submit", str(task), "--inputs", "@data/todo.txt", "--dry-run")
    assert from_file.code == 0, from_file.stderr
    assert _listed(from_file.stdout) == [str(data / "c.csv"), str(data / "a.csv")]
    piped = subprocess.run(
        cli.argv("submit", str(task), "--inputs", "-", "--inputs", "data/b.csv", "--dry-run"),
        input="data/c.csv\n",
        cwd=cli.workdir,
        env=cli.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert piped.returncode == 0, piped.stderr
    assert _listed(piped.stdout) == [str(data / "c.csv"), str(data / "b.csv")]
    helped = cli("submit", "--help").stdout
    assert "@FILE" in helped and "stdin" in helped and "Repeat" in helped


def test_a_dry_run_shows_each_input_on_one_line_whatever_its_name(cli: Cli, tmp_path: Path) -> None:
    """A name with a newline split its shard over two lines of ``id<TAB>input``: an input with a
    character that breaks the line is shown as a Python literal (an input shown as it is starts
    with ``/``, so a quote first always means a literal)."""
    names = ["new\nline.csv", "tab\tx.csv", "'quoted'.csv", "plain.csv"]
    data = make_inputs(tmp_path / "data", names)
    task = make_task(tmp_path / "task", NAME_TASK)
    r = cli("submit", str(task), "--inputs", "data/*", "--dry-run")
    assert r.code == 0, r.stderr
    shown = _listed(r.stdout)
    assert len(shown) == len(names)
    assert shown == [
        str(data / "'quoted'.csv"),
        repr(str(data / "new\nline.csv")),
        str(data / "plain.csv"),
        repr(str(data / "tab\tx.csv")),
    ]
    assert sorted(ast.literal_eval(s) if s[0] in "'\"" else s for s in shown) == sorted(
        str(data / name) for name in names
    )


def test_links_keep_their_names_and_a_file_reached_twice_runs_once(
    cli: Cli, tmp_path: Path
) -> None:
    """A git-annex layout, a link next to its target, non-ASCII names: each runs once, as named."""
    objects = tmp_path / "annex" / ".objects"
    objects.mkdir(parents=True)
    links = tmp_path / "annex" / "data"
    links.mkdir()
    for i in range(2):
        (objects / f"SHA256E-s9--deadbeef{i}.csv").write_text(f"object {i}\n")
        (links / f"region-00{i}.csv").symlink_to(f"../.objects/SHA256E-s9--deadbeef{i}.csv")
    make_inputs(tmp_path / "uni", ["日本.txt", "東京.txt"])
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "link.txt").symlink_to("../uni/日本.txt")
    task = make_task(tmp_path / "task", NAME_TASK)
    r = cli(
        "submit", str(task), "--inputs", "annex/data/*.csv", "--inputs", "uni/*",
        "--inputs", "again/*", "--inputs", "annex/data/region-000.csv",
        "--workers", "2", "--out", "out",
    )  # fmt: skip
    assert r.code == 0, r.stderr
    assert _names(tmp_path / "out") == [
        "region-000.csv,object 0",
        "region-001.csv,object 1",
        "日本.txt,id,value",
        "東京.txt,id,value",
    ]
    note = [line for line in r.stderr.splitlines() if "already taken" in line]
    assert note == [
        "cflow: 2 inputs reach a file already taken and run once:"
        " again/link.txt (the same file as uni/日本.txt), annex/data/region-000.csv (again)"
    ]
    shards = {Path(s["input"]).name: s["id"] for s in cli.status(r.run_id)["shards"]}
    assert shards.keys() == {"region-000.csv", "region-001.csv", "日本.txt", "東京.txt"}
    assert all(shard_id.startswith(f"{name}-") for name, shard_id in shards.items())
    assert cli.status(r.run_id)["shards"][0]["input"] == str(links / "region-000.csv")


def test_what_is_not_a_file_is_named_and_nothing_starts(cli: Cli, tmp_path: Path) -> None:
    mix = make_inputs(tmp_path / "mix", ["a.txt"])
    (mix / "broken.txt").symlink_to("/nonexistent")
    os.mkfifo(mix / "fifo")
    (mix / "sub").mkdir()
    (tmp_path / "list.txt").write_text("mix/a.txt\nmix/gone.txt\n")
    task = make_task(tmp_path / "task", NAME_TASK)
    for dry in ((), ("--dry-run",)):
        r = cli("submit", str(task), "--inputs", "mix/*", "--inputs", "@list.txt", *dry)
        assert r.code == 2, r.stderr
        assert r.stderr.splitlines() == [
            "error: 4 inputs are not readable files; name files only (nothing was started):",
            "  mix/broken.txt: a broken link (to /nonexistent)",
            "  mix/fifo: a fifo",
            "  mix/sub: a folder",
            "  mix/gone.txt: no such file",
        ]
        assert r.stdout == "" and not cli.store.exists()
    nothing = cli("submit", str(task), "--inputs", "mix/*.txt", "--inputs", "mix/*.csv")
    assert nothing.code == 2 and "'mix/*.csv' matches no files" in nothing.stderr


COPY_NAME_TASK = """
from pathlib import Path

def run(shard):
    first = Path(shard.input).read_text(encoding="utf-8").splitlines()[0]
    (Path(shard.output_dir) / "names.csv").write_text(f"{Path(shard.input).name},{first}\\n")
"""


@pytest.mark.emulator
def test_cloud_storage_globs_and_local_links_mix_on_google_cloud(
    deployment: Deployment,  # noqa: F811 (the fixture)
    fake_compute: MakeCompute,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    cloud = _cloud(deployment, fake_compute, tmp_path, idle_timeout=1.0)
    bucket = f"gs://{deployment.bucket}"
    store = GcsStore(deployment.bucket, client=make_client(deployment.project))
    store.put("data/a.csv", b"gs a\n")
    store.put("data/b.csv", b"gs b\n")
    store.put("data/日本.csv", "gs 日本\n".encode())
    local = tmp_path / "local"
    local.mkdir()
    (local / "target-object").write_text("local\n")
    (local / "region-0.csv").symlink_to("target-object")
    task = make_task(tmp_path / "task", COPY_NAME_TASK)
    r = cloud.run(
        "submit", str(task), "--inputs", f"{bucket}/data/*.csv", "--inputs", "local/*.csv",
        "--inputs", f"{bucket}/data/a.csv", "--workers", "2", "--out", "out",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sorted((tmp_path / "out" / "names.csv").read_text().splitlines()) == [
        "a.csv,gs a",
        "b.csv,gs b",
        "region-0.csv,local",
        "日本.csv,gs 日本",
    ]
    assert f"1 input reaches a file already taken and run once: {bucket}/data/a.csv" in r.stderr
    run_id = r.stdout.strip()
    shards = json.loads(cloud.run("status", run_id, "--json").stdout)["shards"]
    names = [Path(s["input"]).name for s in shards]
    assert names == ["a.csv", "b.csv", "日本.csv", "region-0.csv"]  # in the order given
    assert all(s["id"].startswith(f"{name}-") for name, s in zip(names, shards, strict=True))
    assert shards[3]["input"].startswith(f"{bucket}/runs/{run_id}/inputs/")
    nothing = cloud.run("submit", str(task), "--inputs", f"{bucket}/none/*.csv", "--dry-run")
    assert nothing.returncode == 2 and "matches no objects" in nothing.stderr
