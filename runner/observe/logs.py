"""``runner logs``: where each shard's log is, or one attempt's log, followed while it runs.

Nothing here prints: the log's bytes go to a ``write`` callback and notes on the wait to ``say``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from enum import StrEnum

from runner.engine import runs
from runner.engine.reports import ShardReport, iter_shard_reports
from worker.errors import CFlowError, ConfigError
from worker.protocol import Layout, Manifest, RunState
from worker.store import Store

FOLLOW_POLL = 1.0  # seconds between reads of a followed log
GONE_EVERY = 5  # polls between looks at whether a followed attempt's worker is gone
LOG_PIECE = 1 << 20  # bytes of a log read and handed on at a time


class LogEnd(StrEnum):
    """How reading a log ended."""

    READ = "read"  # to its end (a followed attempt's end)
    NEVER_RAN = "never-ran"  # the followed shard ended without running (the run was cancelled)
    WORKER_GONE = "worker-gone"  # the followed attempt's worker is gone: the attempt was lost


def where_logs(store: Store, manifest: Manifest) -> Iterator[str]:
    """``shard<TAB>state<TAB>log URL`` of each shard's latest attempt."""
    for r in iter_shard_reports(store, manifest):
        if r.attempts:
            key = Layout.log(manifest.run_id, r.id, r.attempts[-1].attempt)
            yield f"{r.id}\t{r.state.value}\t{store.url(key)}"


def find_shard(store: Store, manifest: Manifest, shard: str) -> ShardReport:
    """The one shard with this id, or else the one whose id starts with it."""
    reports = list(iter_shard_reports(store, manifest))
    matches = [r for r in reports if r.id == shard] or [
        r for r in reports if r.id.startswith(shard)
    ]
    if len(matches) != 1:
        what = "matches no shard" if not matches else f"matches {len(matches)} shards"
        raise ConfigError(
            f"--shard {shard!r} {what} of run {manifest.run_id};"
            f" `runner status {manifest.run_id}` lists them"
        )
    return matches[0]


def read_log(
    store: Store,
    manifest: Manifest,
    shard: str,
    *,
    attempt: int | None,
    follow: bool,
    write: Callable[[bytes], None],
    say: Callable[[str], None],
    gone: Callable[[str, int], str | None] | None = None,
) -> LogEnd:
    """Hand one attempt's log (default: the latest) to ``write`` as it grows; ``say`` notes the
    wait for a queued shard and how a followed attempt ended.

    ``gone(shard, attempt)`` names the worker of a running attempt when that worker is gone
    (asked every few polls): following such an attempt stops instead of waiting forever.

    Raises:
        ConfigError: no such shard or attempt, or the shard has not started (without follow).
    """
    run_id = manifest.run_id
    report = find_shard(store, manifest, shard)
    numbers = [a.attempt for a in report.attempts]
    # A followed shard that has not started may be asked for its first attempt in advance.
    if attempt is not None and attempt not in numbers and not (follow and not numbers):
        have = ", ".join(map(str, numbers)) or "none yet"
        raise ConfigError(
            f"shard {report.id} has no attempt {attempt} (its attempts: {have})",
            run_id=run_id,
            shard_id=report.id,
        )
    if not numbers:
        if not follow:
            raise ConfigError(
                f"shard {report.id} has not started yet ({report.state.value}); `--follow` waits"
                " for it",
                run_id=run_id,
                shard_id=report.id,
            )
        say(f"shard {report.id} is {report.state.value}; waiting for it to start")
        number = _wait_for_start(store, run_id, report.id, attempt or 1)
        if number is None:
            say(f"shard {report.id} ended without running (the run was cancelled)")
            return LogEnd.NEVER_RAN
    else:
        number = attempt or numbers[-1]
    key = Layout.log(run_id, report.id, number)
    written = polls = 0
    while True:
        over = not follow or _attempt_over(store, run_id, report.id, number)
        lost = None
        if not over and gone is not None and polls % GONE_EVERY == 0:
            lost = gone(report.id, number)
        polls += 1
        while chunk := _read_at(store, key, written):  # what it added, a piece at a time
            write(chunk)
            written += len(chunk)
        if over:  # read once more after the end was seen, so the log's tail is never lost
            return LogEnd.READ
        if lost is not None:
            say(f"worker {lost} is gone; attempt {number} was lost")
            return LogEnd.WORKER_GONE
        time.sleep(FOLLOW_POLL)


def _read_at(store: Store, key: str, offset: int) -> bytes:
    """The log from ``offset``, up to :data:`LOG_PIECE` bytes (b"": nothing more yet): a log
    of gigabytes is shown with flat memory, as it was not (all of it read at every poll)."""
    try:
        return store.get_range(key, offset, LOG_PIECE)
    except CFlowError:
        return b""


def _wait_for_start(store: Store, run_id: str, shard_id: str, attempt: int) -> int | None:
    """Block until the shard's attempt claims its number; None if the run ends first."""
    status_key = Layout.status(run_id, shard_id, attempt)
    while True:
        if store.exists(status_key):
            return attempt
        manifest = runs.load_manifest(store, run_id)
        if manifest.state == RunState.CANCELLED.value or store.exists(
            Layout.result(run_id, shard_id)
        ):
            return None
        time.sleep(FOLLOW_POLL)


def _attempt_over(store: Store, run_id: str, shard_id: str, attempt: int) -> bool:
    if store.exists(Layout.result(run_id, shard_id)):
        return True
    try:
        state = json.loads(store.get(Layout.status(run_id, shard_id, attempt)))["state"]
    except (CFlowError, ValueError, KeyError, TypeError):
        return False
    return bool(state != "running")
