"""The Cloud Storage store: the bucket layout of :class:`worker.protocol.Layout` in one bucket.

Objects are written whole (GCS never shows half an object). :meth:`GcsStore.create` is a simple
(multipart, not resumable) upload with ``if_generation_match=0``: of racing writers exactly one
gets the object and the others a 412, which is how attempts are claimed and shards committed.
Large files stream to and from disk; every call goes through Cloud Storage's retry policy with
no deadline (:meth:`GcsBatch._call`); a create retried after its first try landed gets a 412 and
compares.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import google.cloud.storage as storage
import google_crc32c
import requests.adapters
from google.api_core import exceptions as gexc

from worker.backends.gcp.gcs_api import HTTP_POOL_SIZE, api_errors, parse_gs_uri
from worker.backends.gcp.gcs_batch import GcsBatch
from worker.backends.gcp.retry import Outage
from worker.clock import SYSTEM_CLOCK, Clock
from worker.errors import BackendError, NotFound

_MAX_SIMPLE_UPLOAD = 8 * 1024 * 1024  # bytes; above this the library switches to resumable
_GLOB_CHARS = frozenset("*?[]{}\\")


def glob_prefix(pattern: str) -> str:
    """The literal start of an object glob: the listing prefix that bounds it server-side."""
    for i, char in enumerate(pattern):
        if char in _GLOB_CHARS:
            return pattern[:i]
    return pattern


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a Cloud Storage ``matchGlob`` into a regex, to filter listings client-side.

    ``*`` and ``?`` stay within one path segment, ``**`` crosses ``/`` (and ``**/`` also matches
    no folder at all), ``[abc]``/``[!abc]`` are character classes and ``{a,b}`` alternatives.
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif char == "*":
            out.append("[^/]*")
            i += 1
        elif char == "?":
            out.append("[^/]")
            i += 1
        elif char == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append(f"[{body.replace(chr(92), chr(92) * 2)}]")
            i = end + 1
        elif char == "{" and (end := pattern.find("}", i)) != -1:
            options = pattern[i + 1 : end].split(",")
            out.append("(?:" + "|".join(re.escape(o) for o in options) + ")")
            i = end + 1
        elif char == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
        else:
            out.append(re.escape(char))
            i += 1
    return re.compile("".join(out) + r"\Z")


def file_crc32c(path: Path) -> str:
    """The base64 CRC32C of a file, as Cloud Storage reports it in ``crc32c``."""
    checksum = google_crc32c.Checksum()
    with path.open("rb") as fh:
        while chunk := fh.read(1024 * 1024):
            checksum.update(chunk)
    return base64.b64encode(checksum.digest()).decode()


def make_client(project: str | None, *, pool_size: int = HTTP_POOL_SIZE) -> storage.Client:
    """A storage client whose connection pool is big enough for every slot of a worker.

    Honours ``STORAGE_EMULATOR_HOST`` (then with anonymous credentials); otherwise uses
    Application Default Credentials.
    """
    client = storage.Client(project=project)
    # The client's requests session keeps 10 connections per host by default; slots beyond
    # that would open and drop a connection per call.
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
    session: requests.Session = client._http
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return client


class GcsStore(GcsBatch):
    """One bucket as a :class:`worker.store.Store`; keys are object names (the calls on many
    objects at once are :class:`worker.backends.gcp.gcs_batch.GcsBatch`'s)."""

    def __init__(
        self,
        bucket: str,
        *,
        client: storage.Client | None = None,
        clock: Clock = SYSTEM_CLOCK,
        outage: Outage | None = None,
    ):
        if not bucket or "/" in bucket:
            raise BackendError(f"bucket name {bucket!r} is not valid; give the bare name, no gs://")
        self.client = client if client is not None else make_client(None)
        self.bucket_name = bucket
        self.bucket = self.client.bucket(bucket)
        self.clock = clock  # the retries' pauses
        self.outage = outage or Outage("Cloud Storage", clock=clock)
        self.give_up_after: float | None = None  # None: wait out any outage
        self._written, self._written_lock = {}, threading.Lock()

    def bounded(self, seconds: float) -> GcsStore:
        """This store, its calls giving up after ``seconds`` of transient answers: for writes
        that must not hold up a worker on its way out (its log, a problem report)."""
        other = copy.copy(self)
        other.give_up_after = seconds
        return other

    # -- the Store interface -------------------------------------------------------------

    def url(self, key: str) -> str:
        return f"gs://{self.bucket_name}/{key}"

    def put(self, key: str, data: bytes) -> None:
        with self._errors("write", key):
            blob = self.bucket.blob(key)
            self._write(
                key,
                f"write {self.url(key)}",
                lambda: blob.upload_from_string(data, content_type=_content_type(key), retry=None),
            )

    def put_file(self, key: str, path: Path) -> None:
        with self._errors("upload", key):
            blob = self.bucket.blob(key)
            self._write(
                key,
                f"upload {self.url(key)}",
                lambda: blob.upload_from_filename(
                    str(path), content_type=_content_type(key), retry=None
                ),
            )

    def create(self, key: str, data: bytes) -> bool:
        if len(data) > _MAX_SIMPLE_UPLOAD:  # resumable uploads may not honour the precondition
            raise BackendError(f"create-only object {key} is too large ({len(data)} bytes)")
        blob = self.bucket.blob(key)
        try:
            with self._errors("create", key):
                self._call(
                    f"create {self.url(key)}",
                    lambda: blob.upload_from_string(
                        data, content_type=_content_type(key), if_generation_match=0, retry=None
                    ),
                )
            return True
        except gexc.PreconditionFailed:
            # A retried upload whose first try landed also sees a 412: it won all the same.
            try:
                return self.get(key) == data
            except NotFound:
                return False

    def get(self, key: str) -> bytes:
        return self._read(key)

    def get_range(self, key: str, start: int, size: int) -> bytes:
        return self._read(key, start, start + size - 1)

    def _read(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        """The object, or bytes ``start`` to ``end`` of it (b"": a range at or past its end)."""
        with self._errors("read", key):
            blob = self.bucket.blob(key)

            def read() -> bytes:
                try:
                    data: bytes = blob.download_as_bytes(start=start, end=end, retry=None)
                except gexc.RequestRangeNotSatisfiable:  # 416: only a range can be
                    return b""
                return data

            return self._call(f"read {self.url(key)}", read)

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """A bucket answers each read in tens of milliseconds: 16 in flight at once."""
        if len(keys) < 2:
            return super().get_many(keys)

        def one(key: str) -> tuple[str, bytes | None]:
            try:
                return key, self.get(key)
            except NotFound:
                return key, None

        with ThreadPoolExecutor(16, thread_name_prefix="get") as pool:
            return {key: data for key, data in pool.map(one, keys) if data is not None}

    def get_file(self, key: str, path: Path) -> None:
        self._download(self.bucket, key, path)

    def exists(self, key: str) -> bool:
        with self._errors("check", key):
            blob = self.bucket.blob(key)
            return bool(self._call(f"check {self.url(key)}", lambda: blob.exists(retry=None)))

    def list(
        self,
        prefix: str,
        *,
        suffix: str = "",
        start_after: str | None = None,
        limit: int | None = None,
    ) -> Iterator[str]:
        # matchGlob lets the server skip what does not end in suffix (a run's result markers
        # among all its logs and statuses); the client-side check keeps emulators honest.
        match_glob = None
        if suffix and not (_GLOB_CHARS & set(prefix + suffix)):
            match_glob = f"{prefix}**{suffix}"
        names = self._names(self.bucket_name, prefix, match_glob, start_after)
        count = 0
        for name in names:
            if not name.endswith(suffix) or (start_after is not None and name <= start_after):
                continue  # startOffset is inclusive; start_after is not
            if limit is not None and count >= limit:
                return
            count += 1
            yield name

    def update(self, key: str, change: Callable[[bytes], bytes | None]) -> bytes | None:
        """Read-modify-write under the object's generation (``ifGenerationMatch``): a writer
        that came between makes the write fail with 412, and the object is read again."""
        while True:
            try:
                blob, data = self._read_current(key)
            except gexc.PreconditionFailed:  # rewritten since its generation was read
                continue
            new = change(data)
            if new is None:
                return None
            try:
                self._write_over(key, blob, new)
                return new
            except gexc.PreconditionFailed:
                # Another writer came between, or a retried write whose first try landed.
                if self.get(key) == new:
                    return new

    def _read_current(self, key: str) -> tuple[storage.Blob, bytes]:
        """The object and its bytes, read at the generation its metadata names."""
        url = self.url(key)
        with self._errors("read", key):
            blob = self._call(f"read {url}", lambda: self.bucket.get_blob(key, retry=None))
            if blob is None:
                raise NotFound(f"no object {url}")
            generation = blob.generation
            data = self._call(
                f"read {url}",
                lambda: blob.download_as_bytes(if_generation_match=generation, retry=None),
            )
            return blob, data

    def _write_over(self, key: str, blob: storage.Blob, data: bytes) -> None:
        """Write ``data`` over ``blob`` unless its generation changed since it was read (412)."""
        with self._errors("write", key):
            self._write(
                key,
                f"write {self.url(key)}",
                lambda: blob.upload_from_string(
                    data,
                    content_type=_content_type(key),
                    if_generation_match=blob.generation,
                    retry=None,
                ),
            )

    def delete(self, key: str) -> None:
        with contextlib.suppress(gexc.NotFound), self._errors("delete", key, missing_ok=True):
            blob = self.bucket.blob(key)
            self._call(f"delete {self.url(key)}", lambda: blob.delete(retry=None))

    def fetch(self, uri: str, path: Path) -> None:
        bucket_name, key = parse_gs_uri(uri)
        bucket = self.bucket if bucket_name == self.bucket_name else self.client.bucket(bucket_name)
        self._download(bucket, key, path)

    # -- beyond the interface ------------------------------------------------------------

    def glob(self, pattern: str) -> Iterator[str]:
        """``gs://`` URIs of the objects matching ``gs://bucket/glob``, in name order, lazily.

        Listed in pages from the glob's literal prefix; ``matchGlob`` narrows the listing
        server-side and the same glob is checked here.
        """
        bucket_name, glob = parse_gs_uri(pattern)
        regex = glob_regex(glob)
        prefix = glob_prefix(glob)
        match_glob = glob if glob != prefix else None
        for name in self._names(bucket_name, prefix, match_glob):
            if regex.match(name) and not name.endswith("/"):
                yield f"gs://{bucket_name}/{name}"

    def copy(self, source: str, dest: str) -> None:
        """A server-side copy: the bytes never leave the bucket (rewritten in steps when
        Cloud Storage asks for more calls, as it may for a large object)."""
        blob, source_blob = self.bucket.blob(dest), self.bucket.blob(source)

        def step(token: str | None) -> str | None:  # resumes where the last answered one ended
            return self._call(
                f"copy {self.url(source)}",
                lambda: blob.rewrite(source_blob, token=token, retry=None)[0],
            )

        with self._errors("copy", source):  # writing the same bytes again: safe to retry
            token = step(None)
            while token is not None:
                token = step(token)

    def _names(
        self, bucket: str, prefix: str, match_glob: str | None, start_after: str | None = None
    ) -> Iterator[str]:
        options: dict[str, Any] = {"match_glob": match_glob} if match_glob else {}
        if start_after is not None:
            options["start_offset"] = start_after
        with self._errors("list", prefix):
            what = f"list gs://{bucket}/{prefix}"
            fields = "items(name),nextPageToken"
            for blob in self._listing(
                bucket, what, prefix=prefix or None, fields=fields, **options
            ):
                yield blob.name

    def _download(self, bucket: storage.Bucket, key: str, path: Path) -> None:
        try:
            with self._errors("download", key, bucket=bucket.name):
                blob = bucket.blob(key)
                self._call(
                    f"download gs://{bucket.name}/{key}",
                    lambda: blob.download_to_filename(str(path), retry=None),
                )
        except BaseException:
            path.unlink(missing_ok=True)  # never leave half a file behind
            raise

    def _errors(
        self, action: str, key: str, *, bucket: str | None = None, missing_ok: bool = False
    ) -> contextlib.AbstractContextManager[None]:
        """API errors as CFlow's, the object named in the store's bucket unless told another."""
        return api_errors(bucket or self.bucket_name, action, key, missing_ok=missing_ok)


def _content_type(key: str) -> str | None:
    """Types for the layout's own objects; None lets the library guess from the name."""
    if key.endswith(".json"):
        return "application/json"
    if key.endswith((".txt", ".jsonl")):
        return "text/plain; charset=utf-8"
    return None
