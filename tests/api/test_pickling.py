"""What a map pickles: the same bytes from every process where the cache keys shards on them,
and items of the caller's own classes by value, so that a worker that is not a fork of the
caller (a notebook's, Google Cloud's) can read them (``cflow.pickling``)."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import cflow
from cflow.canonical import canonical_dumps, holds_a_set
from cflow.pickling import ItemPickler

REPO = Path(__file__).parents[2]
SCRIPT = Path(__file__).with_name("pickling_script.py")


def _script(*args: str, seed: str, env: dict[str, str] | None = None, script: Path = SCRIPT) -> Any:
    done = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=script.parent,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": seed, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_a_cached_maps_pickles_are_the_same_bytes_whatever_the_process() -> None:
    # A class of __main__ (cloudpickle tags it with a random id), sets of strings (in the
    # order of the process's string hashes), an enum, a closure, a frozenset in an item.
    first, second = (_script("digests", seed=seed) for seed in ("1", "2"))
    assert first == second
    assert len(set(first.values())) == len(first)


def test_a_canonical_pickle_reads_back_as_cloudpickle_s_would() -> None:
    @dataclasses.dataclass
    class Local:  # not importable: shipped by value
        words: set[str]

    marks = {"x", "y", "z", ("t", 1)}

    def fn(item: Local) -> Local:
        return Local(item.words | {w for w in marks if isinstance(w, str)})

    shipped = cloudpickle.loads(canonical_dumps(fn))
    out = shipped(Local({"a"}))
    assert out.words == {"a", "x", "y", "z"}
    # A value of a class shipped by value comes back as the caller's own class (cloudpickle
    # finds it under the tag the canonical pickle gave it).
    back = pickle.loads(canonical_dumps(out))
    assert type(back) is Local and back == out
    nested = frozenset({frozenset({1, "a"}), frozenset({2.5, b"b"})})
    assert pickle.loads(canonical_dumps(nested)) == nested
    loop: list[Any] = []
    loop.append(loop)
    again = pickle.loads(canonical_dumps(loop))
    assert again[0] is again


def test_an_item_goes_by_value_only_where_a_worker_could_not_read_it() -> None:
    plain = ItemPickler(("mylib",))
    assert plain.dumps(0, {"n": 1, "s": {"a"}}) == pickle.dumps(
        {"n": 1, "s": {"a"}}, protocol=pickle.HIGHEST_PROTOCOL
    )
    cached = ItemPickler((), canonical=True)
    assert cached.dumps(1, [1, 2, 3]) == pickle.dumps([1, 2, 3], protocol=pickle.HIGHEST_PROTOCOL)
    got = list(cached.pickles([7, {"b", "a"}, lambda: 8], lambda: False))  # a map's items
    assert [i for i, _ in got] == [0, 1, 2]
    assert pickle.loads(got[0][1]) == 7 and pickle.loads(got[1][1]) == {"a", "b"}
    assert pickle.loads(got[2][1])() == 8  # a lambda: by value, whole
    with pytest.raises(Exception, match=r"item 2 \(a generator\) cannot be shipped"):
        plain.dumps(2, (x for x in ()))
    floats = [i / 7 for i in range(10_000)]  # a set's opcodes among its bytes, and no set
    data = pickle.dumps(floats, protocol=pickle.HIGHEST_PROTOCOL)
    assert pickle.EMPTY_SET in data and not holds_a_set(floats, data)
    nested = [1, ("a", {2})]
    assert holds_a_set(nested, pickle.dumps(nested, protocol=pickle.HIGHEST_PROTOCOL))


VALUES = [[2, ["cat", "sat"]], [2, ["cat", "dog"]], [3, ["be", "not", "or"]]]
# Workers started as new interpreters, as a notebook's are: none has the script's classes unless
# they come by value.
SPAWNED = {"CFLOW_FORK_WORKERS": "0"}


@pytest.mark.e2e
def test_items_of_a_main_class_reach_workers_that_are_not_its_forks(tmp_path: Path) -> None:
    done = _script("map", str(tmp_path / ".cflow"), seed="1", env=SPAWNED)
    assert done == {"values": VALUES, "own class": True, "cached": 0}


@pytest.mark.e2e
def test_a_rerun_in_another_process_reuses_a_map_over_a_main_class(tmp_path: Path) -> None:
    store = str(tmp_path / ".cflow")
    first = _script("map", store, "--cache", seed="1", env=SPAWNED)
    assert first == {"values": VALUES, "own class": True, "cached": 0}
    second = _script("map", store, "--cache", seed="2", env=SPAWNED)
    assert second == {**first, "cached": 3}


@pytest.mark.e2e
def test_lines_added_above_the_function_and_its_classes_keep_the_cache(tmp_path: Path) -> None:
    # The script edited in place: lines added near its top move every function and class it
    # ships down, and what they compute is the same. Its map reuses every item.
    store, script = str(tmp_path / ".cflow"), tmp_path / "job.py"
    original = SCRIPT.read_text()
    script.write_text(original)
    first = _script("map", store, "--cache", seed="1", script=script)
    future = "from __future__ import annotations\n"
    script.write_text(original.replace(future, future + "\n# a note\nimport os\n"))
    second = _script("map", store, "--cache", seed="2", script=script)
    assert second == {**first, "cached": 3}
    script.write_text(original.replace('"the", "a",', '"the", "a", "cat",'))  # all run again
    third = _script("map", store, "--cache", seed="3", script=script)
    assert third["cached"] == 0 and third["values"][0] == [1, ["sat"]]


MODULE = """\
import dataclasses

@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int

    def scaled(self):
        return Point(self.x * SCALE, self.y * SCALE)

SCALE = 1

def norm1(p):
    return abs(p.x) + abs(p.y)
"""


def test_items_of_a_module_the_workers_cannot_import_reach_them(
    backend: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A module of the caller's own (under its working folder, not installed) that no worker
    # has on its path: Google Cloud's workers, and local ones started as new interpreters.
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "geometry_own.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CFLOW_FORK_WORKERS", "0")
    import geometry_own  # type: ignore[import-not-found]

    try:
        Point = geometry_own.Point

        def moved(p: Any) -> Any:
            assert isinstance(p, Point)  # the function's class and the item's are one class
            return Point(p.x + 1, geometry_own.norm1(p))

        for cached in (0, 2):  # the second map, with the cache, reuses both items
            run = cflow.submit(moved, [Point(1, -2), Point(3, 4)], cache=True, **backend)
            values = run.results()
            assert list(values) == [Point(2, 3), Point(4, 7)]
            assert all(type(v) is Point for v in values)  # the caller's own class, come back
            assert run.progress().cached == cached
        # The values came back as the caller's class, left as it was: its methods still read
        # the module's globals (cloudpickle set on it the methods it unpickled, with the
        # globals they had on the worker).
        geometry_own.SCALE = 10
        assert Point(1, 2).scaled() == Point(10, 20)
    finally:
        del sys.modules["geometry_own"]  # imported afresh by the next test


EDITED = """\
import json
import importlib
import sys

import cflow
import devpkg

def mapped(**options):
    return list(cflow.map(devpkg.shifted, [1, 2], progress=False, **options))

seen = [mapped()]
for shift in (100, 1000):  # edited, then reloaded, as autoreload does in a notebook
    with open(devpkg.__file__, "w") as fh:
        fh.write(f"def shifted(x):\\n    return x + {shift}\\n")
    importlib.reload(devpkg)
    seen += [mapped(), mapped(cache=True)]
print(json.dumps(seen))
"""


def test_a_package_installed_for_development_runs_as_the_caller_has_it(tmp_path: Path) -> None:
    """A package outside the working folder and every site-packages folder (``pip install
    -e``, a folder on ``PYTHONPATH``) goes by value: edited and reloaded, its new code runs.
    By reference, the workers forked from the launcher kept since the first map ran the code
    it had then, and the cache, keyed by the function's name, gave the first values back."""
    (tmp_path / "src" / "devpkg").mkdir(parents=True)
    (tmp_path / "src" / "devpkg" / "__init__.py").write_text("def shifted(x):\n    return x + 1\n")
    (tmp_path / "nb").mkdir()
    script = tmp_path / "nb" / "edited.py"
    script.write_text(EDITED)
    path = os.pathsep.join([str(tmp_path / "src"), str(REPO)])
    seen = _script(seed="0", env={"PYTHONPATH": path}, script=script)
    assert seen == [[2, 3], [101, 102], [101, 102], [1001, 1002], [1001, 1002]]


def test_a_package_outside_the_working_folder_reaches_workers_that_cannot_import_it(
    backend: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "src" / "devpkg_far").mkdir(parents=True)
    (tmp_path / "src" / "devpkg_far" / "__init__.py").write_text("def f(x):\n    return -x\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    (tmp_path / "nb").mkdir()
    monkeypatch.chdir(tmp_path / "nb")  # the package is outside the working folder
    monkeypatch.setenv("CFLOW_FORK_WORKERS", "0")  # local workers import what is on the path
    import devpkg_far  # type: ignore[import-not-found]

    try:
        assert list(cflow.map(devpkg_far.f, [1, 2], **backend)) == [-1, -2]
    finally:
        del sys.modules["devpkg_far"]


OWN_CLASSES = """\
import importlib
import json
import multiprocessing
import pickle
import sys
import threading

import cflow
import shapes

if sys.argv[1:] == ["threaded"]:  # a caller with another thread: its workers are spawned
    threading.Thread(target=threading.Event().wait, daemon=True).start()


def saved(x):
    with open(f"model{x}.pkl", "wb") as fh:
        pickle.dump(shapes.Box(x), fh)  # by reference: the class must be its module's
    return shapes.Box(x)


def pooled(x):
    with multiprocessing.Pool(2) as pool:
        return sum(pool.map(shapes.square, range(x + 3)))


def imported(x):
    import helper  # in the body: the file as it is now, not a fork's old copy

    return helper.g(x)


with open("helper.py", "w") as fh:
    fh.write("def g(x):\\n    return ['v1', x]\\n")
import helper  # noqa: E402

seen = [[b.n for b in cflow.map(saved, [1, 2], progress=False)]]
seen.append(list(cflow.map(pooled, [0, 1], progress=False, timeout=60)))
seen.append(list(cflow.map(imported, [1], progress=False)))
with open("helper.py", "w") as fh:
    # a size of its own: Python takes a .pyc of the same size and second for current
    fh.write("def g(x):\\n    return ['version 2', x]\\n")
importlib.reload(helper)
seen.append(list(cflow.map(imported, [1], progress=False)))
print(json.dumps(seen))
"""


@pytest.mark.parametrize("mode", ["forked", "threaded"])
def test_the_callers_own_classes_are_their_modules_on_the_workers(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A class of the caller's own module comes by value, not as its module's own object:
    ``pickle.dump`` of one in the function, or a pool given one of its functions, failed
    ("it's not the same object as shapes.Box"). And a module imported in the function's body
    was the old copy a forked worker held, not the file as edited and reloaded."""
    (tmp_path / "shapes.py").write_text(
        "import dataclasses\n\n\n@dataclasses.dataclass\nclass Box:\n    n: int\n\n\n"
        "def square(v):\n    return v * v\n"
    )
    script = tmp_path / "own_classes.py"
    script.write_text(OWN_CLASSES)
    args = ["threaded"] if mode == "threaded" else []
    seen = _script(*args, seed="0", script=script)
    assert seen == [[1, 2], [5, 14], [["v1", 1]], [["version 2", 1]]]
    monkeypatch.syspath_prepend(str(tmp_path))
    try:  # what the function pickled reads back here, its class this one's
        assert pickle.loads((tmp_path / "model2.pkl").read_bytes()).n == 2
    finally:
        sys.modules.pop("shapes", None)


def test_a_caller_that_imported_a_module_named_task_maps(
    local_backend: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller of its own ``task`` module (a task folder's task.py it imported) is not the
    task host's: the host dropped its own task module with the caller's."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "task.py").write_text("def run(shard):\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mine"))
    monkeypatch.delitem(sys.modules, "task", raising=False)
    import task  # type: ignore[import-not-found]  # noqa: F401

    try:
        assert list(cflow.map(abs, [-1, -2], retries=0, **local_backend)) == [1, 2]
    finally:
        sys.modules.pop("task", None)
