"""``cflow.map`` and ``cflow.submit`` over functions of every kind, on both backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import cflow
from cflow.driver import let_go
from tests.api.clean import run_script

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def test_a_lambda_and_a_closure_come_back_in_input_order(backend: dict[str, Any]) -> None:
    offset = 100

    def shifted(x: int) -> dict[str, int]:
        return {"x": x, "y": x + offset}  # a closure over offset

    assert list(cflow.map(lambda x: x * 3, range(7), **backend)) == [x * 3 for x in range(7)]
    values = cflow.map(shifted, [5, 1, 4], **backend)
    assert list(values) == [{"x": 5, "y": 105}, {"x": 1, "y": 101}, {"x": 4, "y": 104}]


def test_as_completed_yields_every_item_with_its_value(backend: dict[str, Any]) -> None:
    run = cflow.submit(lambda s: s.upper(), ["a", "b", "c", "d"], **backend)
    got = dict(run.as_completed())
    assert got == {"a": "A", "b": "B", "c": "C", "d": "D"}
    progress = run.progress()
    assert (progress.total, progress.succeeded, progress.failed) == (4, 4, 0)
    assert not progress.publishing
    assert list(run.results()) == ["A", "B", "C", "D"]
    # Reading the values let go of this process's connections; a later look opens its own.
    assert run.progress().succeeded == 4
    assert list(run.results()) == ["A", "B", "C", "D"]


def test_an_async_function_is_awaited_item_by_item(backend: dict[str, Any]) -> None:
    import asyncio
    import functools

    async def scaled(x: float, k: int = 2) -> float:
        await asyncio.sleep(x)
        if x == 0.02:
            raise ValueError(f"no {x}")
        return x * k

    class Shifted:
        async def __call__(self, x: int) -> int:
            return x + 1

    values = cflow.map(
        scaled, [0, 0.01, 0.02, 5, 0.03], timeout=1, retries=0, halt="never", chunk_size=5,
        return_exceptions=True, **backend,
    )  # fmt: skip
    assert values[:2] == [0, 0.02] and values[4] == 0.06
    raised, late = values[2], values[3]
    assert isinstance(raised, cflow.ShardFailed) and isinstance(raised.exception, ValueError)
    # Its traceback starts at the function, not in the event loop that ran it.
    assert raised.traceback.splitlines()[1].endswith("in scaled"), raised.traceback
    assert isinstance(late, cflow.ShardFailed) and "timeout of 1 s" in late.message
    # The item after the one that timed out ran on a new event loop.
    assert list(cflow.map(functools.partial(scaled, k=3), [0.01], **backend)) == [0.03]
    assert list(cflow.map(Shifted(), [1, 2], **backend)) == [2, 3]
    returned = cflow.map(lambda x: scaled(x), [0], return_exceptions=True, **backend)[0]
    assert "map the `async def` function itself" in str(returned), returned


def test_several_iterables_are_mapped_as_the_builtin_map_maps_them(
    backend: dict[str, Any],
) -> None:
    import asyncio

    async def later(a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a - b

    assert list(cflow.map(pow, [2, 3, 4], [5, 6], **backend)) == [32, 729]  # the shortest
    assert list(cflow.map(later, (x for x in [5, 7]), range(2), **backend)) == [5, 6]
    run = cflow.submit(divmod, [7, 9], [2, 0], retries=0, **backend)
    (first, value), (second, failed) = run.as_completed(return_exceptions=True)
    assert (first, value, second) == ((7, 2), (3, 1), (9, 0))
    assert isinstance(failed.exception, ZeroDivisionError)
    if "store" in backend:  # each run is named by its function (`runner runs`)
        shown = subprocess.run(
            [sys.executable, "-m", "runner", "runs", "--json", "--store", backend["store"]],
            capture_output=True, text=True, cwd=REPO, check=True,
        )  # fmt: skip
        assert {r["task"] for r in json.loads(shown.stdout)} == {"pow", "later", "divmod"}


def test_a_local_runs_items_run_in_the_callers_folder_a_clouds_in_their_own(
    backend: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative path means to a local run's function what it meant where the map was
    called (``glob("data/*.csv")`` in a notebook); on Google Cloud there is no such folder
    and each attempt runs in an empty one of its own."""
    here = tmp_path / "here"
    (here / "data").mkdir(parents=True)
    (here / "data" / "a.txt").write_text("alpha")
    monkeypatch.chdir(here)

    def where(_: int) -> tuple[str, list[str]]:
        return os.getcwd(), sorted(os.listdir("."))

    def read(path: str | Path) -> str:
        return Path(path).read_text()

    (folder, names), *_ = cflow.map(where, [0, 1], **backend)
    if "deployment" in backend:
        assert folder != str(here) and names == [], (folder, names)
        return
    assert (folder, names) == (str(here), ["data"])
    assert list(cflow.map(read, ["data/a.txt", Path("data/a.txt")], **backend)) == ["alpha"] * 2
    # The folder is part of the cache's key: another one's values are not this one's.
    there = tmp_path / "there"
    (there / "data").mkdir(parents=True)
    (there / "data" / "a.txt").write_text("beta")

    def config(x: int) -> str:
        return Path("data/a.txt").read_text()  # read from the folder, named by no item

    for folder_, value in ((here, "alpha"), (there, "beta"), (here, "alpha")):
        monkeypatch.chdir(folder_)
        assert list(cflow.map(config, [1], cache=True, **backend)) == [value]


def test_each_item_of_a_chunk_starts_in_the_same_folder(
    local_backend: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An item that changes folder (a library's os.chdir) does not move the ones after it in
    its chunk: the values do not depend on how the items were chunked."""
    for i in range(4):
        (tmp_path / f"f{i}.txt").write_text(f"row{i}")
    monkeypatch.chdir(tmp_path)

    def wanders(name: str) -> str:
        text = Path(name).read_text()
        os.chdir("/")
        return text

    names = [f"f{i}.txt" for i in range(4)]
    for size in (1, 4):
        values = cflow.map(wanders, names, chunk_size=size, retries=0, **local_backend)
        assert list(values) == ["row0", "row1", "row2", "row3"], size


def test_a_helper_module_that_is_not_installed_goes_by_value(
    local_backend: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under the working folder, on this process's path only: no worker can import it (the
    # local workers start in the working folder, which is on their path; the module is not).
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "scoring.py").write_text("def score(x):\n    return {'score': x * x + 1}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(mine))
    import scoring  # type: ignore[import-not-found]

    assert list(cflow.map(scoring.score, [2, 3], **local_backend)) == [
        {"score": 5},
        {"score": 10},
    ]


def test_a_function_of_a_scripts_main_runs(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, sys
            import cflow

            def double(x):
                return x * 2

            if __name__ == "__main__":
                print(json.dumps(list(cflow.map(double, range(5), store=sys.argv[1]))))
            """
        )
    )
    done = run_script(script, str(tmp_path / ".cflow"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [0, 2, 4, 6, 8]


def test_a_maps_workers_sweep_away_the_bundles_nobody_used_for_an_hour(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each function mapped is a bundle its workers unpack: those of earlier maps go once
    unused for an hour, so a notebook's day of maps does not fill the machine's ``/tmp``."""
    cache = tmp_path / "scratch" / "cflow" / "bundles"
    old = cache / ("0" * 64)
    (old / "data").mkdir(parents=True)
    (old / "data" / "weights.bin").write_bytes(bytes(1 << 20))
    (old / ".complete").touch()
    lock = cache / f"{'0' * 64}.lock"
    lock.touch()
    os.utime(lock, (1.0, 1.0))
    monkeypatch.setenv("CFLOW_SCRATCH", str(tmp_path / "scratch"))
    marker = os.urandom(8).hex()  # a function no earlier map shipped: a new bundle

    assert list(cflow.map(lambda x: f"{marker}{x}", range(3), store=tmp_path / "s")) == [
        f"{marker}{x}" for x in range(3)
    ]
    assert let_go()
    assert not old.exists() and not lock.exists()
    left = [p for p in cache.iterdir() if p.is_dir()]
    assert len(left) == 1 and (left[0] / ".complete").exists()  # the map's own, kept an hour


def test_a_big_item_goes_by_the_store_and_a_big_value_is_read_when_asked_for(
    backend: dict[str, Any],
) -> None:
    small, big = b"v", b"w" * 20_000  # over the 8 KiB an item's params carry
    run = cflow.submit(lambda b: b * 150, [small, big], **backend)
    assert dict(run.as_completed()) == {small: small * 150, big: big * 150}
    values = run.results()
    kept = values._values  # what the Results holds: the small value, a handle for the big one
    assert kept[0] == small * 150
    assert isinstance(kept[1], cflow.results.Stored)  # 3 MB: in the store until asked for
    assert values[1] == big * 150


def test_cache_reuses_the_items_an_earlier_run_committed(
    backend: dict[str, Any], tmp_path: Path
) -> None:
    marks = tmp_path / "calls"
    marks.mkdir()

    def counted(x: int) -> int:
        (marks / f"{x}-{len(list(marks.iterdir()))}").touch()
        return x + 1

    assert list(cflow.map(counted, [1, 2, 3], cache=True, **backend)) == [2, 3, 4]
    assert len(list(marks.iterdir())) == 3
    assert list(cflow.map(counted, [1, 2, 3, 4], cache=True, **backend)) == [2, 3, 4, 5]
    assert sorted(p.name.split("-")[0] for p in marks.iterdir()) == ["1", "2", "3", "4"]


def test_cache_reruns_an_item_whose_file_changed_under_the_same_path(
    local_backend: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An item naming a file (a ``Path``, or a string naming one) is keyed with the file's
    size and modification time: the same path with new data reruns that item only."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b", "c"):
        (data / f"{name}.txt").write_text(name)
    items = [Path("data/a.txt"), "data/b.txt", ("data/c.txt", 3)]

    def read(item: Any) -> str:
        return Path(item[0] if isinstance(item, tuple) else item).read_text()

    def mapped() -> tuple[list[str], int]:
        run = cflow.submit(read, items, cache=True, chunk_size=1, **local_backend)
        return list(run.results()), run.progress().cached

    assert mapped() == (["a", "b", "c"], 0)
    assert mapped() == (["a", "b", "c"], 3)
    (data / "a.txt").write_text("A")
    (data / "c.txt").write_text("C")
    os.utime(data / "c.txt", ns=(0, 0))  # a time of its own, whatever the clock's grain
    assert mapped() == (["A", "b", "C"], 1)
    assert mapped() == (["A", "b", "C"], 3)


@pytest.mark.emulator
def test_cache_reruns_an_item_whose_bucket_object_changed(
    tmp_path: Path, fake_compute: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Google Cloud a ``gs://`` item is keyed with its object's checksums."""
    from tests.api.conftest import _cloud
    from worker.backends.gcp.gcs import GcsStore

    for name in ("CFLOW_DEPLOYMENT", "CFLOW_BACKEND", "CFLOW_STORE"):
        monkeypatch.delenv(name, raising=False)
    cloud = _cloud(tmp_path, fake_compute)
    bucket = json.loads(Path(cloud["deployment"]).read_text())["bucket"]
    store = GcsStore(bucket)
    for name in ("a", "b"):
        store.put(f"data/{name}.txt", name.encode())
    items = [f"gs://{bucket}/data/a.txt", f"gs://{bucket}/data/b.txt"]

    def cached() -> int:
        run = cflow.submit(len, items, cache=True, chunk_size=1, **cloud)
        assert list(run.results()) == [len(items[0])] * 2
        return run.progress().cached

    try:
        assert cached() == 0
        assert cached() == 2
        store.put("data/b.txt", b"B, changed")
        assert cached() == 1
    finally:
        assert let_go()


@pytest.mark.parametrize(
    ("option", "said"),
    [
        ({"workers": -1}, "workers=-1: give a whole number of at least 1"),
        ({"workers": "2"}, "workers='2': give a whole number of at least 1"),
        ({"workers": 0}, "workers=0: give a whole number of at least 1"),
        ({"retries": -1}, "retries=-1: give a whole number from 0 to 99"),
        ({"timeout": 0}, "timeout=0: give a number of seconds above 0"),
        ({"timeout": float("nan")}, "timeout=nan: give a number of seconds above 0"),
        ({"slots": 0}, "slots=0: give a whole number from 1 to 256"),
        ({"fallback_after": 0}, "fallback_after=0: give a whole number of at least 1"),
        ({"idle_timeout": -1}, "idle_timeout=-1: give a number of seconds above 0"),
    ],
)
def test_a_number_out_of_bounds_is_refused_in_one_line_before_anything_starts(
    local_backend: dict[str, Any], option: dict[str, Any], said: str
) -> None:
    # workers=-1 used to leave the run waiting for ever; slots=0 made a run whose workers
    # could not start; retries=-1 and timeout=0 were taken.
    from worker.errors import ConfigError

    backend = {k: v for k, v in local_backend.items() if k not in option}
    with pytest.raises(ConfigError) as refused:
        cflow.submit(abs, [1], **backend, **option)
    assert str(refused.value).startswith(said) and "\n" not in str(refused.value)
    assert not Path(local_backend["store"]).exists()  # nothing was started


def test_an_unknown_option_is_refused_in_one_line_naming_the_valid_ones(
    local_backend: dict[str, Any],
) -> None:
    from worker.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        cflow.submit(str, [1], slotz=2, **local_backend)
    said = str(refused.value)
    assert "\n" not in said and "no option slotz" in said
    assert "slots" in said and "cache" in said and "retries" in said
    with pytest.raises(ConfigError, match=r"^cache='yes': give True or False$"):
        cflow.submit(str, [1], cache="yes", **local_backend)
    with pytest.raises(ConfigError, match=r"^the function to map is not callable: 3 \(int\)"):
        cflow.submit(3, [1], **local_backend)  # type: ignore[arg-type]
    assert not Path(local_backend["store"]).exists()  # nothing was started


def test_a_say_that_is_not_callable_is_refused_in_one_line_before_anything_starts(
    local_backend: dict[str, Any],
) -> None:
    """Before, ``say=42`` failed in the run's thread, once the run was being made, as a bare
    ``TypeError: 'int' object is not callable``. None says nothing, as leaving it out does."""
    with pytest.raises(cflow.ConfigError) as refused:
        cflow.submit(abs, [1], say=42, **local_backend)  # type: ignore[arg-type]
    said = str(refused.value)
    assert said.startswith("say=42: give a callable that takes each line") and "\n" not in said
    assert not Path(local_backend["store"]).exists()  # nothing was started
    assert list(cflow.map(abs, [-1, 2], say=None, **local_backend)) == [1, 2]
