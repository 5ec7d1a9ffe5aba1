from __future__ import annotations

import hashlib
import io
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from worker.bundle import inspect_bundle, inspect_task, pack, read_settings
from worker.errors import TaskError
from worker.protocol import Entry
from worker.unpacked import unpack


def test_pack_is_reproducible_and_skips_caches(tmp_path: Path) -> None:
    task = tmp_path / "task"
    (task / "__pycache__").mkdir(parents=True)
    (task / "task.py").write_text("def run(shard): pass\n")
    (task / "__pycache__" / "x.pyc").write_bytes(b"junk")
    data1, sha1 = pack(task)
    (task / "task.py").touch()  # a new mtime changes nothing
    data2, sha2 = pack(task)
    assert data1 == data2 and sha1 == sha2 == hashlib.sha256(data1).hexdigest()
    (task / "task.py").write_text("def run(shard): return 1\n")
    assert pack(task)[1] != sha1


def test_unpack_verifies_the_hash(tmp_path: Path) -> None:
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.sh").write_text("echo hi\n")
    data, sha = pack(task)
    bundle = unpack(data, sha, tmp_path / "cache")
    assert (bundle.root / "task.sh").read_text() == "echo hi\n"
    assert unpack(data, sha, tmp_path / "cache").root == bundle.root  # cached
    with pytest.raises(TaskError, match="corrupt"):
        unpack(data + b"x", sha, tmp_path / "cache2")


def test_a_bundle_of_bytes_deflate_cannot_shrink_is_stored_and_unpacks_alike(
    tmp_path: Path,
) -> None:
    """A large file deflate gains nothing on (a pickled model's weights) makes the bundle be
    stored, not deflated: made at copying speed (deflate tries hard and finds nothing, at
    20 ms a MB), the gzip header says level 0 (its extra flags 0; 2 at level 9). The same folder
    still gives the same bytes; a large file that deflates is deflated at level 9 as ever; both
    unpack to the files."""
    weights, zeros = os.urandom(3 << 20), bytes(3 << 20)
    for name, blob in (("weights", weights), ("zeros", zeros)):
        task = tmp_path / name
        task.mkdir()
        (task / "task.py").write_text("def run(shard): pass\n")
        (task / "blob.bin").write_bytes(blob)
        data, sha = pack(task)
        assert (data, sha) == pack(task)
        if blob is weights:
            assert data[8] == 0 and len(blob) < len(data) < len(blob) + 64 * 1024  # stored
        else:
            assert data[8] == 2 and len(data) < len(blob) // 100  # deflated, level 9
        root = unpack(data, sha, tmp_path / f"cache-{name}", install=False).root
        assert (root / "blob.bin").read_bytes() == blob


def test_inspect_task_errors_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="does not exist"):
        inspect_task(tmp_path / "nope")
    (tmp_path / "task.py").write_text("def run(shard): pass\n")
    with pytest.raises(TaskError, match=r"task.py is a file, not a folder; pass the folder"):
        inspect_task(tmp_path / "task.py")  # it exists: not "does not exist"
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "task.py").write_text("def helper(): pass\n")
    assert inspect_task(tmp_path / "a").entry is Entry.PYTHON  # run is checks.py's to judge
    (tmp_path / "a" / "task.py").write_text("def run(:\n")
    with pytest.raises(TaskError, match="syntax error at line 1"):
        inspect_task(tmp_path / "a")
    (tmp_path / "a" / "task.py").write_text("def run(s): pass\ndef combine(p, o): pass\n")
    info = inspect_task(tmp_path / "a")
    assert info.entry is Entry.PYTHON and info.has_combine


def test_requirements_are_installed_once_and_importable(tmp_path: Path) -> None:
    pkg = tmp_path / "localdep"
    (pkg / "cflow_test_dep").mkdir(parents=True)
    (pkg / "cflow_test_dep" / "__init__.py").write_text("VALUE = 42\n")
    (pkg / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "cflow-test-dep"\nversion = "1.0"\n'
    )
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.py").write_text("def run(shard): pass\n")
    (task / "requirements.txt").write_text(f"# local package\n{pkg}\n")
    data, sha = pack(task)
    bundle = unpack(data, sha, tmp_path / "cache")
    assert bundle.deps is not None and (bundle.deps / ".complete").exists()
    out = subprocess.run(
        [sys.executable, "-c", "import cflow_test_dep; print(cflow_test_dep.VALUE)"],
        env={"PYTHONPATH": bundle.python_path()},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "42"
    (tmp_path / "cache" / sha).rename(tmp_path / "moved")
    assert unpack(data, sha, tmp_path / "cache").deps == bundle.deps  # same file: no reinstall


def test_cflowignore_keeps_files_out_of_the_bundle(tmp_path: Path) -> None:
    import io
    import tarfile

    from worker.bundle import bundle_files

    task = tmp_path / "task"
    (task / "data" / "deep").mkdir(parents=True)
    (task / "lib").mkdir()
    (task / "task.py").write_text("def run(shard): pass\n")
    (task / "lib" / "helper.py").write_text("X = 1\n")
    (task / "lib" / "big.bin").write_bytes(b"0" * 100)
    (task / "data" / "deep" / "rows.csv").write_text("1\n")
    (task / "notes.log").write_text("x\n")
    (task / ".cflowignore").write_text("# data stays home\ndata/\n*.log\n/lib/*.bin\n!keep.log\n")
    (task / "keep.log").write_text("kept\n")
    names = sorted(p.relative_to(task).as_posix() for p in bundle_files(task))
    assert names == [".cflowignore", "keep.log", "lib/helper.py", "task.py"]
    data, _ = pack(task)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == names


def _odd_file(task: Path, kind: str) -> Path:
    """Make an entry of ``kind`` in the task folder that is not a plain file; return it."""
    if kind == "dangling link":  # an Emacs lock file is one
        path = task / ".#task.py"
        path.symlink_to("root@host.123:1700000000")
    elif kind == "link loop":
        path = task / "loop"
        path.symlink_to("loop")
    elif kind == "fifo":
        path = task / "pipe"
        os.mkfifo(path)
    else:  # a socket in a sub-folder, bound by a relative name (a socket's path is short)
        (task / "sub").mkdir()
        path = task / "sub" / "sock"
        cwd = os.getcwd()
        os.chdir(task / "sub")
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.bind("sock")  # the file stays when the socket is closed
        finally:
            os.chdir(cwd)
    return path


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        ("dangling link", "is a link to root@host.123:1700000000, which does not exist"),
        ("link loop", "is a link that loops"),
        ("fifo", "is a fifo"),
        ("socket", "is a socket"),
    ],
)
def test_a_task_folder_entry_that_is_no_plain_file_is_refused_in_one_line_unless_ignored(
    tmp_path: Path, kind: str, said: str
) -> None:
    """Packing such a folder failed with a traceback (FileNotFoundError, ELOOP, ENXIO) or, for a
    fifo, waited forever to read it. Leaving it out unasked would make the bundle other than
    the folder: it is named with the fix, and .cflowignore leaves it out without a word."""
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.py").write_text("def run(shard): pass\n")
    odd = _odd_file(task, kind)
    with pytest.raises(TaskError) as caught:
        pack(task)
    message = str(caught.value)
    assert message.startswith(f"{odd} {said}")
    assert message.endswith(f"remove it or list it in {task / '.cflowignore'}")
    assert "\n" not in message
    (task / ".cflowignore").write_text(odd.relative_to(task).as_posix() + "\n")
    with tarfile.open(fileobj=io.BytesIO(pack(task)[0]), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == [".cflowignore", "task.py"]


def test_settings_are_read_and_checked(tmp_path: Path) -> None:
    from worker.bundle import TaskSettings, read_settings

    task = tmp_path / "task"
    task.mkdir()
    assert read_settings(task) == TaskSettings(headers=None)
    (task / "cflow.toml").write_text("[combine]\nheaders = true\n")
    assert read_settings(task).headers is True
    (task / "cflow.toml").write_text("[combine]\nheaders = 'yes'\n")
    with pytest.raises(TaskError, match="headers must be true or false"):
        read_settings(task)
    (task / "cflow.toml").write_text("[combine\n")
    with pytest.raises(TaskError, match="not valid TOML"):
        read_settings(task)
    (task / "cflow.toml").write_text("[speed]\nfast = true\n")
    with pytest.raises(TaskError, match="unknown setting speed"):
        read_settings(task)


@pytest.mark.parametrize(
    ("files", "entry", "has_combine", "headers"),
    [
        ({"task.py": "def run(s): pass\ndef combine(p, o): pass\n"}, Entry.PYTHON, True, None),
        (
            {"task.py": "def run(s): pass\n", "cflow.toml": "[combine]\nheaders = true\n"},
            Entry.PYTHON,
            False,
            True,
        ),
        (
            {"task.sh": "echo hi\n", "sub/task.py": "def combine(p, o): pass\n"},
            Entry.SHELL,
            False,
            None,
        ),
    ],
)
def test_a_bundle_is_described_in_memory_as_its_unpacked_folder_is(
    tmp_path: Path, files: dict[str, str], entry: Entry, has_combine: bool, headers: bool | None
) -> None:
    task = tmp_path / "task"
    for rel, text in files.items():
        (task / rel).parent.mkdir(parents=True, exist_ok=True)
        (task / rel).write_text(text)
    info, settings = inspect_bundle(pack(task)[0], "task")
    assert (info.entry, info.has_combine, settings.headers) == (entry, has_combine, headers)
    assert (info, settings) == (inspect_task(task), read_settings(task))


def test_a_bundle_with_bad_settings_is_refused_in_memory_as_on_disk(tmp_path: Path) -> None:
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.py").write_text("def run(s): pass\n")
    (task / "cflow.toml").write_text("[combine]\nheaders = 'yes'\n")
    with pytest.raises(TaskError, match="headers must be true or false"):
        inspect_bundle(pack(task)[0], "task")
