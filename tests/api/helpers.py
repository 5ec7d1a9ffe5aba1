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
