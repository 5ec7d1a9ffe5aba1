"""The container engine on this machine (podman, else docker) and the run's image on it.

Podman needs settings that depend on the machine; :func:`detect_runtime` works them out:

- ``--runtime runc`` when cgroups are mounted in hybrid (v1 + v2) or v1 mode and runc is
  installed: crun refuses hybrid mode ("cgroups in hybrid mode not supported").
- ``--cgroup-manager cgroupfs`` when systemd is not the init system (no ``/run/systemd/system``).
- ``CONTAINERS_CONF`` pointing to a file with ``default_ulimits = []`` when a process here may not
  raise its open-files / process limits to what rootful podman asks for (1048576 / 4194304):
  runc then fails with "error setting rlimit type 7: operation not permitted".
- ``--init`` with catatonit when it is installed, so PID 1 forwards SIGTERM to the task.

A run with a GPU gets every GPU of the machine in its containers (:meth:`Runtime.gpu_args`);
:mod:`worker.executors.container.gpus` checks first that the engine can pass them in.

Images are pulled once per image per worker process. Before pulling from Artifact Registry
(``REGION-docker.pkg.dev``) or ``gcr.io`` the engine is logged in with this machine's Google
credentials (on a VM, its service account), so a worker needs no key. A pull failure raises
:class:`ImagePullError`, remembered for :data:`PULL_RETRY_SECONDS`, so the shards behind it fail at
once with the same message instead of each pulling again.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from worker.errors import CFlowError
from worker.executors.container.gpus import NVIDIA_CDI_KIND, check_gpu_support

PULL_TIMEOUT = 1800.0  # seconds a pull may take (a multi-GB ML image on a fresh VM)
PULL_RETRY_SECONDS = 60.0  # how long a failed pull is remembered before trying again
COMMAND_TIMEOUT = 60.0  # seconds for kill / rm / image exists
# Limits rootful podman sets by default (RLIMIT_NOFILE, RLIMIT_NPROC).
PODMAN_NOFILE = 1048576
PODMAN_NPROC = 4194304

_CONTAINERS_CONF = (
    "[containers]\n# This machine may not raise rlimits: keep the process's own.\n"
    "default_ulimits = []\n"
)


class ContainerRuntimeMissing(CFlowError):
    """Neither podman nor a reachable docker daemon is on this machine."""


class ImagePullError(CFlowError):
    """The run's image cannot be found or pulled: the whole run fails, not one shard."""

    def __init__(self, message: str, *, image: str, run_id: str | None = None):
        super().__init__(message, run_id=run_id)
        self.image = image


@dataclass(frozen=True)
class Runtime:
    """A container engine and the flags this machine needs for it."""

    name: str  # "podman" | "docker"
    binary: str
    global_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    init_args: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # why each setting was chosen, for `describe()`

    def argv(self, *args: str) -> list[str]:
        return [self.binary, *self.global_args, *args]

    def environ(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def call(
        self, *args: str, timeout: float = COMMAND_TIMEOUT, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run one engine command, capturing its output; never raises for a non-zero exit."""
        try:
            return subprocess.run(
                self.argv(*args),
                env=self.environ(),
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(
                self.argv(*args), 124, "", f"timed out ({timeout:g}s)"
            )

    def remove(self, name: str) -> None:
        """Remove container ``name`` now, running or not (nothing if it is gone)."""
        if self.name == "podman":
            self.call("rm", "--force", "--ignore", "--time", "0", name)
        else:
            self.call("rm", "--force", name)

    def gpu_args(self) -> tuple[str, ...]:
        """The ``run`` flags that give a container every NVIDIA GPU of the machine."""
        if self.name == "podman":
            return ("--device", f"{NVIDIA_CDI_KIND}=all")
        return ("--gpus", "all")

    def describe(self) -> str:
        flags = " ".join(self.global_args) or "no extra flags"
        conf = f", CONTAINERS_CONF={self.env['CONTAINERS_CONF']}" if self.env else ""
        return f"{self.name} ({flags}{conf})"


def cgroup_mode(root: Path = Path("/sys/fs/cgroup")) -> str:
    """``"v2"`` (unified), ``"hybrid"`` (v1 controllers plus a v2 mount) or ``"v1"``."""
    if (root / "cgroup.controllers").exists():
        return "v2"
    if (root / "unified").is_dir():
        return "hybrid"
    return "v1"


def systemd_running(run_dir: Path = Path("/run/systemd/system")) -> bool:
    """systemd's own test (sd_booted): it is the init system when this folder exists."""
    return run_dir.is_dir()


def can_raise_rlimits() -> bool:
    """Whether a process here may raise its limits to podman's defaults (tried in a child, so
    this process keeps its own)."""
    probe = (
        "import resource as r\n"
        f"r.setrlimit(r.RLIMIT_NOFILE, ({PODMAN_NOFILE}, {PODMAN_NOFILE}))\n"
        f"r.setrlimit(r.RLIMIT_NPROC, ({PODMAN_NPROC}, {PODMAN_NPROC}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30)
    return proc.returncode == 0


def podman_settings(
    *,
    mode: str,
    systemd: bool,
    rlimits_ok: bool,
    have_runc: bool,
    conf_dir: Path,
    env: Mapping[str, str],
) -> tuple[tuple[str, ...], dict[str, str], tuple[str, ...]]:
    """The global flags, extra environment and reasons podman needs on a machine like this."""
    args: list[str] = []
    extra: dict[str, str] = {}
    notes: list[str] = []
    if mode != "v2" and have_runc:
        args += ["--runtime", "runc"]
        notes.append(f"cgroups are {mode}: runc (crun refuses hybrid mode)")
    if not systemd:
        args += ["--cgroup-manager", "cgroupfs"]
        notes.append("systemd is not the init system: cgroupfs")
    if not rlimits_ok:
        if env.get("CONTAINERS_CONF"):
            notes.append(
                f"rlimits cannot be raised; keeping CONTAINERS_CONF={env['CONTAINERS_CONF']}"
            )
        else:
            conf = conf_dir / "containers.conf"
            _write_once(conf, _CONTAINERS_CONF)
            extra["CONTAINERS_CONF"] = str(conf)
            notes.append("rlimits cannot be raised: default_ulimits = []")
    return tuple(args), extra, tuple(notes)


def _write_once(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _default_conf_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"cflow-containers-{os.getuid()}"


def _docker_reachable(binary: str) -> str | None:
    """None when the daemon answers, else why not."""
    try:
        proc = subprocess.run(
            [binary, "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return "its daemon did not answer"
    if proc.returncode == 0:
        return None
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return lines[-1] if lines else f"`docker info` exited {proc.returncode}"


@functools.lru_cache(maxsize=4)
def detect_runtime(prefer: str | None = None, conf_dir: Path | None = None) -> Runtime:
    """The container engine to use: ``prefer`` (or ``$CFLOW_CONTAINER_RUNTIME``), else podman,
    else docker with a reachable daemon. Raises :class:`ContainerRuntimeMissing`."""
    prefer = prefer or os.environ.get("CFLOW_CONTAINER_RUNTIME") or None
    if prefer not in (None, "podman", "docker"):
        raise ContainerRuntimeMissing(
            f"CFLOW_CONTAINER_RUNTIME={prefer!r}: choose podman or docker"
        )
    podman = shutil.which("podman") if prefer in (None, "podman") else None
    if podman:
        args, extra, notes = podman_settings(
            mode=cgroup_mode(),
            systemd=systemd_running(),
            rlimits_ok=can_raise_rlimits(),
            have_runc=shutil.which("runc") is not None,
            conf_dir=conf_dir or _default_conf_dir(),
            env=os.environ,
        )
        catatonit = shutil.which("catatonit")
        init = ("--init", "--init-path", catatonit) if catatonit else ()
        if not catatonit:
            notes += ("no catatonit: PID 1 is the task itself (SIGTERM may be ignored)",)
        return Runtime("podman", podman, args, extra, init, notes)
    docker = shutil.which("docker") if prefer in (None, "docker") else None
    no_podman = "" if prefer == "docker" else "podman is not installed and "
    if docker:
        problem = _docker_reachable(docker)
        if problem is None:
            return Runtime("docker", docker, init_args=("--init",))
        why = f"{no_podman}docker's daemon is not reachable ({problem})"
    else:
        why = {"podman": "podman is not installed", "docker": "docker is not installed"}.get(
            prefer or "", "podman and docker are not installed"
        )
    raise ContainerRuntimeMissing(
        f"--image needs a container runtime but {why}; install podman"
        " (`apt-get install podman runc catatonit`) or start docker"
    )


# -- images ------------------------------------------------------------------------------------

_pulled: dict[tuple[str, str], ImagePullError | None] = {}
_pull_failed_at: dict[tuple[str, str], float] = {}
_pull_lock = threading.Lock()


def check_image(image: str, *, gpu: bool = False) -> None:
    """Before a local run starts: the engine exists, ``image`` is here or can be pulled, and
    with ``gpu`` the engine can pass GPUs into a container.

    Raises:
        ContainerRuntimeMissing, ImagePullError, GpuSupportMissing (:mod:`.gpus`): with the one
            line to show.
    """
    runtime = detect_runtime()
    if gpu:
        check_gpu_support(runtime)
    ensure_image(runtime, image, where="this machine")


def ensure_image(runtime: Runtime, image: str, *, where: str = "this worker") -> None:
    """Make ``image`` present locally, pulling it at most once per worker process.

    Raises:
        ImagePullError: it is not here and cannot be pulled (remembered for a minute).
    """
    key = (runtime.binary, image)
    with _pull_lock:
        if key in _pulled:
            failure = _pulled[key]
            if failure is None:
                return
            if time.monotonic() - _pull_failed_at[key] < PULL_RETRY_SECONDS:
                raise failure
        if _image_present(runtime, image):
            _pulled[key] = None
            return
        host = registry_host(image)
        login_problem = google_login(runtime, host) if is_google_registry(host) else None
        proc = runtime.call("pull", "--quiet", image, timeout=PULL_TIMEOUT)
        if proc.returncode == 0:
            _pulled[key] = None
            return
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        detail = lines[-1].removeprefix("Error: ") if lines else f"exit code {proc.returncode}"
        if login_problem:
            detail += f" ({login_problem})"
        failure = ImagePullError(
            f"image {image} is not on {where} and cannot be pulled: {detail}", image=image
        )
        _pulled[key] = failure
        _pull_failed_at[key] = time.monotonic()
        raise failure


def _image_present(runtime: Runtime, image: str) -> bool:
    if runtime.name == "podman":
        return runtime.call("image", "exists", image).returncode == 0
    return runtime.call("image", "inspect", "--format", "{{.Id}}", image).returncode == 0


_GOOGLE_REGISTRY = re.compile(r"^([a-z0-9-]+-docker\.pkg\.dev|([a-z]+\.)?gcr\.io)$")
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


def registry_host(image: str) -> str | None:
    """The registry an image reference names (``us-docker.pkg.dev``), or None for a short name
    such as ``python:3.12``, which the engine resolves itself."""
    first, sep, _ = image.partition("/")
    if not sep or ("." not in first and ":" not in first and first != "localhost"):
        return None
    return first


def is_google_registry(host: str | None) -> bool:
    """Artifact Registry (``REGION-docker.pkg.dev``) or Container Registry (``gcr.io``)."""
    return host is not None and bool(_GOOGLE_REGISTRY.match(host))


def google_login(runtime: Runtime, host: str | None) -> str | None:
    """Log the engine in to a Google registry with this machine's credentials (on a VM, its
    service account's token from the metadata server); None when done, else why not."""
    if host is None:
        return None
    try:
        import google.auth
        from google.auth.transport.requests import Request
    except ImportError:
        return "google-auth is not installed, so no token for the registry"
    try:
        credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
        credentials.refresh(Request())
    except Exception as exc:  # no credentials, or the token endpoint refused: say which
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"no Google credentials for {host}: {first[:160]}"
    proc = runtime.call(
        "login",
        "--username",
        "oauth2accesstoken",
        "--password-stdin",
        host,
        input=credentials.token,
    )
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return f"login to {host} failed: {lines[-1] if lines else proc.returncode}"
    return None
