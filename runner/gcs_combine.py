"""The default combine on Cloud Storage: concatenated in the bucket, not on the runner.

Per output path, the committed parts are composed in shard order (:func:`compose_tree`). A part
whose last byte is not a newline is followed by a one-byte newline object, as the local combine
writes one. The runner reads one byte of each part for that check; with declared headers it also
reads each part's first line, and re-uploads the parts after the first without it (compose
cannot cut an object), which is the only case where part bytes pass through the runner.
"""

from __future__ import annotations

from runner.combine import Combined, Part, Warn, header_warning
from runner.compose import (
    NEWLINE_KEY,
    Traffic,
    compose_tree,
    ends_with_newline,
    first_line,
    sizes,
    strip_first_line,
)
from worker.errors import TaskError
from worker.gcs_store import GcsStore
from worker.protocol import Layout, Manifest

HEADER_SUFFIXES = (".csv", ".tsv")


def combine_in_bucket(
    store: GcsStore,
    manifest: Manifest,
    groups: dict[str, list[Part]],
    *,
    headers: bool | None,
    warn: Warn,
) -> Combined:
    run_id = manifest.run_id
    target = Layout.combined(run_id)
    scratch = f"runs/{run_id}/combine-scratch/"
    traffic = Traffic()
    combined = Combined(files=[], shards=0, missing=0, traffic=traffic)
    size_of = sizes(store, Layout.shards_prefix(run_id))
    newline = scratch + NEWLINE_KEY
    made: list[str] = []
    try:
        for rel in sorted(groups):
            parts = groups[rel]
            headed = rel.lower().endswith(HEADER_SUFFIXES)
            sources: list[str] = []
            firsts: list[bytes] = []
            for n, part in enumerate(parts):
                size = size_of.get(part.key, 0)
                key = part.key
                if headed and headers is not False:
                    head = first_line(store, part.key, size, traffic)
                    firsts.append(head)
                    if headers and n > 0 and head:
                        if not head.endswith(b"\n") and len(head) < size:
                            raise TaskError(
                                f"{part.key} starts with a line over 64 KiB; a header? set"
                                " `[combine] headers = false` if the parts have none",
                                run_id=run_id,
                            )
                        if len(head) >= size:
                            continue  # the part is its header alone
                        key = f"{scratch}body/{n:06d}/{rel}"
                        strip_first_line(store, part.key, len(head), key, traffic)
                        made.append(key)
                        size -= len(head)
                if size == 0:
                    continue
                sources.append(key)
                if not ends_with_newline(store, part.key, size_of.get(part.key, 0), traffic):
                    if newline not in made:
                        store.put(newline, b"\n")
                        made.append(newline)
                    sources.append(newline)
            if headers is None and headed and (hint := header_warning(firsts, rel)):
                warn(hint)
            if not sources:
                store.put(target + rel, b"")
            else:
                compose_tree(store, sources, target + rel, f"{scratch}tree/{rel}/", traffic)
            combined.files.append(target + rel)
    finally:
        for key in made:
            store.delete(key)
    return combined


__all__ = ["Traffic", "combine_in_bucket"]
