"""The worker wheel the stack ships: reproducible, content-addressed, and installable by pip."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from infra.wheel import build_worker_wheel, worker_requirements

pytestmark = pytest.mark.infra

REPO = Path(__file__).resolve().parents[2]


def _fake_repo(root: Path) -> Path:
    """A copy of the repo's pyproject.toml and worker/ package."""
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    shutil.copytree(REPO / "worker", root / "worker", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_same_source_same_bytes(tmp_path: Path) -> None:
    repo = _fake_repo(tmp_path)
    first = build_worker_wheel(repo=repo, out_dir=tmp_path / "a")
    second = build_worker_wheel(repo=repo, out_dir=tmp_path / "b")
    assert first.filename == second.filename
    assert first.sha256 == second.sha256 == hashlib.sha256(first.path.read_bytes()).hexdigest()


def test_changed_source_changes_version_and_hash(tmp_path: Path) -> None:
    repo = _fake_repo(tmp_path)
    before = build_worker_wheel(repo=repo, out_dir=tmp_path / "a")
    (repo / "worker" / "defaults.py").write_text("# changed\n", encoding="utf-8")
    after = build_worker_wheel(repo=repo, out_dir=tmp_path / "b")
    assert before.filename != after.filename
    assert before.sha256 != after.sha256


def test_holds_the_worker_package_its_dependencies_and_a_valid_record(tmp_path: Path) -> None:
    wheel = build_worker_wheel(repo=REPO, out_dir=tmp_path)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    with zipfile.ZipFile(wheel.path) as zf:
        names = zf.namelist()
        (dist_info,) = {n.split("/")[0] for n in names if ".dist-info/" in n}
        assert {n.split("/")[0] for n in names} == {"worker", dist_info}
        assert "worker/__init__.py" in names
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
        metadata = zf.read(f"{dist_info}/METADATA").decode()
        requires = [
            line.split(": ", 1)[1]
            for line in metadata.splitlines()
            if line.startswith("Requires-Dist")
        ]
        # the worker's VM extra, spelled out: a wheel without its clients cannot start on a VM
        assert requires == [
            "google-cloud-pubsub>=2.20",
            "google-cloud-storage>=2.16",
            "cloudpickle>=3.0",  # worker.pyfunc: the functions cflow ships by value
        ]
        assert requires == worker_requirements(project)
        for line in zf.read(f"{dist_info}/RECORD").decode().splitlines():
            name, digest, size = line.split(",")
            if name.endswith("RECORD"):
                continue
            data = zf.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert (digest, int(size)) == (f"sha256={expected}", len(data))


def test_pip_installs_it(tmp_path: Path) -> None:
    wheel = build_worker_wheel(repo=REPO, out_dir=tmp_path / "dist")
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(wheel.path),
        ],
        check=True,
        capture_output=True,
    )
    probe = (
        "import importlib.metadata as m, worker; print(m.version('cflow-worker'), worker.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env={"PYTHONPATH": str(target)},
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out[0] in wheel.filename
    assert Path(out[1]).is_relative_to(target)
