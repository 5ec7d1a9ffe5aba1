"""The Cloud Storage store's calls on many objects at once, its metadata listings, and how
every one of its calls is retried.

A bucket answers each call in tens of milliseconds, so as many are in flight as the client keeps
connections (``HTTP_POOL_SIZE``); sizes, checksums and input fingerprints come from paged
listings of object metadata, never from downloads.

Every call goes through Cloud Storage's policy (:data:`worker.backends.gcp.retry.GCS`) with no
deadline, the library's own retry turned off: a runner watching a run, or a worker, waits out an
outage of any length (said once, :class:`~worker.backends.gcp.retry.Outage`) and goes on. A
listing is asked for a page at a time, each page retried by itself from its page token. A
rewrite of an object this store wrote less than a second ago waits out the rest of that second
first: Cloud Storage takes one write a second to one object name and refuses more with 429
("Maximum rate of writes to the same object name: one write per second",
https://cloud.google.com/storage/quotas), as a run's manifest would be when its shards are
published and recorded within a second of its making.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import google.cloud.storage as storage

from worker.backends.gcp.gcs_api import HTTP_POOL_SIZE, LIST_PAGE_SIZE, api_errors, parse_gs_uri
from worker.backends.gcp.retry import GCS, Outage, retrying
from worker.clock import Clock
from worker.errors import NotFound
from worker.store import Store

_T = TypeVar("_T")
SAME_OBJECT_SECONDS = 1.0  # Cloud Storage's one write a second to one object name


class GcsBatch(Store):
    """The many-at-once half of :class:`worker.backends.gcp.gcs.GcsStore`, over its single-object
    calls (``create``, ``list``, ``copy``, ``delete``) and its client."""

    client: storage.Client
    bucket_name: str
    clock: Clock
    outage: Outage  # said once however many calls wait on it
    give_up_after: float | None  # seconds of transient answers before a call gives up
    page_size: int = LIST_PAGE_SIZE
    _written: dict[str, float]  # object name -> clock.monotonic() of this store's last write
    _written_lock: threading.Lock

    def _call(self, what: str, call: Callable[[], _T]) -> _T:
        """``call()`` (a library call made with ``retry=None``) through Cloud Storage's policy,
        retried on transient answers (with no deadline unless ``give_up_after``); ``what``
        names it for the outage line."""
        return retrying(
            GCS,
            call,
            what=what,
            clock=self.clock,
            give_up_after=self.give_up_after,
            outage=self.outage,
        )

    def _write(self, key: str, what: str, call: Callable[[], _T]) -> _T:
        """A write of ``key`` (:meth:`_call`), a second or more after this store's last one."""
        with self._written_lock:
            last = self._written.get(key)
        if last is not None:
            self.clock.sleep(SAME_OBJECT_SECONDS - (self.clock.monotonic() - last))
        written = self._call(what, call)
        now = self.clock.monotonic()
        with self._written_lock:
            if len(self._written) > 1000:  # only the last second's matter
                self._written = {
                    k: t for k, t in self._written.items() if now - t < SAME_OBJECT_SECONDS
                }
            self._written[key] = now
        return written

    def _listing(self, bucket: str, what: str, **options: Any) -> Iterator[Any]:
        """The blobs of a listing of ``bucket`` (``list_blobs`` options), a page at a time,
        each page asked for through the policy from the last one's token."""
        token: str | None = None

        def page() -> tuple[list[Any], str | None]:
            blobs = self.client.list_blobs(
                bucket, page_size=self.page_size, page_token=token, retry=None, **options
            )
            found = next(iter(blobs.pages), None)
            return (list(found) if found is not None else []), blobs.next_page_token

        while True:
            items, token = self._call(f"{what} (a page)", page)
            yield from items
            if not token:
                return

    def checksums(self, prefix: str) -> dict[str, tuple[int, str]]:
        """``{key: (size, crc32c)}`` of the objects under ``prefix`` (one paged listing)."""
        out: dict[str, tuple[int, str]] = {}
        with api_errors(self.bucket_name, "list", prefix):
            for blob in self._listing(
                self.bucket_name,
                f"list gs://{self.bucket_name}/{prefix}",
                prefix=prefix,
                fields="items(name,size,crc32c),nextPageToken",
            ):
                out[blob.name] = (int(blob.size or 0), str(blob.crc32c))
        return out

    def _each(self, fn: Callable[[Any], _T], items: Iterable[Any]) -> builtins.list[_T]:
        with ThreadPoolExecutor(HTTP_POOL_SIZE, thread_name_prefix="gcs") as pool:
            return list(pool.map(fn, items))

    def create_many(self, objects: Mapping[str, bytes]) -> set[str]:
        made = self._each(lambda kv: (kv[0], self.create(*kv)), objects.items())
        return {key for key, ok in made if ok}

    def list_many(self, prefixes: Iterable[str]) -> dict[str, builtins.list[str]]:
        return dict(self._each(lambda p: (p, list(self.list(p))), prefixes))

    def copy_many(self, pairs: Iterable[tuple[str, str]]) -> set[str]:
        def one(pair: tuple[str, str]) -> str | None:
            try:
                self.copy(*pair)
                return None
            except NotFound:
                return pair[0]

        return {source for source in self._each(one, pairs) if source is not None}

    def delete_many(self, keys: Iterable[str]) -> None:
        self._each(self.delete, keys)

    def usage(self, prefix: str) -> tuple[int, int]:
        sizes = self.checksums(prefix)
        return len(sizes), sum(size for size, _ in sizes.values())

    def fingerprints(self, uris: builtins.list[str]) -> dict[str, str]:
        """``crc32c:<b64>/md5:<b64>`` from each object's metadata: one paged listing per
        folder of inputs, never a download."""
        folders: dict[tuple[str, str], set[str]] = {}
        for uri in uris:
            bucket, key = parse_gs_uri(uri)
            folders.setdefault((bucket, key.rpartition("/")[0]), set()).add(key)

        def listed(folder: tuple[str, str]) -> dict[str, str]:
            bucket, base = folder
            wanted, found = folders[folder], {}
            with api_errors(bucket, "list", base + "/"):
                for blob in self._listing(
                    bucket,
                    f"list gs://{bucket}/{base}/",
                    prefix=f"{base}/" if base else None,
                    delimiter="/",
                    fields="items(name,crc32c,md5Hash),nextPageToken,prefixes",
                ):
                    if blob.name in wanted and (blob.crc32c or blob.md5_hash):
                        found[f"gs://{bucket}/{blob.name}"] = (
                            f"crc32c:{blob.crc32c or ''}/md5:{blob.md5_hash or ''}"
                        )
            return found

        out: dict[str, str] = {}
        for part in self._each(listed, list(folders)):
            out.update(part)
        return out
