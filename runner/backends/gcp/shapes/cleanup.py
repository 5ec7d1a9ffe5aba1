"""Removing machine shapes no run uses: their groups, templates, work topics and subscriptions.

``runner prune`` calls :func:`cleanup_shapes`. A shaped group (``<group>-<hash>``,
:mod:`runner.backends.gcp.shapes.groups`) goes only when

- no active run uses its shape (a run's shapes are worked out from its options, as ``submit``
  made them: the Spot or standard shape, and with a fallback both);
- it has no VMs at all: a VM still listed may be working, and idle workers remove their own VMs
  within their idle timeout, so an unused group empties by itself;
- it is older than ``GRACE_SECONDS``: ``submit`` makes a run's groups before it writes the
  run's manifest, so a group this young may belong to a run not listed yet.

Then its template goes (Compute Engine refuses to delete a template a group still uses, so the
group first), then the shape's subscription and topic
(:class:`runner.backends.gcp.shapes.queues.ShapeQueues`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from runner.backends.gcp.shapes.groups import Shapes
from runner.backends.gcp.shapes.model import HASH_CHARS, ShapeError, run_shapes
from worker.protocol import Manifest, RunState

log = logging.getLogger("cflow.runner")

GRACE_SECONDS = 600.0  # a shaped group younger than this is kept (its run may not be listed yet)
OPERATION_TIMEOUT = 120.0  # seconds to wait for a group or template to be deleted


@dataclass
class Cleanup:
    """What :func:`cleanup_shapes` removed, and what it kept and why."""

    deleted: list[str] = field(default_factory=list)  # group names (and their templates)
    kept: dict[str, str] = field(default_factory=dict)  # group -> why it stays


def cleanup_shapes(
    shapes: Shapes,
    manifests: Iterable[Manifest],
    *,
    dry: bool = False,
    now: float | None = None,
    grace: float = GRACE_SECONDS,
) -> Cleanup:
    """Delete the shaped groups (and templates, topics, subscriptions) no active run uses."""
    now = time.time() if now is None else now
    in_use: dict[str, str] = {}
    for m in manifests:
        if m.state != RunState.ACTIVE.value:
            continue
        for shape in run_shapes(m.run_options):
            try:
                _, digest = shapes.normalize(shape)
            except ShapeError:  # a shape this deployment cannot make: it has no group
                continue
            in_use.setdefault(f"{shapes.group}-{digest}", m.run_id)
    pattern = re.compile(rf"{re.escape(shapes.group)}-([0-9a-f]{{{HASH_CHARS}}})")
    result = Cleanup()
    for group in shapes.list_groups():
        name = str(group.name)
        match = pattern.fullmatch(name)
        if match is None:
            continue
        if name in in_use:
            result.kept[name] = f"run {in_use[name]} uses it"
            continue
        vms = shapes.group_instances(name)
        if vms:
            result.kept[name] = f"{len(vms)} VMs still in it (idle ones leave by themselves)"
            continue
        created = _created(group)
        if created is not None and now - created < grace:
            result.kept[name] = "made less than 10 minutes ago (its run may be starting)"
            continue
        if not dry:
            _delete(shapes, name, match[1])
        result.deleted.append(name)
    return result


def _created(group: Any) -> float | None:
    stamp = str(getattr(group, "creation_timestamp", "") or "")
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return None


def _delete(shapes: Shapes, name: str, digest: str) -> None:
    shapes.delete_group(name, timeout=OPERATION_TIMEOUT)  # the group first: it uses the template
    if shapes.queues is not None:
        shapes.queues.delete(digest)
    log.info("deleted shaped group %s, its template and its work queue", name)
