"""The object store: where bundles, manifests, logs, outputs and commit markers live.

Keys are ``/``-separated paths in the bucket layout of :class:`worker.protocol.Layout`. Writes are
atomic (a reader sees the old object or the new one, never half of one). :meth:`Store.create` is
create-only: it is how an attempt **claims** its number and how a shard is **committed**, so of
any number of racing attempts exactly one wins.
"""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from worker.errors import NotFound


class Store(ABC):
    @abstractmethod
    def url(self, key: str) -> str:
        """Where a user finds the object (a path or a ``gs://`` URI)."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write (or overwrite) an object atomically."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Upload a local file, streaming it."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write an object only if it does not exist; False when another writer got there first."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Read an object; raises :class:`worker.errors.NotFound`."""

    def get_range(self, key: str, start: int, size: int) -> bytes:
        """Up to ``size`` bytes of an object from byte ``start`` (b"" at or past its end): a
        log read as it grows, never all of it in memory. Raises NotFound. (This default
        reads the whole object; the backends read only the range.)"""
        return self.get(key)[start : start + size]

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """Read several objects; the ones that do not exist are left out of the answer."""
        found = {}
        for key in keys:
            try:
                found[key] = self.get(key)
            except NotFound:
                continue
        return found

    @abstractmethod
    def get_file(self, key: str, path: Path) -> None:
        """Download an object to a local file, streaming it; raises NotFound."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(
        self,
        prefix: str,
        *,
        suffix: str = "",
        start_after: str | None = None,
        limit: int | None = None,
    ) -> Iterator[str]:
        """Keys under ``prefix`` (recursively) ending in ``suffix``, in key order, lazily.

        ``start_after``: only keys after this one; ``limit``: at most this many. Together they
        page through a large prefix one bounded piece at a time (the runner's reconcile).
        """

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; missing is fine."""

    def fetch(self, uri: str, path: Path) -> None:
        """Download a shard input given as a URI (``gs://...``) this store can read."""
        raise NotImplementedError(f"this store cannot read {uri}")

    def local_path(self, key: str) -> Path | None:
        """The object's file when the store is a local directory, so callers can skip copies."""
        return None

    def update(self, key: str, change: Callable[[bytes], bytes | None]) -> bytes | None:
        """Read-modify-write one object: ``change(current)`` is the new content (None: leave
        it as it is). A store with write preconditions writes only over what it read, and on a
        concurrent write reads again and asks ``change`` anew. What was written (or None).

        Raises:
            NotFound: no such object.
        """
        new = change(self.get(key))
        if new is not None:
            self.put(key, new)
        return new

    # -- many at once: a store that can batch them overrides these ------------------------

    def create_many(self, objects: Mapping[str, bytes]) -> set[str]:
        """:meth:`create` each object; the keys this call created."""
        return {key for key, data in objects.items() if self.create(key, data)}

    def list_many(self, prefixes: Iterable[str]) -> dict[str, builtins.list[str]]:
        """:meth:`list` each prefix: ``{prefix: keys}``, every prefix answered."""
        return {prefix: list(self.list(prefix)) for prefix in prefixes}

    def copy(self, source: str, dest: str) -> None:
        """Copy an object within the store; raises NotFound when ``source`` is missing."""
        self.put(dest, self.get(source))

    def copy_many(self, pairs: Iterable[tuple[str, str]]) -> set[str]:
        """:meth:`copy` each ``(source, dest)``; the sources that were missing."""
        missing = set()
        for source, dest in pairs:
            try:
                self.copy(source, dest)
            except NotFound:
                missing.add(source)
        return missing

    def delete_many(self, keys: Iterable[str]) -> None:
        """:meth:`delete` each key."""
        for key in keys:
            self.delete(key)

    def usage(self, prefix: str) -> tuple[int, int]:
        """How many objects lie under ``prefix`` and their bytes (one listing)."""
        count = size = 0
        for key in self.list(prefix):
            count += 1
            try:
                size += len(self.get(key))
            except NotFound:
                continue
        return count, size

    def fingerprints(self, uris: builtins.list[str]) -> dict[str, str]:
        """A content fingerprint (a checksum the store keeps) of each input URI it can read
        without downloading it; the ones it cannot are left out."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release this thread's connections (a later call opens them again)."""
