"""The worker's dependencies as a wheelhouse: resolved for the VMs, installed with no index."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

from infra.wheel import DISTRIBUTION, build_worker_wheel, worker_requirements
from runner.backends.gcp.wheels import TASK_WHEELS, installed_pins, pack_wheels, resolve, stage_task

pytestmark = pytest.mark.infra

REPO = Path(__file__).resolve().parents[2]


def test_worker_boots_from_the_wheelhouse_without_a_package_index(tmp_path: Path) -> None:
    deps = worker_requirements(tomllib.loads((REPO / "pyproject.toml").read_text())["project"])
    house = resolve(deps, constraints=installed_pins(skip={"cflow", DISTRIBUTION}))
    # Pinned to what this machine runs, for the VMs' platform (CPython 3.11, manylinux x86_64).
    names = {w.split("-")[0].lower(): w for w in house.wheels}
    assert {"google_cloud_pubsub", "google_cloud_storage", "grpcio"} <= set(names)
    import importlib.metadata as md

    import google.cloud.pubsub_v1 as pubsub  # noqa: F401 - the version this machine tested

    assert f"-{md.version('google-cloud-pubsub')}-" in names["google_cloud_pubsub"]
    assert "cp311" in names["grpcio"] and "manylinux" in names["grpcio"]
    assert resolve(deps, constraints=installed_pins(skip={"cflow", DISTRIBUTION})) == house

    wheels = tmp_path / "house"
    with tarfile.open(house.path) as tar:
        tar.extractall(wheels, filter="data")
    worker = build_worker_wheel(repo=REPO, out_dir=tmp_path / "dist")
    target = tmp_path / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-index",  # as on a VM: nothing but the shipped wheels
            "--find-links",
            str(wheels / "wheels"),
            "--target",
            str(target),
            str(worker.path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    probe = "import google.cloud.pubsub_v1, google.cloud.storage, worker.agent.agent; print('ok')"
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {probe}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.stdout.strip() == "ok", out.stderr


def test_wheelhouse_tar_is_reproducible(tmp_path: Path) -> None:
    wheels = tmp_path / "w"
    wheels.mkdir()
    for name in ("b-1.0-py3-none-any.whl", "a-2.0-py3-none-any.whl"):
        (wheels / name).write_bytes(name.encode() * 10)
    first = pack_wheels(wheels, tmp_path / "one")
    second = pack_wheels(wheels, tmp_path / "two")
    assert first.sha256 == second.sha256 and first.path.read_bytes() == second.path.read_bytes()
    assert first.wheels == ("a-2.0-py3-none-any.whl", "b-1.0-py3-none-any.whl")
    (wheels / "a-2.0-py3-none-any.whl").write_bytes(b"changed")
    assert pack_wheels(wheels, tmp_path / "three").sha256 != first.sha256


def test_task_requirements_are_resolved_at_submit_and_install_without_an_index(
    tmp_path: Path,
) -> None:
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.py").write_text("import six\n\ndef run(shard):\n    pass\n")
    (task / "requirements.txt").write_text("# the task's own\nsix>=1.15  # tiny, pure Python\n")
    staged = stage_task(task, tmp_path / "staged", cache=tmp_path / "cache")
    assert staged != task and (staged / "task.py").read_text() == (task / "task.py").read_text()
    lines = (staged / "requirements.txt").read_text().splitlines()
    assert lines[1:3] == ["--no-index", f"--find-links {TASK_WHEELS}"]
    assert any(line.startswith("six==") for line in lines)
    assert (task / "requirements.txt").read_text().startswith("# the task's own")  # untouched
    # Resolved once per content: a second submit reads the cache (no network needed).
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    stage_task(task, tmp_path / "again", cache=tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached
    # What the worker does with a task's requirements.txt (worker/bundle.py), offline.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
            str(tmp_path / "deps"),
            "-r",
            "requirements.txt",
        ],
        cwd=staged,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PIP_INDEX_URL": "http://127.0.0.1:9/none"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert list((tmp_path / "deps").glob("six*"))
    # No requirements: the task as it is.
    (task / "requirements.txt").unlink()
    assert stage_task(task, tmp_path / "none") == task
