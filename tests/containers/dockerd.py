"""A docker daemon for the tests, where docker is installed but no daemon answers.

Test machines have no init system to run ``dockerd``, so the tests start one as they start the
emulators, with state of its own: images in :data:`DATA_ROOT` (kept, so an image imported once is
there next time, as podman's are), the socket, pid file and runtime state in :data:`RUN_DIR`. It
needs root, and runs without iptables or a bridge (the containers use the host's network).

One daemon serves every test process of the machine (pytest-xdist workers, concurrent sessions,
benchmarks): :func:`acquire` starts it unless it answers already, and holds a shared lock on
``users.lock`` until :meth:`Lease.release`; the process that lets go last stops it. A process that
dies lets go with it (the kernel drops its locks), and the next one to let go stops the daemon.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

DATA_ROOT = Path("/var/lib/cflow-test-docker")
RUN_DIR = Path("/run/cflow-test-docker")
SOCKET = RUN_DIR / "docker.sock"
HOST = f"unix://{SOCKET}"  # for DOCKER_HOST
PIDFILE = RUN_DIR / "dockerd.pid"
LOG = RUN_DIR / "dockerd.log"
CONTAINERD_PIDFILE = RUN_DIR / "exec" / "containerd" / "containerd.pid"  # the daemon's own
STARTUP_TIMEOUT = 90.0  # seconds; its first start on a machine sets up the data root
STOP_TIMEOUT = 60.0  # seconds; it stops what containers are left first

_children: list[subprocess.Popen[bytes]] = []  # the daemons this process started


class DockerUnavailable(Exception):
    """No daemon can be started here; the message says why."""


def ping(sock: Path = SOCKET, timeout: float = 5.0) -> bool:
    """Whether a docker daemon answers ``GET /_ping`` on ``sock``."""

    class Connection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(str(sock))

    conn = Connection("docker", timeout=timeout)
    try:
        conn.request("GET", "/_ping")
        response = conn.getresponse()
        return response.status == 200 and response.read() == b"OK"
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class Lease:
    """This process's use of the daemon: it stays up until every lease is released."""

    def __init__(self, fd: int):
        self._fd: int | None = fd

    def release(self) -> None:
        """Let go; the last process to let go stops the daemon."""
        if self._fd is None:
            return
        with _locked(RUN_DIR / "start.lock"):
            os.close(self._fd)  # drops this process's shared lock
            self._fd = None
            probe = os.open(RUN_DIR / "users.lock", os.O_RDWR)
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another process still uses it
            else:
                stop()
            finally:
                os.close(probe)


def acquire() -> Lease:
    """Make sure the tests' daemon runs and hold it up; raises :class:`DockerUnavailable`."""
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise DockerUnavailable(
            "docker's daemon does not answer and dockerd is not installed"
            " (`apt-get install docker.io`, which `make test` does on Debian as root)"
        )
    if os.geteuid() != 0:
        raise DockerUnavailable(
            "docker's daemon does not answer, and the tests start one only as root"
        )
    RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(RUN_DIR / "start.lock"):
        fd = os.open(RUN_DIR / "users.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # Never waits: an exclusive lock is only taken under start.lock, which we hold.
            fcntl.flock(fd, fcntl.LOCK_SH)
            if not ping():
                _start(dockerd)
        except BaseException:
            os.close(fd)
            raise
    return Lease(fd)


def _start(dockerd: str) -> None:
    DATA_ROOT.mkdir(mode=0o711, parents=True, exist_ok=True)
    argv = [
        dockerd,
        f"--data-root={DATA_ROOT}",
        f"--exec-root={RUN_DIR / 'exec'}",
        f"--pidfile={PIDFILE}",
        f"--host={HOST}",
        "--iptables=false",
        "--ip6tables=false",
        "--bridge=none",
    ]
    with LOG.open("ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, outliving this process if need be
        )
    _children.append(proc)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not ping(timeout=1.0):
        if proc.poll() is not None:
            raise DockerUnavailable(f"dockerd exited with code {proc.returncode}: {_log_tail()}")
        if time.monotonic() > deadline:
            _end(proc.pid)
            raise DockerUnavailable(
                f"dockerd did not answer within {STARTUP_TIMEOUT:.0f}s: {_log_tail()}"
            )
        time.sleep(0.1)


def _log_tail(lines: int = 3) -> str:
    try:
        tail = LOG.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return f"no log at {LOG}"
    return " / ".join(tail) + f" (log: {LOG})"


def _running(pidfile: Path, marker: str) -> int | None:
    """The pid in ``pidfile`` if that process runs and its command line has ``marker``."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if marker.encode() in cmdline else None


def stop() -> None:
    """Stop the tests' daemon (and its containerd) if it runs."""
    pid = _running(PIDFILE, str(PIDFILE))
    if pid is not None:
        _end(pid)


def _end(pid: int) -> None:
    """SIGTERM the daemon, wait for it to exit, SIGKILL its process group if it does not."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_exit(pid, STOP_TIMEOUT):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        _wait_exit(pid, STOP_TIMEOUT)
        containerd = _running(CONTAINERD_PIDFILE, str(RUN_DIR))  # in a session of its own
        if containerd is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(containerd, signal.SIGKILL)


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited (reaping it when this process started it)."""
    mine = [p for p in _children if p.pid == pid]
    if mine:
        try:
            mine[0].wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        _children.remove(mine[0])
        return True
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)  # readable once the process has exited
        return bool(poller.poll(timeout * 1000))
    finally:
        os.close(fd)
