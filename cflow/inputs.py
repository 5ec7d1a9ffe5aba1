"""The files an item names, for the cross-run cache: an item that is a path (a ``Path``, or a
string naming a file that exists here) is the file it names to the function, so a changed
file must rerun its item even where the path is the same.

An item, or each element of an item that is a tuple or list, or each value of a dict, is
looked at, one level deep: a path-like object (``os.PathLike``), or a string under 4 KiB that
has a ``/`` or a ``.`` in it and names a regular file here, is named by its absolute path; a
``gs://`` URI by itself. The engine fingerprints what is named as it keys the shard
(``runner.engine.cache``): a local file by its size and modification time (as Nextflow's
``-resume`` does by default: no file is read), an object in a bucket by its checksums.
"""

from __future__ import annotations

import os
from typing import Any

PATH_MAX = 4096  # a longer string is no file name
_PARTS = 64  # at most this many elements of a tuple, list or dict are looked at
_NO_PATH = frozenset({int, float, bool, bytes, type(None)})  # names no file: not looked at


def files_named(item: Any) -> list[str]:
    """The files ``item`` names (see the module's doc), in order."""
    kind = type(item)
    if kind in _NO_PATH:
        return []
    if kind is tuple or kind is list:
        parts = item[:_PARTS]
    elif kind is dict:
        parts = list(item.values())[:_PARTS]
    else:
        parts = (item,)
    found = []
    for part in parts:
        name = _named(part)
        if name is not None:
            found.append(name)
    return found


def _named(part: Any) -> str | None:
    if type(part) in _NO_PATH:
        return None
    if type(part) is str:
        if len(part) >= PATH_MAX or ("/" not in part and "." not in part):
            return None
        name = part
    elif isinstance(part, os.PathLike):
        name = os.fspath(part)
        if not isinstance(name, str):
            return None
    else:
        return None
    if name.startswith("gs://"):
        return name
    try:
        return os.path.abspath(name) if os.path.isfile(name) else None
    except (OSError, ValueError):  # a name the system refuses (a NUL byte in it)
        return None
