"""Where shards come from: a glob of input files, a JSON-lines params file, or a count."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path

from worker.errors import InputError
from worker.protocol import Shard, shard_id_for_index, shard_id_for_input

REMOTE_SCHEMES = ("gs://",)


def from_glob(pattern: str, *, lister: RemoteLister | None = None) -> Iterator[Shard]:
    """One shard per matching file, in sorted order; ids are stable per input."""
    if pattern.startswith(REMOTE_SCHEMES):
        if lister is None:
            raise InputError(
                f"{pattern} is a Cloud Storage input; it needs the Google Cloud backend"
            )
        uris = lister(pattern)
    else:
        expanded = os.path.expanduser(pattern)
        uris = iter(
            sorted(
                str(Path(p).resolve())
                for p in glob.iglob(expanded, recursive=True)
                if Path(p).is_file()
            )
        )
    seen: set[str] = set()
    count = 0
    for index, uri in enumerate(uris):
        shard_id = shard_id_for_input(uri)
        if shard_id in seen:  # two inputs whose names and hashes collide: vanishingly rare
            shard_id = f"{shard_id}-{index}"
        seen.add(shard_id)
        count += 1
        yield Shard(id=shard_id, index=index, input=uri)
    if count == 0:
        raise InputError(
            f"--inputs {pattern!r} matches no files; check the path and quote the glob"
        )


def from_params(path: Path) -> Iterator[Shard]:
    """One shard per non-blank line of a JSON-lines file; each line must be a JSON object."""
    if not path.is_file():
        raise InputError(f"--params file {path} does not exist")
    lines: list[tuple[int, dict[str, object]]] = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path} line {number} is not valid JSON: {err.msg}") from None
            if not isinstance(value, dict):
                raise InputError(
                    f"{path} line {number} must be a JSON object, not {type(value).__name__}"
                )
            lines.append((number, value))
    if not lines:
        raise InputError(f"--params file {path} has no lines; add one JSON object per shard")
    for index, (_, params) in enumerate(lines):
        yield Shard(id=shard_id_for_index(index, len(lines)), index=index, params=params)


def from_count(count: int) -> Iterator[Shard]:
    if count < 1:
        raise InputError(f"--shards must be at least 1, not {count}")
    for index in range(count):
        yield Shard(id=shard_id_for_index(index, count), index=index, params={"index": index})


class RemoteLister:
    """Lists ``gs://`` URIs matching a glob (provided by the Google Cloud backend)."""

    def __call__(self, pattern: str) -> Iterator[str]:  # pragma: no cover - interface
        raise NotImplementedError
