"""The wire contract between the runner and the workers.

Vocabulary, used the same way in every module and backend:

- A **run** is one submission: a task bundle, a list of shards and options. Its manifest lives at
  ``runs/<run>/run.json``; its shard list at ``runs/<run>/shards.jsonl``.
- A **shard** is one unit of work: an id, an input (object URI or local path) or a JSON params
  object. One queue message carries one shard (and how many task failures it has had so far).
- An **attempt** is one execution of a shard on one worker. Attempts are numbered from 1 and
  claimed create-only, so two workers never share an attempt's log or output prefix.
- A shard is **committed** when ``result.json`` is created create-only: the first attempt to
  commit wins and later duplicates are discarded. Combine reads only committed attempts.

Everything here is plain data plus the bucket layout; no I/O.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import secrets
import time
import unicodedata
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any, Self

from worker import defaults

SCHEMA_VERSION = 1


class RunState(StrEnum):
    """Lifecycle of a run as recorded in its manifest."""

    ACTIVE = "active"
    CANCELLED = "cancelled"
    FINISHED = "finished"


class AttemptState(StrEnum):
    """Outcome of one attempt, as written to its ``status.json``."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PREEMPTED = "preempted"
    DISCARDED = "discarded"  # succeeded, but another attempt had already committed


class ShardState(StrEnum):
    """A shard's state as the runner reports it."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"  # the run was cancelled (or halted) before the shard finished
    LOST = "lost"  # its attempt's worker is gone; the runner puts the shard on the queue again


class EventKind(StrEnum):
    """What workers tell the runner; the store stays the truth."""

    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRYING = "retrying"
    PREEMPTED = "preempted"
    IDLE = "idle"
    STOPPED = "stopped"
    HEARTBEAT = "heartbeat"  # a worker still holds the shard's lease (long attempts only)


class Entry(StrEnum):
    """How a task bundle is run."""

    PYTHON = "python"  # task.py with run(shard)
    SHELL = "shell"  # task.sh with CFLOW_* environment variables


def _now() -> float:
    return time.time()


@functools.cache
def _fields(cls: type) -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(cls)


@functools.cache
def _names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


class _Record:
    """JSON (de)serialisation shared by the contract's dataclasses.

    Unknown keys are ignored when reading, so an older worker can read a newer manifest.
    """

    def to_dict(self) -> dict[str, Any]:
        # Shallow: the records hold only JSON values (dataclasses.asdict deep-copies them all,
        # which costs more than the rest of a short shard's bookkeeping).
        return {
            f.name: (v.value if isinstance(v := getattr(self, f.name), Enum) else v)
            for f in _fields(type(self))  # type: ignore[arg-type]
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        names = _names(cls)  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json(cls, raw: bytes | str) -> Self:
        return cls.from_dict(json.loads(raw))


@dataclass(frozen=True)
class RunOptions(_Record):
    """Per-run knobs every worker honours."""

    max_attempts: int = defaults.MAX_ATTEMPTS
    timeout: float = defaults.ATTEMPT_TIMEOUT  # seconds per attempt
    stage: bool = True  # copy remote inputs to local scratch before the task runs
    workers: int = 0  # most workers the runner runs at once (0: the backend's default)
    slots: int = defaults.SLOTS  # shards per worker, so a re-attached runner sizes alike
    speculate: bool = False  # back up stragglers near the end (a re-attached runner too)
    isolate: bool = False  # a fresh process per Python shard instead of a warm one per slot
    image: str | None = (
        None  # run each attempt in this container image (worker.executors.container.executor)
    )
    # Machine shape (runner.backends.gcp.shapes.groups; Google Cloud only): None keeps the
    # deployment's value.
    machine_type: str | None = None
    provisioning: str | None = None  # "spot" | "standard"
    gpu: str | None = None  # TYPE[:COUNT], e.g. "nvidia-l4:1"
    disk_gb: int | None = None
    # "standard": Spot first, standard VMs for the tail (runner.backends.gcp.shapes.fallback)
    fallback: str | None = None
    fallback_after: int = 3  # preemptions of one shard that start the fallback
    # The --halt rule, judged by the watching runner and by each worker on its own attempts
    # (worker.agent.runbook), so it holds with no runner attached; None: the runner's alone.
    halt: str | None = None
    # A run of a Python function from ``cflow``: each shard's value is a pickle of what the
    # function returned (read by ``cflow.results``); a task's ``run(shard)`` returns JSON,
    # read as it is. A manifest from before this field has none (told apart by its shape).
    function: bool = False
    # ``BOOT:PID:START`` of the process that made the run and waits for it (a ``cflow`` map or
    # submit, not detached): workers on its machine halt the run once it is gone, as its Ctrl-C
    # would have cancelled it (worker.agent.caller). None: the run goes on without its maker.
    caller: str | None = None


@dataclass(frozen=True)
class Manifest(_Record):
    """``runs/<run>/run.json``: what a worker needs to run any shard of the run."""

    run_id: str
    bundle: str  # sha256 of the task bundle
    entry: str  # Entry value
    shard_count: int
    options: dict[str, Any] = field(default_factory=dict)
    state: str = RunState.ACTIVE.value
    created_at: float = field(default_factory=_now)
    task_name: str = "task"
    schema: int = SCHEMA_VERSION
    # The run's rounds once it has been retried, oldest first: {"sha256", "at", "shards"},
    # the bundle each ran (`retry --task` gives a new one), when, and how many shards.
    # ``bundle`` is the latest, which messages without one run.
    bundles: list[dict[str, Any]] = field(default_factory=list)
    halted: str | None = None  # why the run was stopped early (--halt), if it was
    # When it was cancelled or halted (epoch seconds): an attempt that ended after it is not
    # part of its result, even one that committed in the moment the cancel was being written.
    cancelled_at: float | None = None
    # Publishing progress, so a runner killed while publishing can be resumed: shards of the
    # shard list (in order) confirmed on the queue, and when that count last moved. None: a run
    # from before this field, or one published whole.
    published: int | None = None
    published_at: float | None = None

    @property
    def publishing(self) -> bool:
        """Whether some shards of the run were never put on the queue."""
        return self.published is not None and self.published < self.shard_count

    @functools.cached_property
    def run_options(self) -> RunOptions:
        """Its options, read once per manifest (a worker asks for them several times an
        attempt; a changed manifest is another object)."""
        return RunOptions.from_dict(self.options)

    def with_state(self, state: RunState) -> Manifest:
        return dataclasses.replace(self, state=state.value)


@dataclass(frozen=True)
class Shard(_Record):
    """One unit of work, as listed in ``shards.jsonl`` and carried by a queue message."""

    id: str
    index: int
    input: str | None = None
    params: dict[str, Any] | None = None


@dataclass(frozen=True)
class WorkMessage(_Record):
    """The body of one queue message: a shard of a run and its task-failure count so far.

    Failures travel with the message (a failed attempt re-publishes with ``failures + 1``), so a
    preemption, which only nacks, never burns the failure budget.
    """

    run_id: str
    shard: dict[str, Any]
    failures: int = 0
    backup: bool = False  # a speculative copy of a straggler: skipped if already committed
    preemptions: int = 0  # counted apart from deliveries: preemptions never fail a shard
    # The bundle of the retry that queued it (None: the manifest's); a worker drops a message
    # whose bundle the run no longer runs (left over from before a later retry).
    bundle: str | None = None
    # The run's round (how many retries it had) when it was queued: a worker that knows an
    # earlier round reads the run's manifest afresh (a retry may change its options).
    round: int = 0
    # Google Cloud, machine shapes (runner.backends.gcp.shapes.queues): the work topic this message
    # is to be (re-)published on when not the queue's own, and, for a run with --fallback standard,
    # the standard VMs' topic a shard moves to once preempted ``fallback_after`` times.
    topic: str | None = None
    fallback_topic: str | None = None
    fallback_after: int = 0

    @property
    def shard_record(self) -> Shard:
        return Shard.from_dict(self.shard)

    @property
    def shard_id(self) -> str:
        return str(self.shard["id"])

    def attributes(self) -> dict[str, str]:
        return {"run_id": self.run_id, "shard_id": self.shard_id}

    def after_preemption(self) -> WorkMessage:
        """This message as it goes back after a preemption: counted, and moved to the fallback
        topic (pinned to standard VMs) when it has been preempted often enough."""
        preempted = dataclasses.replace(self, preemptions=self.preemptions + 1)
        if self.fallback_topic and preempted.preemptions >= self.fallback_after:
            return dataclasses.replace(preempted, topic=self.fallback_topic, fallback_topic=None)
        return preempted


@dataclass(frozen=True)
class AttemptStatus(_Record):
    """``attempts/<n>/status.json``: written ``running`` when the attempt claims its number, and
    rewritten when it ends, except by the winner, whose record is the shard's ``result.json``
    (one store write less per shard)."""

    run_id: str
    shard_id: str
    attempt: int
    state: str
    worker: str
    started_at: float
    finished_at: float | None = None
    exit_code: int | None = None
    reason: str | None = None
    bundle: str | None = None  # the task bundle this attempt ran


@dataclass(frozen=True)
class ShardResult(_Record):
    """``result.json``: the commit marker. Its existence means the shard succeeded."""

    run_id: str
    shard_id: str
    attempt: int
    worker: str
    started_at: float
    finished_at: float
    outputs: list[str] = field(default_factory=list)  # paths relative to the attempt's out/
    bundle: str | None = None  # the task bundle the winning attempt ran
    # What run(shard) returned, as JSON (worker.taskapi.keep_return); None when nothing.
    value: Any = None
    # "<run>/<shard>" when the shard was not run but reused from that earlier commit (the
    # runner's cross-run cache, runner.engine.cache); its outputs are copies under attempt 0.
    cached_from: str | None = None
    # The local files it read (its input, the files its cflow items name) as its attempt found
    # them at its start and at its end (worker.agent.files.local_seen); None: it read none, or
    # it predates the field. The cache reuses the commit only where both match what the key
    # was made from. A reused shard's record carries the print its own key was made from.
    input_seen: list[str | None] | None = None

    @property
    def duration(self) -> float:
        return self.finished_at - self.started_at


@dataclass(frozen=True)
class ShardFailure(_Record):
    """``failed.json``: the shard used up its failure budget (or was dead-lettered)."""

    run_id: str
    shard_id: str
    attempt: int | None
    failures: int
    exit_code: int | None
    reason: str
    at: float = field(default_factory=_now)


@dataclass(frozen=True)
class Event(_Record):
    """A worker's report of progress; the runner's live view is built from these."""

    kind: str
    worker: str
    run_id: str | None = None
    shard_id: str | None = None
    attempt: int | None = None
    exit_code: int | None = None
    detail: str | None = None
    at: float = field(default_factory=_now)


class Layout:
    """The bucket layout (the local store mirrors it under a directory). Keys use ``/``."""

    @staticmethod
    def bundle(sha256: str) -> str:
        return f"tasks/{sha256}.tar.gz"

    @staticmethod
    def run_prefix(run_id: str) -> str:
        return f"runs/{run_id}/"

    @staticmethod
    def manifest(run_id: str) -> str:
        return f"runs/{run_id}/run.json"

    @staticmethod
    def shard_list(run_id: str) -> str:
        return f"runs/{run_id}/shards.jsonl"

    @staticmethod
    def shards_prefix(run_id: str) -> str:
        return f"runs/{run_id}/shards/"

    @staticmethod
    def shard_prefix(run_id: str, shard_id: str) -> str:
        return f"runs/{run_id}/shards/{shard_id}/"

    @staticmethod
    def attempt_prefix(run_id: str, shard_id: str, attempt: int) -> str:
        return f"runs/{run_id}/shards/{shard_id}/attempts/{attempt}/"

    @classmethod
    def log(cls, run_id: str, shard_id: str, attempt: int) -> str:
        return cls.attempt_prefix(run_id, shard_id, attempt) + "log.txt"

    @classmethod
    def status(cls, run_id: str, shard_id: str, attempt: int) -> str:
        return cls.attempt_prefix(run_id, shard_id, attempt) + "status.json"

    @classmethod
    def outputs(cls, run_id: str, shard_id: str, attempt: int) -> str:
        return cls.attempt_prefix(run_id, shard_id, attempt) + "out/"

    @classmethod
    def result(cls, run_id: str, shard_id: str) -> str:
        return cls.shard_prefix(run_id, shard_id) + "result.json"

    @classmethod
    def failure(cls, run_id: str, shard_id: str) -> str:
        return cls.shard_prefix(run_id, shard_id) + "failed.json"

    @staticmethod
    def combined(run_id: str) -> str:
        return f"runs/{run_id}/combined/"

    @staticmethod
    def uploads(run_id: str) -> str:
        return f"runs/{run_id}/inputs/"

    @staticmethod
    def parse_shard_key(key: str) -> tuple[str, str, str] | None:
        """Split ``runs/<run>/shards/<shard>/<rest>`` into its parts, or None."""
        parts = key.split("/", 4)
        if len(parts) == 5 and parts[0] == "runs" and parts[2] == "shards":
            return parts[1], parts[3], parts[4]
        return None


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
RUN_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{2,62}$")


def slug(text: str, limit: int = 40) -> str:
    """An ASCII, path- and URL-safe rendering of ``text`` (may be empty)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return _UNSAFE.sub("-", ascii_text).strip("-.")[:limit].strip("-.")


def shard_id_for_input(uri: str) -> str:
    """A stable id for a file input: readable stem plus a hash of the whole URI.

    The same input always gets the same id, whatever else is in the run, and the id is a safe
    path component and message attribute even for names with spaces, unicode or ``$;|``.
    """
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    digest = hashlib.sha256(uri.encode()).hexdigest()[:8]
    stem = slug(name)
    return f"{stem}-{digest}" if stem else digest


def shard_id_for_index(index: int, count: int) -> str:
    """``--shards N`` and params-file ids: zero-padded so they sort in order."""
    width = max(5, len(str(max(count - 1, 0))))
    return f"{index:0{width}d}"


def new_run_id(now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now if now is not None else time.time()))
    return f"r{stamp}-{secrets.token_hex(3)}"


def is_valid_run_id(run_id: str) -> bool:
    return bool(RUN_ID_RE.match(run_id))
