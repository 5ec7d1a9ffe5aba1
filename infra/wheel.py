"""Build the worker package that every VM installs: a small, reproducible wheel.

The wheel holds the repository's ``worker/`` package and nothing else, declares the worker's
dependencies from ``pyproject.toml``, and is byte-for-byte reproducible, so its SHA-256 names it:
a new worker version gives a new object name, a new instance template and new VMs, while an
unchanged worker gives the same plan as before.
"""

from __future__ import annotations

import base64
import hashlib
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DISTRIBUTION = "cflow-worker"  # the wheel's project name on the VM
WORKER_EXTRA = "gcp-worker"  # pyproject's extra that names what the worker needs on a VM
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed timestamp: the same source gives the same bytes
SKIPPED_PARTS = {"__pycache__"}
SKIPPED_SUFFIXES = {".pyc", ".pyo"}


@dataclass(frozen=True)
class Wheel:
    """A built worker wheel."""

    path: Path
    sha256: str  # hex digest of the wheel file

    @property
    def filename(self) -> str:
        return self.path.name


def build_worker_wheel(*, repo: Path, out_dir: Path) -> Wheel:
    """Write ``cflow_worker-<version>+<source hash>-py3-none-any.whl`` into ``out_dir``.

    Args:
        repo: the repository root, holding ``pyproject.toml`` and ``worker/``.
        out_dir: where to write the wheel (created if missing).

    Returns:
        The wheel's path and SHA-256.
    """
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    sources = _package_files(repo / "worker")
    source_hash = hashlib.sha256()
    for rel, data in sources:
        source_hash.update(f"{rel}\0{len(data)}\0".encode())
        source_hash.update(data)
    # The local version label makes pip see every change as a different version.
    version = f"{project['version']}+{source_hash.hexdigest()[:12]}"
    dist_info = f"{DISTRIBUTION.replace('-', '_')}-{version}.dist-info"
    scripts = {
        name: target
        for name, target in project.get("scripts", {}).items()
        if target.startswith("worker.")
    }

    files: list[tuple[str, bytes]] = [(f"worker/{rel}", data) for rel, data in sources]
    files.append((f"{dist_info}/METADATA", _metadata(project, version).encode()))
    files.append((f"{dist_info}/WHEEL", _WHEEL_FILE.encode()))
    if scripts:
        lines = "".join(f"{name} = {target}\n" for name, target in sorted(scripts.items()))
        files.append((f"{dist_info}/entry_points.txt", f"[console_scripts]\n{lines}".encode()))
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files)
    files.append((f"{dist_info}/RECORD", (record + f"{dist_info}/RECORD,,\n").encode()))

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{DISTRIBUTION.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, data in files:
            info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return Wheel(path=path, sha256=hashlib.sha256(path.read_bytes()).hexdigest())


_WHEEL_FILE = """\
Wheel-Version: 1.0
Generator: cflow-infra
Root-Is-Purelib: true
Tag: py3-none-any
"""


def _package_files(package: Path) -> list[tuple[str, bytes]]:
    if not (package / "__init__.py").is_file():
        raise FileNotFoundError(f"{package} is not a Python package (no __init__.py)")
    found = []
    for path in sorted(package.rglob("*")):
        rel = path.relative_to(package)
        if (
            path.is_dir()
            or SKIPPED_PARTS.intersection(rel.parts)
            or path.suffix in SKIPPED_SUFFIXES
        ):
            continue
        found.append((rel.as_posix(), path.read_bytes()))
    return found


def worker_requirements(project: dict[str, Any]) -> list[str]:
    """What a worker VM installs: the project's own dependencies and its ``gcp-worker`` extra
    (``project`` is pyproject.toml's ``[project]`` table)."""
    extras = project.get("optional-dependencies", {})
    return [*project.get("dependencies", []), *extras.get(WORKER_EXTRA, [])]


def _metadata(project: dict[str, Any], version: str) -> str:
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {DISTRIBUTION}",
        f"Version: {version}",
        "Summary: The CFlow worker agent, as installed on every VM.",
    ]
    if project.get("requires-python"):
        lines.append(f"Requires-Python: {project['requires-python']}")
    lines += [f"Requires-Dist: {dep}" for dep in worker_requirements(project)]
    return "\n".join(lines) + "\n"


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"
