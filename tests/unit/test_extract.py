"""Unpacking a bundle refuses members outside its folder, also on a Python without tarfile's
``data`` filter (before 3.11.4, e.g. Debian 12's 3.11.2, the VMs' default)."""

from __future__ import annotations

import contextlib
import io
import tarfile
from pathlib import Path

import pytest

from worker.bundle import extract_safely
from worker.errors import TaskError


def _tar(*members: tuple[str, bytes | None, str | None]) -> tarfile.TarFile:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                info.size = len(data or b"")
                tar.addfile(info, io.BytesIO(data or b""))
    buf.seek(0)
    return tarfile.open(fileobj=buf, mode="r:gz")


@pytest.fixture(params=["data filter", "no data filter"])
def python(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "no data filter":
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    return str(request.param)


def test_a_bundle_unpacks(tmp_path: Path, python: str) -> None:
    tar = _tar(("task.py", b"def run(s): pass\n", None), ("lib/x.py", b"", None))
    extract_safely(tar, tmp_path)
    assert (tmp_path / "task.py").read_text() == "def run(s): pass\n"
    assert (tmp_path / "lib" / "x.py").exists()


@pytest.mark.parametrize("name", ["../evil.py", "a/../../evil.py"])
def test_a_member_outside_the_folder_is_refused(tmp_path: Path, python: str, name: str) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises((TaskError, tarfile.TarError)):
        extract_safely(_tar((name, b"x", None)), dest)
    assert not (tmp_path / "evil.py").exists()


def test_an_absolute_member_never_lands_outside(tmp_path: Path, python: str) -> None:
    name = f"{tmp_path}/evil.py"  # refused, or (the data filter) put under the folder
    dest = tmp_path / "dest"
    dest.mkdir()
    with contextlib.suppress(TaskError):
        extract_safely(_tar((name, b"x", None)), dest)
    assert not (tmp_path / "evil.py").exists()


def test_a_link_out_of_the_folder_is_refused(tmp_path: Path, python: str) -> None:
    with pytest.raises((TaskError, tarfile.TarError)):
        extract_safely(_tar(("escape", None, "/etc/passwd")), tmp_path)
