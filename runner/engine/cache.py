"""The cross-run cache (``runner submit --cache``): a shard that would compute what an earlier
run already committed is not run again; that commit's outputs and result are copied instead.

A shard's **key** is a sha256 over what decides its result: the task's code (the content of the
files that go into its bundle, ``requirements.txt`` included; from ``cflow``, its function's
pickle without line numbers, ``SubmitRequest.code_key``), the shard's id, its input's
content (a local file's sha256; a ``gs://`` object's CRC32C and MD5 from its metadata) or its
params, the files a ``cflow`` item names (``cflow.inputs``: a local file's size and
modification time, an object's checksums), the container image, whether inputs are staged
(``--no-stage`` hands the task a URI), and the environment that reaches the task (on this
machine the runner's environment, less the shell's own bookkeeping such as ``PWD`` or
``TERM``; variables given to the run, where a caller gives them). A shard whose input cannot
be fingerprinted has no key and runs.

The store keeps, per run submitted with the cache:

- an **index entry** ``cache/<key>/<run>/<shard>`` for each shard (created, never rewritten; on
  the local store a row of ``queue.db``), what had this key;
- the run's keys, ``runs/<run>/cache/<first shard index>.jsonl`` per publish batch, one line per
  shard: ``{"shard", "key", "from"}`` (``from``: ``<run>/<shard>`` when reused), which
  ``runner rm`` reads to drop the run's index entries and the progress reads to count; and
  ``keys.jsonl``, every key known when publishing began, from which ``runner watch`` goes on
  reusing when it finishes publishing a cut-off submit (:func:`resumed`).

At submit, for each batch of shards about to be published, the index is read for every key at
once and the earlier shards are tried newest run first: the first whose commit record exists
and whose outputs all copy (a hard link locally, a server-side copy in a bucket) is reused. An
index entry is never trusted without its commit, nor a commit of a chunk of ``cflow`` items of
which one failed (``worker.pyfunc.partly_failed``: it runs again). The new shard's commit record
is written with ``cached_from`` and its outputs under attempt 0 (workers number attempts from
1), so the watch, ``status`` and combine count it as done; it is never published.

A task reads its files after the key is made: one changed in between or while it ran would
leave other content's result under the key. Where workers read this machine's files in place
(the local store), the index entry holds ``seen``, a stat of the shard's local files (input and
named files, :func:`worker.agent.files.local_seen`) as keyed (an input changing while hashed
gets no key); each attempt records them at its start and end (``ShardResult.input_seen``), and
a commit is reused only if both match its entry's (none recorded: never). A reused shard's
record and entry carry its own key's ``seen``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from runner.engine.fingerprint import (
    file_digest,
    keyed_params,
    reads_here,
    stat_key,
)
from runner.engine.runs import Reuse
from worker.agent.files import named_files, seen_print
from worker.clock import SYSTEM_CLOCK, Clock
from worker.errors import NotFound
from worker.protocol import Layout, Shard, ShardResult
from worker.pyfunc import partly_failed
from worker.store import Store

INDEX = "cache/"
KEY_VERSION = 1  # raised when what goes into a key changes: old entries then never match
CACHED_ATTEMPT = 0  # where a reused shard's outputs go: workers number attempts from 1
ALL_KEYS = "keys.jsonl"  # beside the batches' records: every key the submit knew at its start
KEY_BATCH = 1000  # shards fingerprinted at once (one listing per folder of gs:// inputs)


def entry_key(key: str, run_id: str, shard_id: str) -> str:
    return f"{INDEX}{key}/{run_id}/{shard_id}"


def keys_prefix(run_id: str) -> str:
    return f"{Layout.run_prefix(run_id)}cache/"


@dataclass
class ShardCache:
    """One submit's cache: each shard's key as the shards pass (:meth:`keyed`), and reuse of
    earlier commits for each batch about to be published (:meth:`reuse`).

    A stream keys its shards in its reading thread while its publishing thread reuses: the
    keys are shared under a lock. The ids reused reach the run's watcher through
    :meth:`recorded` (called once the manifest counts their batch) and :meth:`take_reused`,
    so it counts them at once: a reused shard sends no event.
    """

    store: Store
    code: str  # code_digest of the task folder
    image: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    stage: bool = True
    clock: Clock = SYSTEM_CLOCK
    keys: dict[str, str | None] = field(default_factory=dict)  # shard id -> key (None: none)
    seen: dict[str, str] = field(default_factory=dict)  # shard id -> its local files, keyed
    cached: int = 0  # shards reused so far
    _recorded: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _unrecorded: list[str] = field(default_factory=list, repr=False)  # reused, batch not counted
    _reused: list[str] = field(default_factory=list, repr=False)  # counted, not yet taken

    def keyed(self, shards: Iterable[Shard]) -> Iterator[Shard]:
        """The shards unchanged, each one's key recorded as it passes (before any staging
        rewrites a local input into the bucket); remote inputs fingerprinted a batch at once."""
        it = iter(shards)
        while batch := list(islice(it, KEY_BATCH)):
            remote = [s.input for s in batch if s.input and "://" in s.input]
            remote += [n for s in batch for n in named_files(s) if "://" in n]
            prints = self.store.fingerprints(remote) if remote else {}
            for shard in batch:
                key, seen = self._key(shard, prints)
                with self._lock:
                    self.keys[shard.id] = key
                    if seen is not None:
                        self.seen[shard.id] = seen
                yield shard

    def _key(self, shard: Shard, prints: Mapping[str, str]) -> tuple[str | None, str | None]:
        """The shard's key (None: none) and its local files' print as they were keyed."""
        data = input_print = None
        if shard.input and "://" in shard.input:
            data = prints.get(shard.input)
        elif shard.input and (hashed := file_digest(shard.input)) is not None:
            data, input_print = hashed
        if shard.input and data is None:
            return None, None  # an input no checksum vouches for: always run
        fields = {
            "v": KEY_VERSION,
            "code": self.code,
            "shard": shard.id,
            "input": data,
            "params": keyed_params(shard.params),
            "image": self.image,
            "stage": self.stage,
            "env": dict(sorted(self.env.items())),
        }
        files: dict[str, str] = {}
        if names := named_files(shard):  # what a cflow item names: a file changed reruns it
            local = {n: stat_key(n) for n in names if "://" not in n}
            files = {n: st[1] for n, st in local.items()}
            fields["files"] = {n: local[n][0] if n in local else prints.get(n) for n in names}
        key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        return key, seen_print(input_print, files)

    def reuse(self, run_id: str, batch: list[Shard]) -> set[str]:
        """Reuse earlier commits for the shards of ``batch``; the ids now committed, which are
        not to be published. Every shard's index entry and key are recorded."""
        in_place = self.store.local_path(INDEX) is not None  # workers read this machine's files
        with self._lock:  # the reading thread may be keying more shards meanwhile
            known = dict(self.keys) if not self._recorded else {}
            seen = dict(self.seen) if not self._recorded and in_place else {}
            wanted = {s.id: k for s in batch if (k := self.keys.get(s.id))}
            # The shards whose commits must vouch for the local files they read (_vouched).
            here = {s.id: self.seen.get(s.id) for s in batch if in_place and reads_here(s)}
        if not self._recorded:  # every key known so far, for a resumed publish (resumed())
            rows = [
                json.dumps(_seen({"shard": s, "key": k}, seen.get(s))) for s, k in known.items()
            ]
            self.store.put(keys_prefix(run_id) + ALL_KEYS, ("\n".join(rows) + "\n").encode())
            self._recorded = True
        listed = self.store.list_many(sorted({INDEX + k + "/" for k in wanted.values()}))
        choices: dict[str, list[tuple[str, str]]] = {}
        for shard_id, key in wanted.items():
            found = []
            for entry in listed.get(f"{INDEX}{key}/", []):
                _, _, run, shard = entry.split("/", 3)
                if run != run_id:
                    found.append((run, shard))
            # Newest run first: run ids start with their second of creation.
            choices[shard_id] = sorted(found, reverse=True)
        hits: dict[str, str] = {}
        while pending := {s: c.pop(0) for s, c in choices.items() if c and s not in hits}:
            hits.update(self._try(run_id, pending, wanted, here))
        lines = [
            json.dumps({"shard": s.id, "key": wanted.get(s.id), "from": hits.get(s.id)})
            for s in batch
        ]
        if batch:
            key = f"{keys_prefix(run_id)}{batch[0].index:09d}.jsonl"
            self.store.put(key, ("\n".join(lines) + "\n").encode())
        self.store.create_many(
            {
                entry_key(k, run_id, s): json.dumps(
                    _seen({"run": run_id, "shard": s}, here.get(s))
                ).encode()
                for s, k in wanted.items()
            }
        )
        with self._lock:
            self.cached += len(hits)
            self._unrecorded.extend(hits)
        return set(hits)

    def recorded(self) -> None:
        """The manifest now counts every batch reused so far as published: their reused ids
        may be taken (a watcher that counted them before would see more shards done than the
        run holds)."""
        with self._lock:
            self._reused.extend(self._unrecorded)
            self._unrecorded.clear()

    def take_reused(self) -> list[str]:
        """The ids reused since the last call, of batches the manifest counts."""
        with self._lock:
            taken, self._reused = self._reused, []
        return taken

    def _try(
        self,
        run_id: str,
        pending: dict[str, tuple[str, str]],
        keys: Mapping[str, str],
        here: Mapping[str, str | None],
    ) -> dict[str, str]:
        """One candidate per shard: its commit (and index entry, for those ``here``) read, its
        outputs copied, the new commit written. The shards reused, with where from."""
        entries = {s: entry_key(keys[s], r, c) for s, (r, c) in pending.items() if s in here}
        wanted = [Layout.result(r, s) for r, s in pending.values()] + list(entries.values())
        records = self.store.get_many(wanted)
        results: dict[str, ShardResult] = {}
        for shard_id, (run, shard) in pending.items():
            raw = records.get(Layout.result(run, shard))
            try:
                result = ShardResult.from_json(raw) if raw is not None else None
            except (ValueError, TypeError):
                result = None
            if result is None or partly_failed(result.value):
                continue
            if shard_id in entries and not _vouched(result, records.get(entries[shard_id])):
                continue  # it may have read other content than its key covers
            results[shard_id] = result
        copies: dict[str, list[tuple[str, str]]] = {}
        for shard_id, result in results.items():
            source = Layout.outputs(result.run_id, result.shard_id, result.attempt)
            dest = Layout.outputs(run_id, shard_id, CACHED_ATTEMPT)
            copies[shard_id] = [(source + rel, dest + rel) for rel in result.outputs]
        missing = self.store.copy_many([pair for pairs in copies.values() for pair in pairs])
        broken = {s for s, pairs in copies.items() if any(src in missing for src, _ in pairs)}
        self.store.delete_many(dst for s in broken for _, dst in copies[s])
        now = self.clock.time()
        commits = {
            Layout.result(run_id, shard_id): ShardResult(
                run_id=run_id,
                shard_id=shard_id,
                attempt=CACHED_ATTEMPT,
                worker="cache",
                started_at=now,
                finished_at=now,
                outputs=result.outputs,
                bundle=result.bundle,
                value=result.value,
                cached_from=f"{result.run_id}/{result.shard_id}",
                input_seen=[seen, seen] if (seen := here.get(shard_id)) else None,
            ).to_json()
            for shard_id, result in results.items()
            if shard_id not in broken
        }
        self.store.create_many(commits)
        return {
            shard_id: f"{result.run_id}/{result.shard_id}"
            for shard_id, result in results.items()
            if shard_id not in broken
        }


def _seen(row: dict[str, Any], seen: str | None) -> dict[str, Any]:
    return {**row, "seen": seen} if seen else row


def _vouched(result: ShardResult, entry: bytes | None) -> bool:
    """Whether the local files a commit's attempt read were, at its start and at its end, as
    its key's submit found them (its index ``entry``): then it read what the key covers."""
    try:
        seen = json.loads(entry).get("seen") if entry is not None else None
    except (ValueError, AttributeError):
        return False
    return seen is not None and result.input_seen == [seen, seen]


def run_keys(store: Store, run_id: str) -> list[dict[str, str | None]]:
    """The run's recorded keys, one per shard submitted with the cache (empty: none)."""
    parts = store.get_many(list(store.list(keys_prefix(run_id), suffix=".jsonl")))
    rows = []
    for key in sorted(parts):
        for line in parts[key].decode().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def resumed(store: Store, run_id: str) -> Reuse | None:
    """The reuse of a ``--cache`` submit cut off while publishing, from the keys it recorded
    (None: it was not submitted with the cache)."""
    try:
        raw = store.get(keys_prefix(run_id) + ALL_KEYS)
    except NotFound:
        return None
    cache = ShardCache(store, code="", _recorded=True)  # the keys hold the code
    for line in raw.decode().splitlines():
        if line.strip():
            row = json.loads(line)
            cache.keys[row["shard"]] = row["key"]
            if row.get("seen"):
                cache.seen[row["shard"]] = row["seen"]
    return cache.reuse


def cached_count(store: Store, run_id: str) -> int:
    """How many shards of the run were reused from earlier runs."""
    return sum(1 for row in run_keys(store, run_id) if row.get("from"))


def drop_index(store: Store, run_id: str) -> int:
    """Remove the run's index entries (its keys stay with the run); how many there were."""
    entries = {
        entry_key(str(row["key"]), run_id, str(row["shard"]))
        for row in run_keys(store, run_id)
        if row.get("key")
    }
    store.delete_many(sorted(entries))
    return len(entries)
