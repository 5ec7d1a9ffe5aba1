#!/bin/bash
# CFlow VM startup script (the instance template's `startup-script` metadata).
#
# Runs as root on every boot. It reads the worker's configuration from instance metadata,
# installs the worker package and its dependencies into a venv from wheels in the bucket (no
# package index, and no pip: the wheels are unpacked, which takes a second where pip took
# several), writes the worker's EnvironmentFile and systemd unit, and (re)starts the unit. Every
# step is idempotent: a reboot or a re-run changes nothing that is already right, and restarts
# the worker only when its unit or configuration changed.
#
# A boot that fails (any step, under set -e) must not leave a VM that bills with no worker: the
# EXIT trap reports it in the bucket (fleet/_problems/<vm>.json, with the last line of this
# script's log, which the runner shows as "VM x failed to boot: <line>"; the log itself goes to
# fleet/<vm>/startup.log), then removes this VM from its group, or powers it off if that fails.
# That path needs only bash, curl and the metadata server's token (no gcloud, no Python), so it
# works on any boot image; the removal is infra/scripts/leave.sh (metadata cflow-leave-script). The group does not repair a VM that powered itself off
# (infra/contract.py), so a VM that cannot leave stays off until the runner deletes it.
#
# No VM outlives max_vm_hours (cflow-max-vm-hours), whatever its worker does: a systemd timer,
# armed before anything else here can hang, runs cflow-leave (the same removal, or power-off)
# that long after boot. A worker that keeps failing (five starts within ten minutes) ends the
# same way, through the unit's OnFailure. On a VM with an NVIDIA GPU the worker starts only once
# nvidia-smi answers (the image may still be installing its driver); past a bounded wait that is
# a failed boot like any other.
#
# Instance metadata attributes read (set by infra/compute.py):
#   cflow-project cflow-region cflow-zone (empty for a regional group) cflow-group cflow-bucket
#   cflow-work-topic cflow-subscription cflow-events-topic cflow-slots cflow-idle-timeout
#   cflow-worker-package (gs:// URL of the worker wheel) cflow-worker-sha256
#   cflow-wheelhouse (gs:// URL of a tar of its dependencies' wheels) cflow-wheelhouse-sha256
#   cflow-max-vm-hours cflow-leave-script (infra/scripts/leave.sh)
#
# Overrides, for tests only: CFLOW_PREFIX (root of every path written, and of /sys), the
# endpoints CFLOW_METADATA_URL, CFLOW_STORAGE_ENDPOINT and CFLOW_COMPUTE_ENDPOINT,
# CFLOW_RETRY_SECONDS (back-off unit of the network steps), CFLOW_GPU_WAIT_SECONDS and
# CFLOW_GPU_POLL_SECONDS, PIP_NO_DEPS (the worker without the libraries it requires).
#
# The worker exits with status 75 when it cannot remove its own VM from the group; the unit then
# does not restart it but fails, and its OnFailure unit (as root) tries the removal once more and
# powers the VM off if that fails too.
# Output goes to the serial console and Cloud Logging through the guest agent.
set -euo pipefail
shopt -s inherit_errexit # a failing step inside $(...) fails the boot too

PREFIX="${CFLOW_PREFIX:-}"
METADATA_URL="${CFLOW_METADATA_URL:-http://metadata.google.internal/computeMetadata/v1}"
STORAGE_URL="${CFLOW_STORAGE_ENDPOINT:-https://storage.googleapis.com}"

CFLOW_HOME="$PREFIX/opt/cflow"
VENV="$CFLOW_HOME/venv"
PACKAGES="$CFLOW_HOME/packages"
ENV_FILE="$PREFIX/etc/cflow/worker.env"
UNIT=cflow-worker.service
UNIT_FILE="$PREFIX/etc/systemd/system/$UNIT"
STATE_DIR=/var/lib/cflow # systemd's StateDirectory=cflow, owned by the worker's dynamic user
STOP_TIMEOUT_SECONDS=20  # systemd SIGKILLs the worker after this; Spot preemption allows ~30 s
RETRY_SECONDS="${CFLOW_RETRY_SECONDS:-10}"
EXIT_CANNOT_LEAVE=75 # worker/backends/gcp/vm.py EXIT_CANNOT_LEAVE
BOOT_LOG="$PREFIX/var/log/cflow-startup.log"
LEAVE="$CFLOW_HOME/bin/leave"
LEAVE_UNIT=cflow-leave.service
LEAVE_UNIT_FILE="$PREFIX/etc/systemd/system/$LEAVE_UNIT"
DEADLINE_TIMER=cflow-deadline.timer
GPU_WAIT_SECONDS="${CFLOW_GPU_WAIT_SECONDS:-900}" # a Deep Learning VM image builds its driver
GPU_POLL_SECONDS="${CFLOW_GPU_POLL_SECONDS:-10}"
NVIDIA_VENDOR=0x10de # PCI vendor id of NVIDIA devices

# What the failure report needs, filled in as main learns it.
BUCKET="" INSTANCE=""

log() { echo "cflow-startup: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# retry COMMAND...: a network step (apt, download, pip) gets three more tries, backing off.
retry() {
  local attempt
  for attempt in 1 2 3; do
    "$@" && return 0
    log "try $attempt failed: $*; again in $((attempt * RETRY_SECONDS)) s"
    sleep "$((attempt * RETRY_SECONDS))"
  done
  "$@"
}

# leave_script: infra/scripts/leave.sh, which removes this VM from its group or powers it off,
# from the instance metadata (the template ships it beside this script).
leave_script() {
  metadata instance/attributes/cflow-leave-script
}


# token: the VM's service account access token, from the metadata server.
token() {
  local answer
  answer="$(metadata instance/service-accounts/default/token)"
  answer="$(printf '%s' "$answer" | sed -n 's/.*"access_token" *: *"\([^"]*\)".*/\1/p')"
  [[ -n "$answer" ]] || return 1
  printf '%s' "$answer"
}

# upload FILE OBJECT: FILE into the bucket as OBJECT (Cloud Storage's JSON API, no gcloud).
upload() {
  local file="$1" object="$2" bearer
  bearer="$(token)" || return 1
  curl --fail --silent --show-error --max-time 30 --retry 3 --retry-connrefused -X POST \
    -H "Authorization: Bearer $bearer" -H 'Content-Type: application/octet-stream' \
    --data-binary "@$file" -o /dev/null \
    "$STORAGE_URL/upload/storage/v1/b/$BUCKET/o?uploadType=media&name=${object//\//%2F}"
}

# download URL DEST: a gs:// object to DEST (Cloud Storage's JSON API, no gcloud).
download() {
  local url="$1" dest="$2" bucket object bearer
  bucket="${url#gs://}"
  object="${bucket#*/}"
  bucket="${bucket%%/*}"
  bearer="$(token)" || return 1
  curl --fail --silent --show-error --max-time 600 -H "Authorization: Bearer $bearer" \
    -o "$dest" "$STORAGE_URL/storage/v1/b/$bucket/o/${object//\//%2F}?alt=media"
}

metadata() {
  curl --fail --silent --show-error --max-time 10 \
    --retry 5 --retry-delay 2 --retry-connrefused \
    -H 'Metadata-Flavor: Google' "$METADATA_URL/$1"
}

# attribute NAME [DEFAULT]: an instance attribute; without DEFAULT a missing one is fatal.
attribute() {
  local value
  if value="$(metadata "instance/attributes/$1" 2>/dev/null)"; then
    :
  elif [[ $# -ge 2 ]]; then
    value="$2"
  else
    die "instance metadata attribute $1 is missing"
  fi
  # Values end up in a systemd EnvironmentFile: allow names, numbers and URLs only.
  [[ "$value" =~ ^[A-Za-z0-9._:/@+-]*$ ]] || die "metadata attribute $1 has unexpected characters"
  printf '%s' "$value"
}

# write_if_changed PATH CONTENT: atomically replace PATH; status 0 if it changed, 1 if not.
write_if_changed() {
  local path="$1" content="$2" tmp
  if [[ -f "$path" ]] && [[ "$(cat "$path")" == "$content" ]]; then
    return 1
  fi
  mkdir -p "$(dirname "$path")"
  tmp="$(mktemp "$path.XXXXXX")"
  printf '%s\n' "$content" >"$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$path"
}

# Installs wheels into the venv whose python runs it, as pip lays them out: each wheel's files
# into site-packages (a <name>.data/ folder's purelib and platlib there too, its scripts into
# bin/, its data into the venv), after the checks pip makes of a wheel's name (this Python, this
# machine). Arguments: wheels, or folders of wheels. No pip and no index: the wheelhouse is the
# resolved set for this image's Python and platform (runner/backends/gcp/wheels.py), verified by
# its SHA-256.
INSTALL_WHEELS='
import concurrent.futures, pathlib, platform, sys, sysconfig, zipfile
paths = sysconfig.get_paths()
site, scripts = pathlib.Path(paths["purelib"]), pathlib.Path(paths["scripts"])
homes = {"purelib": site, "platlib": site, "scripts": scripts, "data": pathlib.Path(sys.prefix)}
minor = sys.version_info[1]

def fits(wheel):
    if wheel.suffix != ".whl" or wheel.stem.count("-") < 4:
        return False
    pys, abi, plats = wheel.stem.split("-")[-3:]
    python = any(
        p in ("py3", f"py3{minor}", f"cp3{minor}")
        or (abi == "abi3" and p.startswith("cp3") and int(p[3:]) <= minor)
        for p in pys.split(".")
    )
    return python and any(p == "any" or p.endswith("_" + platform.machine()) for p in plats.split("."))

args = map(pathlib.Path, sys.argv[1:])
wheels = [w for a in args for w in (sorted(a.glob("*.whl")) if a.is_dir() else [a])]
unfit = [w.name for w in wheels if not fits(w)]
if unfit:
    sys.exit(f"wheels not for this Python or machine: {unfit}")

def unpack(wheel):
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            parts = info.filename.split("/")
            if info.filename.startswith("/") or ".." in parts:
                sys.exit(f"{wheel.name}: unsafe path {info.filename}")
            dest = site / info.filename
            if parts[0].endswith(".data") and len(parts) > 2 and parts[1] in homes:
                dest = homes[parts[1]].joinpath(*parts[2:])
            if info.is_dir():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            data = zf.read(info)
            if dest.parent == scripts and data.startswith(b"#!python"):
                data = b"#!" + sys.executable.encode() + data[len(b"#!python"):]
            dest.write_bytes(data)
            if dest.parent == scripts or (info.external_attr >> 16) & 0o111:
                dest.chmod(0o755)

with concurrent.futures.ThreadPoolExecutor(4) as pool:  # zlib and file writes run in parallel
    list(pool.map(unpack, wheels))
print(f"cflow-startup: unpacked {len(wheels)} wheels", file=sys.stderr, flush=True)
'

# As root (the worker's dynamic user cannot write bytecode): the worker's own bytecode, for every
# process it starts; the import check; and the check pip's resolver made, that every library the
# worker requires came with the wheelhouse (PIP_NO_DEPS skips it, as it skipped pip's). The
# libraries' bytecode is not written: the agent compiles the modules it loads in less time than
# compiling them, or loading them once, here would take (bench/cold_start.py).
CHECK_WORKER='
import compileall, importlib.metadata as md, os, pathlib, re, sys, sysconfig
compileall.compile_dir(pathlib.Path(sysconfig.get_paths()["purelib"]) / "worker", quiet=1)
import worker.cli
for need in [] if os.environ.get("PIP_NO_DEPS") else md.requires("cflow-worker") or []:
    try:
        md.distribution(re.split(r"[ ;<>=!~\[(]", need, maxsplit=1)[0])
    except md.PackageNotFoundError:
        sys.exit(f"the worker requires {need}, which is not in its wheelhouse")
'

# The pip wheel ensurepip would install: Python's own, or where the distribution keeps it
# (Debian: python3-pip-whl in /usr/share/python-wheels). Fails if this Python has none.
PIP_WHEEL='
import glob, os, sys, sysconfig
dirs = [sysconfig.get_config_var("WHEEL_PKG_DIR")]
try:
    import ensurepip
    dirs.append(os.path.join(os.path.dirname(ensurepip.__file__), "_bundled"))
except ImportError:
    pass
found = sorted(w for d in dirs if d for w in glob.glob(os.path.join(d, "pip-*.whl")))
if not found:
    sys.exit(1)
print(found[-1])
'

# ensure_pip: pip in the venv, which the worker runs for a task's requirements.txt. A wheelhouse
# that carries pip's wheel has put it there already; otherwise the wheel ensurepip would install
# is unpacked (Debian 12's python3 has none until python3-pip-whl comes from apt, the slow part
# of such a boot).
ensure_pip() {
  local pip_wheel
  if "$VENV/bin/python" -I -c 'import pip' 2>/dev/null; then
    return
  fi
  if ! pip_wheel="$(python3 -I -c "$PIP_WHEEL")"; then
    log "installing python3-pip-whl"
    export DEBIAN_FRONTEND=noninteractive
    retry apt-get -q update
    retry apt-get -q install -y python3-pip-whl
    pip_wheel="$(python3 -I -c "$PIP_WHEEL")"
  fi
  log "adding pip to $VENV from $pip_wheel"
  "$VENV/bin/python" -I -c "$INSTALL_WHEELS" "$pip_wheel"
}

# fetch_package URL SHA256: download the wheel once and verify it; prints its local path.
fetch_package() {
  local url="$1" sha="$2" dest
  dest="$PACKAGES/$sha/$(basename "$url")"
  if [[ -f "$dest" ]] && echo "$sha  $dest" | sha256sum --check --status; then
    printf '%s' "$dest"
    return
  fi
  mkdir -p "$(dirname "$dest")"
  log "downloading $url"
  retry download "$url" "$dest.part"
  echo "$sha  $dest.part" | sha256sum --check --status ||
    die "worker package $url does not match its SHA-256 $sha"
  mv -f "$dest.part" "$dest"
  printf '%s' "$dest"
}

# unpack_wheelhouse TAR: the directory of its wheels (unpacked once).
unpack_wheelhouse() {
  local tar="$1" dir
  dir="$(dirname "$tar")/unpacked"
  if [[ ! -d "$dir/wheels" ]]; then
    rm -rf "$dir.part"
    mkdir -p "$dir.part/wheels" # there even when the wheelhouse is empty
    tar -xf "$tar" -C "$dir.part"
    mv -f "$dir.part" "$dir"
  fi
  printf '%s' "$dir/wheels"
}

install_worker() {
  local wheel="$1" sha="$2" wheels="$3" stamp="$CFLOW_HOME/installed-$2"
  if [[ -f "$stamp" ]]; then
    log "worker package $sha already installed"
    return
  fi
  log "creating $VENV"
  rm -rf "$VENV" # a fresh venv for a new package: nothing of another install lingers
  python3 -m venv --without-pip "$VENV"
  log "installing $(basename "$wheel") and its dependencies from $wheels"
  "$VENV/bin/python" -I -c "$INSTALL_WHEELS" "$wheels" "$wheel"
  ensure_pip
  "$VENV/bin/python" -I -c "$CHECK_WORKER"
  log "installed $(basename "$wheel")"
  touch "$stamp"
}

# arm_deadline HOURS: the VM's hard bound. cflow-leave runs HOURS after boot, whatever the
# worker does (a transient timer: no unit file, no daemon reload on the boot's critical path;
# a reboot arms it again, counting from that boot).
arm_deadline() {
  local hours="$1" script
  script="$(leave_script)" || die "instance metadata attribute cflow-leave-script is missing"
  if write_if_changed "$LEAVE" "$script"; then
    chmod 0755 "$LEAVE"
  fi
  if ! systemctl is-active --quiet "$DEADLINE_TIMER"; then
    systemd-run --quiet --unit="${DEADLINE_TIMER%.timer}" --on-boot="${hours}h" \
      --timer-property=AccuracySec=1min --description="CFlow: this VM's time limit" \
      "$LEAVE" max-vm-hours
  fi
  log "this VM leaves its group ${hours} h after boot at the latest"
}

# has_gpu: whether this VM has an NVIDIA device on its PCI bus.
has_gpu() {
  grep -qsx "$NVIDIA_VENDOR" "$PREFIX"/sys/bus/pci/devices/*/vendor
}

# wait_for_gpu: the worker starts only once the NVIDIA driver answers. An image may install the
# driver at first boot (a Deep Learning VM builds it then, taking minutes): a worker started
# before would fail its first shards alike ("no CUDA device"), which --halt takes for a task that
# cannot work. Past GPU_WAIT_SECONDS the boot fails (and the VM leaves).
wait_for_gpu() {
  local waited=0 out
  until out="$(nvidia-smi -L 2>&1)"; do
    if ((waited >= GPU_WAIT_SECONDS)); then
      die "the NVIDIA driver is not ready after ${waited} s (nvidia-smi: ${out##*$'\n'})"
    fi
    sleep "$GPU_POLL_SECONDS"
    waited=$((waited + GPU_POLL_SECONDS))
  done
  log "GPU ready: ${out%%$'\n'*}"
}

# After a failed boot: report it, then take this VM out of the group (or at least power it off).
on_exit() {
  local status=$? last problem report script
  trap - EXIT
  ((status == 0)) && return 0
  sleep 0.2 # let tee write the failed step's last words to the log
  last="$(grep -v '^ *$' "$BOOT_LOG" 2>/dev/null | tail -n 1 | tr -d '\000-\037' | cut -c1-300 || true)"
  last="${last#cflow-startup: }"
  last="${last#error: }"
  problem="failed to boot: ${last:-startup script exited with status $status}"
  log "boot failed (status $status); reporting and removing this VM"
  if [[ -n "$BUCKET" && -n "$INSTANCE" ]]; then
    report="$(mktemp)"
    printf '{"vm": "%s", "problem": "%s", "at": %s}\n' "$INSTANCE" \
      "$(printf '%s' "$problem" | sed 's/\\/\\\\/g; s/"/\\"/g')" "$(date +%s)" >"$report"
    upload "$report" "fleet/_problems/$INSTANCE.json" || log "could not report the failure"
    upload "$BOOT_LOG" "fleet/$INSTANCE/startup.log" || log "could not upload $BOOT_LOG"
    rm -f "$report"
  fi
  if script="$(leave_script 2>/dev/null)"; then
    bash -c "$script" cflow-leave "failed to boot" || true
  else
    log "no cflow-leave-script in the metadata; powering off"
    systemctl poweroff || true
  fi
  return "$status"
}

main() {
  local project region zone group bucket work_topic subscription events_topic slots idle_timeout
  local package sha house house_sha instance_name instance_zone wheel wheels location env unit
  local max_vm_hours changed=0 reload=0
  INSTANCE="$(metadata instance/name 2>/dev/null || true)"
  project="$(attribute cflow-project)"
  region="$(attribute cflow-region)"
  zone="$(attribute cflow-zone "")"
  group="$(attribute cflow-group)"
  bucket="$(attribute cflow-bucket)"
  BUCKET="$bucket"
  work_topic="$(attribute cflow-work-topic)"
  subscription="$(attribute cflow-subscription)"
  events_topic="$(attribute cflow-events-topic)"
  slots="$(attribute cflow-slots 1)"
  idle_timeout="$(attribute cflow-idle-timeout 300)"
  max_vm_hours="$(attribute cflow-max-vm-hours 24)"
  [[ "$max_vm_hours" =~ ^[1-9][0-9]*$ ]] || die "cflow-max-vm-hours must be a whole number of hours"
  arm_deadline "$max_vm_hours" # before any step that could hang
  package="$(attribute cflow-worker-package)"
  sha="$(attribute cflow-worker-sha256)"
  house="$(attribute cflow-wheelhouse)"
  house_sha="$(attribute cflow-wheelhouse-sha256)"
  instance_name="$(metadata instance/name)"
  instance_zone="$(metadata instance/zone)"
  instance_zone="${instance_zone##*/}" # projects/NUMBER/zones/ZONE -> ZONE
  INSTANCE="$instance_name"

  mkdir -p "$CFLOW_HOME"
  wheel="$(fetch_package "$package" "$sha")"
  wheels="$(unpack_wheelhouse "$(fetch_package "$house" "$house_sha")")"
  install_worker "$wheel" "$sha" "$wheels"
  if has_gpu; then
    wait_for_gpu
  fi

  # A zonal group is addressed by its zone, a regional one by its region.
  if [[ -n "$zone" ]]; then
    location="CFLOW_ZONE=$zone"
  else
    location="CFLOW_REGION=$region"
  fi
  env="CFLOW_BACKEND=gcp
CFLOW_PROJECT=$project
CFLOW_BUCKET=$bucket
CFLOW_WORK_TOPIC=$work_topic
CFLOW_SUBSCRIPTION=$subscription
CFLOW_EVENTS_TOPIC=$events_topic
CFLOW_SLOTS=$slots
CFLOW_IDLE_TIMEOUT=$idle_timeout
CFLOW_GROUP=$group
$location
CFLOW_WORKER_NAME=$instance_name
CFLOW_INSTANCE_ZONE=$instance_zone
CFLOW_SCRATCH=$STATE_DIR/scratch"

  unit="[Unit]
Description=CFlow worker agent
Wants=network-online.target
After=network-online.target
# A worker that keeps failing (here: five starts in ten minutes, or exit status 75) leaves.
StartLimitIntervalSec=600
StartLimitBurst=5
OnFailure=$LEAVE_UNIT

[Service]
Type=simple
EnvironmentFile=$ENV_FILE
Environment=HOME=$STATE_DIR PYTHONUNBUFFERED=1
ExecStart=$VENV/bin/python -m worker
Restart=on-failure
RestartSec=5s
RestartPreventExitStatus=$EXIT_CANNOT_LEAVE
# SIGTERM goes to the agent alone: it stops its tasks, records them preempted and nacks.
KillMode=mixed
TimeoutStopSec=${STOP_TIMEOUT_SECONDS}s
DynamicUser=yes
StateDirectory=cflow
WorkingDirectory=$STATE_DIR
StandardOutput=journal+console
StandardError=journal+console
SyslogIdentifier=cflow-worker

[Install]
WantedBy=multi-user.target"

  if write_if_changed "$ENV_FILE" "$env"; then changed=1; fi
  if write_if_changed "$LEAVE_UNIT_FILE" "[Unit]
Description=CFlow: remove this VM from its group, or power it off

[Service]
Type=oneshot
ExecStart=$LEAVE worker-failed"; then
    reload=1
  fi
  if write_if_changed "$UNIT_FILE" "$unit"; then
    changed=1 reload=1
  fi
  if ((reload)); then
    systemctl daemon-reload
  fi
  systemctl enable "$UNIT"
  if ((changed)); then
    log "starting $UNIT with new configuration"
    systemctl restart "$UNIT"
  else
    systemctl start "$UNIT" # no-op when it is already running
  fi
  log "worker $instance_name is up (group $group, subscription $subscription)"
}

mkdir -p "$(dirname "$BOOT_LOG")"
exec > >(tee -a "$BOOT_LOG") 2> >(tee -a "$BOOT_LOG" >&2)
trap on_exit EXIT
main "$@"
