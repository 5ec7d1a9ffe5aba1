"""Session fixtures: each container engine in turn, and the test images built on it.

Every test that takes ``container_runtime`` runs on podman and on docker. Where docker is
installed but no daemon answers, the tests start one of their own (:mod:`tests.containers.dockerd`)
and stop it at the end. An engine that is missing, or an image that cannot be built, skips the
tests that need it (listed at the end of the run); under CI it fails them
(:mod:`tests.prerequisites`).
"""

from __future__ import annotations

import os

import pytest

from tests.containers import dockerd, images
from tests.prerequisites import missing
from worker.executors.container.runtime import ContainerRuntimeMissing, Runtime, detect_runtime

ENGINES = ("podman", "docker")


def _docker_answers() -> bool:
    """Whether the docker client reaches a daemon as this machine has it set up."""
    try:
        detect_runtime.cache_clear()
        detect_runtime("docker")
    except ContainerRuntimeMissing:
        return False
    finally:
        detect_runtime.cache_clear()
    return True


_docker_daemon: str | None = None  # "" once a daemon answers; else why none could be had


def _docker(config: pytest.Config) -> str:
    """A docker daemon for this process: the machine's own when one answers, else the tests'
    (held until the session ends; ``DOCKER_HOST`` points at it, for this process and every
    process it starts). Empty when one answers, else why none can be had."""
    global _docker_daemon
    if _docker_daemon is not None:
        return _docker_daemon
    ours = os.environ.get("DOCKER_HOST") == dockerd.HOST
    if not ours and _docker_answers():
        _docker_daemon = ""
        return _docker_daemon
    try:
        lease = dockerd.acquire()
    except dockerd.DockerUnavailable as exc:
        _docker_daemon = str(exc)
        return _docker_daemon
    before = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = dockerd.HOST

    def release() -> None:
        if before is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = before
        lease.release()

    config.add_cleanup(release)
    _docker_daemon = ""
    return _docker_daemon


@pytest.fixture(scope="session", params=ENGINES)
def container_runtime(request: pytest.FixtureRequest) -> Runtime:
    """Each engine in turn (a test runs once per engine)."""
    engine: str = request.param
    if engine == "docker" and (problem := _docker(request.config)):
        missing(f"docker: {problem}")
    detect_runtime.cache_clear()
    try:
        return detect_runtime(engine)
    except ContainerRuntimeMissing as exc:
        missing(f"{engine}: {exc}")


@pytest.fixture(scope="session")
def shell_image(container_runtime: Runtime) -> str:
    """Tag of the busybox image (shell tasks)."""
    try:
        return images.busybox_image(container_runtime)
    except images.ImageBuildError as exc:
        missing(f"the busybox test image for {container_runtime.name}: {exc}")


@pytest.fixture(scope="session")
def python_image(container_runtime: Runtime) -> str:
    """Tag of the Debian python3 image (Python tasks)."""
    try:
        return images.python_image(container_runtime)
    except images.ImageBuildError as exc:
        missing(f"the python test image for {container_runtime.name}: {exc}")
