#!/bin/bash
# CFlow VM shutdown script (the instance template's `shutdown-script` metadata).
#
# Spot preemption gives about 30 s between the ACPI shutdown signal and a hard stop. Stop the
# worker now, explicitly, so its SIGTERM handler (stop tasks, record them preempted, nack) runs
# while the network is still up; systemd SIGKILLs it after the unit's TimeoutStopSec (20 s), and
# this script gives up waiting after CFLOW_STOP_TIMEOUT seconds (default 25), inside the window.
#
# Overrides, for tests only: CFLOW_METADATA_URL, CFLOW_STOP_TIMEOUT.
set -uo pipefail

METADATA_URL="${CFLOW_METADATA_URL:-http://metadata.google.internal/computeMetadata/v1}"
STOP_TIMEOUT="${CFLOW_STOP_TIMEOUT:-25}"
UNIT=cflow-worker.service

log() { echo "cflow-shutdown: $*" >&2; }

preempted="$(curl --fail --silent --max-time 2 -H 'Metadata-Flavor: Google' \
  "$METADATA_URL/instance/preempted" 2>/dev/null || echo unknown)"
log "stopping $UNIT (preempted: $preempted)"
started=$SECONDS
if timeout "$STOP_TIMEOUT" systemctl stop "$UNIT"; then
  log "$UNIT stopped after $((SECONDS - started)) s"
else
  log "$UNIT did not stop cleanly within ${STOP_TIMEOUT} s (status $?)"
fi
exit 0
