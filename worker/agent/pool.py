"""The task bundles this worker has unpacked and the executors that run them, kept warm."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from pathlib import Path

from worker.bundle import UnpackedBundle
from worker.errors import NotFound, TaskError
from worker.executors.base import TaskExecutor
from worker.executors.container.executor import ContainerExecutor
from worker.executors.process import Executor
from worker.protocol import Entry, Layout, RunOptions
from worker.store import Store
from worker.unpacked import BundleCache

_WRITE = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH


def read_only(root: Path) -> None:
    """Take the write bits off every file and folder of an unpacked bundle: the task's code is
    shared by every run of it, so a task writes in its working folder or its outputs, never
    there (it is told so by a PermissionError)."""
    for folder, dirs, files in os.walk(root, topdown=False):
        for name in [*files, *dirs]:
            path = os.path.join(folder, name)
            # Gone meanwhile: another worker's Python writing its bytecode there renames a
            # temporary file away (a bundle is shared; every worker takes its bits off).
            with contextlib.suppress(FileNotFoundError):
                if not os.path.islink(path):
                    os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) & ~_WRITE)
    os.chmod(root, stat.S_IMODE(os.stat(root).st_mode) & ~_WRITE)


class ExecutorPool:
    """One executor per bundle and way of running it (isolated or not, container image, its
    timeout and GPUs), shared by the slots; bundles are fetched and unpacked once, and held
    (kept from the cache's sweep) until :meth:`close`."""

    def __init__(self, store: Store, bundles: Path):
        self.store = store
        self.bundles = BundleCache(bundles)  # where bundles are unpacked
        self._bundles: dict[str, UnpackedBundle] = {}
        self._executors: dict[str, TaskExecutor] = {}
        self._last: str | None = None  # the executor asked for last
        self._lock = threading.Lock()

    def get(self, sha: str, entry: Entry, options: RunOptions) -> TaskExecutor:
        """The executor for bundle ``sha`` run with ``options``, started on first use.

        Raises:
            TaskError: the bundle is not in the store.
            ContainerRuntimeMissing, ImagePullError, GpuSupportMissing: the run's image
                cannot be run here.
        """
        image, timeout, isolate = options.image, options.timeout, options.isolate
        gpu = options.gpu is not None
        # A container executor also carries the run's timeout (its backstop) and GPUs.
        key = f"{sha}:{int(isolate)}"
        if image is not None:
            key += f" {image} {timeout:g} gpu={int(gpu)}"
        with self._lock:
            self._last = key
            executor = self._executors.get(key)
            if executor is None:
                bundle = self._bundle(sha)
                if image is None:
                    executor = Executor(bundle, entry, isolate=isolate or None)
                else:  # raises ContainerRuntimeMissing, ImagePullError, GpuSupportMissing
                    executor = ContainerExecutor(
                        bundle, entry, image, timeout=timeout, isolate=isolate, gpu=gpu
                    )
                self._executors[key] = executor
            return executor

    def _bundle(self, sha: str) -> UnpackedBundle:
        bundle = self._bundles.get(sha)
        if bundle is None:
            try:
                data = self.store.get(Layout.bundle(sha))
            except NotFound:
                raise TaskError(f"task bundle {sha[:12]} is missing") from None
            bundle = self.bundles.unpack(data, sha)
            read_only(bundle.root)
            self._bundles[sha] = bundle
        return bundle

    def keys(self) -> list[str]:
        """The executors held, by bundle and way of running it."""
        with self._lock:
            return list(self._executors)

    def trim(self) -> None:
        """With nothing running, close the task hosts of every bundle but the last one used,
        and let go of the bundles no executor is left for: a long-lived VM serving many
        versions of a task keeps one imported copy, not all, and the others' unpacked folders
        go with the cache's next sweep an hour on (one asked for again is held again)."""
        with self._lock:
            for key in [key for key in self._executors if key != self._last]:
                self._executors.pop(key).close()
            used = {key.split(":", 1)[0] for key in self._executors}
            for sha in [sha for sha in self._bundles if sha not in used]:
                del self._bundles[sha]
                self.bundles.release(sha)

    def begin_close(self) -> None:
        """Tell every executor to wind down, so their task processes end at once."""
        for executor in self._executors.values():
            executor.begin_close()

    def close(self) -> None:
        """Wait for every executor to end (after :meth:`begin_close`), then let go of the
        bundles they ran."""
        for executor in self._executors.values():
            executor.close()
        self.bundles.release()
