"""``python -m worker``: run the agent with configuration from flags or ``CFLOW_*`` variables."""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path
from types import FrameType

from worker import defaults
from worker.agent.agent import Agent, AgentConfig
from worker.backends.base import Backends
from worker.backends.local.backend import open_local
from worker.errors import CFlowError, ConfigError, Unusable
from worker.executors.host_client import fork_hosts


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"CFLOW_{name}", default)


@functools.cache
def _parser() -> argparse.ArgumentParser:
    """The worker's flags, built once a process (a local worker forked from a Python caller
    finds it built); their defaults, from the environment, are set at each parse."""
    p = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    p.add_argument("--backend", choices=["local", "gcp"])
    p.add_argument("--store", type=Path, help="local backend: the store directory")
    p.add_argument("--project")
    p.add_argument("--bucket")
    p.add_argument("--subscription", help="work subscription")
    p.add_argument("--events-topic")
    p.add_argument(
        "--work-topic",
        help="gcp: topic a failed shard is re-queued on [default: the subscription's topic]",
    )
    p.add_argument("--group", help="managed instance group to leave when idle")
    p.add_argument("--zone")
    p.add_argument("--region")
    p.add_argument(
        "--instance-zone", help="gcp: this VM's zone, to leave a regional group [default: --zone]"
    )
    p.add_argument("--name")
    p.add_argument("--slots", type=int)
    p.add_argument(
        "--idle-timeout",
        type=float,
        help="seconds with no work before the worker exits (and leaves its group)",
    )
    p.add_argument("--burst", action="store_true", help="exit as soon as no work is left")
    p.add_argument(
        "--run",
        help="local backend: serve this run's shards only (the runner starts a run's workers so)",
    )
    p.add_argument("--scratch", type=Path)
    p.add_argument(
        "--lease-seconds",
        type=float,
        help="seconds a received shard stays leased without a heartbeat (gcp: its ack deadline)",
    )
    p.add_argument("--heartbeat", type=float)
    return p


def _env_defaults() -> dict[str, object]:
    """Every flag's default, from its ``CFLOW_*`` variable as the environment is now."""
    return {
        "backend": _env("BACKEND", "local"),
        "store": Path(_env("STORE", defaults.STORE_DIR) or defaults.STORE_DIR),
        "project": _env("PROJECT"),
        "bucket": _env("BUCKET"),
        "subscription": _env("SUBSCRIPTION"),
        "events_topic": _env("EVENTS_TOPIC"),
        "work_topic": _env("WORK_TOPIC"),
        "group": _env("GROUP"),
        "zone": _env("ZONE"),
        "region": _env("REGION"),
        "instance_zone": _env("INSTANCE_ZONE"),
        "name": _env("WORKER_NAME") or f"{socket.gethostname()}-{os.getpid()}",
        "slots": int(_env("SLOTS", str(defaults.SLOTS)) or 1),
        "idle_timeout": float(_env("IDLE_TIMEOUT", "0") or 0) or None,
        "run": _env("RUN"),
        "scratch": Path(_env("SCRATCH") or tempfile.gettempdir()) / "cflow",
        "lease_seconds": float(_env("LEASE_SECONDS") or defaults.LEASE_SECONDS),
        "heartbeat": float(_env("HEARTBEAT_SECONDS") or defaults.HEARTBEAT_SECONDS),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _parser()
    p.set_defaults(**_env_defaults())
    args = p.parse_args(argv)
    if args.slots < 1:
        p.error("--slots must be at least 1")
    if args.run and args.backend != "local":
        p.error("--run applies to the local backend (a VM serves every run)")
    if args.idle_timeout is not None and args.idle_timeout <= 0:
        args.idle_timeout = None
    return args


def open_backends(args: argparse.Namespace) -> Backends:
    if args.backend == "local":
        return open_local(args.store, lease_seconds=args.lease_seconds, run_id=args.run)
    # imported late: the local worker needs no cloud client
    try:
        from worker.backends.gcp.backend import open_gcp
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"the Google Cloud backend needs its client libraries: "
            f"pip install 'cflow[gcp-worker]' ({exc})"
        ) from None

    return open_gcp(
        project=args.project,
        bucket=args.bucket,
        subscription=args.subscription,
        events_topic=args.events_topic,
        slots=args.slots,
        max_lease_seconds=None,
        work_topic=args.work_topic,
        lease_seconds=args.lease_seconds,
    )


LOG_FORMAT = defaults.LOG_FORMAT


def _log_to_file(path: Path) -> None:
    """Also write the agent's log to ``path`` (uploaded to the bucket on Google Cloud)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    finally:
        gc.freeze()  # the process ends: no collector passes over every object at exit


def _main(argv: list[str] | None) -> None:
    level = os.environ.get("CFLOW_LOG_LEVEL") or "INFO"
    number = defaults.log_level(level)
    if number is None:
        print(defaults.no_log_level(level), file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=number, format=LOG_FORMAT)
    args = parse_args(argv)
    if args.backend == "local":  # no cloud clients' threads: its spare hosts can be forked
        fork_hosts()
    uploader = None
    if args.backend == "gcp":
        _log_to_file(args.scratch / "agent.log")
    try:
        backends = open_backends(args)
    except CFlowError as err:
        print(f"cflow worker: {err}", file=sys.stderr)
        sys.exit(2)
    if args.backend == "gcp":
        from worker.backends.gcp.vm import AgentLogUploader

        uploader = AgentLogUploader(backends.store, args.name, args.scratch / "agent.log").start()
    agent = Agent(
        queue=backends.queue,
        store=backends.store,
        events=backends.events,
        ledger=backends.ledger,
        config=AgentConfig(
            name=args.name,
            scratch=args.scratch,
            slots=args.slots,
            burst=args.burst,
            idle_timeout=args.idle_timeout,
            lease_seconds=args.lease_seconds,
            heartbeat=min(args.heartbeat, args.lease_seconds / 3),
            run=args.run,
        ),
    )

    def on_term(signum: int, frame: FrameType | None) -> None:
        agent.stop()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    log = logging.getLogger("cflow.worker")
    unusable: Unusable | None = None
    try:
        reason = agent.run()
    except Unusable as exc:
        # Its queue is gone or forbidden (a deleted deployment or shape, a grant that did not
        # apply): a restart would meet the same refusal for ever, so it ends as an idle one does.
        unusable, reason = exc, f"cannot go on: {exc}"
        agent.lifetime.record(stopped=True, reason=reason)
    log.info("worker %s exiting: %s", args.name, reason)
    if uploader is not None:
        uploader.upload()  # before the VM goes: a preempted or removed VM takes its disk along
    if args.backend == "gcp" and (reason.startswith("idle") or unusable) and args.group:
        from worker.backends.gcp.vm import EXIT_CANNOT_LEAVE, leave_group, report_problem

        left = leave_group(
            project=args.project,
            group=args.group,
            zone=args.zone,
            region=args.region,
            instance=args.name,
            instance_zone=args.instance_zone,
        )
        if not left:
            # A VM whose worker simply ended would bill on with nothing to do. Say so in the
            # bucket (the runner deletes the VM by name and shows why) and exit with the status
            # on which the systemd unit powers the VM off instead of restarting the worker.
            log.error("could not remove VM %s from group %s; powering off", args.name, args.group)
            report_problem(backends.store, args.name, "could not remove itself from its group")
            if uploader is not None:
                uploader.close()
            backends.close()
            sys.exit(EXIT_CANNOT_LEAVE)
    if uploader is not None:
        uploader.close()
    backends.close()
    if unusable is not None and not (args.backend == "gcp" and args.group):
        print(f"cflow worker: {unusable}", file=sys.stderr)  # no group to leave: say why
        sys.exit(1)
