"""When to stop a run early: the ``--halt`` rule, judged from the workers' events.

A task that cannot start fails every attempt of every shard the same way; in the cloud each of
those attempts is paid VM time. The rule watches finished attempts as the events arrive:

- ``same,fail=N`` (the default, N = 3): halt when the first N attempts of the run to finish all
  failed with the same reason (no attempt succeeded before them). One success disarms it.
- ``now,fail=N``: halt as soon as N attempts have failed, whatever their reasons (like GNU
  parallel's ``--halt now,fail=N``, counting attempts rather than jobs).
- ``never``: never halt.

Halting cancels the run (queued shards dropped, running attempts stopped) and records why in the
manifest's ``halted`` note. Attempts stopped by a cancel, and preemptions, never count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.errors import ConfigError
from worker.protocol import Event, EventKind

DEFAULT_HALT = "same,fail=3"
CANCELLED_REASON = "run cancelled"  # what an attempt stopped by a cancel records


@dataclass(frozen=True)
class HaltRule:
    mode: str  # "same", "now" or "never"
    fail: int = 0

    @classmethod
    def parse(cls, text: str) -> HaltRule:
        """``never``, ``same,fail=N`` or ``now,fail=N``; raises ConfigError naming the forms."""
        spec = text.strip().lower()
        if spec == "never":
            return cls("never")
        mode, _, rest = spec.partition(",")
        key, _, value = rest.partition("=")
        if mode in ("same", "now") and key == "fail" and value.isdigit() and int(value) >= 1:
            return cls(mode, int(value))
        raise ConfigError(
            f"--halt {text!r} is not a rule; use never, same,fail=N or now,fail=N (N >= 1)"
        )

    def __str__(self) -> str:
        return "never" if self.mode == "never" else f"{self.mode},fail={self.fail}"


@dataclass
class HaltJudge:
    """Feed it events; :attr:`verdict` becomes the halt note once the rule is met."""

    rule: HaltRule
    run_id: str
    failures: list[str] = field(default_factory=list)  # reasons of failed attempts, in order
    succeeded: int = 0
    verdict: str | None = None

    def saw(self, event: Event) -> str | None:
        """Take one event; returns the halt note when this event meets the rule."""
        if self.verdict is not None or self.rule.mode == "never" or event.run_id != self.run_id:
            return None
        kind = EventKind(event.kind)
        if kind is EventKind.SUCCEEDED:
            self.succeeded += 1
            return None
        if kind not in (EventKind.FAILED, EventKind.RETRYING):
            return None
        fallback = "failed" if event.exit_code is None else f"exited with code {event.exit_code}"
        reason = (event.detail or fallback).strip()
        if reason == CANCELLED_REASON:
            return None
        self.failures.append(reason)
        n = self.rule.fail
        if self.rule.mode == "now" and len(self.failures) >= n:
            self.verdict = (
                f"{len(self.failures)} attempts failed (--halt {self.rule}); last: {reason}"
            )
        elif (
            self.rule.mode == "same"
            and self.succeeded == 0
            and len(self.failures) == n
            and len(set(self.failures)) == 1
        ):
            self.verdict = f"the first {n} attempts all failed with: {reason}"
        return self.verdict
