"""One worker process on one simulated VM, stepping the project's :class:`worker.agent.agent.Agent`.

The pull loop mirrors ``Agent.run`` (a receive per free slot, an ``idle`` event once the queue
gives nothing, exit after the idle timeout); every attempt goes through the agent's own
``claim`` (drop or claim an attempt number, ``started`` event) and ``settle`` (commit first-wins,
ack, re-publish with one more failure or write ``failed.json``, nack on preemption). Only the task
itself is simulated: it runs for the drawn time, extending its lease every heartbeat as
``AttemptRunner.supervise`` does, and ends with the drawn exit code.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runner.sim.ledger import Fate
from runner.sim.workload import AttemptPlan
from runner.sim.world import World
from worker.agent.agent import Agent
from worker.agent.slot import Claim
from worker.protocol import AttemptState, Event, EventKind, Layout

SCRATCH = Path("/nonexistent/cflow-sim")  # simulated tasks write nothing; commits list no outputs


@dataclass
class _Task:
    claim: Claim
    start: float
    plan: AttemptPlan


class SimWorker:
    def __init__(
        self,
        world: World,
        name: str,
        vm: int,
        *,
        on_exit: Callable[[], None],
        on_crash: Callable[[], None],
    ):
        self.world = world
        self.name = name
        self.vm = vm  # the ledger's index of this VM incarnation
        self.agent = Agent(
            queue=world.queue,
            store=world.store,
            events=world.events,
            config=dataclasses.replace(world.agent, name=name, scratch=SCRATCH),
            clock=world.clock,
        )
        self.cfg = self.agent.config
        self._on_exit = on_exit
        self._on_crash = on_crash
        self._running: dict[int, _Task] = {}
        self._tokens = itertools.count()
        self._next_pull: float | None = None
        self._announced_idle = False
        self._last_active = world.clock.now
        self.alive = True

    @property
    def busy(self) -> bool:
        return bool(self._running)

    def start(self) -> None:
        self._wake()

    # -- the pull loop (Agent.run) -------------------------------------------------------------

    def _wake(self, delay: float = 0.0) -> None:
        when = self.world.clock.now + delay
        if self._next_pull is not None and self._next_pull <= when:
            return
        self._next_pull = when
        self.world.clock.at(when, lambda: self._pull_if_due(when))

    def _pull_if_due(self, when: float) -> None:
        if self._next_pull == when:
            self._next_pull = None
            self._pull()

    def _pull(self) -> None:
        if not self.alive:
            return
        free = self.cfg.slots - len(self._running)
        if free <= 0:
            return
        # Never block: waiting is modelled by the next scheduled pull (sleeping here would
        # re-enter the simulation).
        deliveries = self.world.queue.receive(free, 0.0)
        for delivery in deliveries:
            claim = self.agent.claim(delivery)
            if claim is not None:
                self._start(claim)
        now = self.world.clock.now
        if deliveries:
            self._announced_idle = False
            if len(self._running) < self.cfg.slots:
                self._wake()
            return
        if self._running:
            self._last_active = now
            self._wake(self.cfg.poll_seconds)
            return
        if not self._announced_idle:
            self._emit(EventKind.IDLE)
            self._announced_idle = True
        # Idle time counts from the last attempt's end (Agent.run counts it from the last
        # empty receive while busy, which with one slot is the worker's start).
        idle_for = now - self._last_active
        if self.cfg.idle_timeout is not None and idle_for >= self.cfg.idle_timeout:
            self.alive = False
            self._emit(EventKind.STOPPED, f"idle for {idle_for:.0f}s")
            self._on_exit()
            return
        self._wake(self.cfg.poll_seconds)

    # -- one attempt (AttemptRunner.supervise, then Agent.settle) ------------------------------

    def _start(self, claim: Claim) -> None:
        index = int(claim.delivery.message.shard["index"])
        task = _Task(claim, self.world.clock.now, self.world.shards.plan(index))
        token = next(self._tokens)
        self._running[token] = task
        timeout = claim.manifest.run_options.timeout
        clock = self.world.clock
        clock.after(min(task.plan.seconds, timeout), lambda: self._end(token))
        clock.after(self.cfg.heartbeat, lambda: self._beat(token))

    def _beat(self, token: int) -> None:
        task = self._running.get(token)
        if task is None or not self.alive:
            return
        self.world.queue.extend(task.claim.delivery, self.cfg.lease_seconds)
        self.world.clock.after(self.cfg.heartbeat, lambda: self._beat(token))

    def _end(self, token: int) -> None:
        if not self.alive or token not in self._running:
            return
        task = self._running.pop(token)
        claim, plan, now = task.claim, task.plan, self.world.clock.now
        if plan.crash:
            self._record(task, Fate.CRASHED)
            self._crash()
            return
        timeout = claim.manifest.run_options.timeout
        if plan.seconds > timeout:
            self.agent.settle(
                claim, AttemptState.FAILED, exit_code=-9, reason=f"timed out after {timeout:g}s"
            )
            fate = Fate.FAILED
        elif plan.exit_code:
            reason = f"exited with code {plan.exit_code}"
            self.agent.settle(claim, AttemptState.FAILED, exit_code=plan.exit_code, reason=reason)
            fate = Fate.FAILED
        else:
            key = Layout.result(claim.manifest.run_id, claim.delivery.message.shard_id)
            won_before = self.world.store.exists(key)
            self.agent.settle(claim, AttemptState.SUCCEEDED, exit_code=0)
            fate = Fate.DISCARDED if won_before else Fate.COMMITTED
        self._record(task, fate)
        self._last_active = now
        self._wake()

    def _record(self, task: _Task, fate: Fate) -> None:
        shard = task.claim.delivery.message.shard_id
        self.world.ledger.attempt(shard, self.vm, task.start, self.world.clock.now, fate)

    # -- the end of the process ----------------------------------------------------------------

    def terminate(self, *, clean: bool) -> None:
        """SIGTERM (preemption or delete): stop the tasks; a clean stop records them
        ``preempted`` and nacks them a few seconds later; otherwise their leases lapse."""
        if not self.alive:
            return
        self.alive = False
        clock, stop = self.world.clock, self.world.vm.stop_seconds
        for task in self._running.values():
            self._record(task, Fate.PREEMPTED if clean else Fate.LOST)
            if clean:
                clock.after(stop, _settler(self.agent, task.claim))
        self._running.clear()
        if clean:
            clock.after(stop, lambda: self._emit(EventKind.STOPPED, "stopped"))

    def _crash(self) -> None:
        for task in self._running.values():
            self._record(task, Fate.LOST)
        self._running.clear()
        self.alive = False
        self._on_crash()

    def _emit(self, kind: EventKind, detail: str | None = None) -> None:
        self.world.events.publish(Event(kind=kind.value, worker=self.name, detail=detail))


def _settler(agent: Agent, claim: Claim) -> Callable[[], None]:
    def settle() -> None:
        agent.settle(
            claim, AttemptState.PREEMPTED, exit_code=-15, reason="worker stopped (preemption)"
        )

    return settle
