"""What a shard's cache key is made of (:mod:`runner.engine.cache`): the task's code, the
environment that reaches the task, a local input's content (and the stat it was read at), a
file an item names by its size and modification time, the params as they bear on the result."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worker.agent.files import GONE, named_files, stat_print
from worker.bundle import bundle_files
from worker.protocol import Shard
from worker.pyfunc import CHUNK_PARAM, CLASSES_KEY_PARAM, CLASSES_PARAM

# Variables a shell, terminal or session sets that no task result should depend on, and the
# runner's own (CFLOW_*: where the store is, how often to poll). From a notebook: the Jupyter
# kernel's process bookkeeping, which changes whenever the server or kernel restarts
# (jupyter_client's launcher sets JPY_PARENT_PID, JPY_INTERRUPT_EVENT and IPY_INTERRUPT_EVENT,
# the server JPY_SESSION_NAME, JupyterHub JPY_API_TOKEN, a kernel gateway KERNEL_ID); the
# connection itself comes in a file named on the kernel's command line, not the environment.
# PYTHONUNBUFFERED (set by IDEs and containers) changes when a process's stdout is flushed,
# never what it holds. PYTHONHASHSEED orders a set's strings: a result that depends on it
# differs between two runs without it too (each process draws its own seed), so the key does
# not hold it either way. MPLBACKEND, which ipykernel also sets, stays in: it picks how
# matplotlib draws.
IGNORED_ENV = frozenset(
    {"_", "PWD", "OLDPWD", "SHLVL", "TERM", "COLORTERM", "COLUMNS", "LINES", "DISPLAY"}
    | {"WINDOWID", "STY", "WINDOW", "LS_COLORS", "MAIL", "GPG_TTY", "PROMPT_COMMAND"}
    | {"PS1", "PS2", "PS3", "PS4", "HISTFILE", "HISTSIZE", "HISTFILESIZE", "HISTCONTROL"}
    | {"LESS", "LESSOPEN", "LESSCLOSE", "SECURITYSESSIONID", "TMUX", "TMUX_PANE"}
    | {"PYTHONUNBUFFERED", "PYTHONHASHSEED", "KERNEL_ID"}
)
IGNORED_ENV_PREFIXES = (
    "CFLOW_", "SSH_", "XDG_", "TERM_", "VSCODE_", "DBUS_", "PYTEST_", "WAYLAND_", "KONSOLE_",
    "ITERM_", "GNOME_TERMINAL_", "JPY_", "IPY_",
)  # fmt: skip


def task_env(
    environ: Mapping[str, str], *, inherited: bool, given: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment a key covers: ``given`` variables, and with ``inherited`` (the local
    backend, whose workers inherit the runner's environment) the rest of ``environ`` less
    :data:`IGNORED_ENV`."""
    env = {}
    if inherited:
        env = {
            k: v
            for k, v in environ.items()
            if k not in IGNORED_ENV and not k.startswith(IGNORED_ENV_PREFIXES)
        }
    env.update(given or {})
    return env


def code_digest(task_dir: Path) -> str:
    """The sha256 of the files that go into the task's bundle: names, modes and contents."""
    digest = hashlib.sha256()
    for path in bundle_files(task_dir):
        rel = path.relative_to(task_dir).as_posix()
        executable = os.access(path, os.X_OK)
        digest.update(f"{rel}\0{int(executable)}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()


def file_digest(path: str) -> tuple[str, str] | None:
    """A local file's sha256 and its :func:`~worker.agent.files.stat_print` as it was read;
    None when it changed while it was read."""
    with open(path, "rb") as fh:
        before = stat_print(os.fstat(fh.fileno()))
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
        if stat_print(os.fstat(fh.fileno())) != before:
            return None
    return "sha256:" + digest, before


def reads_here(shard: Shard) -> bool:
    """Whether the shard's task reads a file of this machine: a local input, a named file."""
    local = shard.input and "://" not in shard.input
    return bool(local) or any("://" not in n for n in named_files(shard))


def stat_key(path: str) -> tuple[str | None, str]:
    """A local file's size and modification time (None: gone), as ``make`` and Nextflow's
    ``-resume`` compare it with no byte read (it may be gigabytes); and its ``seen`` print."""
    try:
        st = os.stat(path)
    except OSError:
        return None, GONE
    return f"{st.st_size}:{st.st_mtime_ns}", stat_print(st)


def keyed_params(params: dict[str, Any] | None) -> dict[str, Any] | None:
    """A shard's params as its key covers them: a chunk's per-item timeout left out (a value
    committed within one timeout is as good under another; and a key made before chunks
    carried one still matches); classes shipped with the items (``cflow``) as the digest that
    comes with them, which leaves out their line numbers."""
    if params is None:
        return None
    spec = params.get(CHUNK_PARAM)
    if isinstance(spec, dict) and "timeout" in spec:
        params = {**params, CHUNK_PARAM: {k: v for k, v in spec.items() if k != "timeout"}}
    if CLASSES_KEY_PARAM in params:
        params = {k: v for k, v in params.items() if k != CLASSES_PARAM}
    return params
