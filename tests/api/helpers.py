"""Functions and exceptions the API tests ship: a module of the test tree, not installed on the
workers (it goes by value)."""

from __future__ import annotations


class Rejected(Exception):
    """An exception class of the caller's own; it unpickles in the caller."""

    def __init__(self, item: int, why: str):
        super().__init__(item, why)
        self.item = item
        self.why = why


class Unloadable(Exception):
    """Pickles, but will not unpickle: its ``__init__`` wants two arguments and its args hold
    one (a common shape of user exceptions), so it comes back as a stand-in."""

    def __init__(self, a: int, b: int):
        super().__init__(f"{a}/{b}")


def check(x: int) -> int:
    if x == 2:
        print("about to reject 2")
        raise Rejected(x, "two is not welcome")
    if x == 3:
        raise Unloadable(3, 4)
    return x


def crashes(x: int) -> int:
    """Items 5 and 9 end the process running them (``os._exit``, a segfault); item 10 calls
    ``sys.exit``; the others return ten times themselves."""
    import os
    import signal
    import sys

    print(f"item {x} starting", flush=True)
    if x == 5:
        os._exit(3)
    if x == 9:
        os.kill(os.getpid(), signal.SIGSEGV)
    if x == 10:
        sys.exit(4)
    return x * 10


def hangs(x: int) -> int:
    """Item 2 sleeps far past any timeout; item 6 does too, having ignored SIGALRM first (as
    code that blocks in C would ignore it); the others return themselves."""
    import signal
    import time

    if x == 6:
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
    if x in (2, 6):
        time.sleep(600)
    return x


def divides(x: int) -> float:
    """Every item raises ZeroDivisionError."""
    return x / 0


def lazily(x: int) -> object:
    """Item 1 returns a generator, which cannot go back to the caller; the others a list."""
    numbers = (i for i in range(x))
    return numbers if x == 1 else list(numbers)


class Spoiled:
    """Pickles on the worker, but will not unpickle anywhere: its ``__setstate__`` raises."""

    def __init__(self, size: int = 0):
        self.payload = b"s" * size

    def __setstate__(self, state: object) -> None:
        raise ValueError("spoiled in transit")
