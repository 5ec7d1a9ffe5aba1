"""A managed instance group's instances as ``listManagedInstances`` lists them, read for the
fleet: each one's name, status and creation error, and which are VMs to delete."""

from __future__ import annotations

from typing import Any

from runner.engine.fleet import Instance

_STOPPING_ACTIONS = {"DELETING", "ABANDONING", "STOPPING", "SUSPENDING"}
_POWERED_OFF = {"TERMINATED", "STOPPED", "SUSPENDED"}  # instanceStatus of a VM that is off


def instance_name(managed: Any) -> str:
    """A managed instance's name (the MIG names it before the VM exists)."""
    return str(managed.name or managed.instance.rsplit("/", 1)[-1])


def instance_error(managed: Any) -> str | None:
    """``CODE: message`` of the group's last failed attempt to create this instance, if any."""
    attempt = getattr(managed, "last_attempt", None)
    errors = list(attempt.errors.errors) if attempt and attempt.errors else []
    if not errors or instance_status(managed) == "running":
        return None
    first = errors[0]
    return f"{first.code}: {first.message}".strip()


def instance_status(managed: Any) -> str:
    """``starting`` | ``running`` | ``stopping``, from the MIG's current action."""
    action = managed.current_action or "NONE"
    if action in _STOPPING_ACTIONS:
        return "stopping"
    if action == "NONE" and managed.instance_status == "RUNNING":
        return "running"
    return "starting"


def powered_off(managed: Any) -> bool:
    """A VM that stopped itself (it could not leave its group): the group does not repair it
    (infra/contract.py), so it stays TERMINATED until it is deleted."""
    status = managed.instance_status or ""
    return (managed.current_action or "NONE") == "NONE" and status in _POWERED_OFF


def classify_instances(
    managed: list[Any], reported: dict[str, str]
) -> tuple[list[Instance], dict[str, int]]:
    """The group's instances with what is wrong with each, and how many cannot be created for
    each creation error. A running VM that reported a failed boot, and one that powered itself
    off (the group leaves it so), are removable: deleting them is the way out."""
    out: list[Instance] = []
    quota: dict[str, int] = {}
    for m in managed:
        name, status = instance_name(m), instance_status(m)
        error = instance_error(m)
        removable = False
        if error is not None:
            quota[error] = quota.get(error, 0) + 1
        elif name in reported and status == "running":
            error, removable = reported[name], True
        elif powered_off(m):  # it stopped itself, and the group leaves it so: delete it
            error, removable = reported.get(name, "powered itself off"), True
        out.append(Instance(name, status, error=error, removable=removable))
    return out, quota
