"""``runner.submit.submit`` without the command line: a Python caller submits, watches and
combines through the library, and the CLI sees the same run."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from runner import config as config_mod
from runner.finish import Ending
from runner.submit import SubmitRequest, submit
from tests.e2e.conftest import Cli
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
