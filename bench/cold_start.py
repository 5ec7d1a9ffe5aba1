"""Cold start of a worker VM: from its startup script's start to its first shard committed.

    python bench/cold_start.py [--rounds 3] [--vms 1000] [--quick]

The VM: a Debian 12 root built here with mmdebstrap (systemd, curl, python3 3.11 without
python3-venv, and this machine's gcloud CLI mounted read-only, as on the ``debian-12`` image),
booting its own systemd in a privileged podman container on this machine's network. A unit in
place of the guest agent's ``google-startup-scripts.service`` fetches ``infra/scripts/startup.sh``
from a local metadata server and runs it; the script takes the worker wheel and wheelhouse from
the bucket (fake-gcs-server), installs them and starts the ``cflow-worker`` unit, whose agent
claims and commits the one shard of a run published beforehand on the Pub/Sub emulator.

Each step's time comes from the timestamps it leaves: the journal's time of each boot log line
and of systemd's "Started cflow-worker.service", the agent's ``lifetime.json``, the attempt's
``status.json`` and the bucket's creation time of ``result.json``. Then the submit-to-first-result
time of a 1,000-VM fleet: the VM's creation and boot (published figures), these steps, and the
ramp from the simulator (:mod:`runner.sim`). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _common import REPO, cannot_run, parse_args, start_emulators

sys.path.insert(0, str(REPO))  # the emulator helpers live with the tests

from infra.wheel import DISTRIBUTION, build_worker_wheel, worker_requirements
from runner.backends.gcp.wheels import installed_pins, resolve
from runner.engine import runs
from runner.engine.shards import from_count
from runner.sim import Scenario, VmModel, Workload, simulate
from tests import emulators
from worker.executors.container.runtime import Runtime, detect_runtime
from worker.protocol import Layout, RunOptions

SDK = Path("/usr/lib/google-cloud-sdk")  # google-cloud-cli, preinstalled on debian-cloud images
SUITE = "bookworm"
PACKAGES = "systemd,systemd-sysv,curl,ca-certificates,python3"
INSTANCE = "cflow-workers-cold"
TASK = "def run(shard):\n    (shard.output_dir / 'out.txt').write_text('ok')\n"

# What the guest agent does at boot: fetch the startup script from the metadata server, run it.
RUNNER = """#!/bin/bash
set -euo pipefail
echo "Starting startup scripts."
script="$(mktemp /run/startup-script.XXXXXX)"
curl --fail --silent -H 'Metadata-Flavor: Google' \\
  "$CFLOW_METADATA_URL/instance/attributes/startup-script" >"$script"
echo "Found startup-script in metadata."
exec /bin/bash "$script"
"""
STARTUP_UNIT = """[Unit]
Description=Google Compute Engine Startup Scripts
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
ExecStart=/usr/bin/google_metadata_script_runner startup
StandardOutput=journal+console
"""
HOOK = f"""set -e
root="$1"
ln -s {SDK}/bin/gcloud "$root/usr/bin/gcloud"
cat >"$root/usr/bin/google_metadata_script_runner" <<'EOF'
{RUNNER}EOF
chmod 0755 "$root/usr/bin/google_metadata_script_runner"
cat >"$root/etc/systemd/system/google-startup-scripts.service" <<'EOF'
{STARTUP_UNIT}EOF
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -s ../google-startup-scripts.service "$root/etc/systemd/system/multi-user.target.wants/"
"""

# Published figures for what is not ours (seconds; see bench/README.md, "Cold start").
CREATE_SECONDS = 15.0  # the group's create call until the instance runs (runner/sim's default)
BOOT_SECONDS = 25.0  # guest boot until the startup script: create + boot is ~40 s to SSH
CREATE_RATE = 20.0  # instances a second Compute Engine creates from images through the API
RAMP_SHARD_SECONDS = 600.0  # the model's shards: long enough that every VM takes one

# (step, the journal lines, one of which ends it; none: a record of the agent's ends it). A step
# whose line is absent (pip came with the wheelhouse, so no apt) counts in the next one.
BOOT = "cflow-startup: "
STEPS: list[tuple[str, tuple[str, ...]]] = [
    ("read metadata", (BOOT + "downloading",)),
    ("worker wheel from the bucket", (BOOT + "downloading",)),
    ("wheelhouse from the bucket, untarred", (BOOT + "creating",)),
    ("venv created", (BOOT + "installing ",)),
    ("wheels unpacked", (BOOT + "unpacked",)),
    ("pip: python3-pip-whl from apt", (BOOT + "adding pip",)),
    ("pip: its wheel unpacked", (BOOT + "unpacked",)),
    ("worker's bytecode, import check", (BOOT + "installed",)),
    ("unit written, systemd starts it", ("Started cflow-worker.service",)),
    ("agent: imports, clients (lifetime.json)", ()),
    ("agent: first pull and claim (status.json)", ()),
    ("bundle, task, commit (result.json created)", ()),
]


def image(rt: Runtime) -> str:
    """The VM image's tag, built once per recipe and package versions."""
    policy = subprocess.run(
        ["apt-cache", "policy", *PACKAGES.split(",")], capture_output=True, text=True
    ).stdout
    digest = hashlib.sha256(f"{SUITE}\n{PACKAGES}\n{HOOK}\n{policy}".encode()).hexdigest()
    tag = f"localhost/cflow-bench-vm:{digest[:12]}"
    if rt.call("image", "exists", tag).returncode == 0:
        return tag
    print(f"building the VM image {tag} (mmdebstrap {SUITE}, once)", flush=True)
    with tempfile.TemporaryDirectory(prefix="cflow-vm-") as tmp:
        hook, tar = Path(tmp) / "hook.sh", Path(tmp) / "root.tar"
        hook.write_text(HOOK)
        subprocess.run(
            [
                *("mmdebstrap", "--variant=minbase", f"--include={PACKAGES}", "--quiet"),
                *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "locale")),
                f'--customize-hook=sh {hook} "$1"',
                *(SUITE, str(tar)),
            ],
            check=True,
            timeout=900,
        )
        if rt.call("import", str(tar), tag, timeout=600).returncode != 0:
            raise RuntimeError(f"podman import {tag} failed")
    return tag


@contextmanager
def metadata_server(attributes: dict[str, str]) -> Iterator[str]:
    """The VM's metadata server (``Metadata-Flavor: Google`` or 403); yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            key = self.path.removeprefix("/computeMetadata/v1/")
            values = {"instance/name": INSTANCE, "instance/zone": "projects/1/zones/us-central1-a"}
            token = {"access_token": "emulators-want-none", "expires_in": 3599}
            values["instance/service-accounts/default/token"] = json.dumps(token)
            values |= {f"instance/attributes/{k}": v for k, v in attributes.items()}
            if self.headers.get("Metadata-Flavor") != "Google":
                return self.send_error(403)
            if key not in values:
                return self.send_error(404)
            body = values[key].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/computeMetadata/v1"
    finally:
        server.shutdown()
        server.server_close()


def stage(d: emulators.Deployment, work: Path) -> dict[str, str]:
    """The worker wheel and wheelhouse in the bucket, as ``cdktf deploy`` puts them there, and
    the instance metadata the template gives the VMs (infra/stack.py, infra/compute.py)."""
    from worker.backends.gcp.gcs import make_client

    deps = worker_requirements(tomllib.loads((REPO / "pyproject.toml").read_text())["project"])
    wheel = build_worker_wheel(repo=REPO, out_dir=work / "dist")
    house = resolve(deps, constraints=installed_pins(skip={"cflow", DISTRIBUTION}))
    bucket = make_client(d.project).bucket(d.bucket)
    urls = {}
    for path, sha in ((wheel.path, wheel.sha256), (house.path, house.sha256)):
        name = f"worker/{sha}/{path.name}"
        bucket.blob(name).upload_from_filename(str(path))
        urls[sha] = f"gs://{d.bucket}/{name}"
    return {
        "cflow-project": d.project,
        "cflow-region": "us-central1",
        "cflow-zone": "us-central1-a",
        "cflow-group": "cflow-workers",
        "cflow-bucket": d.bucket,
        "cflow-work-topic": d.work_topic,
        "cflow-subscription": d.work_subscription,
        "cflow-events-topic": d.events_topic,
        "cflow-slots": "1",
        "cflow-idle-timeout": "300",
        "cflow-max-vm-hours": "24",
        "cflow-worker-package": urls[wheel.sha256],
        "cflow-worker-sha256": wheel.sha256,
        "cflow-wheelhouse": urls[house.sha256],
        "cflow-wheelhouse-sha256": house.sha256,
        "startup-script": (REPO / "infra" / "scripts" / "startup.sh").read_text(),
        "cflow-leave-script": (REPO / "infra" / "scripts" / "leave.sh").read_text(),
    }


def cloud_conf(metadata_url: str, emus: emulators.Emulators) -> str:
    """What the VM's network gives every unit: the metadata server and the Google APIs (here
    the emulators; gcloud without credentials, as the emulators want none)."""
    env = {
        "CFLOW_METADATA_URL": metadata_url,
        "CFLOW_STORAGE_ENDPOINT": emus.gcs_url,  # the startup script's downloads
        **emus.env,
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE": emus.gcs_url + "/",
        "CLOUDSDK_AUTH_DISABLE_CREDENTIALS": "true",
        "CLOUDSDK_CORE_PROJECT": emulators.PROJECT,
    }
    return "[Manager]\nDefaultEnvironment=" + " ".join(f'"{k}={v}"' for k, v in env.items())


def boot(
    rt: Runtime, tag: str, conf: Path, d: emulators.Deployment, work: Path
) -> dict[str, float]:
    """Publish a one-shard run, boot a fresh VM, wait for the commit; the steps' timestamps."""
    from worker.backends.gcp.gcs import make_client

    backends = emulators.open_backends(d)
    task = work / "task"
    task.mkdir(exist_ok=True)
    (task / "task.py").write_text(TASK)
    manifest = runs.create_run(
        store=backends.store,
        queue=backends.queue,
        task_dir=task,
        shards=from_count(1),
        options=RunOptions(),
    )
    shard = next(iter(from_count(1))).id
    run_id, name = manifest.run_id, f"cflow-cold-{manifest.run_id}"
    result_key = Layout.result(run_id, shard)
    bucket = make_client(d.project).bucket(d.bucket)
    logs = work / name
    logs.mkdir()  # the VM's /var/log: its boot log, read after a failed boot powered it off
    started = rt.call(
        *("run", "--detach", "--name", name, "--privileged", "--network=host"),
        *("--systemd=always", "--volume", f"{SDK}:{SDK}:ro", "--volume", f"{logs}:/var/log"),
        *("--volume", f"{conf}:/etc/systemd/system.conf.d/cloud.conf:ro", tag, "/sbin/init"),
    )
    if started.returncode != 0:
        raise RuntimeError(f"the VM did not start: {started.stderr.strip()}")
    status_key = Layout.status(run_id, shard, 1)
    try:
        try:
            deadline = time.monotonic() + 300
            while not backends.store.exists(result_key):
                if (
                    time.monotonic() > deadline
                    or _failed(logs)
                    or _attempt_failed(backends, status_key)
                ):
                    raise RuntimeError(f"no commit; the VM's logs:\n{_logs(rt, name, logs)}")
                time.sleep(0.25)  # the figures are the steps' own timestamps, not this poll's
            marks = _journal_marks(rt, name)
        finally:
            rt.remove(name)
        blob = bucket.get_blob(result_key)
        assert blob is not None and blob.time_created is not None
        lifetime = json.loads(backends.store.get(f"fleet/{INSTANCE}/lifetime.json"))
        status = json.loads(backends.store.get(status_key))
    finally:
        backends.close()
    agent = (lifetime["started_at"], status["started_at"], blob.time_created.timestamp())
    marks.update(zip([step for step, heads in STEPS if not heads], agent, strict=True))
    return marks


def _logs(rt: Runtime, name: str, logs: Path) -> str:
    """The boot log's tail and, while the VM is up, the worker's journal."""
    boot_log = logs / "cflow-startup.log"
    text = boot_log.read_text()[-2000:] if boot_log.exists() else "(no boot log)"
    worker = rt.call("exec", name, "journalctl", "--unit=cflow-worker", "--no-pager", "-n", "40")
    return f"{text}\n{worker.stdout}"


def _attempt_failed(backends: Any, key: str) -> bool:
    """The first attempt ended without a commit (the worker's journal says why)."""
    return backends.store.exists(key) and json.loads(backends.store.get(key))["state"] != "running"


def _failed(logs: Path) -> bool:
    """The boot failed (its log says so; a file read, so the wait costs the VM no CPU)."""
    boot_log = logs / "cflow-startup.log"
    return boot_log.exists() and "cflow-startup: boot failed" in boot_log.read_text()


def _journal(rt: Runtime, name: str) -> list[dict[str, Any]]:
    out = rt.call("exec", name, "journalctl", "--output=json", "--no-pager", "--boot")
    entries = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return [e for e in entries if isinstance(e.get("MESSAGE"), str)]


def _journal_marks(rt: Runtime, name: str) -> dict[str, float]:
    """The time of each step's first journal line (a step seen twice is told apart by order)."""
    marks: dict[str, float] = {}
    lines = [(float(e["__REALTIME_TIMESTAMP"]) / 1e6, e["MESSAGE"]) for e in _journal(rt, name)]
    start = next(t for t, m in lines if m == "Found startup-script in metadata.")
    marks["script start"] = start
    cursor = 0
    for step, heads in STEPS:
        for i in range(cursor, len(lines)):
            t, message = lines[i]
            if heads and t >= start and message.startswith(heads):
                marks[step] = t
                cursor = i + 1
                break
    return marks


def timeline(marks: dict[str, float]) -> list[tuple[str, float]]:
    """Each step's duration; a step whose line is missing (skipped) counts in the next one."""
    out, last = [], marks["script start"]
    for step, _ in STEPS:
        if step in marks:
            out.append((step, marks[step] - last))
            last = marks[step]
    return out


def report(rounds: list[list[tuple[str, float]]]) -> tuple[float, float]:
    """Print every step's median and share; returns (to the first claim, claim to commit)."""
    steps = [s for s, _ in rounds[0]]
    medians = {s: statistics.median(dict(r).get(s, 0.0) for r in rounds) for s in steps}
    totals = [sum(v for _, v in r) for r in rounds]
    print(f"\n{'step (median of ' + str(len(rounds)) + ')':<44}{'s':>7}{'share':>8}   each round")
    for step in steps:
        each = " ".join(f"{dict(r).get(step, 0.0):.2f}" for r in rounds)
        share = medians[step] / sum(medians.values())
        print(f"  {step:<42}{medians[step]:>7.2f}{share:>8.0%}   {each}")
    each = " ".join(f"{t:.2f}" for t in totals)
    print(
        f"  {'script start -> first commit':<42}{statistics.median(totals):>7.2f}{'':>8}   {each}"
    )
    return sum(medians[s] for s in steps[:-1]), medians[steps[-1]]


def fleet_model(vms: int, ours: float, shard: float, submit: float) -> None:
    """Submit to first result, and the fleet's ramp, for ``vms`` VMs: the simulator's group
    (each VM created, booted and ready after ``ours``, lognormal), with shards long enough that
    every VM takes one, so each VM's first attempt marks when it started working."""
    vm = VmModel(create_seconds=CREATE_SECONDS, boot_seconds=BOOT_SECONDS, install_seconds=ours)
    work = Workload(vms, median_seconds=RAMP_SHARD_SECONDS)
    result = simulate(Scenario(name="cold", workload=work, max_workers=vms, vm=vm, seed=1))
    first: dict[int, float] = {}
    for a in result.ledger.attempts:
        first[a.vm] = min(a.start, first.get(a.vm, a.start))
    ready = sorted(first.values())

    def line(what: str, seconds: float) -> None:
        print(f"  {what:<58}{seconds:7.1f} s")

    print(
        f"\nfleet of {vms} VMs (simulated group: create {CREATE_SECONDS:.0f} s and guest boot "
        f"{BOOT_SECONDS:.0f} s assumed, ours {ours:.1f} s to the first claim measured; lognormal "
        f"spread {vm.spread}):"
    )
    line(f"submit (bundle, manifest, {vms} shards published; measured)", submit)
    line(
        "submit -> a median VM's first result (medians, no spread)",
        submit + vm.ready_seconds + shard,
    )
    line("submit -> first result (first VM ready + a no-op shard)", submit + ready[0] + shard)
    for q, label in ((0.5, "half the VMs working"), (0.99, "99% of the VMs working")):
        line(f"submit -> {label}", submit + ready[min(len(ready) - 1, int(q * len(ready)))])
    line("submit -> every VM working", submit + ready[-1])
    line(
        f"... if the group created VMs at {CREATE_RATE:.0f}/s (the API's limit)",
        submit + ready[-1] + vms / CREATE_RATE,
    )
    print(
        f"  ours, a VM: {ours + shard:.1f} s on top of its {CREATE_SECONDS + BOOT_SECONDS:.0f} s "
        "of creation and boot"
    )


def submit_time(d: emulators.Deployment, work: Path, shards: int) -> float:
    """The runner's part before the VMs: bundle, manifest and the publish of every shard."""
    backends = emulators.open_backends(d)
    try:
        start = time.perf_counter()
        runs.create_run(
            store=backends.store,
            queue=backends.queue,
            task_dir=work / "task",
            shards=from_count(shards),
            options=RunOptions(),
        )
        return time.perf_counter() - start
    finally:
        backends.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="VMs booted one after another")
    parser.add_argument("--vms", type=int, default=1000, help="the modelled fleet's size")
    args = parse_args(parser, argv, rounds=1, vms=10)
    for tool in ("podman", "mmdebstrap", str(SDK / "bin" / "gcloud")):
        if not shutil.which(tool):
            cannot_run(f"{tool} is not installed")
    rt = detect_runtime("podman")
    tag = image(rt)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still cleans up
    emus = start_emulators(reuse=args.quick)
    work = Path(tempfile.mkdtemp(prefix="cflow-bench-cold-"))
    try:
        attributes: dict[str, str] = {}
        rounds = []
        with metadata_server(attributes) as url:
            conf = work / "cloud.conf"
            conf.write_text(cloud_conf(url, emus))
            for i in range(args.rounds):
                # A deployment of its own: no pull left open by the last VM takes its message.
                d = emulators.new_deployment()
                attributes.clear()
                attributes.update(stage(d, work / f"stage-{i}"))
                rounds.append(timeline(boot(rt, tag, conf, d, work)))
                print(
                    f"round {i + 1}: first commit {sum(v for _, v in rounds[-1]):.2f} s "
                    "after the startup script started",
                    flush=True,
                )
        ours, shard = report(rounds)
        fleet_model(args.vms, ours, shard, submit_time(d, work, args.vms))
    finally:
        emus.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
