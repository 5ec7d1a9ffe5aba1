"""The object store: where bundles, manifests, logs, outputs and commit markers live.

Keys are ``/``-separated paths in the bucket layout of :class:`worker.protocol.Layout`. Writes are
atomic (a reader sees the old object or the new one, never half of one). :meth:`Store.create` is
create-only: it is how an attempt **claims** its number and how a shard is **committed**, so of
any number of racing attempts exactly one wins.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
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
