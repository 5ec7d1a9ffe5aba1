"""The worker's cache of unpacked bundles is swept: what nobody has used for an hour goes,
what a live worker holds stays, and a sweep racing workers never leaves one a folder half there.

Holders are real processes (a worker's pool holds each bundle it unpacked for its lifetime);
times are set on the lock files, as an hour's wait would leave them.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from worker import unpacked
from worker.agent.pool import ExecutorPool, read_only
from worker.backends.local.store import LocalStore
from worker.bundle import pack
from worker.errors import TaskError
from worker.protocol import Entry, Layout, RunOptions
from worker.unpacked import KEEP_SECONDS, BundleCache, sweep, unpack

ROOT = Path(__file__).resolve().parents[2]
HOUR_AGO = time.time() - KEEP_SECONDS - 60


def _bundle(tmp_path: Path, text: str) -> tuple[bytes, str]:
    task = tmp_path / f"task-{abs(hash(text))}"
    task.mkdir()
    (task / "task.py").write_text(f"def run(shard):\n    return {text!r}\n")
    (task / "data").mkdir()
    (task / "data" / "big.bin").write_bytes(os.urandom(4096))
    return pack(task)


def _unused_since(cache: Path, sha: str, when: float) -> None:
    os.utime(cache / f"{sha}.lock", (when, when))


def _holder(cache: Path, data: bytes, sha: str, tmp_path: Path) -> subprocess.Popen[str]:
    """Another process that unpacked the bundle and holds it (as a worker's pool does)."""
    (tmp_path / "bundle.bin").write_bytes(data)
    code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from worker.unpacked import BundleCache
        cache = BundleCache(Path({str(cache)!r}))
        cache.unpack(Path({str(tmp_path / "bundle.bin")!r}).read_bytes(), {sha!r})
        print("held", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_a_new_bundle_sweeps_away_what_nobody_used_for_an_hour(tmp_path: Path) -> None:
    cache = tmp_path / "bundles"
    old_data, old = _bundle(tmp_path, "old")
    recent_data, recent = _bundle(tmp_path, "recent")
    read_only(unpack(old_data, old, cache).root)  # as a worker leaves it: no write bits
    unpack(recent_data, recent, cache)
    (cache / f"{old}.partial").mkdir()  # an unpack killed halfway, long ago
    _unused_since(cache, old, HOUR_AGO)

    new_data, new = _bundle(tmp_path, "new")
    got = BundleCache(cache)
    bundle = got.unpack(new_data, new)

    assert (bundle.root / "task.py").exists()
    assert sorted(os.listdir(cache)) == sorted([recent, f"{recent}.lock", new, f"{new}.lock"]), (
        "the old bundle, its lock and its partial unpack go; the recent one stays"
    )
    got.release()


def test_a_bundle_a_live_worker_holds_is_never_swept_and_goes_once_it_has_died(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "bundles"
    data, sha = _bundle(tmp_path, "held")
    holder = _holder(cache, data, sha, tmp_path)
    try:
        _unused_since(cache, sha, HOUR_AGO)  # even with a time an hour old: it is held
        assert sweep(cache) == []
        assert (cache / sha / "task.py").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # a worker killed: its hold goes with it
        holder.wait()
    _unused_since(cache, sha, HOUR_AGO)
    assert sweep(cache) == [sha]
    assert os.listdir(cache) == []


def test_a_bundle_removed_by_hand_while_held_is_made_again_without_waiting_for_its_holder(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "bundles"
    data, sha = _bundle(tmp_path, "by hand")
    holder = _holder(cache, data, sha, tmp_path)
    try:
        shutil.rmtree(cache / sha)  # a clean of /tmp, say, while a worker runs the task
        made: list[Path] = []
        again = threading.Thread(target=lambda: made.append(unpack(data, sha, cache).root))
        again.start()
        again.join(10)
        assert made, "making it again waited for the worker holding it"
        assert "return 'by hand'" in (made[0] / "task.py").read_text()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_a_bundle_let_go_is_free_even_where_a_process_forked_since_shares_its_lock(
    tmp_path: Path,
) -> None:
    """A worker's task hosts are forked from it after it took its bundles: letting a bundle
    go (a trim) must not leave the lock held by them."""
    cache = tmp_path / "bundles"
    data, sha = _bundle(tmp_path, "shared")
    held = BundleCache(cache)
    held.unpack(data, sha)
    child = os.fork()
    if child == 0:  # a task host: its copy of the descriptor, for as long as it lives
        time.sleep(30)
        os._exit(0)
    try:
        held.release(sha)
        _unused_since(cache, sha, HOUR_AGO)
        assert sweep(cache) == [sha]
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_a_bundle_used_again_counts_its_hour_from_then(tmp_path: Path) -> None:
    cache = tmp_path / "bundles"
    data, sha = _bundle(tmp_path, "again")
    unpack(data, sha, cache)
    _unused_since(cache, sha, HOUR_AGO)
    unpack(data, sha, cache)  # used again now: found whole, not made again
    assert sweep(cache) == []
    assert sweep(cache, keep=0) == [sha]


def test_the_time_kept_is_a_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "bundles"
    data, sha = _bundle(tmp_path, "setting")
    unpack(data, sha, cache)
    past = time.time() - 120
    _unused_since(cache, sha, past)
    assert sweep(cache) == []  # two minutes: within the hour
    monkeypatch.setenv("CFLOW_BUNDLE_KEEP_SECONDS", "60")
    assert sweep(cache) == [sha]


def test_a_sweep_stops_after_its_time_and_the_next_goes_on(tmp_path: Path) -> None:
    cache = tmp_path / "bundles"
    shas = []
    for text in ("a", "b", "c"):
        data, sha = _bundle(tmp_path, text)
        unpack(data, sha, cache)
        shas.append(sha)
    for sha in shas:
        _unused_since(cache, sha, HOUR_AGO)
    first = sweep(cache, budget=0.0)
    assert len(first) < 3
    assert sorted(first + sweep(cache)) == sorted(shas)
    assert os.listdir(cache) == []


def test_a_sweep_cut_short_leaves_a_bundle_unpacked_again_not_one_half_there(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "bundles"
    data, sha = _bundle(tmp_path, "cut")
    unpack(data, sha, cache)
    # A sweep killed after its first step: the mark of a whole entry is gone, files remain.
    (cache / sha / ".complete").unlink()
    (cache / sha / "task.py").unlink()
    bundle = unpack(data, sha, cache)
    assert "return 'cut'" in (bundle.root / "task.py").read_text()


SWEEPER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from worker.unpacked import BundleCache, sweep
    cache, source, rounds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    data = source.read_bytes()
    sha = source.stem
    for _ in range(rounds):
        held = BundleCache(cache)
        bundle = held.unpack(data, sha, install=False)
        # Whole while held, whatever the others sweep meanwhile.
        assert (bundle.root / ".complete").exists(), "not whole"
        assert "return 'raced'" in (bundle.root / "task.py").read_text()
        assert len((bundle.root / "data" / "big.bin").read_bytes()) == 4096
        held.release()
        sweep(cache, keep=0)
    """
)


def test_workers_unpacking_and_sweeping_at_once_each_find_their_bundle_whole(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "bundles"
    data, sha = _bundle(tmp_path, "raced")
    source = tmp_path / f"{sha}.bin"
    source.write_bytes(data)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SWEEPER, str(cache), str(source), "40"],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, errors


AS_A_USER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from worker.agent.pool import read_only
    from worker.unpacked import BundleCache, KEEP_SECONDS
    cache, old, new = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    held = BundleCache(cache)
    read_only(held.unpack(old.read_bytes(), old.stem, install=False).root)  # as a worker does
    held.release()
    past = time.time() - KEEP_SECONDS - 60
    os.utime(cache / f"{old.stem}.lock", (past, past))
    BundleCache(cache).unpack(new.read_bytes(), new.stem, install=False)  # sweeps
    print(sorted(os.listdir(cache)))
    """
)


def _as_nobody() -> dict[str, Any]:
    """How to run a Python process as an unprivileged user (this one, unless it is root)."""
    if os.getuid() != 0:
        return {"executable": sys.executable}

    def demote() -> None:
        os.setgid(65534)
        os.setuid(65534)

    for python in (sys.executable, "/usr/bin/python3"):
        try:
            probe = subprocess.run([python, "-c", "pass"], preexec_fn=demote, capture_output=True)
        except OSError:  # not theirs to run (under /root, say)
            continue
        if probe.returncode == 0:
            return {"executable": python, "preexec_fn": demote}
    pytest.skip("no Python this machine's unprivileged user may run")


def test_a_user_who_is_not_root_sweeps_the_read_only_bundles_their_workers_left(
    tmp_path: Path,
) -> None:
    """A worker takes the write bits off what it unpacked: root removes such a folder
    regardless, anyone else only once the sweep gives the bits back."""
    how = _as_nobody()
    theirs = Path(tempfile.mkdtemp(prefix="cflow-test-user-"))  # a folder they may reach
    try:
        _sweep_as(how, tmp_path, theirs)
    finally:
        shutil.rmtree(theirs)


def _sweep_as(how: dict[str, Any], tmp_path: Path, theirs: Path) -> None:
    cache = theirs / "scratch" / "bundles"
    cache.mkdir(parents=True)
    files = []
    for text in ("old", "new"):
        data, sha = _bundle(tmp_path, text)
        (theirs / f"{sha}.bin").write_bytes(data)
        files.append(theirs / f"{sha}.bin")
    if os.getuid() == 0:  # the cache and the folder it is in are theirs (own_folder)
        os.chown(cache.parent, 65534, 65534)
        os.chown(cache, 65534, 65534)
        os.chmod(theirs, 0o755)
    python = how.pop("executable")
    done = subprocess.run(
        [python, "-c", AS_A_USER, str(ROOT), str(cache), *map(str, files)],
        capture_output=True,
        text=True,
        **how,
    )
    assert done.returncode == 0, done.stderr
    new = files[1].stem
    assert done.stdout.strip() == str(sorted([new, f"{new}.lock"]))


@pytest.mark.parametrize("name", [".lock", "..lock", "...lock", "x.lock", "deps-.lock"])
def test_a_sweep_looks_only_at_the_lock_files_of_entries(tmp_path: Path, name: str) -> None:
    """A ``..lock`` is not the lock of an entry named ``.``: the folder above stays."""
    cache = tmp_path / "scratch" / "bundles"
    data, sha = _bundle(tmp_path, "kept")
    held = BundleCache(cache)
    held.unpack(data, sha)
    (tmp_path / "scratch" / "agent.log").write_text("a worker's\n")
    (cache / name).touch()
    os.utime(cache / name, (HOUR_AGO, HOUR_AGO))
    assert sweep(cache) == []
    assert (cache / sha / "task.py").exists() and (tmp_path / "scratch" / "agent.log").exists()
    held.release()


def test_a_full_disk_sweeps_to_make_room_and_leaves_no_partial_unpack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "bundles"
    old_data, old = _bundle(tmp_path, "old")
    unpack(old_data, old, cache)
    _unused_since(cache, old, HOUR_AGO)
    real = unpacked.extract_safely
    full = [True]

    def extract(tar: Any, dest: Path) -> None:
        real(tar, dest)
        if full and (cache / old).exists():  # the disk is full until the old one goes
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(unpacked, "extract_safely", extract)
    data, sha = _bundle(tmp_path, "new")
    bundle = unpack(data, sha, cache)
    assert (bundle.root / "task.py").exists() and not (cache / old).exists()

    other_data, other = _bundle(tmp_path, "other")
    unpack(data, sha, cache)  # used now: nothing to sweep
    monkeypatch.setattr(unpacked, "sweep", lambda cache: [])
    monkeypatch.setattr(unpacked, "extract_safely", _full)
    with pytest.raises(OSError, match="No space"):
        unpack(other_data, other, cache)
    assert not (cache / f"{other}.partial").exists()


def _full(tar: Any, dest: Path) -> None:
    (dest / "half").write_bytes(b"x")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_bundle_cache_of_another_user_is_refused_in_one_line(tmp_path: Path) -> None:
    """Code another user put in it would run as this user's."""
    if os.getuid() != 0:
        pytest.skip("needs root, to make a folder another user's")
    cache = tmp_path / "scratch" / "bundles"
    cache.mkdir(parents=True)
    os.chown(cache.parent, 65534, 65534)
    data, sha = _bundle(tmp_path, "planted")
    with pytest.raises(TaskError, match=r"belongs to another user \(uid 65534\).*CFLOW_SCRATCH"):
        BundleCache(cache).unpack(data, sha)
    assert not (cache / sha).exists()


def test_a_cache_of_this_users_open_to_others_is_closed_to_them(tmp_path: Path) -> None:
    cache = tmp_path / "scratch" / "bundles"
    cache.mkdir(parents=True)
    os.chmod(cache.parent, 0o777)
    data, sha = _bundle(tmp_path, "closed")
    unpack(data, sha, cache)
    assert stat.S_IMODE(os.stat(cache.parent).st_mode) == 0o755


def test_a_bundle_held_for_hours_is_kept_an_hour_from_its_release(tmp_path: Path) -> None:
    cache = tmp_path / "bundles"
    data, sha = _bundle(tmp_path, "long")
    held = BundleCache(cache)
    held.unpack(data, sha)
    _unused_since(cache, sha, HOUR_AGO - 3600)  # first used two hours ago, held since
    assert sweep(cache) == []
    held.release()
    assert sweep(cache) == []


def test_a_last_use_in_the_future_does_not_keep_a_bundle_for_ever(tmp_path: Path) -> None:
    cache = tmp_path / "bundles"
    data, sha = _bundle(tmp_path, "future")
    unpack(data, sha, cache)
    ahead = time.time() + 365 * 86400  # a clock set back since
    os.utime(cache / f"{sha}.lock", (ahead, ahead))
    assert sweep(cache) == [sha]


def test_a_worker_trimming_its_idle_executors_lets_their_bundles_be_swept(
    tmp_path: Path,
) -> None:
    """A long-lived VM serving many versions of a task keeps only the last one's."""
    store = LocalStore(tmp_path / "store")
    cache = tmp_path / "scratch" / "bundles"
    shas = []
    for text in ("v1", "v2"):
        data, sha = _bundle(tmp_path, text)
        store.put(Layout.bundle(sha), data)
        shas.append(sha)
    pool = ExecutorPool(store, cache)
    try:
        for sha in shas:
            pool.get(sha, Entry.PYTHON, RunOptions())
        pool.trim()  # the worker idle: v2 was the last one used
        for sha in shas:
            _unused_since(cache, sha, HOUR_AGO)
        assert sweep(cache) == [shas[0]]
        assert (cache / shas[1] / "task.py").exists()
        pool.get(shas[0], Entry.PYTHON, RunOptions())  # asked for again: unpacked, held again
        _unused_since(cache, shas[0], HOUR_AGO)
        assert sweep(cache) == []
    finally:
        pool.begin_close()
        pool.close()
