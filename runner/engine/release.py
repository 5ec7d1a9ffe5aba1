"""Which workers one run's runner may delete, and deleting them.

Workers are shared by every run of a deployment, and a runner never deletes one it does not
know to work for no other run: the scale policy (:func:`runner.engine.policy.decide_scale`)
names candidates, :class:`Release` checks them against what the fleet's lease records or the
workers' own words say, deletes, and drains the fleet after the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from runner.engine.asks import Asks
from runner.engine.fleet import Fleet, Instance
from runner.engine.run_view import IDLE_SETTLE, RunView
from worker.clock import Clock

log = logging.getLogger("cflow.runner")


@runtime_checkable
class LeaseRecords(Protocol):
    """A fleet that knows which runs each worker holds live leases of (the local one: the
    queue keeps its lease records). What it says is the truth about who works; other fleets'
    workers are known busy by their events."""

    def lease_runs(self) -> dict[str, set[str]]:
        """Worker -> the runs whose shards it holds live leases of."""
        ...

    def fence(self, names: Iterable[str], allowed: set[str]) -> list[str]:
        """Of these workers, those holding leases of ``allowed`` runs only, now fenced: they
        take no more work, in the same step as the look, so none is stopped with a shard it
        took after the look."""
        ...


@dataclass
class Release:
    """Which workers one run's runner may delete, and deleting them.

    While work remains only idle workers go (:func:`decide_scale`); once the run is over, every
    worker known to work for no other run (:meth:`free`). Where the fleet keeps lease records
    (:class:`LeaseRecords`) they are the truth, checked as each delete fences its workers; elsewhere
    the workers' own words across runs tell (:meth:`RunView.free`), an idle word standing only
    once ``settle`` seconds passed with nothing else from its worker.
    """

    view: RunView
    run_id: str
    clock: Clock
    silence: float  # a worker unheard this long works for no run
    settle: float = IDLE_SETTLE
    boot: float = float("inf")  # one never heard this long never started (Hearing.mute)
    deleted: set[str] = field(default_factory=set)  # instances deleted here, still listed
    # Instances never heard from, at the last drain: the seconds before each is taken for silent.
    unheard: dict[str, float] = field(default_factory=dict)
    say: Callable[[str], None] | None = None  # what the drain waits for (None: the log)
    # Reads the run's own records: the workers holding an attempt of it that never ended
    # (:func:`runner.engine.lost.attempt_holders`); None: no records (none is such a holder).
    records: Callable[[], set[str]] | None = None
    # Who asked for the VMs still starting (None: the fleet's instances are never listed
    # starting for long, so no other run's runner takes one for spare).
    asks: Asks | None = None

    def __post_init__(self) -> None:
        self._holders: set[str] | None = None

    def lease_runs(self, fleet: Fleet) -> dict[str, set[str]] | None:
        """Who holds leases of which runs, where the fleet knows (None: it does not)."""
        return fleet.lease_runs() if isinstance(fleet, LeaseRecords) else None

    def known(self, fleet: Fleet, instances: list[Instance], *, over: bool) -> set[str]:
        """The workers the scale policy may take for idle: while work remains, those whose
        idle word stands (where lease records are kept, deleting checks them: :meth:`delete`);
        once the run is over, every one :meth:`free`."""
        if over:
            return self.free(instances, self.lease_runs(fleet))
        if isinstance(fleet, LeaseRecords):
            return self.view.idle
        return self.view.idle_for(self.clock.monotonic(), self.settle)

    def quiet(self, fleet: Fleet, *, told: bool) -> set[str]:
        """Workers silent past a lease and a heartbeat, their last word not idle, or running
        before this runner started and never heard from (one frozen while the runner was down):
        no capacity, like the stale ones (:meth:`RunView.quiet`). Trusted only where a worker's
        silence is ``told`` (heartbeats are sent); where the fleet keeps lease records those
        tell who is stale."""
        if isinstance(fleet, LeaseRecords) or not told:
            return set()
        return self.view.quiet(self.clock.monotonic(), self.silence, self.boot)

    def free(self, instances: list[Instance], held: dict[str, set[str]] | None) -> set[str]:
        """Workers this runner may delete now that its run is over: known to work for no other
        run (by the lease records where the fleet keeps them, else by what they said)."""
        if held is not None:
            return {i.name for i in instances if held.get(i.name, set()) <= {self.run_id}}
        now = self.clock.monotonic()
        unheard = {n for n in self.view.silent(now, self.silence) if not self.view.heard(n)}
        holders = self.holders() if unheard else set()
        return self.view.free(now, self.silence, self.settle, holders, self.boot)

    def holders(self) -> set[str]:
        """The workers the run's own records name as holding an attempt of it that never
        ended, read once: asked only once the run is over, when no attempt of it starts."""
        if self._holders is None:
            self._holders = self.records() if self.records is not None else set()
        return self._holders

    def spoken_for(self, instances: list[Instance], names: Iterable[str]) -> set[str]:
        """Of these names, the instances another run's runner asked for, booting or not yet at
        work: that runner waits for them, and deletes them if it needs them no more
        (:mod:`runner.engine.asks`). One that will never work is not spoken for."""
        if self.asks is None:
            return set()
        wanted = set(names)
        return self.asks.elsewhere(
            i.name for i in instances if i.name in wanted and not (i.error or i.removable)
        )

    def elsewhere(self, held: dict[str, set[str]] | None) -> set[str]:
        """Workers known busy with another run."""
        others = self.view.busy_elsewhere()
        if held is not None:
            others |= {w for w, held_runs in held.items() if held_runs - {self.run_id}}
        return others

    def delete(self, fleet: Fleet, names: list[str], *, mine: bool = False) -> None:
        """Delete these workers, except where the lease records say one holds work of another
        run (or, unless ``mine``, of this one): the records are the truth, events are late.
        Those deleted are fenced as they are looked at (:meth:`LeaseRecords.fence`): one that
        just took a shard is kept, and none takes one between the look and its stop."""
        if isinstance(fleet, LeaseRecords):
            names = fleet.fence(names, {self.run_id} if mine else set())
        if not names:
            return
        log.info("scaling down: deleting idle %s", ", ".join(names))
        fleet.delete(names)
        self.view.idle.difference_update(names)
        self.deleted.update(names)

    def wait(self, fleet: Fleet, listen: Callable[[], None], timeout: float, pace: float) -> bool:
        """After the run: ``listen`` (take the events) and :meth:`drain`, every ``pace``
        seconds (or as soon as an idle word stands), until nothing is waited for. False when
        time ran out first: the workers still unknown are left to their idle timeout.

        An instance never heard from is not given up on while it may still speak: the wait
        lasts until it is silent past the bound (then deleted, and given ``timeout`` to go),
        whatever ``timeout`` says, and says so once."""
        deadline = self.clock.monotonic() + timeout
        told: set[str] = set()
        while True:
            listen()
            if not self.drain(fleet):
                return True
            now = self.clock.monotonic()
            if self.unheard:
                told |= self._tell_unheard(told, overdue=now >= deadline)
                deadline = max(deadline, now + max(self.unheard.values()) + timeout)
            if now >= deadline:
                return False
            settles = self.view.settles_in(now, self.settle)
            pause = min(pace, max(settles, 0.0), deadline - now)
            # Locally the look after a worker exits comes at once, not a pace later: a short
            # run's runner returned a pace after its workers were gone.
            if not fleet.wait_for_an_exit(pause):
                self.clock.sleep(pause)

    def _tell_unheard(self, told: set[str], *, overdue: bool) -> set[str]:
        """Say which never-heard instances the drain waits for, each once: when it has been
        unheard for half the bound (a working worker has spoken several times by then, even
        through a slow event stream), or once the drain is past its usual time; those said."""
        holders = self.holders()  # only those are deleted at the bound: the others, not said
        new = sorted(
            n
            for n, left in self.unheard.items()
            if n in holders and n not in told and (overdue or left <= self.silence / 2)
        )
        if new:
            most = max(self.unheard[n] for n in new)
            (self.say or log.warning)(
                f"waiting up to {most:.0f}s for {', '.join(new)}, not heard from since this"
                " runner started: deleted as frozen then, unless heard from"
            )
        return set(new)

    def drain(self, fleet: Fleet) -> list[str]:
        """One look at the fleet after the run: delete the workers now known free (and any
        that will never work); the instances still waited for: those deleted, until they are
        gone (or, in a fleet whose deleted instances go by themselves, listed stopping); those
        that worked for this run and have not said what they do now (not known busy with
        another run); and those running and never heard from, until they speak or are silent
        past the bound (:meth:`RunView.unheard`: frozen before this runner started, say, when
        it resumed), then deleted only if the run's own records name them holding one of its
        attempts (:meth:`free`). One still booting is deleted (it works for no run). Neither
        goes if another run asked for it (:meth:`spoken_for`).
        """
        now = self.clock.monotonic()
        instances = fleet.instances()
        self.view.listed(instances, now)
        self.deleted &= {i.name for i in instances}  # a name seen again later is a new worker
        held = self.lease_runs(fleet)
        free = self.free(instances, held)
        going = [
            i.name
            for i in instances
            if i.status != "stopping"
            and i.name not in self.deleted
            and (i.name in free or i.status == "starting" or i.error or i.removable)
        ]
        theirs = self.spoken_for(instances, going)
        self.delete(fleet, [n for n in going if n not in theirs], mine=True)
        elsewhere = self.elsewhere(held) | theirs  # another run's runner answers for these
        # Where lease records say who works, a worker that holds none is known free already.
        # A never-heard one is waited for until it speaks (then its word tells) or is silent
        # past the bound: deleted then only if the run's records name it (:meth:`free`).
        unheard = self.view.unheard(now, self.silence) if held is None else {}
        self.unheard = {n: left for n, left in unheard.items() if n not in self.deleted | elsewhere}
        return [
            i.name
            for i in instances
            if not self._going(fleet, i)
            and (
                i.name in self.deleted
                or i.name in self.unheard
                or (self.view.heard(i.name) and i.name not in elsewhere)
            )
        ]

    def _going(self, fleet: Fleet, instance: Instance) -> bool:
        """Deleted by this runner and listed stopping in a fleet whose instances then go by
        themselves (a managed group's VMs): nothing more to wait for."""
        return (
            fleet.deletes_by_itself
            and instance.status == "stopping"
            and instance.name in self.deleted
        )
