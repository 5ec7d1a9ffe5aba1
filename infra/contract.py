"""What other parts of CFlow read from the stack without loading CDKTF.

Plain values only (no cdktf import), so the runner's checks and the tests can import them in no
time: the APIs a deployment uses, what its instance groups do with a VM that stopped, and the
workers' rights the identity and registry constructs grant.
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

# What a worker needs to remove its own VM from the group when it has been idle too long
# (``instanceGroupManagers.deleteInstances``, which also lowers the target size). The API asks
# only ``compute.instanceGroupManagers.update`` of the caller ("Authorization requires the
# following IAM permission on the specified resource instanceGroupManager:
# compute.instanceGroupManagers.update",
# https://cloud.google.com/compute/docs/reference/rest/v1/regionInstanceGroupManagers/deleteInstances);
# the group then deletes the VM with its own service agent, so no instance right is needed.
LEAVE_GROUP_PERMISSIONS = [
    "compute.instanceGroupManagers.get",
    "compute.instanceGroupManagers.update",
]

# The workers' one right on the stack's Artifact Registry repository (infra/registry.py): pull.
READER_ROLE = "roles/artifactregistry.reader"

# Hours a worker VM may live before a timer of its own removes it from its group (or powers it
# off), whatever its worker does: the bound on a VM whose agent is broken.
DEFAULT_MAX_VM_HOURS = 24
