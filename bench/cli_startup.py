"""What a ``runner`` command costs before it does its work: the CPU of the command's own process.

    python bench/cli_startup.py [--rounds 9] [--typer 0.29.2] [--quick]

Every round runs, in fresh interpreters: ``python -c pass``; ``runner --version``; ``runner runs``
on an empty store; ``runner status RUN --json`` of a finished four-shard run; and ``runner
submit`` of a no-op task over four shards with one local worker, counting the runner's process
alone (not the worker it starts). With ``--typer VERSION`` (the full form's default, 0.29.2) the
same commands run a second time with that typer and its dependencies installed apart (uv, into
``bench/out``) and put first on the path: the figures side by side show what that version costs
each command. Prints the median CPU milliseconds (user + system) of each; the test suite starts
about 470 runner commands, so 0.1 s each is some 47 s of CPU per test run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO, compile_project, parse_args

# RUNNER runs the runner as its console script does (COUNT alone: the interpreter); at exit, the
# process writes its own CPU seconds to the file named by CFLOW_BENCH_CPU. A worker the runner
# starts is another process and not counted.
COUNT = """
import atexit, os, resource
def _cpu():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    with open(os.environ["CFLOW_BENCH_CPU"], "w") as f:
        f.write(str(ru.ru_utime + ru.ru_stime))
atexit.register(_cpu)
"""
RUNNER = (
    COUNT
    + """
import runpy, sys
sys.argv = ["runner", *sys.argv[1:]]
runpy.run_module("runner", run_name="__main__")
"""
)


class Commands:
    """The measured commands, run in ``work`` against one store of their own."""

    def __init__(self, work: Path, pythonpath: str):
        self.work = work
        self.env = {
            **os.environ,
            "PYTHONPATH": pythonpath,
            "CFLOW_STORE": str(work / "store"),
            "CFLOW_BENCH_CPU": str(work / "cpu"),
        }
        for name in ("CFLOW_DEPLOYMENT", "CFLOW_BACKEND"):
            self.env.pop(name, None)
        task = work / "task"
        task.mkdir(exist_ok=True)
        (task / "task.py").write_text("def run(shard):\n    pass\n")
        self.run_id = self.stdout("submit", "task", "--shards", "4", "--workers", "1")
        empty = work / "empty"
        empty.mkdir(exist_ok=True)
        self.cases: dict[str, list[str]] = {
            "python -c pass": [],
            "runner --version": ["--version"],
            "runner runs (empty store)": ["runs", "--store", str(empty)],
            "runner status RUN --json": ["status", self.run_id, "--json"],
            "runner submit, 4 no-op shards": ["submit", "task", "--shards", "4", "--workers", "1"],
        }

    def stdout(self, *args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "runner", *args],
            cwd=self.work,
            env=self.env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(f"runner {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
        return proc.stdout.strip().splitlines()[0]

    def cpu_ms(self, name: str) -> float:
        args = self.cases[name]
        cpu = self.work / "cpu"
        cpu.unlink(missing_ok=True)
        argv = [sys.executable, "-c", RUNNER if args else COUNT, *args]
        proc = subprocess.run(argv, cwd=self.work, env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
        return float(cpu.read_text()) * 1000


def _install_typer(version: str, into: Path) -> Path:
    """``typer==version`` and its dependencies, compiled, in a folder of their own."""
    target = into / f"typer-{version}"
    if not (target / "typer").is_dir():
        subprocess.run(
            [sys.executable, "-m", "uv", "pip", "install", "-q", "--compile-bytecode",
             "--python", sys.executable, "--target", str(target), f"typer=={version}"],
            check=True,
        )  # fmt: skip
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--typer", default="0.29.2", help="a typer to compare with ('' for none)")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "out")
    args = parse_args(parser, argv, rounds=1, typer="")
    compile_project()
    args.work.mkdir(parents=True, exist_ok=True)
    import typer

    setups = {f"typer {typer.__version__} (installed)": str(REPO)}
    if args.typer:
        peer = _install_typer(args.typer, args.work)
        setups[f"typer {args.typer}"] = os.pathsep.join([str(peer), str(REPO)])
    figures: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="cflow-cli-", dir=args.work) as tmp:
        commands = {}
        for n, (setup, path) in enumerate(setups.items()):
            (Path(tmp) / str(n)).mkdir()
            commands[setup] = Commands(Path(tmp) / str(n), path)
        for _ in range(args.rounds):
            for setup, cmds in commands.items():
                for name in cmds.cases:
                    figures.setdefault((name, setup), []).append(cmds.cpu_ms(name))
    names = list(next(iter(commands.values())).cases)
    print(f"CPU of the command's own process, ms, median of {args.rounds} rounds")
    print(f"{'command':<32}" + "".join(f"{setup:>28}" for setup in setups))
    for name in names:
        row = [statistics.median(figures[name, setup]) for setup in setups]
        print(f"{name:<32}" + "".join(f"{v:>28.0f}" for v in row))
    print(
        json.dumps(
            {
                f"{name} | {setup}": round(statistics.median(v), 1)
                for (name, setup), v in figures.items()
            }
        )
    )


if __name__ == "__main__":
    main()
