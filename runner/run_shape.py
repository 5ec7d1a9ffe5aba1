"""A run's machine shape and fallback, applied to the deployment the runner opened for it.

``submit`` calls :func:`check_shape_options` before anything is published (bad options, shapes
the zone lacks and quota the project lacks are refused with one line), then
:func:`apply_run_shape`, which points the deployment's fleet at the shape's group (made or
reused by :class:`runner.shapes.Shapes`) and, with ``--fallback standard``, at a
:class:`runner.fallback.FallbackFleet` of the shape's Spot and standard groups, fed by the run's
preemption events. The deployment's own group is never changed.
"""

from __future__ import annotations

from typing import Any

from runner import runs
from runner.fallback import FallbackFleet, FallbackPolicy, PreemptionTap
from runner.fleet import Fleet
from runner.shapes import Shape, ShapedGroup, ShapeError, Shapes
from worker.clock import SYSTEM_CLOCK
from worker.protocol import Layout, RunOptions, ShardResult
from worker.queue import EventBus

FALLBACKS = ("standard",)


def check_shape_options(options: RunOptions) -> Shape:
    """The run's shape, or one line on what is wrong with the options."""
    if options.fallback is not None and options.fallback not in FALLBACKS:
        raise ShapeError(f"--fallback must be standard, not {options.fallback!r}")
    if options.fallback_after < 1:
        raise ShapeError("--fallback-after must be 1 or more preemptions")
    shape = Shape.from_options(options)
    if options.fallback and shape.provisioning == "standard":
        raise ShapeError("--fallback standard needs Spot VMs first; drop --provisioning standard")
    return shape


def needs_groups(options: RunOptions) -> bool:
    """Whether the run needs groups of its own (a shape, or a fallback)."""
    return not Shape.from_options(options).is_default or options.fallback is not None


def apply_run_shape(dep: Any, options: RunOptions) -> list[ShapedGroup]:
    """Make (or reuse) the run's groups and point ``dep``'s fleet and events at them.

    ``dep`` is a :class:`runner.backends.Deployment` on Google Cloud. Returns the groups used.
    """
    shape = check_shape_options(options)
    if not needs_groups(options):
        return []
    cfg = dep.config
    if not cfg.zone:
        raise ShapeError(
            "machine shapes and --fallback need a zonal deployment (set the zone variable)"
        )
    shapes = Shapes(project=cfg.project, group=cfg.group, zone=cfg.zone)
    try:
        spot = shape if shape.provisioning or not options.fallback else _spot(shape)
        made = [shapes.ensure(spot)]
        if options.fallback:
            made.append(shapes.ensure(shape.standard()))
    finally:
        shapes.close()
    store = dep.backends.store

    def group_fleet(group: str) -> Fleet:
        from runner.gce_fleet import GceFleet  # the Compute client: only for cloud runs

        return GceFleet(
            project=cfg.project, group=group, zone=cfg.zone, clock=SYSTEM_CLOCK, store=store
        )

    if not options.fallback:
        dep.make_fleet = lambda slots, idle_timeout: group_fleet(made[0].group)
        return made
    preemptions: dict[str, int] = {}
    opened = dep.open_run_events

    def open_run_events(run_id: str, since: float | None) -> EventBus:
        inner = opened(run_id, since) if opened is not None else dep.backends.events
        return PreemptionTap(inner, preemptions)

    def make_fleet(slots: int, idle_timeout: float | None) -> Fleet:
        return FallbackFleet(
            spot=group_fleet(made[0].group),
            standard=group_fleet(made[1].group),
            preemptions=preemptions,
            policy=FallbackPolicy(after_preemptions=options.fallback_after),
            clock=SYSTEM_CLOCK,
        )

    dep.open_run_events = open_run_events
    dep.make_fleet = make_fleet
    return made


def fallback_line(fleet: Fleet, store: Any, run_id: str, machine_type: str) -> str | None:
    """The summary line of a run's fallback: shards on standard VMs and what they cost."""
    if not isinstance(fleet, FallbackFleet):
        return None
    winners: dict[str, str] = {}
    if fleet.active:  # who committed each shard: only worth reading when standard VMs ran
        for shard in runs.committed(store, run_id):
            result = ShardResult.from_json(store.get(Layout.result(run_id, shard)))
            winners[shard] = result.worker
    spot_seconds, standard_seconds = fleet.vm_seconds()
    summary = fleet.summary(
        winners=winners,
        spot_seconds=spot_seconds,
        standard_seconds=standard_seconds,
        machine_type=machine_type,
    )
    return summary.line()


def _spot(shape: Shape) -> Shape:
    return Shape(shape.machine_type, "spot", shape.gpu_type, shape.gpu_count, shape.disk_gb)
