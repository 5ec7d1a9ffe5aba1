"""The ``--halt`` rule, judged alike on the runner and on every worker.

:class:`HaltRule` is the rule as a run records it (``same,fail=N``, ``now,fail=N`` or
``never``); :class:`HaltTally` counts one round's ended attempts against it. ``same,fail=N``
compares failure reasons as :func:`masked_reason` has them: what varies from shard to shard in
one error (paths, ids, times, numbers) masked, so a task that fails alike on every shard is seen
as failing with one reason.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from worker.errors import ConfigError
from worker.ledger import CANCELLED
from worker.protocol import Manifest

log = logging.getLogger("cflow.worker")

DEFAULT_HALT = "same,fail=3"


@dataclass(frozen=True)
class HaltRule:
    """When to stop a run early (``--halt``), judged on the attempts of one round:

    - ``same,fail=N``: the first N attempts to finish all failed with the same reason, and
      none succeeded before them. One success disarms it.
    - ``now,fail=N``: N attempts failed, whatever their reasons.
    - ``never``.
    """

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


# What varies from shard to shard in one error, masked so that ``same,fail=N`` sees one error
# where the task fails alike on every shard. Applied in this order: a quoted string that looks
# like a path or a file name as a whole, then unquoted paths and URLs, ids, times and numbers.
# A short quoted name that is no path (``KeyError: 'price'``) stays as it is.
_QUOTED = re.compile(r"""(?<!\w)(?:'([^'\n]*)'|"([^"\n]*)")""")
_FILE_NAME = re.compile(r"[^\s/\\]*[^\s/\\.]\.[A-Za-z][A-Za-z0-9]{0,4}")
_END = r"[^\s'\"<>()\[\]{},;:]*[^\s'\"<>()\[\]{},;:.]"  # a path's last character
_MASKS = [
    (re.compile(r"\b[A-Za-z][\w+.-]*://" + _END), "<path>"),  # gs://b/x, https://h/x
    (re.compile(r"(?<![\w.<>/])(?:~|\.{1,2})?/" + _END), "<path>"),  # /x, ./x, ../x, ~/x
    (re.compile(r"\b[A-Za-z]:\\" + _END), "<path>"),  # C:\x
    (re.compile(r"(?<![\w<>])[\w.-]+(?:/[\w.-]+)+/?"), "<path>"),  # data/x.csv
    (re.compile(r"\b[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}\b"), "<uuid>"),
    (re.compile(r"\br\d{8}-\d{6}-[0-9a-f]{6}\b"), "<run>"),  # a run id
    (re.compile(r"(?<![\w<>])[\w.-]+-[0-9a-f]{8}\b"), "<shard>"),  # an input's shard id
    (
        re.compile(
            r"\b\d{4}-\d\d-\d\d(?:[T ]\d\d:\d\d(?::\d\d(?:[.,]\d+)?)?"
            r"(?:Z|[+-]\d\d:?\d\d)?)?\b|\b\d\d?:\d\d:\d\d(?:[.,]\d+)?\b"
        ),
        "<time>",
    ),
    (re.compile(r"\b0[xX][0-9a-fA-F]+\b"), "<hex>"),  # an address: <Model at 0x7f3a...>
    (re.compile(r"\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{6,}\b"), "<id>"),
    (re.compile(r"(?<!\w)\d+(?:[.,]\d+)*"), "<n>"),  # part-00017, line 4, 512MB, 2.5s
]


def _quoted(match: re.Match[str]) -> str:
    text = match.group(1) if match.group(1) is not None else match.group(2)
    path = "/" in text or "\\" in text or text.startswith("~") or _FILE_NAME.fullmatch(text)
    return "'<path>'" if path else match.group(0)


def masked_reason(reason: str) -> str:
    """``reason`` with what varies between shards failing alike masked: paths (quoted or not)
    and URLs, quoted file names, UUIDs, run and shard ids, timestamps, hex ids and addresses,
    and numbers; whitespace runs become one space. Quoted strings that are no path or file
    name (``KeyError: 'price'``) and words with digits (``col1``) are kept, so two different
    errors stay two. What ``same,fail=N`` compares, on the runner and on every worker."""
    text = _QUOTED.sub(_quoted, " ".join(reason.split()))
    for pattern, mask in _MASKS:
        text = pattern.sub(mask, text)
    return text


def same_reason(reasons: list[str]) -> bool:
    """Whether the reasons are one reason but for their paths, numbers and ids."""
    return len({masked_reason(reason) for reason in reasons}) <= 1


@dataclass
class HaltTally:
    """The ended attempts of one round, as its :class:`HaltRule` judges them."""

    rule: HaltRule
    failures: list[str] = field(default_factory=list)  # reasons of failed attempts, in order
    succeeded: int = 0
    verdict: str | None = None

    @property
    def decided(self) -> bool:
        """Nothing more can change the verdict: it is given, or the rule can no longer be met."""
        if self.verdict is not None or self.rule.mode == "never":
            return True
        return self.rule.mode == "same" and (
            self.succeeded > 0 or len(self.failures) >= self.rule.fail
        )

    def wants(self, success: bool) -> bool:
        """Whether an attempt that ended so could still move the verdict."""
        return not self.decided and (not success or self.rule.mode == "same")

    def success(self) -> None:
        if self.wants(True):
            self.succeeded += 1

    def failure(self, reason: str | None, exit_code: int | None = None) -> str | None:
        """Count a failed attempt; returns the halt note when this failure meets the rule. An
        attempt stopped because its run was cancelled is not a failure of the task."""
        fallback = "failed" if exit_code is None else f"exited with code {exit_code}"
        reason = (reason or fallback).strip()
        if reason == CANCELLED or not self.wants(False):
            return None
        self.failures.append(reason)
        n = self.rule.fail
        if self.rule.mode == "now" and len(self.failures) >= n:
            self.verdict = (
                f"{len(self.failures)} attempts failed (--halt {self.rule}); last: {reason}"
            )
        elif self.rule.mode == "same" and len(self.failures) == n and same_reason(self.failures):
            example = self.failures[0]  # as the task gave it, never its masked form
            alike = any(other != example for other in self.failures)
            self.verdict = f"the first {n} attempts all failed with: {example}" + (
                " (the others alike but for their paths, numbers or ids)" if alike else ""
            )
        return self.verdict


def run_rule(manifest: Manifest) -> HaltRule:
    """The halt rule recorded in a run's options (``never`` where none is recorded)."""
    text = manifest.run_options.halt
    try:
        return HaltRule.parse(text) if text else HaltRule("never")
    except ConfigError:
        log.warning(
            "run %s records no usable --halt rule (%r); not judged here", manifest.run_id, text
        )
        return HaltRule("never")
