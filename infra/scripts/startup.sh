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
#
# Instance metadata attributes read (set by infra/compute.py):
#   cflow-project cflow-region cflow-zone (empty for a regional group) cflow-group cflow-bucket
#   cflow-work-topic cflow-subscription cflow-events-topic cflow-slots cflow-idle-timeout
#   cflow-worker-package (gs:// URL of the worker wheel) cflow-worker-sha256
#   cflow-wheelhouse (gs:// URL of a tar of its dependencies' wheels) cflow-wheelhouse-sha256
#
# Overrides, for tests only: CFLOW_PREFIX (root of every path written), CFLOW_METADATA_URL,
# CFLOW_RETRY_SECONDS (back-off unit of the network steps), PIP_NO_DEPS (the worker without the
# libraries it requires).
#
# The worker exits with status 75 when it cannot remove its own VM from the group; the unit then
# does not restart it, and its ExecStopPost hook (run as root) powers the VM off.
# Output goes to the serial console and Cloud Logging through the guest agent.
set -euo pipefail
shopt -s inherit_errexit # a failing step inside $(...) fails the boot too

PREFIX="${CFLOW_PREFIX:-}"
METADATA_URL="${CFLOW_METADATA_URL:-http://metadata.google.internal/computeMetadata/v1}"

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
AFTER_STOP="$CFLOW_HOME/bin/after-stop"

# What the failure report needs, filled in as main learns it.
BUCKET="" GROUP="" ZONE="" REGION="" INSTANCE=""

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
  retry gcloud storage cp --quiet "$url" "$dest.part" >&2
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

# After a failed boot: report it, then take this VM out of the group (or at least power it off).
on_exit() {
  local status=$? last problem location
  trap - EXIT
  ((status == 0)) && return 0
  sleep 0.2 # let tee write the failed step's last words to the log
  last="$(grep -v '^ *$' "$BOOT_LOG" 2>/dev/null | tail -n 1 | tr -d '\000-\037' | cut -c1-300 || true)"
  last="${last#cflow-startup: }"
  last="${last#error: }"
  problem="failed to boot: ${last:-startup script exited with status $status}"
  log "boot failed (status $status); reporting and removing this VM"
  if [[ -n "$BUCKET" && -n "$INSTANCE" ]]; then
    printf '{"vm": "%s", "problem": "%s", "at": %s}\n' "$INSTANCE" \
      "$(printf '%s' "$problem" | sed 's/\\/\\\\/g; s/"/\\"/g')" "$(date +%s)" |
      gcloud storage cp --quiet - "gs://$BUCKET/fleet/_problems/$INSTANCE.json" || true
    gcloud storage cp --quiet "$BOOT_LOG" "gs://$BUCKET/fleet/$INSTANCE/startup.log" || true
  fi
  if [[ -n "$ZONE" ]]; then location="--zone=$ZONE"; else location="--region=$REGION"; fi
  if [[ -n "$GROUP" && -n "$INSTANCE" ]] &&
    gcloud compute instance-groups managed delete-instances "$GROUP" --quiet \
      --instances="$INSTANCE" "$location"; then
    log "removed $INSTANCE from group $GROUP"
  else
    log "could not remove this VM from its group; powering off"
    systemctl poweroff || true
  fi
  return "$status"
}

main() {
  local project region zone group bucket work_topic subscription events_topic slots idle_timeout
  local package sha house house_sha instance_name instance_zone wheel wheels location env unit
  local changed=0
  INSTANCE="$(metadata instance/name 2>/dev/null || true)"
  project="$(attribute cflow-project)"
  region="$(attribute cflow-region)"
  zone="$(attribute cflow-zone "")"
  group="$(attribute cflow-group)"
  GROUP="$group" ZONE="$zone" REGION="$region" # known now, for the failure report
  bucket="$(attribute cflow-bucket)"
  BUCKET="$bucket"
  work_topic="$(attribute cflow-work-topic)"
  subscription="$(attribute cflow-subscription)"
  events_topic="$(attribute cflow-events-topic)"
  slots="$(attribute cflow-slots 1)"
  idle_timeout="$(attribute cflow-idle-timeout 300)"
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

  # The worker's exit status 75: it could not remove its VM from the group. Power off instead
  # of restarting it (the runner, or a later `runner watch`, deletes the VM by name).
  if write_if_changed "$AFTER_STOP" "#!/bin/sh
# ExecStopPost of $UNIT (run as root).
if [ \"\$EXIT_STATUS\" = $EXIT_CANNOT_LEAVE ]; then
  echo 'cflow: the worker could not remove this VM from its group; powering off' >&2
  systemctl poweroff
fi"; then
    chmod 0755 "$AFTER_STOP"
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

[Service]
Type=simple
EnvironmentFile=$ENV_FILE
Environment=HOME=$STATE_DIR PYTHONUNBUFFERED=1
ExecStart=$VENV/bin/python -m worker
Restart=on-failure
RestartSec=5s
RestartPreventExitStatus=$EXIT_CANNOT_LEAVE
ExecStopPost=+$AFTER_STOP
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
  if write_if_changed "$UNIT_FILE" "$unit"; then
    changed=1
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
