"""Session fixtures: this machine's container engine and the test images built on it.

Without an engine (or the tools to build an image) the container tests are skipped, loudly;
under ``CI=true`` that is a failure instead, so a CI machine cannot silently test less.
"""

from __future__ import annotations

import os
import warnings

import pytest

from tests.containers import images
from worker.executors.container.runtime import ContainerRuntimeMissing, Runtime, detect_runtime


def unavailable(reason: str) -> None:
    """Skip (fail under CI=true) the test that needs what is missing."""
    message = f"container tests cannot run: {reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    warnings.warn(message, stacklevel=2)
    pytest.skip(message)


ENGINES = ("podman", "docker")


@pytest.fixture(scope="session", params=ENGINES)
def container_runtime(request: pytest.FixtureRequest) -> Runtime:
    """Each engine on this machine in turn. One missing while the other works is a skip; both
    missing is :func:`unavailable` (a failure under CI)."""
    found: dict[str, Runtime | str] = {}
    for engine in ENGINES:
        try:
            found[engine] = detect_runtime(engine)
        except ContainerRuntimeMissing as exc:
            found[engine] = str(exc)
    chosen = found[request.param]
    if isinstance(chosen, Runtime):
        return chosen
    if not any(isinstance(r, Runtime) for r in found.values()):
        unavailable(chosen)
    pytest.skip(f"{request.param} is not usable here ({chosen}); the other engine is tested")


@pytest.fixture(scope="session")
def shell_image(container_runtime: Runtime) -> str:
    """Tag of the busybox image (shell tasks)."""
    try:
        return images.busybox_image(container_runtime)
    except images.ImageBuildError as exc:
        unavailable(str(exc))
        raise


@pytest.fixture(scope="session")
def python_image(container_runtime: Runtime) -> str:
    """Tag of the Debian python3 image (Python tasks)."""
    try:
        return images.python_image(container_runtime)
    except images.ImageBuildError as exc:
        unavailable(str(exc))
        raise
