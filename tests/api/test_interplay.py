"""An API run is a run like any other: Ctrl-C, detach and attach, and the CLI on both sides."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import cflow
from cflow.api import DEFAULT_WORKER_PYTHON, check_python
from runner import config as config_mod
from tests.e2e.conftest import Cli, make_task, wait_for
from worker.agent.caller import process_start
from worker.errors import ConfigError, RunStateError

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).with_name("interrupt_script.py")
REPO = Path(__file__).resolve().parents[2]


def _gated(marks: Path) -> Any:
    def gated(x: int) -> int:
        (marks / f"started-{x}").touch()
        while not (marks / "go").exists():
            time.sleep(0.05)
        return x * 10

    return gated


def _interrupt(
    cli: Cli, mode: str, go: bool = False, sig: int = signal.SIGINT
) -> subprocess.CompletedProcess[str]:
    """The script in ``mode``, sent Ctrl-C (or ``sig``) once a first item started (``go``: the
    items are let through instead)."""
    marks = cli.workdir / "marks"
    marks.mkdir()
    proc = _started(cli, marks, mode)
    try:
        wait_for(lambda: any(marks.glob("started-*")), 60, "a first item to start")
        if go:
            (marks / "go").touch()
        else:
            os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=60)
    except (AssertionError, subprocess.TimeoutExpired):
        proc.kill()  # its workers, in sessions of their own, are stopped by the fixture
        _, err = proc.communicate()
        raise AssertionError(f"the script did not end on Ctrl-C; it wrote:\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _started(cli: Cli, marks: Path, mode: str) -> subprocess.Popen[str]:
    """The script in ``mode``, started in the test's folder."""
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(cli.store), str(marks), mode],
        cwd=cli.workdir,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cli.workdir), "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _ended(cli: Cli, script: Path, marks: Path, mode: str) -> subprocess.CompletedProcess[str]:
    """The script in ``mode``, run to its end (it exited 0)."""
    done = subprocess.run(
        [sys.executable, str(script), str(cli.store), str(marks), mode],
        cwd=cli.workdir,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cli.workdir), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_a_process_started_here_takes_ctrl_c_as_a_terminal_job_does() -> None:
    """Whatever started the tests (a shell's background job ignores SIGINT), the scripts they
    interrupt start with Python's own Ctrl-C handler, as in a terminal (tests/conftest.py)."""
    probe = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert shown.stdout.strip() == "True", shown.stderr


def _only_run(cli: Cli) -> str:
    runs = list((cli.store / "runs").iterdir())
    assert len(runs) == 1
    return runs[0].name


def test_ctrl_c_cancels_the_run(cli: Cli) -> None:
    done = _interrupt(cli, "cancel")
    assert done.returncode == 130, done.stderr
    run_id = _only_run(cli)
    assert f"run {run_id} cancelled" in done.stderr
    assert cli.status(run_id)["state"] == "cancelled"


def test_ctrl_c_with_detach_leaves_the_run_to_attach_to(cli: Cli, tmp_path: Path) -> None:
    done = _interrupt(cli, "detach")
    assert done.returncode == 130, done.stderr
    run_id = _only_run(cli)
    assert f"cflow.attach({run_id!r})" in done.stderr and f"runner watch {run_id}" in done.stderr
    assert cli.status(run_id)["state"] == "active"
    (tmp_path / "marks" / "go").touch()
    run = cflow.attach(run_id, store=cli.store)
    assert list(run.results()) == [0, 10, 20]
    assert cli.status(run_id)["state"] == "finished"


def test_a_killed_script_takes_its_run_with_it_and_a_retry_runs_what_is_left(
    cli: Cli, tmp_path: Path
) -> None:
    """``kill -9`` (the OOM killer, an outer item's timeout) leaves no Ctrl-C to cancel with:
    its run went on, unwatched and active for ever, its workers making what nobody reads.
    The workers now see their caller gone and halt the run, saying why; the retry its line
    recommends is bound to nobody, and runs to its end."""
    done = _interrupt(cli, "cancel", sig=signal.SIGKILL)
    assert done.returncode == -signal.SIGKILL
    run_id = _only_run(cli)
    wait_for(lambda: cli.status(run_id)["state"] == "cancelled", 30, "the workers to halt it")
    assert "ended without waiting for it" in cli.status(run_id)["halted"]
    # The items its halt stopped were not run to their end: no item's failure ("ShardError:
    # run cancelled", before), the halt and its reason.
    with pytest.raises(RunStateError, match=f"run {run_id} halted \\(the process that made"):
        cflow.attach(run_id, store=cli.store, progress=False).results()
    watched = cli("watch", run_id)
    assert watched.code != 0 and f"`runner retry {run_id} --failed` runs" in watched.stderr
    pids = cli.workers().values()  # as its fleet last recorded them: nobody forgets them now
    wait_for(lambda: all(process_start(p) is None for p in pids), 60, "its workers to go")
    (tmp_path / "marks" / "go").touch()
    retried = cli("retry", run_id, "--failed")
    assert retried.code == 0, retried.stderr
    assert cli.status(run_id)["state"] == "finished"
    assert list(cflow.attach(run_id, store=cli.store).results()) == [0, 10, 20]


def test_a_script_killed_while_reading_its_items_leaves_a_run_of_those_it_read(
    cli: Cli, tmp_path: Path
) -> None:
    """The shard list went to the store only as it doubled: the halted run listed the first
    batch's 10 shards of the 20 that ran, its count said 20 of 21, its values were 10, and
    `runner retry --failed` found nothing to retry."""
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = _started(cli, marks, "stalls")
    try:
        run_id = _only_run_when(cli)
        wait_for(lambda: (marks / "read").exists(), 60, "the items to be read")
        wait_for(lambda: len(cli.records(f"runs/{run_id}/shards/*/result.json")) == 20, 60, "20")
    finally:
        proc.kill()
        proc.communicate()
    # Its workers, idle (every shard out had run), look at their run every 2 s: not only as
    # they leave (30 s idle, locally).
    wait_for(lambda: cli.status(run_id)["state"] == "cancelled", 10, "the workers to halt it")
    assert len(cli.status(run_id)["shards"]) == 20
    got = cflow.attach(run_id, store=cli.store, progress=False).results()
    assert list(got) == [x * 10 for x in range(20)]


def _only_run_when(cli: Cli) -> str:
    wait_for(lambda: (cli.store / "runs").exists() and any((cli.store / "runs").iterdir()), 60)
    return _only_run(cli)


def test_an_item_that_times_out_takes_the_runs_its_function_made_with_it(
    cli: Cli, tmp_path: Path
) -> None:
    """The timeout kills the host the item ran in, the inner map's caller: its run went on,
    active for ever, its workers making what nobody reads (with retries, once per try)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    inner_cli = Cli(tmp_path / "inner")
    inner_cli.workdir.mkdir()
    gated, inner = _gated(marks), str(inner_cli.store)

    def outer(n: int) -> Any:
        return cflow.map(gated, range(n), store=inner, workers=1, progress=False)

    with pytest.raises(cflow.ShardFailed) as failed:
        cflow.map(outer, [2], store=cli.store, timeout=8, retries=0, progress=False)
    assert isinstance(failed.value.exception, cflow.ItemTimedOut)
    assert any(marks.glob("started-*"))
    (made,) = (inner_cli.store / "runs").iterdir()
    wait_for(lambda: inner_cli.status(made.name)["state"] == "cancelled", 30, "the inner halt")
    assert "ended without waiting for it" in inner_cli.status(made.name)["halted"]


def test_a_killed_script_leaves_a_detached_run_going(cli: Cli, tmp_path: Path) -> None:
    done = _interrupt(cli, "detach", sig=signal.SIGKILL)
    assert done.returncode == -signal.SIGKILL
    run_id = _only_run(cli)
    time.sleep(3)  # more than a running attempt takes to look at its run again
    assert cli.status(run_id)["state"] == "active"
    (tmp_path / "marks" / "go").touch()
    assert list(cflow.attach(run_id, store=cli.store).results()) == [0, 10, 20]


def test_a_detached_run_left_at_exit_holds_every_item_it_was_given(
    cli: Cli, tmp_path: Path
) -> None:
    """The items not yet published were dropped at exit: the run held 1,000 of the 2,500 it
    was given, and its results were silently short."""
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = _ended(cli, SCRIPT, marks, "exit-detach-many")
    run_id = _only_run(cli)
    assert "reading the rest of run" in proc.stderr and "goes on;" in proc.stderr
    assert list(cflow.attach(run_id, store=cli.store).results()) == [x * 10 for x in range(2500)]


def test_ctrl_c_with_detach_cuts_a_stream_short_saying_so_and_the_run_ends(
    cli: Cli, tmp_path: Path
) -> None:
    """The count of what was read was recorded by a thread that died with the process: the
    run stayed ``publishing`` and attaching to it waited for ever."""
    done = _interrupt(cli, "detach-stream")
    assert done.returncode == 130, done.stderr
    run_id = _only_run(cli)
    said = re.findall(
        r"goes on with its first (\d+) items \(reading them stopped here\)", done.stderr
    )
    assert len(said) == 1, done.stderr  # said once (the exit said it again)
    (tmp_path / "marks" / "go").touch()
    got = cflow.attach(run_id, store=cli.store, progress=False).results()
    assert list(got) == [x * 10 for x in range(int(said[0]))]


def test_a_script_that_ends_without_waiting_waits_for_its_run_at_exit(cli: Cli) -> None:
    """As ``concurrent.futures`` waits for its work: the run's thread would otherwise end with
    the process, leaving the run unwatched (active for ever) and its unread items unread."""
    done = _interrupt(cli, "exit", go=True)
    assert done.returncode == 0, done.stderr
    run_id = _only_run(cli)
    assert f"waiting for run {run_id} to end" in done.stderr
    assert cli.status(run_id)["state"] == "finished"
    assert list(cflow.attach(run_id, store=cli.store).results()) == [0, 10, 20]


def test_ctrl_c_while_a_script_waits_for_its_run_at_exit_cancels_it(cli: Cli) -> None:
    done = _interrupt(cli, "exit")
    run_id = _only_run(cli)
    assert f"run {run_id} cancelled" in done.stderr, done.stderr
    assert cli.status(run_id)["state"] == "cancelled"


def test_a_detached_run_is_left_going_at_exit_saying_how_to_attach(
    cli: Cli, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = _ended(cli, SCRIPT, marks, "exit-detach")
    run_id = _only_run(cli)
    assert f"cflow.attach({run_id!r})" in proc.stderr
    assert cli.status(run_id)["state"] == "active"
    (marks / "go").touch()
    assert list(cflow.attach(run_id, store=cli.store).results()) == [0, 10, 20]


FORGED = """
import base64
import os
import pickle

class Forged:
    def __reduce__(self):
        return (os.mkdir, (MARK,))

def run(shard):
    return {"pickle": base64.b64encode(pickle.dumps(Forged())).decode(), "n": shard.index}
"""


def test_attach_to_a_cli_run_gives_its_json_values_and_never_unpickles_them(
    cli: Cli, tmp_path: Path
) -> None:
    """A task's ``run(shard)`` returns JSON: that is its value from Python too. Before, every
    value was read as a cflow function's pickle record: an int came back None, a dict raised
    ``NotFound``, and a dict holding ``"pickle"`` ran code of the task's choosing here."""
    numbers = make_task(tmp_path / "numbers", "def run(shard):\n    return shard.index + 10\n")
    mark = tmp_path / "unpickled"
    forged = make_task(tmp_path / "forged", FORGED.replace("MARK", repr(str(mark))))
    for task, values in ((numbers, [10, 11]), (forged, None)):
        done = cli("submit", str(task), "--shards", "2")
        assert done.code == 0, done.stderr
        run = cflow.attach(done.run_id, store=cli.store, progress=False)
        got = list(run.results())
        if values is not None:
            assert got == values
        else:
            assert [v["n"] for v in got] == [0, 1] and "pickle" in got[0]
        assert [value for _, value in run.as_completed()] == got
        assert [item for item, _ in run.as_completed()] == [{"index": 0}, {"index": 1}]
    assert not mark.exists()


def test_runner_cancel_while_as_completed_iterates_ends_it_as_results_would(
    cli: Cli, tmp_path: Path
) -> None:
    """The running items a cancel stopped have no failure record: reading one raised an
    internal NotFound traceback."""
    marks = tmp_path / "marks"
    marks.mkdir()
    run = cflow.submit(_gated(marks), range(6), store=cli.store, workers=2, chunk_size=1)
    wait_for(lambda: len(list(marks.glob("started-*"))) == 2, 60, "two items to start")
    assert cli("cancel", run.id).code == 0
    with pytest.raises(RunStateError, match=f"run {run.id} was cancelled"):
        list(run.as_completed(return_exceptions=True))


def test_a_script_that_imported_ipykernel_is_no_kernel_and_waits_at_exit(
    cli: Cli, tmp_path: Path
) -> None:
    """Only a running kernel leaves its runs going at exit (a library may import ipykernel)."""
    script = tmp_path / "imports_ipykernel.py"
    script.write_text(
        SCRIPT.read_text().replace("import cflow\n", "import cflow\nimport ipykernel\n")
    )
    marks = tmp_path / "marks"
    marks.mkdir()
    (marks / "go").touch()
    done = _ended(cli, script, marks, "exit")
    run_id = _only_run(cli)
    assert f"waiting for run {run_id} to end" in done.stderr
    assert cli.status(run_id)["state"] == "finished"


def test_a_function_run_is_not_retried_with_a_task_folder(cli: Cli, tmp_path: Path) -> None:
    run = cflow.submit(lambda x: 1 / x, [1, 0], store=cli.store, retries=0, progress=False)
    assert run.wait().failed == 1
    task = make_task(tmp_path / "task", "def run(shard):\n    return 1\n")
    refused = cli("retry", run.id, "--failed", "--task", str(task))
    assert refused.code != 0 and "maps a Python function" in refused.stderr, refused.stderr
    assert cli.status(run.id)["state"] == "finished"


def test_the_cli_sees_an_api_run_and_its_cancel_reaches_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("CFLOW_DEPLOYMENT", "CFLOW_BACKEND", "CFLOW_STORE"):
        monkeypatch.delenv(name, raising=False)
    marks = tmp_path / "marks"
    marks.mkdir()
    cli = Cli(tmp_path)
    run = cflow.submit(_gated(marks), range(3), store=cli.store, workers=1)
    wait_for(lambda: any(marks.glob("started-*")), 60, "a first item to start")
    status = cli.status(run.id)
    assert status["state"] == "active" and len(status["shards"]) == 3
    assert cli("cancel", run.id).code == 0
    progress = run.wait()
    assert progress.cancelled and progress.succeeded == 0


def test_a_worker_python_of_another_minor_version_is_refused_before_anything(
    cloud_outputs: Path,
) -> None:
    import json

    mine = f"{sys.version_info.major}.{sys.version_info.minor}"
    other = "3.10" if mine != "3.10" else "3.12"
    fields = json.loads(cloud_outputs.read_text())
    cloud_outputs.write_text(json.dumps({**fields, "worker_python": other}))
    with pytest.raises(ConfigError) as refused:
        cflow.submit(len, ["x"], deployment=cloud_outputs)
    line = str(refused.value)
    assert "\n" not in line
    assert f"this is Python {mine} but the deployment's workers run Python {other}" in line
    assert f"run this from a Python {other} interpreter, or pass image=" in line
    # The same Python passes the check (nothing is opened here: the resources do not exist).
    cloud_outputs.write_text(json.dumps({**fields, "worker_python": mine}))
    check_python(config_mod.resolve(deployment_file=cloud_outputs), image=None)
    # Without the output, the default image's Python (3.11) is assumed.
    cloud_outputs.write_text(json.dumps(fields))
    config = config_mod.resolve(deployment_file=cloud_outputs)
    if mine == DEFAULT_WORKER_PYTHON:
        check_python(config, image=None)
    else:
        with pytest.raises(ConfigError, match=r"workers run Python 3\.11"):
            check_python(config, image=None)
