"""A run's machine shape and fallback, applied to the deployment the runner opened for it.

``submit`` calls :func:`runner.backends.gcp.shapes.model.check_shape_options` before anything
is published (bad options, shapes the zone lacks and quota the project lacks are refused with one
line), then :func:`apply_run_shape`, which points the deployment's work queue at the shape's
topic and its fleet at the shape's group (both made or reused by
:class:`runner.backends.gcp.shapes.groups.Shapes`) and, with ``--fallback standard``, at a
:class:`runner.backends.gcp.shapes.fallback.FallbackFleet` of the shape's Spot and standard groups,
fed by the run's preemption events. ``watch`` and ``retry`` do the same before they publish, so a
shaped run's shards always go to its shape's queue. A runner that resumes a run with fallback
(``runner watch``) counts the preempted attempts of its unsettled shards from their records, and
finds in ``runs/<run>/fallback.json`` whether and why the run already fell back, so it goes on
where the first runner was. The deployment's own group, topic and subscription are never changed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import TYPE_CHECKING, Any

from runner.backends.gcp.shapes.fallback import FallbackFleet, FallbackPolicy, PreemptionTap
from runner.backends.gcp.shapes.groups import Shapes
from runner.backends.gcp.shapes.model import (
    Shape,
    ShapedGroup,
    check_shape_options,
    needs_groups,
    run_shapes,
)
from runner.engine import runs
from runner.engine.deployment import Deployment
from runner.engine.fleet import Fleet
from worker.clock import SYSTEM_CLOCK
from worker.errors import NotFound
from worker.protocol import AttemptState, AttemptStatus, Layout, RunOptions, ShardResult
from worker.queue import EventBus

if TYPE_CHECKING:
    from runner.backends.gcp.shapes.queues import Mover

log = logging.getLogger("cflow.runner")


def open_shapes(dep: Deployment) -> Shapes:
    """The deployment's :class:`Shapes`, with its shapes' work queues (the caller closes it;
    the queues' clients close with ``dep``)."""
    from runner.backends.gcp.shapes.queues import (
        ShapeQueues,  # the cloud clients: only for cloud runs
    )

    cfg = dep.config
    queues = ShapeQueues(
        project=_required(cfg.project),
        work_topic=_required(cfg.work_topic),
        work_subscription=_required(cfg.work_subscription),
        subscriber=getattr(dep.backends.queue, "subscriber", None),
    )
    dep.closers.append(queues.close)
    return Shapes(
        project=_required(cfg.project),
        group=_required(cfg.group),
        zone=cfg.zone,
        region=cfg.region,
        queues=queues,
        gpu_image=getattr(cfg, "gpu_image", None),
        container_image=getattr(cfg, "container_image", None),
    )


def apply_run_shape(dep: Deployment, options: RunOptions) -> list[ShapedGroup]:
    """Make (or reuse) the run's groups and queues; point ``dep``'s queue, fleet and events at
    them.

    ``dep`` is a :class:`runner.engine.deployment.Deployment` on Google Cloud (zonal or regional).
    Its work queue is replaced by one that publishes on the shape's topic (and, with a
    fallback, names the standard shape's topic in every message); with a fallback, the run's
    events (opened once the run exists) come with a mover of its queued shards. Returns the
    groups used, the Spot one first.
    """
    shape = check_shape_options(options)
    if not needs_groups(options):
        return []
    subscriber = getattr(dep.backends.queue, "subscriber", None)
    shapes = open_shapes(dep)
    try:
        spot = shape if shape.provisioning or not options.fallback else _spot(shape)
        made = [shapes.ensure(spot)]
        if options.fallback:
            made.append(shapes.ensure(shape.standard()))
    finally:
        shapes.close()
    _publish_on_shape(dep, made, options, subscriber)
    if options.fallback:
        _fall_back(dep, made, options, subscriber)
    else:
        store = dep.backends.store
        dep.make_fleet = lambda slots, idle_timeout: _group_fleet(dep, store, made[0].group)
    return made


def _publish_on_shape(
    dep: Deployment, made: list[ShapedGroup], options: RunOptions, subscriber: Any
) -> None:
    """Replace ``dep``'s work queue by one on the shape's topic (naming the standard shape's
    topic in every message, with a fallback)."""
    from runner.backends.gcp.shapes.queues import ShapeWorkQueue  # the cloud clients

    cfg = dep.config
    queue = dep.backends.queue
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


def _group_fleet(dep: Deployment, store: Any, group: str) -> Fleet:
    from runner.backends.gcp.fleet import GceFleet  # the Compute client: only for cloud runs

    cfg = dep.config
    return GceFleet(
        project=_required(cfg.project),
        group=group,
        zone=cfg.zone,
        region=cfg.region,
        clock=SYSTEM_CLOCK,
        store=store,
    )


def _fall_back(
    dep: Deployment, made: list[ShapedGroup], options: RunOptions, subscriber: Any
) -> None:
    """Point ``dep``'s fleet at a :class:`FallbackFleet` of the Spot and standard groups, and
    its run events at a tap of preemptions, with a mover of each run's queued shards."""
    from runner.backends.gcp.shapes.queues import Mover  # the cloud clients

    project, store = _required(dep.config.project), dep.backends.store
    preemptions: dict[str, int] = {}
    idle: set[str] = set()
    opened = dep.open_run_events
    movers: dict[str, Mover] = {}
    watched: list[str] = []  # the runs whose events were opened: the one this runner watches
    attempts: dict[str, set[int]] = {}  # shard -> its preempted attempts
    policy = FallbackPolicy(
        after_preemptions=options.fallback_after,
        on_start=lambda reason: _record_fallback(store, watched, reason),
    )

    def open_run_events(run: str, since: float | None) -> EventBus:
        inner = opened(run, since) if opened is not None else dep.backends.events
        tap = PreemptionTap(inner, preemptions, idle, attempts)
        if run not in watched:  # what happened before this runner watched the run
            watched.append(run)
            if (reason := _recorded_fallback(store, run)) is not None:
                policy.resume(SYSTEM_CLOCK.monotonic(), reason)
            for shard, attempt in _preempted_attempts(store, run):
                tap.count(shard, attempt)
        if run not in movers and made[1].queue is not None:
            movers[run] = Mover(
                project=project,
                run_id=run,
                subscription=made[0].queue.subscription,  # type: ignore[union-attr]
                to_topic=made[1].queue.topic,
                from_topic=made[0].queue.topic,  # type: ignore[union-attr]
                subscriber=subscriber,
            )
            dep.closers.append(movers[run].close)
        return tap

    def make_fleet(slots: int, idle_timeout: float | None) -> Fleet:
        return FallbackFleet(
            spot=_group_fleet(dep, store, made[0].group),
            standard=_group_fleet(dep, store, made[1].group),
            preemptions=preemptions,
            policy=policy,
            clock=SYSTEM_CLOCK,
            move=lambda: sum(m() for m in movers.values()),
            idle=idle,
        )

    dep.open_run_events = open_run_events
    dep.make_fleet = make_fleet


def _fallback_key(run_id: str) -> str:
    return f"{Layout.run_prefix(run_id)}fallback.json"


def _record_fallback(store: Any, run_ids: list[str], reason: str) -> None:
    """Keep why the run fell back in the store, for a runner that resumes it."""
    for run_id in run_ids:
        try:
            store.put(_fallback_key(run_id), json.dumps({"reason": reason}).encode())
        except Exception as exc:  # the fallback goes on; only a resumed runner would miss it
            log.warning("could not record the fallback of run %s: %s", run_id, exc)


def _recorded_fallback(store: Any, run_id: str) -> str | None:
    """Why the run fell back before this runner watched it, if it did."""
    try:
        reason = json.loads(store.get(_fallback_key(run_id)))["reason"]
    except NotFound:
        return None
    return str(reason)


def _preempted_attempts(store: Any, run_id: str) -> list[tuple[str, int]]:
    """The preempted attempts of the run's shards not settled yet, from their records: a runner
    that resumes a run counts them as its first runner did from the events."""
    keys = list(store.list(Layout.shards_prefix(run_id)))
    settled = {k.split("/")[3] for k in keys if k.endswith(("/result.json", "/failed.json"))}
    wanted = [k for k in keys if k.endswith("/status.json") and k.split("/")[3] not in settled]
    found = []
    for raw in store.get_many(wanted).values():
        status = AttemptStatus.from_json(raw)
        if status.state == AttemptState.PREEMPTED.value:
            found.append((status.shard_id, status.attempt))
    return found


def run_group_fleets(dep: Deployment, options: RunOptions) -> list[Fleet]:
    """The fleets of a shaped run's groups as submitted (nothing is made); [] for a run with
    no shape, or whose groups are gone."""
    if not needs_groups(options):
        return []
    from runner.backends.gcp.fleet import GceFleet  # the Compute client: only for cloud runs

    cfg = dep.config
    shapes = Shapes(
        project=_required(cfg.project),
        group=_required(cfg.group),
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
        fleet = GceFleet(
            project=_required(cfg.project), group=name, zone=cfg.zone, region=cfg.region
        )
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


def _required(value: str | None) -> str:
    """A deployment field every Google Cloud configuration has (``runner.config.REQUIRED_FOR_GCP``,
    checked when it is loaded)."""
    assert value, "a Google Cloud deployment field is missing"
    return value


def _spot(shape: Shape) -> Shape:
    return dataclasses.replace(shape, provisioning="spot")
