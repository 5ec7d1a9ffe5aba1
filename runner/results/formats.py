"""What combining does with each output name: the one rule both backends follow.

- **Lines** (``.csv``, ``.tsv``, ``.jsonl``, ``.ndjson``, ``.txt``): the parts are concatenated in
  shard order, each ending in a newline (one is added after a part that lacks it). With declared
  headers (``[combine] headers = true``) a ``.csv``/``.tsv`` part's first line is left out when it
  is the header, the first part's first line; a part whose first line differs keeps it, and a
  warning names its shard. A part that is not text (:func:`text_problem`: a NUL byte, or bytes
  that are not UTF-8, in its first :data:`TEXT_PROBE` bytes) is not cut into lines: the name is
  kept per shard.
- **Gzip members** (the same formats gzip-compressed, ``.csv.gz`` ...): the parts are concatenated
  byte for byte. A gzip file may hold several members and decompresses to their contents in
  order, so the result is the parts' lines in shard order; a part whose content does not end in a
  newline is followed by :data:`NEWLINE_MEMBER`, as a line format's part by a newline. That is
  seen by decompressing each part as a stream (:func:`scan_gzip`); nothing is recompressed, so
  declared headers cannot be cut out of a member: a ``.csv.gz``/``.tsv.gz`` with declared headers
  is kept per shard, and so is a name one of whose parts is not whole gzip data or not text.
- **Per shard** (anything else: binary, a JSON document, an unknown suffix): never changed. Each
  shard's part is copied to ``combined/<name>/<shard id><suffix>`` and listed in
  ``combined/<name>/manifest.json`` (shard, index, file, size and a checksum).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import zlib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

LINE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".txt")  # text, one record a line
HEADER_SUFFIXES = (".csv", ".tsv")  # line formats whose first line may be a header
GZIP_MAGIC = b"\x1f\x8b"  # the first two bytes of every gzip member
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip")  # kept with the suffix before them
MANIFEST = "manifest.json"  # the listing of a name kept per shard
NAMED = 3  # shards a warning names before "and N more"
# Bytes of a line format's part (of a gzip part's content) looked at to tell text from binary:
# as git's and grep's test, a NUL byte there says binary; bytes that are not UTF-8 say not text.
TEXT_PROBE = 8192
# A gzip member holding "\n" (gzip.compress(b"\n", mtime=0)): what ends a gzip part's last line.
# 21 bytes: a 10-byte header, the deflated "\n", its CRC-32 and its length.
NEWLINE_MEMBER = bytes.fromhex("1f8b0800000000000203e302009306d73201000000")
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # a gzip wrapper: zlib checks each member's CRC and length
_INFLATE_OUT = 1 << 20  # bytes: the most a gzip scan holds decompressed at once


class Method(StrEnum):
    """What is done with one output name's parts."""

    LINES = "lines"  # concatenated, each part ending in a newline
    GZIP = "gzip members"  # concatenated byte for byte: one gzip member per part
    PER_SHARD = "per shard"  # copied unchanged under combined/<name>/, with a manifest


@dataclass(frozen=True)
class Plan:
    """The rule for one output name."""

    method: Method
    strip_headers: bool = False  # LINES: leave out each later part's first line if the header
    headed: bool = False  # LINES: a .csv/.tsv, whose first lines are looked at
    why: str = ""  # PER_SHARD: why the parts are not joined


def headed(rel: str) -> bool:
    """Whether a path's parts may start with a header line (a CSV or TSV)."""
    return rel.lower().endswith(HEADER_SUFFIXES)


def plan_for(rel: str, headers: bool | None) -> Plan:
    """The rule for the output path ``rel``, given the declared headers (None: undeclared)."""
    name = rel.lower()
    if name.endswith(LINE_SUFFIXES):
        return Plan(Method.LINES, strip_headers=bool(headers) and headed(rel), headed=headed(rel))
    inner = name.removesuffix(".gz")
    if inner != name and inner.endswith(LINE_SUFFIXES):
        if headers and headed(inner):
            return Plan(Method.PER_SHARD, why="declared headers are not cut out of gzip data")
        return Plan(Method.GZIP)
    suffix = kept_suffix(rel)
    what = f"{suffix} is not a line format" if suffix else "a name without a suffix"
    return Plan(Method.PER_SHARD, why=what)


def not_gzip(shard: str, detail: str = "") -> Plan:
    """The rule for a gzip name one of whose parts is not (whole) gzip data."""
    more = f" ({detail})" if detail else ""
    return Plan(Method.PER_SHARD, why=f"the part of shard {shard} is not gzip data{more}")


def not_text(shard: str, problem: str) -> Plan:
    """The rule for a line format one of whose parts is not text (:func:`text_problem`)."""
    return Plan(Method.PER_SHARD, why=f"the part of shard {shard} is not text: {problem}")


def text_problem(head: bytes, *, whole: bool) -> str | None:
    """Why a part whose first bytes are ``head`` is not text (None: it is): a NUL byte, or
    bytes that are not UTF-8. ``whole``: ``head`` is all of it (else a character cut at its
    end is not held against it). Joining such a part as lines, a newline added, would change
    binary data; only the first :data:`TEXT_PROBE` bytes are asked for, so the check stays
    cheap whatever the part's size."""
    if (at := head.find(b"\0")) >= 0:
        return f"a NUL byte at offset {at}"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=whole)
    except UnicodeDecodeError as exc:
        return f"byte 0x{head[exc.start]:02x} at offset {exc.start} is not UTF-8"
    return None


@dataclass(frozen=True)
class GzipScan:
    """What a gzip part decompresses to, as far as combining asks: its first and last bytes."""

    head: bytes  # the first TEXT_PROBE bytes of its content (all of it when shorter)
    last: bytes  # its content's last byte (b"": empty)
    whole: bool  # head is the whole content
    problem: str | None = None  # why it is not whole gzip data (its members then are not read)

    def text_problem(self) -> str | None:
        """Why its content is not text (:func:`text_problem`), None when it is."""
        return text_problem(self.head, whole=self.whole)


def scan_gzip(src: BinaryIO, chunk: int = 1 << 20) -> GzipScan:
    """Decompress a gzip part as a stream, keeping only its first and last bytes.

    Every member must be whole (its CRC and length checked) and follow the one before with
    nothing between or after: ``gzip -d`` stops at trailing bytes, so a part joined after them
    would be lost to it. Memory stays flat (``chunk`` bytes read, at most 1 MiB out, at a time).
    """
    head = b""
    last = b""
    size = 0
    members = 0
    inflater = zlib.decompressobj(_GZIP_WBITS)
    fed = False  # the current member has been given bytes
    data = b""
    more = False  # the last call was cut at _INFLATE_OUT: call again, even with no new bytes
    while True:
        if not data and not more:
            data = src.read(chunk)
            if not data:
                break
        try:
            out = inflater.decompress(data, _INFLATE_OUT)
        except zlib.error as exc:
            where = "bytes after its last member" if members and not fed else "corrupt"
            return GzipScan(head, last, False, f"{where}: {exc}")
        fed = True
        more = len(out) == _INFLATE_OUT
        if out:
            if size < TEXT_PROBE:
                head += out[: TEXT_PROBE - size]
            size += len(out)
            last = out[-1:]
        if inflater.eof:
            members += 1
            data = inflater.unused_data
            inflater = zlib.decompressobj(_GZIP_WBITS)
            fed = more = False
        else:
            data = inflater.unconsumed_tail
    if fed:
        return GzipScan(head, last, False, "truncated: its last member is not complete")
    return GzipScan(head, last, size <= TEXT_PROBE)


def is_gzip(head: bytes) -> bool:
    """Whether a part's first bytes start a gzip member."""
    return head.startswith(GZIP_MAGIC)


def file_text_problem(path: Path) -> str | None:
    """:func:`text_problem` of a local part, its first :data:`TEXT_PROBE` bytes read."""
    with path.open("rb") as fh:
        head = fh.read(TEXT_PROBE + 1)  # one more: is the probe the whole part?
    return text_problem(head[:TEXT_PROBE], whole=len(head) <= TEXT_PROBE)


def scan_gzip_file(path: Path) -> GzipScan | None:
    """:func:`scan_gzip` of a local part (None: it is not gzip data; an empty part, which adds
    no member, is empty content)."""
    with path.open("rb") as fh:
        head = fh.read(2)
        if not head:
            return GzipScan(b"", b"", whole=True)
        if not is_gzip(head):
            return None
        fh.seek(0)
        return scan_gzip(fh)


def kept_suffix(rel: str) -> str:
    """The suffix a per-shard copy keeps: ``.npy``; ``.tar.gz`` for a compressed name."""
    suffixes = PurePosixPath(rel).suffixes
    if len(suffixes) >= 2 and suffixes[-1].lower() in COMPRESSED:
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""


def kept_name(shard: str, rel: str) -> str:
    """A per-shard copy's file name inside ``combined/<rel>/``: ``00003.npy``."""
    return shard + kept_suffix(rel)


def same_line(a: bytes, b: bytes) -> bool:
    """Two first lines alike, whatever their line endings."""
    return a.rstrip(b"\r\n") == b.rstrip(b"\r\n")


def header_of(firsts: list[bytes]) -> bytes | None:
    """The header: the first line of the first part that has one."""
    return next((line for line in firsts if line), None)


def differing(firsts: list[bytes]) -> list[int]:
    """Indexes of the parts whose first line is not the header (empty parts never differ)."""
    header = header_of(firsts)
    if header is None:
        return []
    return [n for n, line in enumerate(firsts) if line and not same_line(line, header)]


def shards_text(shards: list[str]) -> str:
    """``shard 00001``; ``shards 00001, 00004, 00007 and 12 more``."""
    if len(shards) == 1:
        return f"shard {shards[0]}"
    named = ", ".join(shards[:NAMED])
    more = f" and {len(shards) - NAMED} more" if len(shards) > NAMED else ""
    return f"shards {named}{more}"


def mismatch_warning(rel: str, header: bytes, shards: list[str], first: bytes) -> str:
    """Declared headers, but some parts start with another line: kept, and said."""
    text = header.decode(errors="replace").rstrip("\r\n")
    line = first.decode(errors="replace").rstrip("\r\n")
    return (
        f"{rel}: the first line of {shards_text(shards)} is not the header {text!r}"
        f" (e.g. {line!r}); kept as data, not dropped"
    )


def header_warning(first_lines: list[bytes], rel: str) -> str | None:
    """A hint when every part of a CSV/TSV starts with the same line and no one said why."""
    if len(first_lines) > 1 and first_lines[0].strip() and len(set(first_lines)) == 1:
        line = first_lines[0].decode(errors="replace").strip()
        return (
            f"every part of {rel} starts with {line!r}; kept in each part. If it is a header,"
            " set `[combine] headers = true` in the task's cflow.toml (or `runner combine"
            " --headers`)"
        )
    return None


def lines_note(parts: int, stripped: bool) -> str:
    """What was done with a line format's parts."""
    header = ", the header kept once" if stripped else ""
    return f"lines of {parts} parts concatenated{header}"


def gzip_note(parts: int, newlines: int | None = None) -> str:
    """What was done with a compressed line format's parts; ``newlines``: after how many a
    :data:`NEWLINE_MEMBER` was added (None: their content was not looked at)."""
    if newlines is None:
        return f"{parts} gzip members concatenated into one gzip file (not decompressed)"
    note = f"{parts} gzip members concatenated into one gzip file (not recompressed)"
    if newlines:
        note += f", a newline member added after the {newlines} whose content lacked one"
    return note


def per_shard_note(rel: str, parts: int, why: str) -> str:
    """What was done with the parts of a name kept per shard."""
    return f"kept per shard ({why}): {parts} files listed in {rel}/{MANIFEST}"


def file_sha256(path: Path) -> str:
    """A file's sha256, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_json(rel: str, why: str, parts: list[dict[str, Any]]) -> bytes:
    """``combined/<rel>/manifest.json``: the name, why it is kept per shard, and its parts (each
    with ``shard``, ``index``, ``file``, ``size`` and ``sha256`` or the bucket's ``crc32c``)."""
    head = json.dumps({"name": rel, "kept": Method.PER_SHARD.value, "why": why})[:-1]
    rows = ",\n  ".join(json.dumps(part) for part in parts)  # one part a line
    return f'{head},\n "parts": [\n  {rows}\n ]}}\n'.encode()
