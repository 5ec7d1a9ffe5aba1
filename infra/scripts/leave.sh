#!/bin/bash
# CFlow's way out for a VM (instance metadata `cflow-leave-script`, written to
# /opt/cflow/bin/leave by infra/scripts/startup.sh): removes this VM from its managed instance
# group (deleteInstances, which lowers the group's target size, so the group does not make the
# VM again), or powers it off when that fails (the group does not repair a VM that stopped
# itself: infra/contract.py). It needs bash, curl and the metadata server only (no gcloud).
# Run when a boot fails, by the worker unit's OnFailure, and by the max_vm_hours timer.
#
#   leave [WHY]
#
# Overrides, for tests only: CFLOW_METADATA_URL, CFLOW_COMPUTE_ENDPOINT.
set -uo pipefail
METADATA_URL="${CFLOW_METADATA_URL:-http://metadata.google.internal/computeMetadata/v1}"
COMPUTE_URL="${CFLOW_COMPUTE_ENDPOINT:-https://compute.googleapis.com}"
why="${1:-asked to}"
log() { echo "cflow-leave: $*" >&2; }
md() {
  curl --fail --silent --show-error --max-time 10 --retry 3 --retry-connrefused \
    -H "Metadata-Flavor: Google" "$METADATA_URL/$1"
}
delete_self() {
  local project group zone region name vm_zone scope token body
  project="$(md instance/attributes/cflow-project)" || return 1
  group="$(md instance/attributes/cflow-group)" || return 1
  zone="$(md instance/attributes/cflow-zone 2>/dev/null)" || zone=""
  region="$(md instance/attributes/cflow-region 2>/dev/null)" || region=""
  name="$(md instance/name)" || return 1
  vm_zone="$(md instance/zone)" || return 1
  vm_zone="${vm_zone##*/}"
  if [[ -n "$zone" ]]; then
    scope="zones/$zone"
  elif [[ -n "$region" ]]; then
    scope="regions/$region"
  else
    return 1
  fi
  token="$(md instance/service-accounts/default/token |
    sed -n "s/.*\"access_token\" *: *\"\([^\"]*\)\".*/\1/p")" || return 1
  [[ -n "$token" ]] || return 1
  body="{\"instances\": [\"zones/$vm_zone/instances/$name\"], \"skipInstancesOnValidationError\": true}"
  # One requestId for every try: Compute runs a retried request once.
  curl --fail --silent --show-error --max-time 30 --retry 5 --retry-delay 5 --retry-connrefused \
    -X POST -H "Authorization: Bearer $token" -H "Content-Type: application/json" \
    --data "$body" -o /dev/null \
    "$COMPUTE_URL/compute/v1/projects/$project/$scope/instanceGroupManagers/$group/deleteInstances?requestId=$(cat /proc/sys/kernel/random/uuid)"
}
if delete_self; then
  log "removed this VM from its group ($why)"
  exit 0
fi
log "could not remove this VM from its group ($why); powering off"
systemctl poweroff
