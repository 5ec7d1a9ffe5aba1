"""Failed items: ``ShardFailed`` with what happened on the worker, the user's exception back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

import cflow
from tests.api import helpers
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
    with pytest.raises(ValueError, match="gone after fifteen"):
        run.results()
    # The five read into the next chunk before it raised run too.
    assert (run.progress().total, run.progress().succeeded) == (15, 15)


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
