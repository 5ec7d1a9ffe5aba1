"""A task host forked ahead imports the installed modules its caller's function named while it
waits for its task: a launcher started as a new interpreter (the caller had threads, as one
that imported numpy has) holds none of the caller's modules, and every map's hosts would import
them again on the map's time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cflow.pickling import modules_named, pickle_function

pytestmark = pytest.mark.e2e

REPO = Path(__file__).parents[2]


def test_the_modules_a_pickled_function_names_are_the_installed_ones_it_needs() -> None:
    import json as stdlib_json

    np = pytest.importorskip("numpy")

    def uses(x: int) -> str:
        return stdlib_json.dumps(float(np.sqrt(x)))

    named = modules_named(pickle_function(uses))
    assert {"numpy", "json"} <= set(named)
    assert not {n for n in named if n.partition(".")[0] in ("cflow", "runner", "worker", "tests")}
    assert modules_named(b"not a pickle") == ()


def test_hosts_forked_ahead_import_what_the_function_needs_before_the_next_map(
    tmp_path: Path,
) -> None:
    pytest.importorskip("numpy")
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("preload_script.py")), str(tmp_path / "s")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("CFLOW_")},
    )
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout.splitlines()[-1])
    assert shown["first"] == [2.0, 3.0] and shown["again"] == [4.0, 5.0]
    assert len(shown["hosts"]) == 2 and all(shown["hosts"].values()), shown
