"""``runner submit``, ``watch`` and ``retry``: the commands that run shards."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from runner import config as config_mod
from runner.backends.gcp.shapes.model import needs_groups
from runner.cli.common import (
    DeploymentOpt,
    HaltOpt,
    LocalOpt,
    OutOpt,
    RunArg,
    SlotsOpt,
    StoreOpt,
    WorkersOpt,
    app,
    duration,
    err,
    exit_code,
    fail,
    follow_to_end,
    live,
    need_run,
    open_dep,
    out,
    say,
    show_outcome,
)
from runner.engine import rounds, runs
from runner.engine.checks import check_task
from runner.engine.deployment import Deployment
from runner.engine.halt import round_rule
from runner.finish import listen_first, live_workers, make_watcher, resume_watching
from runner.submit import SubmitRequest, submit
from worker import defaults
from worker.agent.halt_rule import DEFAULT_HALT, HaltRule
from worker.protocol import Manifest, RunState

# submit's own options (the shared ones are in runner.cli.common)
TaskDirArg = Annotated[Path, typer.Argument(help="Folder with task.py (run(shard)) or task.sh.")]
InputsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--inputs",
        metavar="GLOB|@FILE|-",
        help="Input files, one shard each: a glob ('data/*.csv', quoted; ** recurses;"
        " gs://BUCKET/GLOB on Google Cloud), @FILE (a list of paths, one a line, relative to"
        " FILE's folder; blank lines and # comments skipped) or - (that list on stdin,"
        " relative to the working folder). Repeat to add more, in order; a file reached twice"
        " runs once, and a match that is not a readable file is refused.",
    ),
]
ParamsOpt = Annotated[
    Path | None, typer.Option("--params", help="JSON-lines file, one shard per line.")
]
ShardsOpt = Annotated[
    int | None, typer.Option("--shards", help="N shards with params {'index': i}.")
]
SubmitWorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", min=1, help="Most workers (processes or VMs) at once."),
]
SubmitSlotsOpt = Annotated[int, typer.Option("--slots", min=1, max=256, help="Shards per worker.")]
MaxAttemptsOpt = Annotated[
    int, typer.Option("--max-attempts", min=1, max=100, help="Task failures allowed per shard.")
]
TimeoutOpt = Annotated[
    float,
    typer.Option(
        "--timeout", parser=duration, help="How long one attempt may run: 90 (s), 90s, 15m, 1h30m."
    ),
]
StageOpt = Annotated[
    bool, typer.Option("--stage/--no-stage", help="Copy remote inputs to the worker first.")
]
SubmitDetachOpt = Annotated[
    bool, typer.Option("--detach", help="Enqueue and start workers, then return.")
]
CancelOnInterruptOpt = Annotated[
    bool,
    typer.Option("--cancel-on-interrupt", help="Ctrl-C cancels the run (default: detach)."),
]
IdleTimeoutOpt = Annotated[
    float | None,
    typer.Option("--idle-timeout", min=1, help="Seconds an idle worker waits before leaving."),
]
SpeculateOpt = Annotated[
    bool,
    typer.Option(
        "--speculate",
        help="Near the end, run a backup attempt of stragglers; the first to commit wins.",
    ),
]
IsolateOpt = Annotated[
    bool,
    typer.Option(
        "--isolate",
        help="Run each Python shard in a fresh process (for tasks that leak state between "
        "shards); by default one warm process per slot runs shard after shard.",
    ),
]
ImageOpt = Annotated[
    str | None,
    typer.Option("--image", help="Run each attempt in this container image (podman/docker)."),
]
MachineTypeOpt = Annotated[
    str | None,
    typer.Option("--machine-type", help="VM machine type for this run (Google Cloud)."),
]
GpuOpt = Annotated[
    str | None, typer.Option("--gpu", help="GPUs per VM, TYPE[:COUNT] (nvidia-l4:1).")
]
DiskGbOpt = Annotated[
    int | None, typer.Option("--disk-gb", help="Boot disk size of this run's VMs, GB.")
]
ProvisioningOpt = Annotated[
    str | None, typer.Option("--provisioning", help="spot or standard VMs for this run.")
]
FallbackOpt = Annotated[
    str | None,
    typer.Option("--fallback", help="standard: Spot first, standard VMs for the tail."),
]
FallbackAfterOpt = Annotated[
    int, typer.Option("--fallback-after", min=1, help="Preemptions of a shard that fall back.")
]
CheckOpt = Annotated[
    bool,
    typer.Option("--check/--no-check", help="Check the task can start before publishing."),
]
DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="List the shards (id<TAB>input or params, one a line; an input whose name holds a"
        " newline or another control character shown as a Python string literal) and what"
        " would start; start nothing.",
    ),
]
CacheOpt = Annotated[
    bool,
    typer.Option(
        "--cache",
        help="Reuse the committed outputs of shards an earlier --cache run ran with the same"
        " task code, input, image and environment, instead of running them again.",
    ),
]
STOP_WAIT = 60.0  # seconds a retry waits for a cancelled run's attempts to stop
# watch's and retry's: the rule the run was submitted with, unless told otherwise
RunHaltOpt = Annotated[
    str | None,
    typer.Option(
        "--halt",
        help="Stop the run early: same,fail=N, now,fail=N or never [default: as submitted].",
    ),
]


@app.command("submit")
def submit_cmd(
    task_dir: TaskDirArg,
    inputs: InputsOpt = None,
    params: ParamsOpt = None,
    shard_count: ShardsOpt = None,
    workers: SubmitWorkersOpt = None,
    slots: SubmitSlotsOpt = 1,
    max_attempts: MaxAttemptsOpt = defaults.MAX_ATTEMPTS,
    timeout: TimeoutOpt = defaults.ATTEMPT_TIMEOUT,
    stage: StageOpt = True,
    detach: SubmitDetachOpt = False,
    cancel_on_interrupt: CancelOnInterruptOpt = False,
    out_dir: OutOpt = None,
    idle_timeout: IdleTimeoutOpt = None,
    speculate: SpeculateOpt = False,
    isolate: IsolateOpt = False,
    image: ImageOpt = None,
    halt: HaltOpt = DEFAULT_HALT,
    machine_type: MachineTypeOpt = None,
    gpu: GpuOpt = None,
    disk_gb: DiskGbOpt = None,
    provisioning: ProvisioningOpt = None,
    fallback: FallbackOpt = None,
    fallback_after: FallbackAfterOpt = 3,
    check: CheckOpt = True,
    dry: DryRunOpt = False,
    cache: CacheOpt = False,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
) -> None:
    """Publish shards, start workers, watch progress, combine outputs. Prints the run id."""
    request = SubmitRequest(
        task_dir=task_dir,
        inputs=inputs,
        params=params,
        shards=shard_count,
        workers=workers,
        slots=slots,
        max_attempts=max_attempts,
        timeout=timeout,
        stage=stage,
        detach=detach,
        cancel_on_interrupt=cancel_on_interrupt,
        out=out_dir,
        idle_timeout=idle_timeout,
        speculate=speculate,
        isolate=isolate,
        image=image,
        halt=halt,
        machine_type=machine_type,
        gpu=gpu,
        disk_gb=disk_gb,
        provisioning=provisioning,
        fallback=fallback,
        fallback_after=fallback_after,
        check=check,
        dry_run=dry,
        local=local,
        cache=cache,
    )
    cfg = config_mod.resolve(local=local, store_dir=store, deployment_file=deployment)
    submitted = submit(
        request,
        cfg,
        say,
        on_created=_print_run_id,
        on_published=_show_published,
        display=live,
        on_outcome=show_outcome,
    )
    if submitted.outcome is not None:  # watched to its end (not a dry run, not detached)
        raise typer.Exit(exit_code(submitted.outcome))


def _print_run_id(manifest: Manifest) -> None:
    out.print(manifest.run_id)
    sys.stdout.flush()


def _show_published(published: int) -> None:
    """A big run's publishing, counted on a terminal (the line is overwritten)."""
    if published >= 10_000 and err.is_terminal:
        err.print(f"  published {published} shards", end="\r")


@app.command()
def watch(
    run_id: RunArg,
    halt: RunHaltOpt = None,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
    workers: WorkersOpt = None,
    slots: SlotsOpt = None,
) -> None:
    """Re-attach to a run: live progress, scale-down, and combine when it ends."""
    given = None if halt is None else str(HaltRule.parse(halt))  # a bad rule: one line, first
    need_run(run_id, local, store, deployment)
    with open_dep(local, store, deployment) as dep:
        manifest = runs.load_manifest(dep.backends.store, run_id)
        if manifest.state == RunState.CANCELLED.value:
            raise fail(_stopped(manifest))
        if given is not None:  # the workers judge by it too
            manifest = rounds.record_halt(dep.backends.store, run_id, given)
        rule = round_rule(manifest, given)
        _to_run_shape(dep, manifest)  # what is left to publish goes to the run's own queue
        watcher = resume_watching(dep, manifest, say, workers=workers, slots=slots)
        code = follow_to_end(watcher, dep, rule=rule, cancel_on_interrupt=False, out=None)
    raise typer.Exit(code)


@app.command()
def retry(
    run_id: RunArg,
    failed_only: Annotated[
        bool, typer.Option("--failed", help="Re-enqueue the failed and unfinished shards.")
    ] = False,
    task_dir: Annotated[
        Path | None,
        typer.Option("--task", help="Run the retried shards with this (fixed) task folder."),
    ] = None,
    halt: RunHaltOpt = None,
    max_attempts: Annotated[
        int | None,
        typer.Option(
            "--max-attempts", min=1, max=100, help="Task failures allowed per retried shard."
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout", parser=duration, help="How long one retried attempt may run (1h30m)."
        ),
    ] = None,
    workers: WorkersOpt = None,
    slots: SlotsOpt = None,
    detach: Annotated[bool, typer.Option("--detach", help="Enqueue, then return.")] = False,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
) -> None:
    """Re-run the failed (or unfinished) shards of a run; committed shards stay as they are.

    Without --task the retried shards run the bundle the run last used. Either way the retry
    is judged afresh by the halt rule: only the attempts of the retried shards count.
    --timeout and --max-attempts apply to the retried shards from now on.
    """
    if not failed_only:
        raise fail("say what to retry: `runner retry RUN --failed [--task DIR]`")
    given = None if halt is None else str(HaltRule.parse(halt))
    need_run(run_id, local, store, deployment)
    if task_dir is not None:
        check_task(task_dir)
    with open_dep(local, store, deployment) as dep:
        st = dep.backends.store
        interrupted = runs.load_manifest(st, run_id)
        rule = round_rule(interrupted, given)
        _to_run_shape(dep, interrupted)  # retried shards go to its shape
        if interrupted.state == RunState.ACTIVE.value and interrupted.publishing:
            # Nothing failed yet: the submit was cut off. Finish it, as `runner watch` would.
            if given is not None:
                interrupted = rounds.record_halt(st, run_id, given)
            watcher = resume_watching(dep, interrupted, say, workers=workers, slots=slots)
            if detach:
                watcher.poll(listen=False)  # the events wait for `runner watch` (submit's detach)
                return
            raise typer.Exit(
                follow_to_end(watcher, dep, rule=rule, cancel_on_interrupt=False, out=None)
            )
        changes = {
            k: v for k, v in (("timeout", timeout), ("max_attempts", max_attempts)) if v is not None
        }
        # The run's subscription went with its end: a new one, before the round is published.
        events = listen_first(dep, run_id)
        started = _new_round(dep, interrupted, task_dir, given, rule, changes)
        if started is None:
            say(f"run {run_id} has no failed shards; nothing to retry")
            return
        manifest, retried = started
        watcher = make_watcher(
            dep, manifest, workers=workers, slots=slots, shards=retried, events=events
        )
        if detach:
            watcher.poll(listen=False)
            return
        code = follow_to_end(watcher, dep, rule=rule, cancel_on_interrupt=False, out=None)
    raise typer.Exit(code)


def _new_round(
    dep: Deployment,
    was: Manifest,
    task_dir: Path | None,
    given: str | None,
    rule: HaltRule,
    changes: dict[str, float | int],
) -> tuple[Manifest, int] | None:
    """Queue a run's failed and unfinished shards again, as a new round (``rounds.retry``): the
    manifest it leaves and how many shards, or None when there is nothing to retry."""
    run_id, queue = was.run_id, dep.backends.queue
    if task_dir is not None and was.state == RunState.CANCELLED.value:
        # Its attempts still running would finish in the new round with the old code.

        def alive() -> set[str]:
            return live_workers(dep, run_id)[0]

        if rounds.wait_released(queue, run_id, alive, timeout=0.0):
            say("waiting for the attempts of the cancelled run to stop")
            if still := rounds.wait_released(queue, run_id, alive, timeout=STOP_WAIT):
                say(
                    f"warning: {still} attempts of the cancelled run still run; a shard one"
                    " of them finishes keeps what the old task made"
                )
    retried = rounds.retry(
        dep.backends.store, queue, run_id, task_dir=task_dir, halt=given, changes=changes
    )
    if not retried:
        return None
    manifest = runs.mark_published(
        dep.backends.store, runs.load_manifest(dep.backends.store, run_id)
    )
    with_what = f" with bundle {manifest.bundle[:12]}" if task_dir is not None else ""
    say(f"retrying {len(retried)} shards of run {run_id}{with_what}")
    if was.halted and task_dir is None and rule.mode != "never":
        say(
            f"it was halted ({was.halted}) and runs the same task again; --halt {rule}"
            " judges the retried attempts afresh (a fixed task: --task DIR)"
        )
    return manifest, len(retried)


def _to_run_shape(dep: Deployment, manifest: Manifest) -> None:
    """Point ``dep`` at the groups and queue a shaped cloud run was submitted with."""
    if needs_groups(manifest.run_options) and not dep.config.is_local:
        # The shapes' machinery (Compute's groups, templates, quota): cloud runs only.
        from runner.backends.gcp.shapes.apply import apply_run_shape

        apply_run_shape(dep, manifest.run_options)


def _stopped(manifest: Manifest) -> str:
    """Why a cancelled run cannot be watched, and how to start it again."""
    run_id = manifest.run_id
    if manifest.halted and manifest.options.get("function"):  # no task folder to give
        return (
            f"run {run_id} was halted: {manifest.halted}; `runner retry {run_id} --failed`"
            " runs what is left, or map the function again (fixed, if it was at fault; with"
            " cache=True the items done are reused)"
        )
    if manifest.halted:
        return (
            f"run {run_id} was halted: {manifest.halted}; fix the task, then"
            f" `runner retry {run_id} --failed --task DIR`"
        )
    return f"run {run_id} was cancelled; `runner retry {run_id} --failed` restarts it"
