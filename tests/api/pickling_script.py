"""Run by tests/api/test_pickling.py, in processes of their own (each with its own string hash
seed): ``digests`` prints a cached map's keys of functions and sha256 of its items' pickles; ``map
STORE [--cache]`` maps a function over instances of a class of this ``__main__`` (on workers
that are not forks of it, where the test says so) and prints the values and how many were
reused."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import sys

import cflow
from cflow.own import own_modules
from cflow.pickling import ItemPickler, function_key

STOP_WORDS = {"the", "a", "an", "of", "and", "to", "in"}  # a set of strings: ordered by hash


class Mode(enum.Enum):
    COUNT = "count"
    UPPER = "upper"


@dataclasses.dataclass(frozen=True)
class Doc:
    words: tuple[str, ...]
    tags: tuple[str, ...] = ()

    def content(self) -> set[str]:  # a method: code of the script's, with its line numbers
        return {w for w in self.words if w not in STOP_WORDS}


@dataclasses.dataclass
class Counted:
    n: int
    kept: set[str]


def count(doc: Doc, mode: Mode = Mode.COUNT) -> Counted:
    if not isinstance(doc, Doc):  # the function's class and the items' are one to a worker
        raise TypeError(f"{type(doc)} is not {Doc}")
    kept = doc.content()
    return Counted(len(kept) if mode is Mode.COUNT else 0, kept)


OFFSET = 7


def plain(x: int) -> int:  # no set, no class of its own: cloudpickle's bytes are the same
    return x * 2 + OFFSET


def scaled(by: int):  # a closure: shipped by value with what it holds
    return lambda doc: count(doc).n * by


DOCS = [
    Doc(("the", "cat", "sat")),
    Doc(("a", "dog", "and", "a", "cat"), ("pets", "animals")),
    Doc(("to", "be", "or", "not", "to", "be")),
]


def digests() -> dict[str, str]:
    own = own_modules()
    items = ItemPickler(own, canonical=True)
    pickles = {
        "function": function_key(count, own, "task.py").encode(),
        "closure": function_key(scaled(3), own, "task.py").encode(),
        "plain": function_key(plain, own, "task.py").encode(),
        **{f"item{i}": items.dumps(i, doc) for i, doc in enumerate(DOCS)},
        "set item": items.dumps(9, {"words": set(STOP_WORDS), "tags": frozenset(STOP_WORDS)}),
    }
    return {name: hashlib.sha256(data).hexdigest() for name, data in pickles.items()}


def mapped(store: str, cache: bool) -> dict[str, object]:
    run = cflow.submit(count, DOCS, store=store, workers=2, cache=cache, progress=False)
    values = run.results()
    return {
        "values": [[v.n, sorted(v.kept)] for v in values],
        "own class": all(type(v) is Counted for v in values),
        "cached": run.progress().cached,
    }


if __name__ == "__main__":
    what = digests() if sys.argv[1] == "digests" else mapped(sys.argv[2], "--cache" in sys.argv)
    print(json.dumps(what))
