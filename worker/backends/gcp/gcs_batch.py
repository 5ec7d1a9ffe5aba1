"""The Cloud Storage store's calls on many objects at once, and its metadata listings.

A bucket answers each call in tens of milliseconds, so as many are in flight as the client keeps
connections (``HTTP_POOL_SIZE``); sizes, checksums and input fingerprints come from paged
listings of object metadata, never from downloads.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import google.cloud.storage as storage

from worker.backends.gcp.gcs_api import HTTP_POOL_SIZE, LIST_PAGE_SIZE, api_errors, parse_gs_uri
from worker.backends.gcp.retry import STORAGE_RETRY
from worker.errors import NotFound
from worker.store import Store

_T = TypeVar("_T")


class GcsBatch(Store):
    """The many-at-once half of :class:`worker.backends.gcp.gcs.GcsStore`, over its single-object
    calls (``create``, ``list``, ``copy``, ``delete``) and its client."""

    client: storage.Client
    bucket_name: str

    def checksums(self, prefix: str) -> dict[str, tuple[int, str]]:
        """``{key: (size, crc32c)}`` of the objects under ``prefix`` (one paged listing)."""
        out: dict[str, tuple[int, str]] = {}
        with api_errors(self.bucket_name, "list", prefix):
            for blob in self.client.list_blobs(
                self.bucket_name,
                prefix=prefix,
                page_size=LIST_PAGE_SIZE,
                fields="items(name,size,crc32c),nextPageToken",
                retry=STORAGE_RETRY,
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
                for blob in self.client.list_blobs(
                    bucket,
                    prefix=f"{base}/" if base else None,
                    delimiter="/",
                    page_size=LIST_PAGE_SIZE,
                    fields="items(name,crc32c,md5Hash),nextPageToken,prefixes",
                    retry=STORAGE_RETRY,
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
