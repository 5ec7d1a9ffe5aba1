#!/bin/bash
# CFlow VM startup script (the instance template's `startup-script` metadata).
#
# Runs as root on every boot. It reads the worker's configuration from instance metadata,
# installs the worker package into a venv, writes the worker's EnvironmentFile and systemd unit,
# and (re)starts the unit. Every step is idempotent: a reboot or a re-run changes nothing that
# is already right, and restarts the worker only when its unit or configuration changed.
#
# Instance metadata attributes read (set by infra/compute.py):
#   cflow-project cflow-region cflow-zone (empty for a regional group) cflow-group cflow-bucket
#   cflow-work-topic cflow-subscription cflow-events-topic cflow-slots cflow-idle-timeout
#   cflow-worker-package (gs:// URL of the worker wheel) cflow-worker-sha256
#
# Overrides, for tests only: CFLOW_PREFIX (root of every path written), CFLOW_METADATA_URL,
# CFLOW_RETRY_SECONDS (back-off unit of the network steps).
# Output goes to the serial console and Cloud Logging through the guest agent.
set -euo pipefail

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

ensure_venv_support() {
  if python3 -c 'import ensurepip, venv' 2>/dev/null; then
    return
  fi
  log "installing python3-venv"
  export DEBIAN_FRONTEND=noninteractive
  retry apt-get -q update
  retry apt-get -q install -y python3-venv
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

install_worker() {
  local wheel="$1" sha="$2" stamp="$CFLOW_HOME/installed-$2"
  if [[ -f "$stamp" ]]; then
    log "worker package $sha already installed"
    return
  fi
  ensure_venv_support
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
  fi
  log "installing $(basename "$wheel") and its dependencies"
  retry "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input --quiet "$wheel"
  touch "$stamp"
}

main() {
  local project region zone group bucket work_topic subscription events_topic slots idle_timeout
  local package sha instance_name instance_zone wheel location env unit changed=0
  project="$(attribute cflow-project)"
  region="$(attribute cflow-region)"
  zone="$(attribute cflow-zone "")"
  group="$(attribute cflow-group)"
  bucket="$(attribute cflow-bucket)"
  work_topic="$(attribute cflow-work-topic)"
  subscription="$(attribute cflow-subscription)"
  events_topic="$(attribute cflow-events-topic)"
  slots="$(attribute cflow-slots 1)"
  idle_timeout="$(attribute cflow-idle-timeout 300)"
  package="$(attribute cflow-worker-package)"
  sha="$(attribute cflow-worker-sha256)"
  instance_name="$(metadata instance/name)"
  instance_zone="$(metadata instance/zone)"
  instance_zone="${instance_zone##*/}" # projects/NUMBER/zones/ZONE -> ZONE

  mkdir -p "$CFLOW_HOME"
  wheel="$(fetch_package "$package" "$sha")"
  install_worker "$wheel" "$sha"

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

main "$@"
