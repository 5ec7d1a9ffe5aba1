"""Joining and copying in a Cloud Storage bucket: ``compose``, 32 sources a call, in a tree.

A compose request takes 1 to 32 source objects of one bucket and creates their concatenation;
a composite may itself be a source. So N parts become one object in ``ceil(log32 N)`` levels of
calls, with no byte passing through the runner. What compose cannot do is cut: a part whose first
line is a header to drop has to be re-uploaded without it, the one case where bytes travel both
ways (see :func:`strip_first_line`). Reading is ranged: a part's first bytes, its last byte, or
the whole of it as a stream (:class:`ObjectReader`, what a gzip part is decompressed from).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.results.parts import Traffic
from worker.errors import BackendError
from worker.tempdirs import temp_folder

if TYPE_CHECKING:  # the cloud client loads only when a bucket is combined
    from worker.backends.gcp.gcs import GcsStore


def _retry() -> Any:
    from worker.backends.gcp.retry import STORAGE_RETRY

    return STORAGE_RETRY


MAX_COMPOSE_SOURCES = 32  # Cloud Storage's limit per compose request
NEWLINE_KEY = "newline"  # a one-byte object composed in after a part that lacks a final newline
HEAD_FIRST = 512  # bytes first read to find a part's first line; doubled while it is longer
HEAD_PROBE = 64 * 1024  # most bytes read to find it
READ_CHUNK = 4 * 1024 * 1024  # bytes one ranged read of a streamed object asks for


def compose_tree(
    store: GcsStore, sources: Sequence[str], target: str, scratch: str, traffic: Traffic
) -> None:
    """Compose ``sources`` (keys in order) into ``target`` in levels of at most 32 sources.

    Intermediate objects live under ``scratch`` and are deleted afterwards.
    """
    if not sources:
        raise BackendError(f"nothing to compose into {target}")
    level, made = list(sources), []
    depth = 0
    try:
        while len(level) > MAX_COMPOSE_SOURCES:
            nxt = []
            for i in range(0, len(level), MAX_COMPOSE_SOURCES):
                key = f"{scratch}{depth}-{i // MAX_COMPOSE_SOURCES:06d}"
                _compose(store, level[i : i + MAX_COMPOSE_SOURCES], key, traffic)
                nxt.append(key)
                made.append(key)
            level, depth = nxt, depth + 1
        _compose(store, level, target, traffic)
    finally:
        for key in made:
            store.delete(key)


def _compose(store: GcsStore, sources: Sequence[str], target: str, traffic: Traffic) -> None:
    if len(sources) > MAX_COMPOSE_SOURCES:  # the real service refuses this with a 400
        raise BackendError(f"compose of {len(sources)} sources; at most {MAX_COMPOSE_SOURCES}")
    bucket = store.bucket
    with store._errors("compose", target):
        bucket.blob(target).compose([bucket.blob(s) for s in sources], retry=_retry())
    traffic.compose_calls += 1


def first_bytes(store: GcsStore, key: str, count: int, traffic: Traffic) -> bytes:
    """An object's first ``count`` bytes (fewer if it is shorter): a ranged read."""
    with store._errors("read", key):
        head = store.bucket.blob(key).download_as_bytes(start=0, end=count - 1, retry=_retry())
    traffic.downloaded += len(head)
    return bytes(head)


class ObjectReader(io.RawIOBase):
    """An object's bytes as a stream, in ranged reads (wrap it in ``io.BufferedReader``): a part
    read through the runner whatever its size, memory flat. ``size`` is its size in the
    listing (parts are never rewritten); ``downloaded`` counts the bytes read."""

    def __init__(self, store: GcsStore, key: str, size: int) -> None:
        super().__init__()
        self.store = store
        self.key = key
        self.size = size
        self.pos = 0
        self.downloaded = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self.size - self.pos)
        if want <= 0:
            return 0
        with self.store._errors("read", self.key):
            data = self.store.bucket.blob(self.key).download_as_bytes(
                start=self.pos,
                end=self.pos + want - 1,
                raw_download=True,  # the bytes as stored, which compose joins
                checksum=None,  # a range: the object's checksum does not apply
                retry=_retry(),
            )
        got = min(len(data), want)
        buffer[:got] = data[:got]
        self.pos += got
        self.downloaded += got
        return got


def ends_with_newline(store: GcsStore, key: str, size: int, traffic: Traffic) -> bool:
    """Whether an object's last byte is ``\\n``: a one-byte ranged read."""
    if size == 0:
        return True
    with store._errors("read", key):
        last = store.bucket.blob(key).download_as_bytes(
            start=size - 1, end=size - 1, retry=_retry()
        )
    traffic.downloaded += len(last)
    return last == b"\n"


def first_line(store: GcsStore, key: str, size: int, traffic: Traffic) -> bytes:
    """An object's first line with its newline (the whole object if it has none in 64 KiB)."""
    want = HEAD_FIRST
    head = b""
    while len(head) < size:
        with store._errors("read", key):
            more = store.bucket.blob(key).download_as_bytes(
                start=len(head), end=min(size, want) - 1, retry=_retry()
            )
        traffic.downloaded += len(more)
        head += more
        cut = head.find(b"\n")
        if cut >= 0:
            return head[: cut + 1]
        if want >= HEAD_PROBE:
            break
        want *= 2
    return head


def strip_first_line(store: GcsStore, key: str, skip: int, target: str, traffic: Traffic) -> None:
    """Write ``key`` minus its first ``skip`` bytes to ``target`` (a ranged download, an upload).

    Compose cannot cut an object, so this is where a header costs the runner the part's bytes.
    """
    with temp_folder("strip") as tmp:
        path = Path(tmp) / "part"
        with store._errors("download", key):
            store.bucket.blob(key).download_to_filename(str(path), start=skip, retry=_retry())
        size = path.stat().st_size
        traffic.downloaded += size
        store.put_file(target, path)
        traffic.uploaded += size


def copy_to(store: GcsStore, key: str, uri_bucket: str, uri_key: str) -> None:
    """Server-side copy of one object to another bucket (``--out gs://other/...``)."""
    # rewrite, not copyTo: a large object across locations may take several calls.
    with store._errors("copy", key):
        src = store.bucket.blob(key)
        dest = store.client.bucket(uri_bucket).blob(uri_key)
        token, _, _ = dest.rewrite(src, retry=_retry())
        while token is not None:
            token, _, _ = dest.rewrite(src, token=token, retry=_retry())
