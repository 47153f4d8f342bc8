"""The ``list`` policy: Xen's reverse map before the 2012 series.

Each shared frame keeps a doubly linked list of ``gfn_info``-like nodes, one
per (domid, gfn) pointing at it. New entries go to the head; finding an entry
is a linear scan from the head. So ``contains`` and ``remove`` cost O(n) at
sharing degree n, and removing every entry of an n-entry rmap one by one
(what domain teardown does) costs O(n^2). That slowness is deliberate: this
policy is the baseline the benchmarks measure the other two against.

Invariants (per frame, kept by ``add``/``remove``):
- ``head.prev is None``; for every node ``n.next.prev is n``;
- ``count`` equals the number of nodes reachable from ``head``.
Frames with no state yet behave as empty lists; ``release`` drops the state.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterator

from .base import Rmap


class _Node:
    """One (domid, gfn) of a frame's rmap (Xen's ``gfn_info_t``)."""

    __slots__ = ("domid", "gfn", "prev", "next")

    def __init__(self, domid: int, gfn: int, nxt: "_Node | None"):
        self.domid = domid
        self.gfn = gfn
        self.prev: _Node | None = None
        self.next = nxt


class _Frame:
    """Per-frame list head and entry count."""

    __slots__ = ("head", "count")

    def __init__(self) -> None:
        self.head: _Node | None = None
        self.count = 0


# Approximate object sizes for nbytes() (CPython, including the GC header).
_NODE_BYTES = sys.getsizeof(_Node(0, 0, None))
_FRAME_BYTES = sys.getsizeof(_Frame())


class ListRmap(Rmap):
    """One head-inserted, linearly searched linked list per frame."""

    name = "list"

    def __init__(self, nframes: int, table_alloc: Callable[[], bool] | None = None):
        # table_alloc is accepted so every policy takes the same factory
        # arguments; a list never allocates a table.
        super().__init__(nframes)
        self._frames: dict[int, _Frame] = {}
        self._entries = 0  # total nodes over all frames, for nbytes()

    def add(self, mfn: int, domid: int, gfn: int) -> None:
        f = self._frames.get(mfn)
        if f is None:
            f = self._frames[mfn] = _Frame()
        node = _Node(domid, gfn, f.head)
        if f.head is not None:
            f.head.prev = node
        f.head = node
        f.count += 1
        self._entries += 1

    def _find(self, f: _Frame | None, domid: int, gfn: int) -> _Node | None:
        # Linear scan from the head: O(count), as in Xen.
        n = f.head if f is not None else None
        while n is not None:
            if n.gfn == gfn and n.domid == domid:
                return n
            n = n.next
        return None

    def remove(self, mfn: int, domid: int, gfn: int, convert: bool = True) -> None:
        f = self._frames.get(mfn)
        n = self._find(f, domid, gfn)
        if n is None:
            raise KeyError((mfn, domid, gfn))
        if n.prev is None:
            f.head = n.next
        else:
            n.prev.next = n.next
        if n.next is not None:
            n.next.prev = n.prev
        n.prev = n.next = None
        f.count -= 1
        self._entries -= 1

    def contains(self, mfn: int, domid: int, gfn: int) -> bool:
        return self._find(self._frames.get(mfn), domid, gfn) is not None

    def count(self, mfn: int) -> int:
        f = self._frames.get(mfn)
        return f.count if f is not None else 0

    def entries(self, mfn: int) -> Iterator[tuple[int, int]]:
        f = self._frames.get(mfn)
        n = f.head if f is not None else None
        while n is not None:
            # Take the successor before yielding: the caller may remove n.
            nxt = n.next
            yield n.domid, n.gfn
            n = nxt

    def release(self, mfn: int) -> None:
        f = self._frames.pop(mfn, None)
        if f is not None:
            self._entries -= f.count

    def nbytes(self) -> int:
        return (self._entries * _NODE_BYTES + len(self._frames) * _FRAME_BYTES
                + sys.getsizeof(self._frames))

    def check(self) -> None:
        """Verify the list invariants of every frame (for tests)."""
        total = 0
        for mfn, f in self._frames.items():
            n, prev, seen = f.head, None, 0
            while n is not None:
                assert n.prev is prev, f"frame {mfn}: broken prev link"
                prev, n, seen = n, n.next, seen + 1
            assert seen == f.count, f"frame {mfn}: count {f.count} != {seen} nodes"
            total += seen
        assert total == self._entries, "entry total out of step"
