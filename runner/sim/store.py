"""An in-memory :class:`worker.store.Store` that counts what the runner asks of it.

Objects are bytes in a dict; ``create`` is create-only like GCS's ``if_generation_match=0``. The
counters say what a real bucket would be asked for: how many list calls and how many keys they
walked (a GCS listing returns every object under the prefix, 1,000 a page, whatever the suffix).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from worker.errors import NotFound
from worker.store import Store

GCS_LIST_PAGE = 1000  # objects per page of a GCS listing


class MemoryStore(Store):
    def __init__(self) -> None:
        self._objects: dict[str, bytes] = {}
        self.creates: Counter[str] = Counter()  # successful create-only writes per key
        self.list_calls = 0
        self.keys_listed = 0  # keys under the listed prefixes, as a bucket would page them

    def url(self, key: str) -> str:
        return f"mem://{key}"

    def put(self, key: str, data: bytes) -> None:
        self._objects[key] = data

    def put_file(self, key: str, path: Path) -> None:
        self._objects[key] = Path(path).read_bytes()

    def create(self, key: str, data: bytes) -> bool:
        if key in self._objects:
            return False
        self._objects[key] = data
        self.creates[key] += 1
        return True

    def get(self, key: str) -> bytes:
        try:
            return self._objects[key]
        except KeyError:
            raise NotFound(f"no object {key}") from None

    def get_file(self, key: str, path: Path) -> None:
        Path(path).write_bytes(self.get(key))

    def exists(self, key: str) -> bool:
        return key in self._objects

    def list(
        self,
        prefix: str,
        *,
        suffix: str = "",
        start_after: str | None = None,
        limit: int | None = None,
    ) -> Iterator[str]:
        self.list_calls += 1
        under = sorted(
            k
            for k in self._objects
            if k.startswith(prefix) and (start_after is None or k > start_after)
        )
        matching = [k for k in under if k.endswith(suffix)][:limit]
        self.keys_listed += len(matching) if limit is not None else len(under)
        return iter(matching)

    def delete(self, key: str) -> None:
        self._objects.pop(key, None)

    def __len__(self) -> int:
        return len(self._objects)
