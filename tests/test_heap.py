"""The frozen start-up heap: a reload's leftovers in reference cycles are collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from relay import heap


class Node:
    """Stands for what a reload replaces: an upstream and its client, pointing at each other."""

    def __init__(self) -> None:
        self.peer: Node | None = None


def cycle() -> tuple[Node, weakref.ref[Node]]:
    a, b = Node(), Node()
    a.peer, b.peer = b, a
    return a, weakref.ref(b)


@pytest.fixture
def thawed_after() -> Iterator[None]:
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("thawed_after")
def test_a_frozen_cycle_dropped_later_is_kept_until_refreeze() -> None:
    kept, ref = cycle()
    assert heap.freeze() > 0
    del kept
    gc.collect()
    assert ref() is not None  # frozen: no collection sees it (the leak refreeze mends)
    heap.refreeze()
    assert ref() is None


@pytest.mark.usefixtures("thawed_after")
def test_refreeze_keeps_what_is_still_referenced_frozen() -> None:
    kept, ref = cycle()
    heap.freeze()
    assert heap.refreeze() >= 2
    assert ref() is kept.peer
    # frozen objects are left out of the collector's generations; the freeze count itself
    # is not compared: anything frozen that another thread frees meanwhile lowers it
    tracked = gc.get_objects()
    assert not any(o is kept or o is kept.peer for o in tracked)
