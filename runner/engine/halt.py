"""When to stop a run early: the ``--halt`` rule, judged from the workers' events.

A task that cannot start fails every attempt of every shard the same way; in the cloud each of
those attempts is paid VM time. The rule (:class:`~worker.agent.halt_rule.HaltRule`) is recorded in
the run's options and judged in two places: here, by the runner watching the run, on the events
of every worker as they arrive; and by each worker on its own attempts
(:mod:`worker.agent.runbook`), so it holds with no runner attached (``--detach``, Ctrl-C).

- ``same,fail=N`` (the default, N = 3): halt when the first N attempts to finish all failed
  with the same reason (no attempt succeeded before them). One success disarms it. Reasons are
  compared as :func:`~worker.agent.halt_rule.masked_reason` has them, with what varies from shard
  to shard masked (paths, file names, numbers, ids, times), so a wrong path that names each
  shard's own file is one reason; the halt note shows the first of them as the task gave it.
- ``now,fail=N``: halt as soon as N attempts have failed, whatever their reasons (like GNU
  parallel's ``--halt now,fail=N``, counting attempts rather than jobs).
- ``never``: never halt.

The rule judges one *round* of the run: the run as submitted, then each ``runner retry``. A
retry starts afresh, judged on the attempts that ended after it and ran its bundle: a fixed
task is never halted for the failures of the code it replaced, and a retry of the same code
gets N new attempts before the rule can stop it again.

Halting cancels the run (queued shards dropped, running attempts stopped) and records why in the
manifest's ``halted`` note. Attempts stopped by a cancel, and preemptions, never count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from worker.agent.halt_rule import DEFAULT_HALT, HaltRule, HaltTally
from worker.errors import CFlowError
from worker.protocol import AttemptStatus, Event, EventKind, Layout, Manifest
from worker.store import Store

BundleOf = Callable[[Event], str | None]  # the bundle an ended attempt ran (None: not known)
_ENDED = {k.value for k in (EventKind.SUCCEEDED, EventKind.FAILED, EventKind.RETRYING)}


def round_rule(manifest: Manifest, given: str | None) -> HaltRule:
    """The rule to watch a run by: ``given`` (``--halt``), else the one the run records, else
    the default. Raises ConfigError for a rule that is not one."""
    return HaltRule.parse(given or manifest.run_options.halt or DEFAULT_HALT)


@dataclass
class HaltJudge:
    """Feed it events; :attr:`verdict` becomes the halt note once the rule is met.

    ``since`` (epoch seconds): attempts that ended before it belong to an earlier round and are
    not judged. ``bundle``: the round's bundle; with ``bundle_of``, an attempt that ran another
    (one left running from before a retry with a new task) is not judged either.
    """

    rule: HaltRule
    run_id: str
    since: float | None = None
    bundle: str | None = None
    bundle_of: BundleOf | None = None
    tally: HaltTally = field(init=False)

    def __post_init__(self) -> None:
        self.tally = HaltTally(self.rule)

    @classmethod
    def for_round(cls, rule: HaltRule, manifest: Manifest, store: Store) -> HaltJudge:
        """A judge of the run's current round (the run as submitted, or its last retry)."""
        if not manifest.bundles:
            return cls(rule, manifest.run_id)
        since = float(manifest.bundles[-1]["at"])
        if len(manifest.bundles) < 2 or manifest.bundles[-2]["sha256"] == manifest.bundle:
            return cls(rule, manifest.run_id, since=since)  # the same code as the round before
        return cls(
            rule,
            manifest.run_id,
            since=since,
            bundle=manifest.bundle,
            bundle_of=lambda event: attempt_bundle(store, event),
        )

    @property
    def verdict(self) -> str | None:
        return self.tally.verdict

    def saw(self, event: Event) -> str | None:
        """Take one event; returns the halt note when this event meets the rule."""
        if event.run_id != self.run_id or event.kind not in _ENDED:
            return None
        success = event.kind == EventKind.SUCCEEDED.value
        if not self.tally.wants(success) or not self._of_this_round(event):
            return None
        if success:
            self.tally.success()
            return None
        return self.tally.failure(event.detail, event.exit_code)

    def _of_this_round(self, event: Event) -> bool:
        if self.since is not None and event.at < self.since:
            return False
        if self.bundle is None or self.bundle_of is None:
            return True
        ran = self.bundle_of(event)
        return ran is None or ran == self.bundle


def attempt_bundle(store: Store, event: Event) -> str | None:
    """The bundle the attempt of an event ran, from its ``status.json`` (written when it was
    claimed, before any of its events); None where that cannot be read."""
    if event.run_id is None or event.shard_id is None or event.attempt is None:
        return None
    try:
        raw = store.get(Layout.status(event.run_id, event.shard_id, event.attempt))
        return AttemptStatus.from_json(raw).bundle
    except (CFlowError, ValueError, TypeError, KeyError):
        return None
