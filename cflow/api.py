"""``cflow.map``, ``cflow.submit`` and ``cflow.attach``: the engine of ``runner submit``, from
Python, over a function and an iterable of items."""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

from cflow.chunks import Chunking
from cflow.driver import Driver
from cflow.own import own_modules
from cflow.pickling import ItemPickler, function_key, not_callable
from cflow.progress import ProgressChoice, in_notebook
from cflow.progress import check as check_progress
from cflow.results import Results
from cflow.run import Run
from cflow.shipping import TASK_PY, ItemFeed, make_task, task_dir
from runner import config as config_mod
from runner.backends.gcp.wheels import VM_PYTHON
from runner.backends.local import kept as keeping
from runner.backends.local.launcher import used_by_this_thread
from runner.config import Config, load_outputs
from runner.finish import Outcome, quiet
from runner.preflight import early_workers
from runner.request import check_seconds, check_whole
from runner.submit import SubmitRequest
from runner.submit import submit as engine_submit
from worker import defaults
from worker.agent.caller import stamp as caller_stamp
from worker.errors import ConfigError
from worker.pyfunc.calling import Starred

WORKER_PYTHON_OUTPUT = "worker_python"  # the deployment output naming the VMs' Python (3.11)
DEFAULT_WORKER_PYTHON = VM_PYTHON  # a deployment from before the output: the image's python3

PathLike = str | os.PathLike[str]


def _config(deployment: PathLike | None, store: PathLike | None) -> Config:
    if deployment is None:
        return config_mod.resolve(local=True, store_dir=Path(store) if store else None)
    return config_mod.resolve(deployment_file=Path(deployment))


def _default_workers(config: Config) -> int:
    """How many workers a run gets when ``workers`` is not given (the backend's default)."""
    if config.is_local:
        return max(os.cpu_count() or 1, 1)
    from runner.backends.gcp.deployment import DEFAULT_WORKERS

    return DEFAULT_WORKERS


def _slots(given: Any) -> int:
    """Slots per worker for sizing chunks (a bad value is refused later, with the request's)."""
    if isinstance(given, int) and not isinstance(given, bool) and given > 0:
        return given
    return defaults.SLOTS


def check_python(config: Config, image: str | None) -> None:
    """Refuse a run whose workers' Python cannot load what this one pickles.

    Local workers run this interpreter. Google Cloud VMs run the deployment's Python (its
    ``worker_python`` output, else the default image's); a run in an ``image`` runs that
    image's own, which the caller vouches for.

    Raises:
        ConfigError: the minor versions differ; says what to do.
    """
    if config.is_local or image is not None:
        return
    outputs = load_outputs(config.deployment_file) if config.deployment_file else {}
    theirs = str(outputs.get(WORKER_PYTHON_OUTPUT) or DEFAULT_WORKER_PYTHON)
    mine = f"{sys.version_info.major}.{sys.version_info.minor}"
    if theirs != mine:
        raise ConfigError(
            f"this is Python {mine} but the deployment's workers run Python {theirs}, which"
            f" cannot load functions pickled here; run this from a Python {theirs}"
            f" interpreter, or pass image= an image with Python {mine}"
        )


# SubmitRequest fields submit() sets itself, or that make no sense for a function's run.
_NOT_OPTIONS = frozenset(
    {"task_dir", "inputs", "params", "shards", "feed", "input_list", "check", "dry_run"}
    | {"cancel_on_interrupt", "local", "workers", "machine_type", "image", "max_attempts"}
    | {"timeout", "detach", "code_key", "function", "caller"}
)


def check_options(options: dict[str, Any]) -> None:
    """Refuse an option name :class:`runner.submit.SubmitRequest` does not take here.

    Raises:
        ConfigError: names the unknown options and the valid ones.
    """
    fields = [f for f in dataclasses.fields(SubmitRequest) if f.init]
    valid = {f.name for f in fields} - _NOT_OPTIONS
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ConfigError(
            f"cflow.submit takes no option {', '.join(unknown)}; its options: deployment, store,"
            " workers, machine_type, image, retries, timeout, detach, chunk_size, progress, say, "
            + ", ".join(sorted(valid))
        )
    for field in fields:  # a flag given "yes" or 1 would be taken for True, unsaid
        given = options.get(field.name)
        if isinstance(field.default, bool) and field.name in options and type(given) is not bool:
            raise ConfigError(f"{field.name}={given!r}: give True or False")


def check_say(say: Any) -> Callable[[str], None]:
    """The narration's listener: ``say`` itself, or one that hears nothing for None.

    Raises:
        ConfigError: ``say`` is not callable (else it failed in the run's thread, as a bare
            ``TypeError``, once the run was being made).
    """
    if say is None:
        return quiet
    if not callable(say):
        shown = repr(say)
        shown = shown if len(shown) <= 60 and "\n" not in shown else type(say).__name__
        raise ConfigError(
            f"say={shown}: give a callable that takes each line of narration (print, say, a"
            " logger's info), or None for none"
        )
    return cast(Callable[[str], None], say)


def submit(
    fn: Callable[..., Any],
    items: Iterable[Any],
    *more: Iterable[Any],
    deployment: PathLike | None = None,
    store: PathLike | None = None,
    workers: int | None = None,
    machine_type: str | None = None,
    image: str | None = None,
    retries: int = defaults.MAX_ATTEMPTS - 1,
    timeout: float = defaults.ATTEMPT_TIMEOUT,
    detach: bool = False,
    chunk_size: int | None = None,
    progress: ProgressChoice = None,
    say: Callable[[str], None] | None = quiet,
    **options: Any,
) -> Run:
    """Start ``fn(item)`` for every item as a run, and return it at once.

    A thread of this process reads the items, publishes them and watches the run (scaling its
    workers, combining at the end). A process that ends before the run does waits for it at
    its exit (Ctrl-C cancels it; ``detach=True``, or a Jupyter kernel, leaves it going).

    Args:
        fn: any callable of one argument: a function, a lambda, a closure, one defined in
            ``__main__`` or a notebook, an ``async def`` function (awaited). It is pickled by
            value (cloudpickle) with the modules of your own it uses: those not installed
            under this interpreter's prefix or a site-packages folder.
        items: any iterable of picklable values; read and published as it goes (a generator
            of 100,000 items never sits in memory), and the run starts before it ends.
        more: further iterables, as the built-in ``map`` takes them: ``fn(a, b)`` for each
            ``(a, b)`` of ``zip(items, *more)``, the shortest ending it; each item is then
            such a tuple (``as_completed`` yields it).
        deployment: a ``cflow-outputs.json`` to run on Google Cloud; None: this machine.
        store: the local store folder [default: ``CFLOW_STORE`` or ``./.cflow``].
        workers: most workers at once [default: the backend's].
        machine_type, image: as ``runner submit --machine-type`` and ``--image`` (an image
            runs the function with its own Python, which needs cloudpickle and this Python's
            minor version; it is not checked here).
        retries: failed attempts an item may have before it fails (in a chunk: an item that
            raised is run again at once in its chunk; a chunk whose attempt crashed, timed out
            or was preempted is run again whole).
        timeout: seconds one item may run (a chunk's attempt: this times its items).
        detach: Ctrl-C while waiting leaves the run going (and says how to attach) instead
            of cancelling it.
        chunk_size: items per shard; 1: a shard per item. None: chosen from the item count
            and the workers (``cflow.chunks``): many small items then share shards, each
            chunk committed once with every item's value or failure.
        progress: how waiting on the run shows its progress: None picks an HTML bar in a
            notebook, a line on a terminal, plain lines elsewhere (``cflow.progress``);
            False shows none; ``"notebook"``, ``"terminal"`` or ``"plain"`` force one.
        say: a callable that hears the narration, one line at a time; None: none [default:
            none].
        options: other :class:`runner.submit.SubmitRequest` fields (``slots``, ``cache``...).

    Raises:
        ConfigError: an option, the function, or this Python against the workers' (nothing
            was published).
    """
    if more:
        if not callable(fn):
            raise ConfigError(not_callable(fn))
        fn, items = Starred(fn), _zipped(items, more)
    check_progress(progress)
    say = check_say(say)
    check_options(options)
    check_whole("workers", workers, 1, None, "the most workers at once")
    check_whole("retries", retries, 0, 99, "failed attempts an item may have")
    check_seconds("timeout", timeout, "how long one item may run")
    config = _config(deployment, store)
    check_python(config, image)
    chunking = Chunking.pick(
        items,
        chunk_size,
        slots=(workers or _default_workers(config)) * _slots(options.get("slots")),
        tries=retries + 1,
        timeout=timeout,
    )
    # With the cache, what the shards' keys are made of is the same from any process: the
    # function's key, taken before it is shipped, and the items' pickles (cflow.pickling).
    own, canonical = own_modules(), bool(options.get("cache"))
    # Locally (no image) the items run where this process does: relative paths hold there,
    # so that folder is part of what the function computes (and of its cache key).
    here = _working_folder() if config.is_local and image is None else None
    if canonical:
        runner = TASK_PY if here is None else f"{TASK_PY}\0in {here}"
        options = {**options, "code_key": function_key(fn, own, runner)}
    folder, needs = make_task(fn, own, here)
    feed = ItemFeed(items, chunking, ItemPickler(own, canonical=canonical))
    request = SubmitRequest(
        task_dir(folder),
        feed=feed,
        workers=workers,
        machine_type=machine_type,
        image=image,
        # An item that raises is run again inside its chunk; the chunk's own attempts are
        # for what ends a whole attempt (a crash, a timeout, a preemption).
        max_attempts=retries + 1,
        timeout=timeout * (chunking.largest if feed.chunked else 1),
        check=False,  # the task is ours; the function was pickled above
        function=True,  # its values are pickles: a task's JSON values are read as they are
        # Waited for here: a caller that dies without a word takes the run with it, as its
        # Ctrl-C would (detached, or in a kernel, it goes on: said at exit how to attach).
        caller=None if detach or in_notebook() else caller_stamp(),
        cancel_on_interrupt=True,  # the run's thread is interrupted only to cancel
        local=config.is_local,
        **options,
    )
    driver = _drive(request, config, folder, say, needs)
    interrupted = False
    try:
        while not driver.created.wait(0.2):
            pass
    except KeyboardInterrupt:
        if driver.run_id is None:  # before the run was made: nothing is left running
            feed.stop(cancel=True)
            driver.stop.set()
            raise
        interrupted = True
    run_id = driver.run_id
    if run_id is None:
        assert driver.error is not None
        raise driver.error
    run = Run(run_id, config, driver=driver, feed=feed, detach=detach, progress=progress)
    if interrupted:  # the run was made as Ctrl-C came: cancelled, or left going, as in a wait
        run._interrupted()
        raise KeyboardInterrupt
    return run


def _zipped(items: Iterable[Any], more: tuple[Iterable[Any], ...]) -> Iterable[Any]:
    """``zip(items, *more)``: a list where each is a list, tuple or range (so its length is
    known, as the chunking wants it), else read as it goes."""
    every = (items, *more)
    if all(type(it) in (list, tuple, range) for it in every):
        return list(zip(*every, strict=False))  # the shortest ends it, as map says
    return zip(*every, strict=False)


def _working_folder() -> Path | None:
    """This process's working folder; None where it was removed since."""
    try:
        return Path.cwd()
    except OSError:
        return None


def _drive(
    request: SubmitRequest,
    config: Config,
    folder: tempfile.TemporaryDirectory[str],
    say: Callable[[str], None],
    needs: tuple[str, ...] = (),
) -> Driver:
    """A thread of this process that submits ``request`` and watches its run to the end, as
    ``runner submit`` does; the generated task folder goes when it ends. ``needs``: the
    installed modules the function's pickle names, which the task hosts of workers forked
    ahead import while they wait (:mod:`runner.backends.local.kept`)."""
    driver = Driver()
    # Local workers forked from this process, which has their code loaded, rather than new
    # interpreters; decided here, before the run's thread exists (None where not safe). The
    # workers the run starts early (runner.preflight) wait forked ahead in the launcher.
    launcher, early = None, 0
    if config.is_local:
        early = early_workers(request, request.workers or _default_workers(config))
        launcher = keeping.for_run(ahead=early, preload=needs)

    def body(d: Driver) -> Outcome | None:
        try:
            with used_by_this_thread(launcher):
                return engine_submit(
                    request,
                    config,
                    say,
                    on_created=d.on_created,
                    on_published=d.on_published,
                    display=d.display,
                    on_outcome=d.on_outcome,
                ).outcome
        finally:
            folder.cleanup()
            if config.is_local:
                keeping.after_run(launcher, early, preload=needs)

    driver.start(body)
    return driver


def map(
    fn: Callable[..., Any],
    items: Iterable[Any],
    *more: Iterable[Any],
    workers: int | None = None,
    return_exceptions: bool = False,
    **options: Any,
) -> Results:
    """``fn(item)`` for every item, on this machine's workers unless ``deployment=`` says
    otherwise; blocks, and returns the values in input order (:class:`cflow.Results`). With
    ``more`` iterables, ``fn(a, b, ...)`` as the built-in ``map`` calls it.

    Takes :func:`submit`'s options. Ctrl-C cancels the run (``detach=True``: leaves it going).

    Raises:
        ShardFailed: an item failed (unless ``return_exceptions``).
    """
    run = submit(fn, items, *more, workers=workers, **options)
    return run.results(return_exceptions=return_exceptions)


def attach(
    run_id: str,
    *,
    deployment: PathLike | None = None,
    store: PathLike | None = None,
    detach: bool = False,
    progress: ProgressChoice = None,
) -> Run:
    """The run ``run_id``, started from Python or ``runner submit`` in any process.

    Its :meth:`~cflow.Run.wait`, :meth:`~cflow.Run.results` and
    :meth:`~cflow.Run.as_completed` watch it to its end where nothing else does.

    Raises:
        RunNotFound: no such run in the store.
    """
    from runner.backends.factory import open_deployment
    from runner.engine import runs

    config = _config(deployment, store)
    dep = open_deployment(config)
    try:
        runs.load_manifest(dep.backends.store, run_id)
    finally:
        dep.close()
    return Run(run_id, config, detach=detach, progress=progress)
