"""Lost shards: outstanding, yet nobody will ever run them.

A shard is lost when it has no result, no failure marker, no queue message and no live lease:
its message went with a crash, or someone deleted the queue's file. The watcher's reconcile
finds such shards and puts them on the queue again; a duplicate is harmless because the first
commit wins.

Where the queue can list a run's messages (the local backend, :meth:`WorkQueue.pending`), a
shard is lost when it is missing from the queue in two reconciles in a row while nothing of the
run waits in the queue (checked only then, so the check stays cheap; a lost shard matters when
the workers run out of work). Pub/Sub cannot list messages, so the rule there is conservative:
every worker sat idle, with nothing running and shards still outstanding, for longer than a
lease plus the subscription's longest retry backoff; then the outstanding shards are lost.
Either way each candidate's markers are read once more before it is re-enqueued.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from runner.engine import runs
from runner.engine.run_view import RunView
from worker.clock import Clock
from worker.protocol import (
    AttemptState,
    AttemptStatus,
    Layout,
    Manifest,
    RunState,
    ShardResult,
    WorkMessage,
)
from worker.queue import WorkQueue
from worker.store import Store

log = logging.getLogger("cflow.runner")

LOST_CHECK_MAX = 200  # candidates whose markers one reconcile reads (a GET each on GCS)
PUBSUB_MAX_BACKOFF = 300.0  # seconds: the work subscription's maximum retry backoff (infra)


@dataclass(frozen=True)
class Probe:
    """What the queue said, read before the store's markers (a shard settled after this
    look has its marker by the time the markers are read)."""

    pending: set[str] | None  # shards with a message; None where the queue cannot tell
    leases: dict[str, str] | None


class LostShards:
    """The lost-shard detector of one run's view (see the module docstring).

    ``silence`` is how long an attempt may go unheard before its lease is taken for lapsed
    (a lease plus a heartbeat period): the quiet rule waits that plus the longest backoff.
    """

    def __init__(
        self, view: RunView, queue: WorkQueue, store: Store, clock: Clock, *, silence: float
    ):
        self.view = view
        self.queue = queue
        self.store = store
        self.clock = clock
        self.silence = silence
        self.requeued = 0  # shards put on the queue again, over the detector's life
        self._suspects: set[str] = set()
        self._quiet_since: float | None = None
        self._ids: list[str] | None = None

    @property
    def run_id(self) -> str:
        return self.view.run_id

    def _outstanding(self) -> list[str]:
        if self._ids is None:  # read once; only when a check is due
            self._ids = [s.id for s in runs.iter_shards(self.store, self.run_id)]
        return self.view.outstanding(self._ids)

    def probe(self, manifest: Manifest, leases: dict[str, str] | None) -> Probe | None:
        """Look at the queue, if a check is due at all."""
        v = self.view
        if manifest.state != RunState.ACTIVE.value or manifest.publishing:
            return None  # publishing resumes first (runs.publish_rest); cancelled: nothing
        waiting = v.waiting(manifest.shard_count)
        if waiting <= 0 and not v.running:
            return None
        if waiting > LOST_CHECK_MAX and (v.running or not v.idle):
            return None  # by the events, plenty waits in the queue: no need to ask it yet
        stats = self.queue.stats(self.run_id)
        if stats.queued is None:
            return Probe(pending=None, leases=leases)
        if stats.queued > 0:
            return None  # workers have queued work: a lost shard can wait to be found
        return Probe(pending=self.queue.pending(self.run_id), leases=leases)

    def check(self, probe: Probe | None) -> list[str]:
        """After the markers were read: re-enqueue the shards found lost; their ids."""
        if probe is None:
            self._suspects.clear()
            self._quiet_since = None
            return []
        if probe.pending is not None:
            held = probe.pending | set(probe.leases or {})
            candidates = [s for s in self._outstanding() if s not in held]
        else:
            candidates = self._quiet_candidates()
        confirmed = self._confirm(candidates[:LOST_CHECK_MAX])
        if probe.pending is not None:  # seen missing twice in a row: not a passing state
            lost = [s for s in confirmed if s in self._suspects]
            self._suspects = set(confirmed) - set(lost)
        else:
            lost = confirmed
        if lost:
            self._requeue(lost)
        return lost

    def _quiet_candidates(self) -> list[str]:
        now = self.clock.monotonic()
        if self.view.running or not self.view.idle:
            self._quiet_since = None
            return []
        if self._quiet_since is None:
            self._quiet_since = now
        quiet = self.silence + PUBSUB_MAX_BACKOFF
        if now - self._quiet_since < quiet:
            return []
        self._quiet_since = now  # the next batch only after another quiet period
        return self._outstanding()

    def _confirm(self, candidates: list[str]) -> list[str]:
        """Read each candidate's markers: one that settled meanwhile is recorded, not lost."""
        out = []
        for shard_id in candidates:
            if self.store.exists(Layout.result(self.run_id, shard_id)):
                self.view.succeed(shard_id)
            elif self.store.exists(Layout.failure(self.run_id, shard_id)):
                self.view.fail(shard_id)
            else:
                out.append(shard_id)
        return out

    def _requeue(self, lost: list[str]) -> None:
        wanted = set(lost)
        shards = [s for s in runs.iter_shards(self.store, self.run_id) if s.id in wanted]
        log.warning(
            "%d shards of run %s had no queue message, lease or marker; queued again: %s",
            len(shards),
            self.run_id,
            ", ".join(sorted(wanted)[:5]) + (" ..." if len(wanted) > 5 else ""),
        )
        self.queue.publish(WorkMessage(run_id=self.run_id, shard=s.to_dict()) for s in shards)
        self.requeued += len(shards)


def attempt_holders(store: Store, run_id: str) -> set[str]:
    """Workers the run's own records name as running one of its attempts that never ended:
    its ``status.json`` still says running and it is not the attempt that committed (the
    winner's record is the shard's ``result.json``). Once the run is over, such a worker froze
    or died holding this run's work: this run's runner may delete it even if it never heard
    from it (a runner resumed with ``runner watch``). A worker named by no attempt of the run
    may be busy with another run whose events this runner missed: it is not this run's to judge.

    One listing of the run's records; the statuses read are those of shards not committed or
    committed after more than one attempt (a GET each on Cloud Storage).
    """
    statuses: dict[str, list[str]] = {}  # shard -> its attempts' status keys
    committed: set[str] = set()
    for key in store.list(Layout.shards_prefix(run_id), suffix=".json"):
        parts = Layout.parse_shard_key(key)
        if parts is None:
            continue
        _, shard_id, rest = parts
        if rest == "result.json":
            committed.add(shard_id)
        elif rest.startswith("attempts/") and rest.endswith("/status.json"):
            statuses.setdefault(shard_id, []).append(key)
    retried = [s for s in committed if len(statuses.get(s, ())) > 1]
    winners = {}
    for raw in store.get_many([Layout.result(run_id, s) for s in retried]).values():
        won = ShardResult.from_json(raw)
        winners[won.shard_id] = won.attempt
    wanted = [
        key
        for shard_id, keys in statuses.items()
        if shard_id not in committed or shard_id in winners
        for key in keys
    ]
    holders = set()
    for raw in store.get_many(wanted).values():
        status = AttemptStatus.from_json(raw)
        if status.state == AttemptState.RUNNING.value and winners.get(status.shard_id) != (
            status.attempt
        ):
            holders.add(status.worker)
    return holders
