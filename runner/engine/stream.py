"""A run whose shards come from a stream (a Python caller's iterable): published as read.

:func:`runs.create_run` lists every shard before publishing, so the count is known from the
start. A stream's length is not: :func:`start_stream` makes the run from the first batch, returns
its manifest, and goes on reading and publishing in a thread of its own while the run is watched.
Until the stream ends the manifest counts one shard more than it published (``publishing``
holds: the run cannot look settled, and ``runner runs`` shows it ``publishing``); at the end it
records the real count. The shard list (``shards.jsonl``, read by ``runner status`` and retry)
goes to the store before the shards it lists are published: with every batch while it is
short (up to :data:`LIST_EVERY_BATCH`), and once longer whenever its count has doubled and at
the end, so its writes add up to at most twice its size then. Memory stays flat: a batch at a
time, the list in a temporary file (a stream of one batch, a list's few thousand items, puts its
list from memory).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from runner.engine import runs
from worker import defaults
from worker.clock import SYSTEM_CLOCK, Clock
from worker.errors import CFlowError
from worker.protocol import Layout, Manifest, RunOptions, RunState, Shard, WorkMessage, new_run_id
from worker.queue import WorkQueue
from worker.store import Store
from worker.tempdirs import temp_folder

log = logging.getLogger(__name__)

BATCH_SECONDS = 0.25  # a batch goes out once this old, full or not: a slow stream still starts
# Bytes of shards (their params and input, about) read ahead of publishing, and in one batch:
# a shard of many items (a cflow chunk) weighs far more than one of a single item, and the
# stream's memory stays flat by bytes, not by count.
QUEUE_BYTES = 1024 * 1024
BATCH_BYTES = 1024 * 1024
SHARD_BYTES = 256  # what a shard weighs besides its params' strings and its input
AHEAD = 4 * defaults.PUBLISH_BATCH  # shards queued at most before reading waits (locally)
LIST_EVERY_BATCH = 1 << 20  # a shard list this long or shorter is put again with every batch


def _weight(shard: Shard) -> int:
    params = shard.params or {}
    strings = sum(len(v) for v in params.values() if isinstance(v, str))
    return SHARD_BYTES + strings + len(shard.input or "")


class ShardFeed(Protocol):
    """Shards a caller makes once the run exists (items large enough go to the store under
    the run's id first), read as they are published."""

    def shards(self, store: Store, run_id: str) -> Iterable[Shard]: ...

    def stopped(self) -> bool:
        """Whether the caller wants no more shards read (the run is cancelled or detached)."""
        ...

    def cancels(self) -> bool:
        """Whether the stop is a cancel: the run's last count and its cancel are recorded in
        one write (a run whose published shards all ran never looks finished)."""
        ...

    def at_least(self) -> int | None:
        """How many shards the feed will give at least, where it knows before reading (its
        items have a length); None: it does not know. The run's first workers are sized by it."""
        ...

    def in_memory(self) -> bool:
        """Whether reading its first batch never waits (its items are all in memory already):
        that batch is read in the caller's thread, with no reading thread to start."""
        ...


class StreamError(CFlowError):
    """Reading the stream failed part way; the run holds what was published before."""


class Publisher:
    """Publishes the rest of a stream in a thread; :meth:`join` waits for the end."""

    def __init__(self, store: Store, queue: WorkQueue, manifest: Manifest, clock: Clock):
        self.store, self.queue, self.clock = store, queue, clock
        self.manifest = manifest
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, target: Callable[[], None]) -> None:
        def body() -> None:
            try:
                target()
            except BaseException as exc:  # kept for the caller: the thread has no one to tell
                self.error = exc
                log.warning("publishing run %s stopped: %s", self.manifest.run_id, exc)
            finally:
                self.done.set()

        self._thread = threading.Thread(target=body, name="cflow-publish", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the stream's end; True once it has ended."""
        return self.done.wait(timeout)


def start_stream(
    *,
    store: Store,
    queue: WorkQueue,
    task_dir: Path,
    feed: ShardFeed,
    options: RunOptions,
    clock: Clock = SYSTEM_CLOCK,
    on_created: Callable[[Manifest], None] | None = None,
    on_published: runs.Progress | None = None,
    run_id: str | None = None,
    keyed: Callable[[Iterable[Shard]], Iterator[Shard]] | None = None,
    reuse: runs.Reuse | None = None,
    packed: tuple[bytes, str] | None = None,
) -> tuple[Manifest, Publisher]:
    """Bundle the task, make the run, publish the first batch; the rest in a thread.

    ``run_id``: the run's id when chosen already; ``keyed`` and ``reuse``: the cross-run
    cache's (``runner.engine.cache``), which sees each shard as it is read and each batch
    before it is published (the shards it reused are not published); ``packed``: the task
    folder's bundle, packed already (``(data, sha)``).

    Raises:
        Exception: what the stream raised while its first batch was read (no run was made).
        BackendError: the first batch could not be published.
    """
    info, sha = runs.store_bundle(store, task_dir, packed)
    run_id = run_id or new_run_id(clock.time())
    source = iter(feed.shards(store, run_id))
    if keyed is not None:
        source = keyed(source)
    reader = _Reader(source, first_inline=feed.in_memory())
    first = reader.batch(clock, feed.stopped)
    if reader.failed is not None:  # before the first batch went out: no run is made
        raise reader.failed
    ended = len(first) < defaults.PUBLISH_BATCH and first.ended
    manifest = Manifest(
        run_id=run_id,
        bundle=sha,
        entry=info.entry.value,
        shard_count=len(first) + (0 if ended else 1),
        options=options.to_dict(),
        created_at=clock.time(),
        task_name=task_dir.resolve().name,
        published=0,
        published_at=clock.time(),
    )
    stream = _Stream(store, queue, manifest, clock, on_published, reuse)
    records = stream.list_first(first)
    store.put(Layout.manifest(run_id), manifest.to_json())
    if on_created is not None:
        on_created(manifest)
    publisher = Publisher(store, queue, manifest, clock)
    try:
        stream.publish(first, records, final=ended)
    except BaseException:
        stream.close()
        raise
    publisher.manifest = stream.manifest
    if ended:
        publisher.done.set()
        return stream.manifest, publisher

    def rest() -> None:
        try:
            stream.run(reader, feed)
        finally:
            publisher.manifest = stream.manifest
            stream.close()

    publisher.start(rest)
    return stream.manifest, publisher


class _Batch(list[Shard]):
    ended: bool = False  # the stream ended while this batch was read


class _Reader:
    """Reads the stream in a thread of its own into a bounded queue, so a batch goes out when
    the stream stalls (a slow generator never holds back the items it already gave).

    ``first_inline``: the first batch is read in the caller's thread, the thread started only
    for a later one (a stream whose reading never waits: a list's items). A map of a few
    thousand items is then one batch, read with no thread at all: starting one, and handing
    the GIL to it and back, cost a short run's start a few milliseconds on a busy machine.
    """

    _END = object()

    def __init__(self, source: Iterator[Shard], *, first_inline: bool = False):
        self._source = source
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=2 * defaults.PUBLISH_BATCH)
        self._held = 0  # bytes of the shards in the queue (_weight)
        self._room = threading.Condition()
        self._ended = False
        self._failed: BaseException | None = None  # what the stream raised, not yet raised
        self._asked = threading.Event()  # the first batch was asked for: reading may start
        self._inline = first_inline
        self._thread: threading.Thread | None = None
        if not first_inline:
            self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(
            target=self._read, args=(self._source,), name="cflow-stream-read", daemon=True
        )
        self._thread.start()

    @property
    def failed(self) -> BaseException | None:
        """What the stream raised, once read up to it."""
        return self._failed

    def _read(self, source: Iterator[Shard]) -> None:
        # Read once the first batch is asked for, not from start(): a thread that reads while
        # the one that started it has yet to return from start() keeps the GIL from it for up
        # to a switch interval (5 ms), a run's start delayed by that much for nothing (giving
        # the GIL up once at the start does not hand it over: the reader takes it back first).
        self._asked.wait()
        try:
            for shard in source:
                weight = _weight(shard)
                with self._room:  # one shard always fits, however heavy
                    while self._held and self._held + weight > QUEUE_BYTES:
                        self._room.wait()
                    self._held += weight
                self._queue.put((shard, weight))
        except BaseException as exc:  # raised where the batch is taken
            self._queue.put(_Failed(exc))
            return
        self._queue.put(self._END)

    def batch(self, clock: Clock, stop: Callable[[], bool]) -> _Batch:
        """Up to a publish batch of shards: what came within :data:`BATCH_SECONDS` of the
        first, or until the stream ended. The first is waited for until ``stop()`` (asked
        every :data:`BATCH_SECONDS`) says to give up: an empty batch."""
        batch = _Batch()
        self._asked.set()
        if self._failed is not None:
            self._ended = True
            raise self._failed
        if self._ended:
            batch.ended = True
            return batch
        if self._inline:
            self._inline = False
            return self._read_inline(batch, clock)
        if self._thread is None:
            self._start()
        started: float | None = None
        weight = 0
        while len(batch) < defaults.PUBLISH_BATCH and weight < BATCH_BYTES:
            wait = BATCH_SECONDS if started is None else started + BATCH_SECONDS - clock.monotonic()
            if started is not None and wait <= 0:
                break
            try:
                got = self._queue.get(timeout=wait)
            except queue.Empty:
                if started is None and not stop():
                    continue
                break
            if got is self._END:
                self._ended = batch.ended = True
                break
            if isinstance(got, _Failed):  # raised once what came before it went out
                self._failed = got.error
                break
            shard, heavy = got
            with self._room:
                self._held -= heavy
                self._room.notify()
            weight += heavy
            batch.append(shard)
            if started is None:
                started = clock.monotonic()
        return batch

    def _read_inline(self, batch: _Batch, clock: Clock) -> _Batch:
        """The first batch, read here: up to a publish batch, what is read within
        :data:`BATCH_SECONDS` (large items, each stored as it is read, take time), or until
        the stream ends or raises (raised at the next batch, as the thread's reading would)."""
        weight = 0
        until = clock.monotonic() + BATCH_SECONDS
        while len(batch) < defaults.PUBLISH_BATCH and weight < BATCH_BYTES:
            if batch and clock.monotonic() >= until:
                break
            try:
                shard = next(self._source)
            except StopIteration:
                self._ended = batch.ended = True
                break
            except BaseException as exc:
                self._failed = exc
                break
            weight += _weight(shard)
            batch.append(shard)
        return batch


def _lines(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode("utf-8")


@dataclasses.dataclass(frozen=True)
class _Failed:
    error: BaseException


@dataclasses.dataclass
class _Stream:
    """The publishing of one stream: the shard list so far, the manifest's counts."""

    store: Store
    queue: WorkQueue
    manifest: Manifest
    clock: Clock
    on_published: runs.Progress | None
    reuse: runs.Reuse | None = None
    listed: int = 0  # shards in the list so far
    uploaded: int = 0  # shards in the list last put in the store
    # The list so far, a temporary file from the second batch on (a stream that is one batch,
    # a list's few thousand items, has its list put in the store straight from memory).
    listing: Path | None = None
    _first: bytes = b""  # the first batch's lines, until the list has a file
    _folder: tempfile.TemporaryDirectory[str] | None = None

    def list_first(self, batch: list[Shard]) -> list[dict[str, Any]]:
        """List the first batch and put the list in the store; its shards as the messages
        carry them."""
        records = [shard.to_dict() for shard in batch]
        self._first = _lines(records)
        self.store.put(Layout.shard_list(self.manifest.run_id), self._first)
        self.listed = self.uploaded = len(batch)
        return records

    def append(self, batch: list[Shard]) -> list[dict[str, Any]]:
        """List a later batch; its shards as the messages carry them."""
        records = [shard.to_dict() for shard in batch]
        if self.listing is None:
            self._folder = temp_folder("stream")
            self.listing = Path(self._folder.name) / "shards.jsonl"
            self.listing.write_bytes(self._first)
            self._first = b""
        with self.listing.open("ab") as fh:
            fh.write(_lines(records))
        self.listed += len(batch)
        return records

    def close(self) -> None:
        if self._folder is not None:
            self._folder.cleanup()

    def publish(
        self,
        batch: list[Shard],
        records: list[dict[str, Any]],
        *,
        final: bool,
        cancel: bool = False,
    ) -> None:
        """Publish a batch (already listed, ``records`` its shards as dicts); record the
        counts (and the run cancelled, with ``cancel``); the list when due."""
        run_id = self.manifest.run_id
        reused = self.reuse(run_id, batch) if self.reuse is not None and batch else set()
        messages = [WorkMessage(run_id=run_id, shard=r) for r in records if r["id"] not in reused]
        # The list goes first: a shard on the queue is listed, whatever becomes of this process
        # (its caller killed, a run then halted: what it committed read back from the list).
        # A long list goes only when it has doubled, so that its writes stay within twice its
        # size: those past the last one are listed once the stream ends.
        doubled = self.listed >= 2 * max(self.uploaded, defaults.PUBLISH_BATCH // 2)
        short = self.listing is not None and self.listing.stat().st_size <= LIST_EVERY_BATCH
        due = doubled or short or final
        if self.listing is not None and due and self.uploaded < self.listed:
            self.store.put_file(Layout.shard_list(run_id), self.listing)  # not twice the same
            self.uploaded = self.listed
        if messages:
            self.queue.publish(messages)
        done = (self.manifest.published or 0) + len(batch)
        at = self.clock.time()

        def counted(current: Manifest) -> Manifest:  # over a `runner cancel` meanwhile
            if cancel:
                current = current.with_state(RunState.CANCELLED)
            count = done if final else done + 1
            return dataclasses.replace(current, shard_count=count, published=done, published_at=at)

        self.manifest = runs.update_manifest(self.store, run_id, counted)
        if self.on_published is not None and batch:
            self.on_published(len(batch))

    def _stopped(self, feed: ShardFeed) -> bool:
        """The caller wants no more, or the run is no longer active (cancelled, halted)."""
        if feed.stopped():
            return True
        state = runs.load_manifest(self.store, self.manifest.run_id).state
        return state != RunState.ACTIVE.value

    def _room(self, feed: ShardFeed) -> bool:
        """Wait while :data:`AHEAD` of the run's shards wait on the queue (where it can tell:
        the local backend), so an endless or fast iterable is read only so far ahead of the
        workers (it filled the disk with items by the million); False once the run stops."""
        while (self.queue.stats(self.manifest.run_id).queued or 0) >= AHEAD:
            if self._stopped(feed):
                return False
            self.clock.sleep(BATCH_SECONDS)
        return True

    def run(self, reader: _Reader, feed: ShardFeed) -> None:
        """Read and publish batches to the stream's end, or until the run stops or the caller
        wants no more; the run then counts what was published."""
        try:
            while True:
                if self._stopped(feed) or not self._room(feed):
                    self.publish([], [], final=True, cancel=feed.stopped() and feed.cancels())
                    return
                batch = reader.batch(self.clock, lambda: self._stopped(feed))
                if not batch and not batch.ended:
                    continue  # stopped while the stream stalled: said above
                # A feed that ends its items because it was stopped ends as a stop does: a
                # cancel's stop is recorded (the run read as finished with what was read).
                cut = batch.ended and feed.stopped() and feed.cancels()
                self.publish(batch, self.append(batch), final=batch.ended, cancel=cut)
                if batch.ended:
                    return
        except BaseException as exc:
            self.publish([], [], final=True)  # the run ends with what went out
            if isinstance(exc, CFlowError):
                raise
            raise StreamError(
                f"reading the items of run {self.manifest.run_id} failed after"
                f" {self.manifest.published} shards were published ({type(exc).__name__}:"
                f" {exc}); the run holds those",
                run_id=self.manifest.run_id,
            ) from exc
