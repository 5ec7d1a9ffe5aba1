"""What other parts of CFlow read from the stack without loading CDKTF.

Plain values only (no cdktf import), so the runner's checks and the tests can import them in no
time: the APIs a deployment uses, and what its instance groups do with a VM that stopped.
"""

from __future__ import annotations

# Every API the stack's resources and the runner call. The stack enables Artifact Registry itself
# (a fresh project has it off, and the repository is the stack's last resource to fail); the
# rest must be on before the first deploy (docs/google-cloud.md, step 1), because the provider
# needs them to plan at all.
REQUIRED_APIS = (
    "compute.googleapis.com",
    "pubsub.googleapis.com",
    "storage.googleapis.com",
    "iam.googleapis.com",
    "cloudresourcemanager.googleapis.com",
    "logging.googleapis.com",
    "artifactregistry.googleapis.com",
)
STACK_ENABLED_APIS = ("artifactregistry.googleapis.com",)

# instanceLifecyclePolicy.defaultActionOnFailure of every CFlow instance group. Compute's default,
# REPAIR, recreates a VM that stopped without the group asking ("MIG automatically repairs a
# failed VM by recreating it"); DO_NOTHING leaves it stopped ("MIG does not repair a failed VM"),
# https://cloud.google.com/compute/docs/reference/rest/v1/instanceGroupManagers (the field's
# description). A worker VM stops itself only when it cannot leave its group (it powers off):
# repairing it would boot the same VM into the same failure for ever, billed, with no runner
# watching. Stopped, it costs only its disk until the runner deletes it by name.
DEFAULT_ACTION_ON_FAILURE = "DO_NOTHING"

# Hours a worker VM may live before a timer of its own removes it from its group (or powers it
# off), whatever its worker does: the bound on a VM whose agent is broken.
DEFAULT_MAX_VM_HOURS = 24
