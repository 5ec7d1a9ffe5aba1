"""What a submit asks for: ``runner submit``'s options as data (:class:`SubmitRequest`).

Built by the command line, by :mod:`cflow` and by tests; :func:`runner.submit.submit` carries
it out.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from runner.engine import shards as shard_sources
from runner.engine.shards import RemoteLister
from runner.finish import quiet
from runner.results.parts import Say
from worker import defaults
from worker.agent.halt_rule import DEFAULT_HALT, HaltRule
from worker.errors import ConfigError
from worker.protocol import RunOptions, Shard

if TYPE_CHECKING:
    from runner.engine.stream import ShardFeed


# The bounds the command line puts on its options, for every caller (cflow passes them through):
# field -> (least, most, what it counts); None where it may be left out.
_WHOLE = {
    "workers": (1, None, "the most workers at once"),
    "slots": (1, 256, "shards per worker"),
    "max_attempts": (1, 100, "attempts a shard may have"),
    "fallback_after": (1, None, "preemptions of a shard before it falls back"),
    "disk_gb": (1, None, "GB of each VM's boot disk"),
}
_SECONDS = {
    "timeout": "how long one attempt may run",
    "idle_timeout": "how long an idle worker waits",
}


def check_whole(name: str, value: object, least: int, most: int | None, what: str) -> None:
    """Refuse ``value`` unless a whole number within bounds (None passes: left out).

    Raises:
        ConfigError: one line naming the option, what it counts and its bounds.
    """
    if value is None:
        return
    whole = isinstance(value, int) and not isinstance(value, bool)
    if whole and value >= least and (most is None or value <= most):  # type: ignore[operator]
        return
    bounds = f"from {least} to {most}" if most is not None else f"of at least {least}"
    raise ConfigError(f"{name}={value!r}: give a whole number {bounds} ({what})")


def check_seconds(name: str, value: object, what: str) -> None:
    """Refuse ``value`` unless a number of seconds above 0 (None passes: left out).

    Raises:
        ConfigError: one line naming the option and what it means.
    """
    if value is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not 0 < value < math.inf:  # type: ignore[operator]
        raise ConfigError(f"{name}={value!r}: give a number of seconds above 0 ({what})")


@dataclass
class SubmitRequest:
    """What to run, over which shards, and how: ``runner submit``'s options as data.

    Exactly one of ``inputs`` (globs, ``@FILE`` lists and ``-`` for a list on stdin, one shard
    per file; see :class:`runner.engine.shards.Inputs`), ``params`` (a JSON-lines file, one
    shard per line) or ``shards`` (N shards with params ``{"index": i}``) says the shards.

    Raises:
        ConfigError: not exactly one shard source, a number out of the command line's bounds
            (``workers=0``, ``slots=300``), or ``halt`` is not a rule.
    """

    task_dir: Path  # folder with task.py (run(shard)) or task.sh
    inputs: list[str] | None = None  # each a glob, @FILE or - (a list of paths on stdin)
    params: Path | None = None
    shards: int | None = None
    workers: int | None = None  # most workers at once [default: the deployment's]
    slots: int = 1  # shards per worker
    max_attempts: int = defaults.MAX_ATTEMPTS  # task failures allowed per shard
    timeout: float = defaults.ATTEMPT_TIMEOUT  # seconds one attempt may run
    stage: bool = True  # copy remote inputs to the worker first
    detach: bool = False  # publish and start workers, then return
    cancel_on_interrupt: bool = False  # Ctrl-C cancels the run (else the runner detaches)
    out: str | None = None  # also write the combined result here (a folder or gs://...)
    idle_timeout: float | None = None  # seconds an idle worker waits before leaving
    speculate: bool = False  # near the end, back up stragglers
    isolate: bool = False  # a fresh process per Python shard
    image: str | None = None  # run each attempt in this container image
    halt: str = DEFAULT_HALT  # when to stop the run early (see HaltRule.parse)
    machine_type: str | None = None
    gpu: str | None = None  # TYPE[:COUNT]
    disk_gb: int | None = None
    provisioning: str | None = None  # spot or standard
    fallback: str | None = None  # standard: Spot first, standard VMs for the tail
    fallback_after: int = 3  # preemptions of a shard that fall back
    check: bool = True  # check the task can start before publishing
    dry_run: bool = False  # list the shards and what would start; start nothing
    local: bool = False  # the local backend was asked for (else a local config found no other)
    input_list: IO[str] | None = None  # what `--inputs -` reads [default: stdin]
    cache: bool = False  # reuse earlier runs' commits of unchanged shards (runner.engine.cache)
    # What the cache keys the task's code on, where the caller fingerprints it itself (cflow:
    # its function without line numbers) [default: the task folder's files]
    code_key: str | None = None
    function: bool = False  # a cflow function's run: its values are pickles (RunOptions)
    caller: str | None = None  # the process the run is bound to (worker.agent.caller)
    # Shards from a Python caller, published as read (runner.engine.stream; cflow.submit)
    feed: ShardFeed | None = None
    rule: HaltRule = field(init=False, repr=False)
    _gathered: shard_sources.Inputs | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.inputs, str):  # one glob, as a Python caller may well write it
            self.inputs = [self.inputs]
        sources = (self.inputs or None, self.params, self.shards, self.feed)
        chosen = [v for v in sources if v is not None]
        if len(chosen) != 1:
            raise ConfigError(
                "give exactly one of --inputs GLOB, --params FILE.jsonl or --shards N"
            )
        for name, (least, most, what) in _WHOLE.items():
            check_whole(name, getattr(self, name), least, most, what)
        for name, what in _SECONDS.items():
            check_seconds(name, getattr(self, name), what)
        self.rule = HaltRule.parse(self.halt)

    def gather_inputs(self) -> shard_sources.Inputs | None:
        """The ``--inputs`` found and checked, once (None: the shards come from elsewhere).

        Raises:
            InputError: an input is not a readable file, a glob matches nothing, a list is
                missing or empty.
        """
        if self.inputs and self._gathered is None:
            stream = self.input_list if self.input_list is not None else sys.stdin
            self._gathered = shard_sources.Inputs.gather(self.inputs, stdin=stream)
        return self._gathered

    def known_shards(self) -> int | None:
        """How many shards the run has at least, where that is known before they are read
        (``--shards N``, or a feed of items with a length); None: not known yet."""
        if self.feed is not None:
            return self.feed.at_least()
        return self.shards

    def shard_source(self, lister: RemoteLister | None = None, say: Say = quiet) -> Iterator[Shard]:
        """The shards, read lazily (``lister`` lists remote inputs, e.g. gs://; ``say`` hears
        of inputs that repeat a file, which run once)."""
        if self.feed is not None:  # read once the run exists (runner.engine.stream)
            return iter(())
        inputs = self.gather_inputs()
        if inputs is not None:
            return inputs.shards(lister, say)
        if self.params is not None:
            return shard_sources.from_params(self.params)
        assert self.shards is not None  # one source is set: checked when made
        return shard_sources.from_count(self.shards)

    def run_options(self, default_workers: int) -> RunOptions:
        """The options every worker of the run reads from its manifest."""
        return RunOptions(
            max_attempts=self.max_attempts,
            timeout=self.timeout,
            stage=self.stage,
            workers=self.workers or default_workers,
            slots=self.slots,
            speculate=self.speculate,
            isolate=self.isolate,
            image=self.image,
            machine_type=self.machine_type,
            provisioning=self.provisioning,
            gpu=self.gpu,
            disk_gb=self.disk_gb,
            fallback=self.fallback,
            fallback_after=self.fallback_after,
            halt=str(self.rule),
            function=self.function,
            caller=self.caller,
        )
