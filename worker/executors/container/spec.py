"""What every container of one executor is made of: the image, the engine, the network, the GPUs
and the fixed mounts, turned into an ``ENGINE run`` command line (:meth:`ContainerSpec.run_args`).

Built once per executor and shared by its containers per attempt
(:mod:`worker.executors.container.executor`) and its warm containers
(:mod:`worker.executors.container.warm`)::

    /task              the unpacked task bundle              read-only
    /opt/cflow/worker  the worker's task host (stdlib only)  read-only, on PYTHONPATH
    /opt/cflow/deps    the bundle's dependencies, if any     read-only, on PYTHONPATH
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import worker
from worker.bundle import UnpackedBundle
from worker.executors.container.runtime import Runtime
from worker.protocol import slug
from worker.tempdirs import kept_temp_folder

TASK_DIR = "/task"
WORK_DIR = "/cflow/work"  # an attempt's own working folder, mounted read-write
LIB_DIR = "/opt/cflow"
DEPS_DIR = "/opt/cflow/deps"
OWNER_LABEL = "cflow.owner"  # HOST:PID of the worker process that started the container

Volume = tuple[Path, str, str]  # a host path, where the container sees it, and "ro" or "rw"

_WORKER_PACKAGE = Path(worker.__file__).resolve().parent


@dataclass(frozen=True)
class ContainerSpec:
    """The containers of one bundle and image.

    Args:
        bundle: the unpacked task, mounted at :data:`TASK_DIR`.
        image: the image reference (already pulled).
        runtime: the engine.
        network: the container network (``host``: the task reaches what the worker reaches,
            such as the metadata server, without a network namespace per attempt).
        gpu: give the containers every NVIDIA GPU of the machine.
    """

    bundle: UnpackedBundle
    image: str
    runtime: Runtime
    network: str = "host"
    gpu: bool = False

    def run_args(
        self,
        name: str,
        labels: dict[str, str],
        mounts: list[Volume],
        env: dict[str, str],
        *,
        interactive: bool = False,
        lifetime: float | None = None,
        workdir: str = TASK_DIR,
    ) -> list[str]:
        """``ENGINE run ... IMAGE`` for container ``name``: the bundle, the task host and
        ``mounts`` (source, target, ``ro``/``rw``) mounted, ``env`` and the labels set, the
        image read-only; ``lifetime`` seconds is podman's backstop (``--timeout``); the task runs in
        ``workdir``."""
        rt = self.runtime
        mounts = [
            (self.bundle.root, TASK_DIR, "ro"),
            (_WORKER_PACKAGE, f"{LIB_DIR}/worker", "ro"),
            *mounts,
        ]
        python_path = [TASK_DIR, LIB_DIR]
        if self.bundle.deps is not None:
            mounts.append((self.bundle.deps, DEPS_DIR, "ro"))
            python_path.append(DEPS_DIR)
        env = {
            **env,
            "PYTHONPATH": ":".join(python_path),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        argv = rt.argv("run", "--rm", "--name", name, "--pull", "never")
        if interactive:
            argv.append("--interactive")
        argv += [*rt.init_args, "--read-only", "--tmpfs", "/tmp"]
        argv += ["--network", self.network, "--workdir", workdir]
        if self.gpu:
            argv += rt.gpu_args()
        if rt.name == "podman" and lifetime is not None:
            argv += ["--timeout", str(max(1, round(lifetime)))]
        if rt.name == "docker" and os.getuid() != 0:
            argv += ["--user", f"{os.getuid()}:{os.getgid()}"]  # a rootful daemon's outputs
        for key, value in {**labels, OWNER_LABEL: owner()}.items():
            argv += ["--label", f"{key}={value}"]
        for source, target, mode in mounts:
            argv += ["--volume", f"{mount_source(source)}:{target}:{mode}"]
        for key, value in env.items():
            argv += ["--env", f"{key}={value}"]
        argv.append(self.image)
        return argv


def safe_name(name: str) -> str:
    """A file name usable as a mount target (``:`` and ``,`` split engine mount options)."""
    if ":" in name or "," in name or not name:
        return slug(name) or "input"
    return name


_links_dir: Path | None = None
_links_lock = threading.Lock()


def mount_source(path: Path) -> str:
    """``path``, or a symlink to it without ``:`` or ``,`` (mounts follow the link)."""
    text = str(path)
    if ":" not in text and "," not in text:
        return text
    global _links_dir
    with _links_lock:
        if _links_dir is None:
            _links_dir = kept_temp_folder("mounts")  # swept once this worker has ended
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]  # one link per input, reused
    link = _links_dir / f"{digest}-{safe_name(path.name)}"
    with contextlib.suppress(FileExistsError):
        link.symlink_to(path)
    return str(link)


def owner() -> str:
    """This worker process, as the :data:`OWNER_LABEL` of the containers it starts."""
    return f"{socket.gethostname()}:{os.getpid()}"
