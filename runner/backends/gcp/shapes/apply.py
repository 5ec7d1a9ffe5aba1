"""A run's machine shape and fallback, applied to the deployment the runner opened for it.

``submit`` calls :func:`check_shape_options` before anything is published (bad options, shapes
the zone lacks and quota the project lacks are refused with one line), then
:func:`apply_run_shape`, which points the deployment's work queue at the shape's topic and its
fleet at the shape's group (both made or reused by
:class:`runner.backends.gcp.shapes.groups.Shapes`) and, with ``--fallback standard``, at a
:class:`runner.backends.gcp.shapes.fallback.FallbackFleet` of the shape's Spot and standard groups,
fed by the run's preemption events. ``watch`` and ``retry`` do the same before they publish, so a
shaped run's shards always go to its shape's queue. The deployment's own group, topic and
subscription are never changed.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from runner.backends.gcp.shapes.fallback import FallbackFleet, FallbackPolicy, PreemptionTap
from runner.backends.gcp.shapes.groups import Shape, ShapedGroup, ShapeError, Shapes
from runner.engine import runs
from runner.engine.fleet import Fleet
from worker.clock import SYSTEM_CLOCK
from worker.protocol import Layout, RunOptions, ShardResult
from worker.queue import EventBus

if TYPE_CHECKING:
    from runner.backends.gcp.shapes.queues import Mover

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


def needs_groups(options: RunOptions, *, cloud: bool = True) -> bool:
    """Whether the run needs groups of its own (a shape, a fallback or, on Google Cloud
    (``cloud``), an image: VMs with a container engine)."""
    shape = Shape.from_options(options, cloud=cloud)
    return not shape.is_default or options.fallback is not None


def open_shapes(dep: Any) -> Shapes:
    """The deployment's :class:`Shapes`, with its shapes' work queues (the caller closes it;
    the queues' clients close with ``dep``)."""
    from runner.backends.gcp.shapes.queues import (
        ShapeQueues,  # the cloud clients: only for cloud runs
    )

    cfg = dep.config
    queues = ShapeQueues(
        project=cfg.project,
        work_topic=cfg.work_topic,
        work_subscription=cfg.work_subscription,
        subscriber=getattr(dep.backends.queue, "subscriber", None),
    )
    dep.closers.append(queues.close)
    return Shapes(
        project=cfg.project,
        group=cfg.group,
        zone=cfg.zone,
        region=cfg.region,
        queues=queues,
        gpu_image=getattr(cfg, "gpu_image", None),
        container_image=getattr(cfg, "container_image", None),
    )


def apply_run_shape(dep: Any, options: RunOptions) -> list[ShapedGroup]:
    """Make (or reuse) the run's groups and queues; point ``dep``'s queue, fleet and events at
    them.

    ``dep`` is a :class:`runner.backends.factory.Deployment` on Google Cloud (zonal or regional).
    Its work queue is replaced by one that publishes on the shape's topic (and, with a
    fallback, names the standard shape's topic in every message); with a fallback, the run's
    events (opened once the run exists) come with a mover of its queued shards. Returns the
    groups used, the Spot one first.
    """
    shape = check_shape_options(options)
    if not needs_groups(options):
        return []
    cfg = dep.config
    queue = dep.backends.queue
    subscriber = getattr(queue, "subscriber", None)
    shapes = open_shapes(dep)
    try:
        spot = shape if shape.provisioning or not options.fallback else _spot(shape)
        made = [shapes.ensure(spot)]
        if options.fallback:
            made.append(shapes.ensure(shape.standard()))
    finally:
        shapes.close()
    from runner.backends.gcp.fleet import GceFleet  # the Compute client: only for cloud runs
    from runner.backends.gcp.shapes.queues import Mover, ShapeWorkQueue

    store = dep.backends.store
    assert made[0].queue is not None
    fallback_topic = made[1].queue.topic if options.fallback and made[1].queue else None
    shaped_queue = ShapeWorkQueue(
        project=cfg.project,
        topic=made[0].queue.topic,
        dead_letter_subscription=cfg.dead_letter_subscription,
        subscriber=subscriber,
        fallback_topic=fallback_topic,
        fallback_after=options.fallback_after,
    )
    shaped_queue.before_publish = getattr(queue, "before_publish", None)
    queue.close()
    dep.backends.queue = shaped_queue

    def group_fleet(group: str) -> Fleet:
        return GceFleet(
            project=cfg.project,
            group=group,
            zone=cfg.zone,
            region=cfg.region,
            clock=SYSTEM_CLOCK,
            store=store,
        )

    if not options.fallback:
        dep.make_fleet = lambda slots, idle_timeout: group_fleet(made[0].group)
        return made
    preemptions: dict[str, int] = {}
    idle: set[str] = set()
    opened = dep.open_run_events
    movers: dict[str, Mover] = {}

    def open_run_events(run: str, since: float | None) -> EventBus:
        inner = opened(run, since) if opened is not None else dep.backends.events
        if run not in movers and made[1].queue is not None:
            movers[run] = Mover(
                project=cfg.project,
                run_id=run,
                subscription=made[0].queue.subscription,  # type: ignore[union-attr]
                to_topic=made[1].queue.topic,
                subscriber=subscriber,
            )
            dep.closers.append(movers[run].close)
        return PreemptionTap(inner, preemptions, idle)

    def make_fleet(slots: int, idle_timeout: float | None) -> Fleet:
        return FallbackFleet(
            spot=group_fleet(made[0].group),
            standard=group_fleet(made[1].group),
            preemptions=preemptions,
            policy=FallbackPolicy(after_preemptions=options.fallback_after),
            clock=SYSTEM_CLOCK,
            move=lambda: sum(m() for m in movers.values()),
            idle=idle,
        )

    dep.open_run_events = open_run_events
    dep.make_fleet = make_fleet
    return made


def run_group_fleets(dep: Any, options: RunOptions) -> list[Fleet]:
    """The fleets of a shaped run's groups as submitted (nothing is made); [] for a run with
    no shape, or whose groups are gone."""
    if not needs_groups(options):
        return []
    from runner.backends.gcp.fleet import GceFleet  # the Compute client: only for cloud runs
    from runner.backends.gcp.shapes.cleanup import run_shapes

    cfg = dep.config
    shapes = Shapes(
        project=cfg.project,
        group=cfg.group,
        zone=cfg.zone,
        region=cfg.region,
        gpu_image=getattr(cfg, "gpu_image", None),  # a GPU shape's hash covers its image
        container_image=getattr(cfg, "container_image", None),  # and an --image run's its own
    )
    try:
        names = [f"{cfg.group}-{shapes.normalize(s)[1]}" for s in run_shapes(options)]
    finally:
        shapes.close()
    fleets: list[Fleet] = []
    for name in names:
        fleet = GceFleet(project=cfg.project, group=name, zone=cfg.zone, region=cfg.region)
        if fleet.exists():
            fleets.append(fleet)
        else:
            fleet.close()
    return fleets


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
    return dataclasses.replace(shape, provisioning="spot")
