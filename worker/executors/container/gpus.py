"""GPUs in containers: whether this machine's engine can give a container its NVIDIA GPUs.

A run with a GPU gets every GPU of the machine in its containers: podman through CDI
(``--device nvidia.com/gpu=all``, the spec ``nvidia-ctk cdi generate`` writes to ``/etc/cdi``),
docker through the NVIDIA Container Toolkit (``--gpus all``). :func:`check_gpu_support` says
what to install when the engine cannot, once for the whole run (:class:`GpuSupportMissing`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from worker.errors import CFlowError

if TYPE_CHECKING:
    from worker.executors.container.runtime import Runtime


class GpuSupportMissing(CFlowError):
    """The run has a GPU but this machine's engine cannot give it to a container."""


CDI_SPEC_DIRS = (Path("/etc/cdi"), Path("/var/run/cdi"))  # podman's default cdi_spec_dirs
NVIDIA_CDI_KIND = "nvidia.com/gpu"
DOCKER_GPU_HOOK = "nvidia-container-runtime-hook"  # what dockerd runs for `--gpus`


def nvidia_cdi_specs(dirs: tuple[Path, ...] | None = None) -> list[Path]:
    """The CDI spec files in ``dirs`` (default :data:`CDI_SPEC_DIRS`) that declare NVIDIA GPUs
    (``kind: nvidia.com/gpu``)."""
    found = []
    if dirs is None:
        dirs = CDI_SPEC_DIRS
    for folder in dirs:
        try:
            paths = sorted(folder.iterdir())
        except OSError:
            continue
        for path in paths:
            if path.suffix not in (".yaml", ".yml", ".json"):
                continue
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if NVIDIA_CDI_KIND in text:
                found.append(path)
    return found


def check_gpu_support(
    runtime: Runtime,
    *,
    cdi_dirs: tuple[Path, ...] | None = None,
    which: Callable[[str], str | None] = shutil.which,
) -> None:
    """Before the first GPU container: the engine can pass GPUs in (podman: an NVIDIA CDI
    spec in ``cdi_dirs``, default :data:`CDI_SPEC_DIRS`; docker: the toolkit's hook).

    Raises:
        GpuSupportMissing: one line saying what to install.
    """
    if cdi_dirs is None:
        cdi_dirs = CDI_SPEC_DIRS
    if runtime.name == "podman":
        if nvidia_cdi_specs(cdi_dirs):
            return
        where = " or ".join(str(d) for d in cdi_dirs)
        step = (
            "run `nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`"
            if which("nvidia-ctk")
            else "install the NVIDIA Container Toolkit (nvidia-container-toolkit-base) and run"
            " `nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`"
        )
        raise GpuSupportMissing(
            f"the run has a GPU but podman has no NVIDIA CDI spec ({where} has none"
            f" for {NVIDIA_CDI_KIND}): {step} on the worker"
        )
    if which(DOCKER_GPU_HOOK) is None:
        raise GpuSupportMissing(
            f"the run has a GPU but docker cannot pass it in ({DOCKER_GPU_HOOK} is not"
            " installed): install the NVIDIA Container Toolkit (nvidia-container-toolkit),"
            " run `nvidia-ctk runtime configure --runtime=docker` and restart docker"
        )
