"""Reading a run's values while it runs, for :meth:`cflow.Run.results`: each shard's as the
watcher sees it commit (while the other shards run), the rest once every shard is committed,
so the caller's wait after the last commit is the reading of that one shard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cflow.results import Results, collect, committed_values
from runner.engine import runs
from worker.protocol import Layout, Manifest, Shard
from worker.store import Store


class ValueReader:
    """A run's values, read as its shards commit (:meth:`meanwhile`), then whole once every
    shard is committed (:meth:`at_end`): ``values`` is then the :class:`Results`, or what
    reading them raised (raised once the run is over, as it would be then)."""

    def __init__(
        self,
        run_id: str,
        store: Callable[[], Store],
        shard: Callable[[str], Shard],
        manifest: Callable[[], Manifest],
        return_exceptions: bool,
    ):
        self.run_id = run_id
        self._store = store
        self._shard = shard
        self._manifest = manifest
        self._return_exceptions = return_exceptions
        self.read: dict[str, list[Any]] = {}  # committed shards' values, by shard id
        self.values: Results | Exception | None = None

    def meanwhile(self, committed: frozenset[str]) -> None:
        """Read the shards committed since the last look (one query for their records); one
        that will not read now is read again at the end, which says why."""
        new = sorted(committed - self.read.keys())
        if not new:
            return
        store = self._store()
        records = store.get_many([Layout.result(self.run_id, sid) for sid in new])
        for sid in new:
            record = records.get(Layout.result(self.run_id, sid))
            if record is None:
                continue
            try:
                self.read[sid] = committed_values(store, self.run_id, self._shard(sid), record)
            except Exception:  # read again at the end, which raises what it raises
                continue

    def at_end(self) -> bool:
        """Every shard is committed, as the watcher saw it: read what is not read yet. True
        once the values are here (the caller returns them at once)."""
        store, manifest = self._store(), self._manifest()
        done = runs.committed(store, self.run_id)
        if manifest.publishing or len(done) < manifest.shard_count:
            return False
        try:
            shards = runs.iter_shards(store, self.run_id)
            self.values = collect(
                store, self.run_id, shards, done, self._return_exceptions, read=self.read
            )
        except Exception as exc:  # raised once the run is over, as it would be then (the
            self.values = exc  # run's thread still finishing it, its exit hook still set)
            return False
        return True
