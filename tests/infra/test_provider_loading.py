"""The stack loads the 24 resources it declares from the Google provider, not its 1,472
(:mod:`infra.provider`); anything else asked of the package still works as a plain import."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _python(code: str, *paths: Path) -> str:
    env_path = ":".join(str(p) for p in (*paths, REPO))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": env_path, "HOME": str(Path.home())},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_stack_loads_only_the_provider_resources_it_declares() -> None:
    out = _python(
        """
        import sys
        import infra.stack
        from cdktf_cdktf_provider_google.storage_bucket import StorageBucket
        loaded = [m for m in sys.modules if m.startswith("cdktf_cdktf_provider_google.")]
        print(len(loaded), StorageBucket.__module__, "vertex_ai_index" in str(loaded))
        """
    )
    count, module, other = out.split()
    assert 24 <= int(count) < 100, out  # the 24 it declares and what they use, of 1,472
    assert module == "cdktf_cdktf_provider_google.storage_bucket"
    assert other == "False"


def test_a_registered_package_gives_submodules_then_its_init_for_the_rest(
    tmp_path: Path,
) -> None:
    pkg = tmp_path / "bigpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import sys\nsys.stdout.write('init ran\\n')\nfrom . import one, two\nHELPER = 42\n"
    )
    (pkg / "one.py").write_text("VALUE = 1\n")
    (pkg / "two.py").write_text("VALUE = 2\n")
    out = _python(
        """
        import sys
        from infra.provider import register
        package = register("bigpkg")
        from bigpkg.one import VALUE
        print("one", VALUE, "bigpkg.two" in sys.modules)
        print("two", package.two.VALUE)
        print("helper", package.HELPER)
        try:
            package.nothing
        except AttributeError as exc:
            print("missing", type(exc).__name__)
        print("same", register("bigpkg") is package is sys.modules["bigpkg"])
        """,
        tmp_path,
    )
    assert out.splitlines() == [
        "one 1 False",  # the __init__ did not run: its other import did not happen
        "two 2",  # a submodule asked of the package
        "init ran",  # a name only the __init__ makes: it runs then
        "helper 42",
        "missing AttributeError",
        "same True",
    ]


def test_a_package_not_installed_is_left_alone() -> None:
    out = _python("from infra.provider import register\nprint(register('no_such_package_here'))\n")
    assert out.strip() == "None"
