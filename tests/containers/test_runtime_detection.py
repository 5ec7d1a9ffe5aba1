"""How the container engine and its settings are worked out from the machine."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.prerequisites import missing
from worker.executors.container.gpus import GpuSupportMissing, check_gpu_support
from worker.executors.container.runtime import (
    ContainerRuntimeMissing,
    ImagePullError,
    Runtime,
    cgroup_mode,
    detect_runtime,
    ensure_image,
    is_google_registry,
    podman_settings,
    registry_host,
)


@pytest.fixture(autouse=True)
def _fresh_detection() -> Iterator[None]:
    detect_runtime.cache_clear()
    yield
    detect_runtime.cache_clear()


def test_cgroup_mode_reads_the_mounts(tmp_path: Path) -> None:
    unified = tmp_path / "v2"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("cpu memory pids\n")
    hybrid = tmp_path / "hybrid"
    (hybrid / "unified").mkdir(parents=True)
    (hybrid / "memory").mkdir()
    legacy = tmp_path / "v1"
    (legacy / "memory").mkdir(parents=True)
    assert [cgroup_mode(p) for p in (unified, hybrid, legacy)] == ["v2", "hybrid", "v1"]


def test_a_hybrid_machine_without_systemd_or_rlimits_gets_every_setting(tmp_path: Path) -> None:
    args, env, notes = podman_settings(
        mode="hybrid", systemd=False, rlimits_ok=False, have_runc=True, conf_dir=tmp_path, env={}
    )
    assert args == ("--runtime", "runc", "--cgroup-manager", "cgroupfs")
    conf = tmp_path / "containers.conf"
    assert env == {"CONTAINERS_CONF": str(conf)}
    assert "default_ulimits = []" in conf.read_text().splitlines()
    assert len(notes) == 3


def test_a_plain_systemd_machine_needs_nothing(tmp_path: Path) -> None:
    args, env, notes = podman_settings(
        mode="v2", systemd=True, rlimits_ok=True, have_runc=True, conf_dir=tmp_path, env={}
    )
    assert (args, env, notes) == ((), {}, ())
    assert not (tmp_path / "containers.conf").exists()


def test_a_users_containers_conf_is_kept(tmp_path: Path) -> None:
    mine = str(tmp_path / "mine.conf")
    args, env, _ = podman_settings(
        mode="v2",
        systemd=True,
        rlimits_ok=False,
        have_runc=False,
        conf_dir=tmp_path,
        env={"CONTAINERS_CONF": mine},
    )
    assert args == () and env == {}
    assert not (tmp_path / "containers.conf").exists()


def test_no_engine_at_all_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ContainerRuntimeMissing, match="podman and docker are not installed"):
        detect_runtime()


def test_docker_without_its_daemon_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docker = shutil.which("docker")
    if docker is None:
        missing("no docker client to try without a daemon (`apt-get install docker.io`)")
    (tmp_path / "docker").symlink_to(docker)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-daemon.sock")
    with pytest.raises(ContainerRuntimeMissing, match="docker's daemon is not reachable"):
        detect_runtime()


def test_an_unknown_engine_choice_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CFLOW_CONTAINER_RUNTIME", "lxc")
    with pytest.raises(ContainerRuntimeMissing, match="choose podman or docker"):
        detect_runtime()


@pytest.mark.parametrize(
    ("image", "host", "google"),
    [
        ("us-docker.pkg.dev/p/r/ml:1.4", "us-docker.pkg.dev", True),
        ("europe-west4-docker.pkg.dev/p/r/ml@sha256:00", "europe-west4-docker.pkg.dev", True),
        ("gcr.io/p/ml", "gcr.io", True),
        ("eu.gcr.io/p/ml", "eu.gcr.io", True),
        ("localhost/cflow-test-busybox:1", "localhost", False),
        ("registry.example.com:5000/ml", "registry.example.com:5000", False),
        ("python:3.12", None, False),
        ("library/python", None, False),
    ],
)
def test_registry_of_an_image(image: str, host: str | None, google: bool) -> None:
    assert registry_host(image) == host
    assert is_google_registry(registry_host(image)) is google


def test_a_google_registry_without_credentials_says_so(
    container_runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-key.json"))
    image = "us-docker.pkg.dev/no-project/no-repo/ml:1.4"
    with pytest.raises(ImagePullError) as caught:
        ensure_image(container_runtime, image)
    message = str(caught.value)
    assert message.startswith(f"image {image} is not on this worker and cannot be pulled: ")
    assert "(no Google credentials for us-docker.pkg.dev: " in message and "\n" not in message


NVIDIA_SPEC = """cdiVersion: 0.5.0
kind: nvidia.com/gpu
devices:
- name: all
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia0
"""


def test_gpus_reach_a_container_by_cdi_on_podman_and_by_the_toolkit_on_docker() -> None:
    assert Runtime("podman", "/usr/bin/podman").gpu_args() == ("--device", "nvidia.com/gpu=all")
    assert Runtime("docker", "/usr/bin/docker").gpu_args() == ("--gpus", "all")


def test_podman_with_an_nvidia_cdi_spec_may_run_gpu_containers(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "other.yaml").write_text("cdiVersion: 0.5.0\nkind: vendor.com/fpga\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "nvidia.yaml").write_text(NVIDIA_SPEC)
    podman = Runtime("podman", "/usr/bin/podman")
    check_gpu_support(podman, cdi_dirs=(tmp_path / "etc", tmp_path / "run"))


@pytest.mark.parametrize("has_ctk", [False, True], ids=["no-toolkit", "toolkit"])
def test_podman_without_an_nvidia_cdi_spec_says_what_to_run(tmp_path: Path, has_ctk: bool) -> None:
    (tmp_path / "cdi").mkdir()
    (tmp_path / "cdi" / "fpga.yaml").write_text("cdiVersion: 0.5.0\nkind: vendor.com/fpga\n")
    podman = Runtime("podman", "/usr/bin/podman")
    with pytest.raises(GpuSupportMissing) as caught:
        check_gpu_support(
            podman,
            cdi_dirs=(tmp_path / "cdi", tmp_path / "missing"),
            which=lambda tool: "/usr/bin/nvidia-ctk" if has_ctk and tool == "nvidia-ctk" else None,
        )
    message = str(caught.value)
    assert "\n" not in message and "podman has no NVIDIA CDI spec" in message
    assert "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml" in message
    assert ("install the NVIDIA Container Toolkit" in message) is not has_ctk


def test_docker_without_the_nvidia_toolkit_says_what_to_install() -> None:
    docker = Runtime("docker", "/usr/bin/docker")
    with pytest.raises(GpuSupportMissing, match="install the NVIDIA Container Toolkit"):
        check_gpu_support(docker, which=lambda tool: None)
    check_gpu_support(docker, which=lambda tool: f"/usr/bin/{tool}")
