"""Test images, built on this machine (no registry is reachable from the test machines).

- ``busybox``: Debian's ``busybox-static`` package unpacked into an empty root with a link per
  applet: a shell, coreutils-like tools, no Python. For ``task.sh``.
- ``python``: a minimal Debian root with ``python3`` made by ``mmdebstrap`` from the host's
  Debian archive. For ``task.py``, with the image's own interpreter (not the test machine's).

Each image is tagged with a hash of its recipe and the package versions apt would install, so a
rerun finds it in the engine's store and builds nothing; a new package version makes a new tag.
The root file system of each tag is kept in :data:`CACHE` (the latest one per image), so a second
engine, or an engine whose store was wiped, imports it in seconds instead of building it again.
Builds and imports hold a lock per image, so processes that need the same image at once (test
processes, benchmarks, sessions side by side) build it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from worker.executors.container.runtime import Runtime

RECIPE_VERSION = "1"  # bump when a recipe below changes
REPO_PREFIX = "localhost/cflow-test-"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cflow-test-images"


class ImageBuildError(Exception):
    """A test image could not be built here; the message says what is missing."""


def _candidate(package: str) -> str:
    """The version ``apt-get install`` would pick (from the local package lists)."""
    proc = subprocess.run(
        ["apt-cache", "policy", package], capture_output=True, text=True, check=False
    )
    for line in proc.stdout.splitlines():
        if line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)":
                return version
    raise ImageBuildError(f"apt knows no candidate for {package} (run `apt-get update`)")


def _tag(name: str, *parts: str) -> str:
    digest = hashlib.sha256("\n".join((RECIPE_VERSION, name, *parts)).encode()).hexdigest()
    return f"{REPO_PREFIX}{name}:{digest[:12]}"


def _exists(runtime: Runtime, tag: str) -> bool:
    if runtime.name == "podman":
        return runtime.call("image", "exists", tag).returncode == 0
    return runtime.call("image", "inspect", tag).returncode == 0


def _import(runtime: Runtime, tar_path: Path, tag: str) -> None:
    proc = runtime.call("import", str(tar_path), tag, timeout=600)
    if proc.returncode != 0:
        raise ImageBuildError(f"{runtime.name} import {tag} failed: {proc.stderr.strip()}")


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    fd = os.open(CACHE / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _provide(runtime: Runtime, name: str, tag: str, build: Callable[[Path], None]) -> str:
    """``tag`` in ``runtime``'s store: imported from the cached root file system, which
    ``build(tar_path)`` makes first when the cache lacks it."""
    if _exists(runtime, tag):
        return tag
    with _locked(name):
        if _exists(runtime, tag):  # another process imported it while we waited
            return tag
        cached = CACHE / f"{tag.rsplit('/', 1)[1].replace(':', '-')}.tar"
        if not cached.is_file():
            partial = cached.with_name(f".{cached.stem}.{os.getpid()}.tar")
            try:
                build(partial)
                partial.replace(cached)
            finally:
                partial.unlink(missing_ok=True)
            for older in CACHE.glob(f"{cached.name.rsplit('-', 1)[0]}-*.tar"):
                if older != cached:
                    older.unlink(missing_ok=True)
        _import(runtime, cached, tag)
    return tag


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ImageBuildError(f"{tool} is missing: `apt-get install {package}` (or `make install`)")
    return path


def busybox_image(runtime: Runtime) -> str:
    """A busybox image's tag, built once per busybox-static version."""
    version = _candidate("busybox-static")
    return _provide(
        runtime, "busybox", _tag("busybox", version), lambda tar: _busybox_root(version, tar)
    )


def _busybox_root(version: str, tar_path: Path) -> None:
    _need("apt-get", "apt")
    _need("dpkg-deb", "dpkg")
    with tempfile.TemporaryDirectory(prefix="cflow-busybox-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # apt's sandbox user downloads into it when we are root
        proc = subprocess.run(
            ["apt-get", "download", f"busybox-static={version}"],
            cwd=work,
            capture_output=True,
            text=True,
            check=False,
        )
        debs = list(work.glob("busybox-static_*.deb"))
        if proc.returncode != 0 or not debs:
            raise ImageBuildError(f"apt-get download busybox-static failed: {proc.stderr.strip()}")
        root = work / "rootfs"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
        busybox = root / "bin" / "busybox"
        applets = subprocess.run(
            [str(busybox), "--list"], capture_output=True, text=True, check=True
        ).stdout.split()
        for applet in applets:
            link = root / "bin" / applet
            if not link.exists():
                link.symlink_to("busybox")
        for folder in ("tmp", "proc", "sys", "dev", "etc", "root"):
            (root / folder).mkdir(exist_ok=True)
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc" / "group").write_text("root:x:0:\n")
        with tarfile.open(tar_path, "w") as tar:
            tar.add(root, arcname=".")


def _codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise ImageBuildError("/etc/os-release names no Debian release (VERSION_CODENAME)")


def python_image(runtime: Runtime) -> str:
    """A Debian image with python3, built once per python3 version; needs mmdebstrap."""
    suite = _codename()
    tag = _tag("python", suite, _candidate("python3"))
    return _provide(runtime, "python", tag, lambda tar: _python_root(suite, tar))


def _python_root(suite: str, tar_path: Path) -> None:
    mmdebstrap = _need("mmdebstrap", "mmdebstrap")
    argv = [
        mmdebstrap,
        "--variant=essential",  # dpkg's essential set: bash, coreutils, ... and no apt
        "--include=python3",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--format=tar",
        "--quiet",
        suite,
        str(tar_path),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=900)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ImageBuildError(f"mmdebstrap {suite} failed: {' / '.join(tail)}")
