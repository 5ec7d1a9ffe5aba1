"""Every run of a store, and how ``runner runs`` states each one."""

from __future__ import annotations

from dataclasses import dataclass, field

from runner.engine.runs import parse_manifest
from worker.errors import NotFound
from worker.protocol import Manifest, RunState
from worker.store import Store

PUBLISH_STALE_SECONDS = 60.0  # a publisher silent this long is taken for dead (`runner runs`)


@dataclass
class RunListing:
    """Every run of a store: the readable manifests (oldest first) and the broken ones."""

    manifests: list[Manifest] = field(default_factory=list)
    broken: dict[str, str] = field(default_factory=dict)  # manifest URL -> what is wrong


def scan_runs(store: Store) -> RunListing:
    """Read every run's manifest; a broken one is reported, not skipped silently."""
    listing = RunListing()
    for key in store.list("runs/", suffix="/run.json"):
        if key.count("/") != 2:
            continue
        try:
            listing.manifests.append(parse_manifest(store.get(key)))
        except NotFound:
            continue
        except ValueError as exc:
            listing.broken[store.url(key)] = str(exc)
    listing.manifests.sort(key=lambda m: m.created_at)
    return listing


def list_runs(store: Store) -> list[Manifest]:
    return scan_runs(store).manifests


UNFINISHED = "active, all done"  # every shard committed, nobody watched it to its end


def shown_state(manifest: Manifest, now: float, committed: int | None = None) -> str:
    """A run's state as `runner runs` shows it: ``publishing`` while shards still go out,
    ``publishing (interrupted)`` once its publisher has been silent too long, and
    :data:`UNFINISHED` once its ``committed`` shards are all of them but no runner finished it
    (submitted ``--detach``, or its runner killed: `runner watch` combines and finishes it)."""
    active = manifest.state == RunState.ACTIVE.value
    if active and not manifest.publishing and (committed or 0) >= manifest.shard_count:
        return UNFINISHED
    if active and manifest.publishing:
        last = manifest.published_at or manifest.created_at
        if now - last > PUBLISH_STALE_SECONDS:
            return f"publishing (interrupted at {manifest.published}/{manifest.shard_count})"
        return f"publishing ({manifest.published}/{manifest.shard_count})"
    return manifest.state


def unfinished(run_id: str) -> str:
    """What to do about a run every shard of which committed while no runner watched it."""
    return (
        f"run {run_id} has every shard done but was never finished (nobody watched it to its"
        f" end): `runner watch {run_id}` combines its outputs and finishes it"
    )
