"""Failed items: ``ShardFailed`` with what happened on the worker, the user's exception back."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import cflow
from tests.api import helpers
from tests.api.clean import run_script
from tests.api.helpers import Rejected, check, lazily
from worker.errors import ConfigError, RunStateError

pytestmark = pytest.mark.e2e


def test_a_failed_item_raises_shard_failed_with_its_story(backend: dict[str, Any]) -> None:
    run = cflow.submit(check, [0, 1, 2, 3], retries=0, **backend)
    with pytest.raises(cflow.ShardFailed) as raised:
        run.results()
    failed = raised.value
    assert failed.index == 2 and failed.run_id == run.id
    assert failed.type_name == "tests.api.helpers.Rejected"
    assert "two is not welcome" in failed.message
    # The worker's traceback from the function's frame on, each frame named by its file here
    # with its source line (cloudpickle ships the code as "<dynamic-code>").
    assert failed.traceback.startswith("Traceback (most recent call last):")
    assert "pyfunc" not in failed.traceback and "<dynamic-code>" not in failed.traceback
    assert f'File "{helpers.__file__}", line ' in failed.traceback
    assert 'raise Rejected(x, "two is not welcome")' in failed.traceback
    assert "about to reject 2" in failed.log_tail
    # The user's class comes back as itself, with its fields.
    assert isinstance(failed.exception, Rejected) and failed.exception.why == "two is not welcome"
    assert failed.__cause__ is failed.exception

    values = run.results(return_exceptions=True)
    assert values[0] == 0 and values[1] == 1
    stand_in = values[3]
    assert isinstance(stand_in, cflow.ShardFailed) and stand_in.index == 3
    assert isinstance(stand_in.exception, cflow.RemoteError)  # would not unpickle here
    assert stand_in.exception.type_name == "tests.api.helpers.Unloadable"
    assert stand_in.exception.message == "3/4" and "Unloadable: 3/4" in stand_in.traceback
    progress = run.progress()
    assert (progress.succeeded, progress.failed) == (2, 2)


def test_as_completed_raises_the_failed_item(local_backend: dict[str, Any]) -> None:
    run = cflow.submit(check, [2], retries=0, **local_backend)
    with pytest.raises(cflow.ShardFailed, match=r"item 0 failed: tests\.api\.helpers\.Rejected"):
        list(run.as_completed())


def test_as_completed_with_return_exceptions_goes_on_past_a_failed_item(
    backend: dict[str, Any],
) -> None:
    # Chunks and single-item shards alike: the loop sees every item, each failure in its place.
    for chunk_size in (None, 1):
        run = cflow.submit(
            check, [1, 2, 3, 4, 5], retries=0, halt="never", chunk_size=chunk_size, **backend
        )
        got = dict(run.as_completed(return_exceptions=True))
        assert sorted(got) == [1, 2, 3, 4, 5]
        failed = {item for item, value in got.items() if isinstance(value, cflow.ShardFailed)}
        assert failed == {2, 3}
        assert [got[1], got[4], got[5]] == [1, 4, 5]


def test_a_value_that_will_not_pickle_fails_its_item_saying_so(backend: dict[str, Any]) -> None:
    for chunk_size in (None, 1):  # chunks, and a shard per item
        values = cflow.map(
            lazily, [0, 1, 3], retries=0, halt="never", chunk_size=chunk_size,
            return_exceptions=True, **backend,
        )  # fmt: skip
        assert values[0] == [] and values[2] == [0, 1, 2]
        failed = values[1]
        assert isinstance(failed, cflow.ShardFailed)
        assert isinstance(failed.exception, cflow.UnpicklableValue)
        assert "the function returned a generator, which cannot be pickled" in str(failed)


class _BrokenStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("str broke")


def _breaks_on_3(x: int) -> int:
    if x == 3:
        raise _BrokenStr("item 3 is bad")
    return x


def test_an_exception_whose_str_raises_fails_its_item_only(
    local_backend: dict[str, Any],
) -> None:
    """Its text is what Python prints for it; before, the chunk's other items failed with
    the error of its ``__str__`` (or, retried, as a crash)."""
    for retries in (0, 2):
        values = cflow.map(
            _breaks_on_3, range(10), chunk_size=5, retries=retries, return_exceptions=True,
            **local_backend,
        )  # fmt: skip
        assert [v for i, v in enumerate(values) if i != 3] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
        failed = values[3]
        assert isinstance(failed, cflow.ShardFailed)
        assert failed.type_name.endswith("_BrokenStr")
        assert failed.message == "<exception str() failed>"
        assert "raise _BrokenStr" in failed.traceback


def test_a_cancelled_runs_results_say_so(local_backend: dict[str, Any], tmp_path: Any) -> None:
    gate = tmp_path / "go"

    def wait_for_gate(x: int) -> int:
        import time

        while not gate.exists():
            time.sleep(0.05)
        return x

    run = cflow.submit(wait_for_gate, range(4), **local_backend)
    run.cancel()
    assert run.progress().cancelled
    with pytest.raises(RunStateError, match=f"run {run.id} was cancelled"):
        run.results()
    # as_completed ends as results does (it ended quietly, the items not done unsaid)
    with pytest.raises(RunStateError, match=f"run {run.id} was cancelled"):
        list(run.as_completed(return_exceptions=True))


def test_a_cancel_that_cuts_an_iterable_short_is_a_cancel(
    local_backend: dict[str, Any], tmp_path: Any
) -> None:
    """The feed ended its items as it stopped: the run was recorded finished with what it had
    read, and its values came back as if they were all."""

    def slowly() -> Any:
        for i in range(40):
            if i == 12:
                (tmp_path / "six").touch()
            time.sleep(0.1)
            yield i

    run = cflow.submit(abs, slowly(), **local_backend)
    deadline = time.monotonic() + 60
    while not (tmp_path / "six").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    run.cancel()
    assert run.progress().cancelled
    with pytest.raises(RunStateError, match=f"run {run.id} was cancelled"):
        run.results()
    with pytest.raises(RunStateError, match=f"run {run.id} was cancelled"):
        list(run.as_completed())


def test_an_iterable_that_raises_is_the_callers_error(local_backend: dict[str, Any]) -> None:
    def first_batch_fails() -> Any:
        yield 1
        raise ValueError("no more items")

    with pytest.raises(ValueError, match="no more items"):
        cflow.submit(str, first_batch_fails(), **local_backend)

    def later_batch_fails() -> Any:
        import time

        yield 1
        time.sleep(0.3)  # the first batch goes out once a quarter of a second old
        yield 2
        raise ValueError("gone after two")

    run = cflow.submit(str, later_batch_fails(), **local_backend)
    with pytest.raises(ValueError, match="gone after two"):
        run.results()
    assert run.progress().total == 2  # the run holds the items read before it
    assert run.progress().succeeded == 2

    def fails_inside_a_chunk() -> Any:
        import time

        yield from range(10)
        time.sleep(0.3)  # the first chunk goes out
        yield from range(10, 15)
        raise ValueError("gone after fifteen")

    run = cflow.submit(str, fails_inside_a_chunk(), chunk_size=10, **local_backend)
    with pytest.raises(ValueError, match="gone after fifteen") as raised:
        run.results()
    # The five read into the next chunk before it raised run too, and it says so in items
    # (the only count was the publisher's, in chunks: "failed after 2").
    assert (run.progress().total, run.progress().succeeded) == (15, 15)
    assert raised.value.__notes__ == [f"cflow: run {run.id} holds the 15 items read before it"]


@pytest.mark.parametrize("chunk_size", [None, 1], ids=["chunks", "a-shard-each"])
def test_an_item_that_cannot_be_pickled_is_refused_in_one_line_naming_it(
    local_backend: dict[str, Any], chunk_size: int | None
) -> None:
    """Not a bare ``TypeError: cannot pickle '_thread.lock' object``: which item, what it is,
    what to map over instead; and no run was made."""
    import threading

    items = [1, 2, threading.Lock(), 4]
    with pytest.raises(ConfigError) as refused:
        cflow.map(str, items, chunk_size=chunk_size, **local_backend)
    said = str(refused.value)
    assert said.startswith("item 2 (a lock) cannot be shipped to the workers: TypeError:"), said
    assert "map over picklable items" in said and "\n" not in said
    runs = Path(local_backend["store"]) / "runs"
    assert not runs.exists() or not any(runs.iterdir())


def test_a_halted_runs_items_say_what_failed_and_what_never_ran(backend: dict[str, Any]) -> None:
    """A function that fails every item halts its run (its first attempts all failed alike):
    the items that ran say their own error, those it never ran say so and why, and without
    ``return_exceptions`` the first failure is raised, noting the halt and what to do. Before,
    ``RunStateError: run R was cancelled with 0 of 12 items done``, the error itself unsaid."""
    run = cflow.submit(helpers.divides, range(12), chunk_size=1, **backend)
    values = run.results(return_exceptions=True)
    progress = run.progress()
    assert progress.cancelled and progress.halted is not None
    assert "ZeroDivisionError" in progress.halted
    assert all(isinstance(v, cflow.ShardFailed) for v in values)
    ran = [v for v in values if v.type_name != "NotRun"]
    never = [v for v in values if v.type_name == "NotRun"]
    assert ran and never, [v.type_name for v in values]
    assert all(isinstance(v.exception, ZeroDivisionError) for v in ran)
    assert all("the run halted before it ran" in v.message for v in never)
    assert all("ZeroDivisionError" in v.message for v in never)  # the halt says why
    # as_completed gives every item too, those never run last (it stopped at the failed ones)
    pairs = list(run.as_completed(return_exceptions=True))
    assert sorted(item for item, _ in pairs) == list(range(12))
    assert sum(v.type_name == "NotRun" for _, v in pairs) == len(never)
    with pytest.raises(cflow.ShardFailed) as raised:
        cflow.map(helpers.divides, range(12), chunk_size=1, **backend)
    assert isinstance(raised.value.exception, ZeroDivisionError)
    (note,) = raised.value.__notes__
    assert "halted" in note and "items were not run" in note and "map again" in note
    assert f"runner retry {raised.value.run_id} --failed" in note


def test_a_value_that_will_not_load_here_fails_its_item_only(
    local_backend: dict[str, Any], tmp_path: Path
) -> None:
    """Item 2 returns an instance of a module only its worker has, items 4 and 5 one whose
    ``__setstate__`` raises (5's over 1 MB, read from the store when asked for): each fails
    alone, saying its value came back and why it will not load here; the others come back,
    from ``results``, ``as_completed``, ``attach`` and the cache alike. Before, the first
    such value's unpickling error ended the reading of every other, even with
    ``return_exceptions``."""
    hidden = tmp_path / "the-workers-only"

    def returns(x: int) -> object:
        if x == 2:
            import sys

            hidden.mkdir(exist_ok=True)
            (hidden / "cflow_workers_only.py").write_text("class Thing:\n    pass\n")
            sys.path.insert(0, str(hidden))
            import cflow_workers_only  # type: ignore[import-not-found]

            return cflow_workers_only.Thing()
        if x in (4, 5):
            return helpers.Spoiled(2_000_000 if x == 5 else 0)
        return x

    def lost_alone(values: Any, run_id: str) -> None:
        assert [values[i] for i in (0, 1, 3, 6)] == [0, 1, 3, 6]
        missing, spoiled, big = values[2], values[4], values[5]
        for index, failed in ((2, missing), (4, spoiled), (5, big)):
            assert isinstance(failed, cflow.ShardFailed), failed
            assert (failed.index, failed.run_id) == (index, run_id) and failed.shard_id
            assert "its value was returned but cannot be loaded in this process" in failed.message
        assert missing.type_name == "builtins.ModuleNotFoundError"
        assert "No module named 'cflow_workers_only'" in missing.message
        assert "the worker had that module" in missing.message
        assert isinstance(missing.exception, ModuleNotFoundError)
        assert spoiled.type_name == big.type_name == "builtins.ValueError"
        assert "spoiled in transit" in spoiled.message and "__setstate__" in spoiled.traceback

    # Chunks (all small values in one list, and an entry each beside a value in a file of
    # its own), and a shard per item; each mapped again to be read back from the cache.
    for chunk_size in (3, 1):
        for cached in (0, 7):
            run = cflow.submit(
                returns, range(7), chunk_size=chunk_size, cache=True, **local_backend
            )
            lost_alone(run.results(return_exceptions=True), run.id)
            assert run.progress().cached == cached
            with pytest.raises(cflow.ShardFailed) as raised:
                run.results()
            assert raised.value.index == 2
            got = dict(run.as_completed(return_exceptions=True))
            lost_alone([got[i] for i in range(7)], run.id)
            with pytest.raises(cflow.ShardFailed):
                dict(run.as_completed())
            attached = cflow.attach(run.id, store=local_backend["store"])
            lost_alone(attached.results(return_exceptions=True), run.id)


def test_a_script_whose_value_will_not_load_here_exits_without_waiting(tmp_path: Path) -> None:
    """Its ``cflow.map`` raises the item's ``ShardFailed`` once the run is over; the exit
    then says nothing of waiting for the run. Before, the unpickling error escaped while the
    run was being finished, and the exit said ``cflow: waiting for run RUN to end``."""
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import os
            import sys
            import cflow

            HIDDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers-only")

            def returns(x):
                if x == 1:
                    sys.path.insert(0, HIDDEN)
                    import cflow_workers_only
                    return cflow_workers_only.Thing()
                return x

            if __name__ == "__main__":
                cflow.map(returns, range(3), progress=False, store=sys.argv[1])
            """
        )
    )
    hidden = tmp_path / "workers-only"
    hidden.mkdir()
    (hidden / "cflow_workers_only.py").write_text("class Thing:\n    pass\n")
    done = run_script(script, str(tmp_path / ".cflow"), cwd=tmp_path)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("cflow.errors.ShardFailed: item 1 failed: builtins.Module"), last
    assert "its value was returned but cannot be loaded in this process" in last
    assert "waiting for run" not in done.stderr, done.stderr


def test_a_traceback_read_by_another_process_names_the_submitting_script(
    tmp_path: Path,
) -> None:
    """A run submitted by one script and read by ``cflow.attach`` in another: every frame of
    the function, those of the exception it chained from too, names the submitting script
    and shows its line. Before, each named the reading script, quoting its lines, and the
    chained exception's frames stayed ``<dynamic-code>``."""
    submitting, reading = tmp_path / "submits.py", tmp_path / "attaches.py"
    submitting.write_text(
        textwrap.dedent(
            """\
            import sys
            import cflow

            def inner(x):
                raise ValueError(f"inner {x}")

            def outer(x):
                try:
                    inner(x)
                except ValueError as exc:
                    raise KeyError(x) from exc

            if __name__ == "__main__":
                run = cflow.submit(outer, [1], retries=0, progress=False, store=sys.argv[1])
                run.wait()
                print(run.id)
            """
        )
    )
    reading.write_text(
        textwrap.dedent(
            """\
            import json
            import sys
            import cflow
            # these lines are not the function's
            # nor this one
            run = cflow.attach(sys.argv[2], store=sys.argv[1])
            failed = run.results(return_exceptions=True)[0]
            print(json.dumps(failed.traceback))
            """
        )
    )

    def python(script: Path, *args: str) -> str:
        done = run_script(script, str(tmp_path / ".cflow"), *args, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    trace = json.loads(python(reading, python(submitting)))
    assert str(reading) not in trace and "<dynamic-code>" not in trace, trace
    for line, name, source in [
        (9, "outer", "inner(x)"),
        (5, "inner", 'raise ValueError(f"inner {x}")'),
        (11, "outer", "raise KeyError(x) from exc"),
    ]:
        assert f'  File "{submitting}", line {line}, in {name}\n    {source}\n' in trace, trace


def test_a_worker_traceback_is_named_from_what_was_recorded_not_from_this_main(
    tmp_path: Path,
) -> None:
    """How a worker's traceback is read, whatever the worker recorded: a frame naming a file
    the worker did not have gets its line from the file here; a ``<dynamic-code>`` frame is
    named by the file the worker recorded for it, or by its module here, never by this
    process's ``__main__`` (another script where this process only attached to the run); a
    chained exception's frame is named as a recorded frame of the same function."""
    from cflow.errors import read_failure
    from worker.pyfunc import ERROR_MARK

    script = tmp_path / "script.py"
    script.write_text("def f(x):\n    y = x + 1\n    return y / 0\n")
    trace = (
        "Traceback (most recent call last):\n"
        f'  File "{script}", line 3, in f\n'
        '  File "<dynamic-code>", line 7, in helper\n'
        "ValueError: inner\n\nThe above exception was the direct cause of the following"
        " exception:\n\nTraceback (most recent call last):\n"
        '  File "<dynamic-code>", line 9, in helper\n'
        '  File "<dynamic-code>", line 2, in g\n'
        '  File "<dynamic-code>", line 2, in h\n'
        "KeyError: 1\n"
    )
    frames = [
        ["__main__", "g", 2],  # this process's __main__ is not the script that made it
        ["tests.api.helpers", "helper", 9, str(script)],  # the file the worker recorded
        ["tests.api.helpers", "h", 2],  # the module as this process has it
    ]
    record = {"type": "builtins.KeyError", "message": "1", "traceback": trace, "frames": frames}
    described, _ = read_failure(ERROR_MARK + json.dumps(record) + "\n", "failed")
    named = described.traceback
    assert f'  File "{script}", line 3, in f\n    return y / 0\n' in named, named
    assert f'  File "{script}", line 7, in helper\n' in named  # chained: named as its function
    assert f'  File "{script}", line 9, in helper\n' in named
    assert '  File "<dynamic-code>", line 2, in g\n' in named
    assert f'  File "{helpers.__file__}", line 2, in h\n' in named


def test_the_errors_cflow_raises_are_cflows_own_names(local_backend: dict[str, Any]) -> None:
    """What the API documents it raises, under ``cflow``: the very classes raised, so that
    ``except cflow.RunStateError`` catches what a cancelled run's ``results`` raises."""
    assert cflow.ConfigError is ConfigError and cflow.RunStateError is RunStateError
    assert {"ConfigError", "RunStateError"} <= set(cflow.__all__)
    with pytest.raises(cflow.ConfigError, match="no option slotz"):
        cflow.submit(str, [1], slotz=2, **local_backend)
