"""Wheelhouses: Python dependencies resolved on this machine for the worker VMs' platform.

A VM must boot without a package index (PyPI down, rate limited, or a new release that breaks):
everything it installs is resolved here, at deploy or submit time, with ``pip download
--only-binary=:all:`` for the VMs' Python and platform, and shipped as content-addressed bytes.
The VM unpacks the worker's wheelhouse into its venv at boot, and the worker installs a task's
with ``pip install --no-index --find-links``. Resolution is pinned to what this
machine runs (every distribution installed here constrains the resolution), so the VMs get the
versions the deployer tested, not the versions of the day.

Resolved wheelhouses are cached per input under ``CFLOW_WHEEL_CACHE`` (default
``~/.cache/cflow/wheelhouses``): a second deploy or submit with the same requirements reads the
cache and needs no network.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.bundle import extract_safely
from worker.errors import ConfigError
from worker.tempdirs import temp_folder

# The image family's Python (debian-12: python3.11) and the platforms its glibc (2.36) runs.
VM_PYTHON = "3.11"
VM_PLATFORMS = (
    "manylinux_2_36_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_5_x86_64",
    "manylinux1_x86_64",
)
CACHE_ENV = "CFLOW_WHEEL_CACHE"
TASK_WHEELS = ".cflow-wheels"  # folder of a staged task's wheels, beside its requirements.txt
DOWNLOAD_TIMEOUT = 900.0  # seconds for one resolution


@dataclass(frozen=True)
class Wheelhouse:
    """A reproducible tar of wheels, named by its SHA-256."""

    path: Path
    sha256: str
    wheels: tuple[str, ...]  # file names, sorted

    @property
    def filename(self) -> str:
        return self.path.name


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cflow" / "wheelhouses")


def installed_pins(skip: set[str] | None = None) -> list[str]:
    """``name==version`` for every distribution in this environment (a constraints list)."""
    # Here, not at the top: the shape groups import this module on every command, local ones
    # included, and importlib.metadata (with email, zipfile, csv) costs a runner's start-up.
    import importlib.metadata

    skip = {_norm(s) for s in (skip or set())}
    pins = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if not name or _norm(name) in skip or "+" in dist.version:
            continue
        pins[_norm(name)] = f"{name}=={dist.version}"
    return sorted(pins.values())


def resolve(
    requirements: list[str],
    *,
    constraints: list[str] | None = None,
    python_version: str = VM_PYTHON,
    platforms: tuple[str, ...] = VM_PLATFORMS,
    cache: Path | None = None,
) -> Wheelhouse:
    """Download ``requirements`` and their dependencies as wheels for the VMs into a tarball.

    Raises:
        ConfigError: pip could not resolve them (its last line says why).
    """
    spec = {
        "requirements": sorted(requirements),
        "constraints": sorted(constraints or []),
        "python": python_version,
        "platforms": list(platforms),
    }
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]
    home = (cache or cache_dir()) / key
    done = home / "wheelhouse.json"
    if done.is_file():
        meta = json.loads(done.read_text())
        path = home / meta["file"]
        if path.is_file():
            return Wheelhouse(path, meta["sha256"], tuple(meta["wheels"]))
    shutil.rmtree(home, ignore_errors=True)
    wheels_dir = home / "wheels"
    wheels_dir.mkdir(parents=True)
    with temp_folder("resolve") as tmp:
        req_file = Path(tmp) / "requirements.txt"
        req_file.write_text("\n".join(requirements) + "\n")
        argv = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            "--only-binary=:all:",
            "--implementation",
            "cp",
            "--python-version",
            python_version,
            *[arg for p in platforms for arg in ("--platform", p)],
            "--dest",
            str(wheels_dir),
            "-r",
            str(req_file),
        ]
        if constraints:
            con_file = Path(tmp) / "constraints.txt"
            con_file.write_text("\n".join(constraints) + "\n")
            argv += ["-c", str(con_file)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:] or ["no output"]
        raise ConfigError(f"cannot resolve wheels for the VMs: {errors[0].strip()}")
    house = pack_wheels(wheels_dir, home)
    done.write_text(
        json.dumps({"file": house.filename, "sha256": house.sha256, "wheels": house.wheels})
    )
    return house


def pack_wheels(wheels_dir: Path, out_dir: Path) -> Wheelhouse:
    """A byte-for-byte reproducible tar of the ``*.whl`` files in ``wheels_dir``."""
    names = sorted(p.name for p in wheels_dir.glob("*.whl"))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            data = (wheels_dir / name).read_bytes()
            info = tarfile.TarInfo(f"wheels/{name}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"wheelhouse-{sha[:16]}.tar"
    path.write_bytes(data)
    return Wheelhouse(path, sha, tuple(names))


def stage_task(task_dir: Path, out_dir: Path, *, cache: Path | None = None) -> Path:
    """A copy of the task folder whose ``requirements.txt`` installs from wheels it carries.

    The requirements are resolved for the VMs once per content (cached), the wheels go in
    ``.cflow-wheels/`` and the copied ``requirements.txt`` starts with ``--no-index`` and
    ``--find-links .cflow-wheels`` (pip reads options from a requirements file), so the worker's
    ordinary ``pip install -r requirements.txt`` needs no package index. A task without
    requirements is returned as it is.
    """
    req = task_dir / "requirements.txt"
    lines = _requirement_lines(req.read_text()) if req.is_file() else []
    if not lines:
        return task_dir
    house = resolve(lines, cache=cache)
    staged = out_dir / task_dir.resolve().name
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(task_dir, staged, ignore=shutil.ignore_patterns("__pycache__", TASK_WHEELS))
    wheels = staged / TASK_WHEELS
    wheels.mkdir()
    with tarfile.open(house.path) as tar:
        extract_safely(tar, wheels)
    for path in (wheels / "wheels").iterdir():
        path.rename(wheels / path.name)
    (wheels / "wheels").rmdir()
    pinned = [f"{_dist_of(w)}=={_version_of(w)}" for w in house.wheels]
    (staged / "requirements.txt").write_text(
        "# Resolved at submit for the worker VMs; the original lines are kept below as comments.\n"
        f"--no-index\n--find-links {TASK_WHEELS}\n"
        + "".join(f"{p}\n" for p in pinned)
        + "".join(f"# {line}\n" for line in lines)
    )
    return staged


def _requirement_lines(text: str) -> list[str]:
    out = []
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            raise ConfigError(
                f"requirements.txt option {line.split()[0]} is not supported on Google Cloud "
                "(requirements are resolved at submit and installed without an index)"
            )
        out.append(line)
    return out


def _dist_of(wheel: str) -> str:
    return wheel.split("-", 1)[0]


def _version_of(wheel: str) -> str:
    return wheel.split("-")[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# Where shaped templates' copies of the worker's wheel and wheelhouse live: the stack's own
# objects (worker/<sha256>/...) are Terraform's, and a deploy of a new worker deletes the old
# ones, while a shaped template made before it (still booting VMs for a live run) names them.
# Copies under this prefix are no deploy's to delete; they are content-addressed like the
# originals, so every shape of one worker shares one copy.
KEPT_PACKAGES = "shapes/worker/"
PACKAGE_METADATA = ("cflow-worker-package", "cflow-wheelhouse")


def keep_worker_package(props: dict[str, Any], project: str) -> None:
    """Point a shaped template's ``props`` at copies of the worker's package that no deploy
    deletes (made once, by a copy inside the bucket); URLs already copied are left alone."""
    from worker.backends.gcp.gcs import GcsStore, make_client  # a cloud client: only here

    items = props.get("metadata", {}).get("items", [])
    stores: dict[str, GcsStore] = {}
    for item in items:
        url = str(item.get("value", ""))
        if item.get("key") not in PACKAGE_METADATA or not url.startswith("gs://"):
            continue
        bucket, _, key = url.removeprefix("gs://").partition("/")
        if key.startswith(KEPT_PACKAGES) or not key:
            continue
        if bucket not in stores:
            stores[bucket] = GcsStore(bucket, client=make_client(project))
        store, kept = stores[bucket], f"{KEPT_PACKAGES}{key.removeprefix('worker/')}"
        if not store.exists(kept):
            store.copy(key, kept)
        item["value"] = store.url(kept)
