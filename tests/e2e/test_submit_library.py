"""``runner.submit.submit`` without the command line: a Python caller submits, watches and
combines through the library, and the CLI sees the same run."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from runner import config as config_mod
from runner.finish import Ending
from runner.submit import SubmitRequest, submit
from tests.e2e.conftest import Cli, living
from worker.errors import ConfigError, TaskError

pytestmark = pytest.mark.e2e


def _task(tmp_path: Path, body: str) -> Path:
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.py").write_text(textwrap.dedent(body))
    return task


def test_a_python_caller_submits_watches_and_combines_without_typer(
    tmp_path: Path, cli: Cli
) -> None:
    task = _task(
        tmp_path,
        """
        def run(shard):
            (shard.output_dir / "out.txt").write_text(f"{shard.params['index']}\\n")
        """,
    )
    config = config_mod.resolve(local=True, store_dir=cli.store)
    said: list[str] = []
    created: list[str] = []
    done = submit(
        SubmitRequest(task, shards=4, workers=2, idle_timeout=2),
        config,
        said.append,
        on_created=lambda manifest: created.append(manifest.run_id),
    )
    assert done.run_id is not None and created == [done.run_id]
    outcome = done.outcome
    assert outcome is not None and outcome.ending is Ending.SETTLED and outcome.ok
    assert outcome.snapshot is not None and outcome.snapshot.succeeded == 4
    assert outcome.files is not None and len(outcome.files) == 1
    combined = Path(outcome.files[0].removeprefix("file://"))
    assert sorted(combined.read_text().split()) == ["0", "1", "2", "3"]

    status = cli.status(done.run_id)  # the CLI reads the run the library made
    assert status["counts"]["succeeded"] == 4
    assert {s["state"] for s in status["shards"]} == {"succeeded"}


def test_a_bad_request_or_task_is_refused_before_anything_is_made(tmp_path: Path, cli: Cli) -> None:
    with pytest.raises(ConfigError, match="exactly one of"):
        SubmitRequest(tmp_path, shards=2, inputs=["*.csv"])
    task = _task(tmp_path, "def run():\n    pass\n")  # run takes no shard
    config = config_mod.resolve(local=True, store_dir=cli.store)
    with pytest.raises(TaskError):
        submit(SubmitRequest(task, shards=2), config)
    assert not cli.store.exists()


@pytest.mark.parametrize("cancel", [True, False], ids=["cancel", "detach"])
def test_ctrl_c_after_the_run_is_made_and_before_its_watch_lets_go_as_the_watch_would(
    tmp_path: Path, cli: Cli, cancel: bool
) -> None:
    """A runner starved of the CPU may still be between making the run and watching it when
    its early workers already run a shard, and a Ctrl-C lands there: it cancels the run (and
    lets its workers go) or detaches, as during the watch, and never escapes the submit."""
    task = _task(
        tmp_path,
        f"""
        import pathlib, time

        def run(shard):
            while not pathlib.Path({str(tmp_path / "gate")!r}).exists():
                time.sleep(0.02)
        """,
    )
    config = config_mod.resolve(local=True, store_dir=cli.store)

    def say(line: str) -> None:
        if "shards, up to" in line:  # said once the run is made, before the watch begins
            raise KeyboardInterrupt

    request = SubmitRequest(task, shards=2, workers=1, cancel_on_interrupt=cancel)
    try:
        done = submit(request, config, say)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the submit of a run that exists")
    outcome = done.outcome
    assert done.run_id is not None and outcome is not None and outcome.interrupted
    if cancel:
        assert outcome.ending is Ending.CANCELLED
        assert cli.status(done.run_id)["state"] == "cancelled"
        assert not living(cli.workers().values())  # let go, as after a cancelled watch
    else:
        assert outcome.ending is Ending.DETACHED
        assert cli.status(done.run_id)["state"] == "active"
