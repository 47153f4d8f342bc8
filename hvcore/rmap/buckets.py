"""The ``buckets`` policy: Xen's reverse map after the 2012 series.

A frame's rmap starts as the pre-series list (head insertion, linear search).
When an ``add`` finds the count already at ``RMAP_HEAVY_SHARED_PAGE`` (256)
it converts the list into a hash table of ``RMAP_HASHTAB_SIZE`` (256)
buckets, bucket ``(gfn + domid) % 256``, each bucket again a head-inserted
list. A ``remove`` (with ``convert``) that leaves the count at or below
``RMAP_LIGHT_SHARED_PAGE`` (64) converts back. The gap between the two
thresholds is hysteresis: a frame hovering around one of them does not
convert back and forth. A lookup in the table still scans a bucket, so this
is ~256x better than the list at high degree, not O(1).

Invariants:
- ``heads`` has 1 element (list) or 256 (hash); a node lives in bucket
  ``(gfn + domid) % 256`` of a hash, in ``heads[0]`` of a list;
- every bucket is a proper doubly linked list (``head.prev is None``,
  ``n.next.prev is n``) and ``count`` is the total number of nodes;
- ``heads`` is never replaced while ``walkers > 0`` (an ``entries`` walk
  holds it): conversions due then are skipped, not deferred, as in Xen;
- if ``table_alloc`` refuses the table the rmap stays a list (the next add
  tries again), exactly like Xen on ``-ENOMEM``.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterator

from .base import Rmap
from .listmap import _Node

RMAP_HEAVY_SHARED_PAGE = 256   # add at this count converts list -> hash
RMAP_LIGHT_SHARED_PAGE = 64    # remove leaving this count converts hash -> list
RMAP_HASHTAB_SIZE = 256        # buckets per table (one 4 KiB page in Xen)


class _Frame:
    """Per-frame state: bucket heads, entry count, active walks."""

    __slots__ = ("heads", "count", "walkers")

    def __init__(self) -> None:
        self.heads: list[_Node | None] = [None]
        self.count = 0
        self.walkers = 0


_NODE_BYTES = sys.getsizeof(_Node(0, 0, None))
_FRAME_BYTES = sys.getsizeof(_Frame()) + sys.getsizeof([None])
_TABLE_BYTES = sys.getsizeof([None] * RMAP_HASHTAB_SIZE)


def _insert(heads: list, b: int, node: _Node) -> None:
    """Head-insert ``node`` into bucket ``b``."""
    first = heads[b]
    node.prev = None
    node.next = first
    if first is not None:
        first.prev = node
    heads[b] = node


class BucketsRmap(Rmap):
    """Per frame a list that turns into a 256-bucket hash when heavily shared."""

    name = "buckets"

    def __init__(self, nframes: int, table_alloc: Callable[[], bool] | None = None):
        super().__init__(nframes)
        # Asked before each list -> hash conversion; False = allocation failed.
        self.table_alloc = table_alloc
        self._frames: dict[int, _Frame] = {}
        self._entries = 0
        self._tables = 0

    # -- conversions --------------------------------------------------------
    def _to_hash(self, f: _Frame) -> None:
        table: list[_Node | None] = [None] * RMAP_HASHTAB_SIZE
        n = f.heads[0]
        while n is not None:
            nxt = n.next
            _insert(table, (n.gfn + n.domid) % RMAP_HASHTAB_SIZE, n)
            n = nxt
        f.heads = table
        self._tables += 1

    def _to_list(self, f: _Frame) -> None:
        single: list[_Node | None] = [None]
        for n in f.heads:
            while n is not None:
                nxt = n.next
                _insert(single, 0, n)
                n = nxt
        f.heads = single
        self._tables -= 1

    # -- accessors ----------------------------------------------------------
    def add(self, mfn: int, domid: int, gfn: int) -> None:
        f = self._frames.get(mfn)
        if f is None:
            f = self._frames[mfn] = _Frame()
        if (len(f.heads) == 1 and f.count >= RMAP_HEAVY_SHARED_PAGE and not f.walkers
                and (self.table_alloc is None or self.table_alloc())):
            self._to_hash(f)
        heads = f.heads
        _insert(heads, (gfn + domid) % RMAP_HASHTAB_SIZE if len(heads) > 1 else 0,
                _Node(domid, gfn, None))
        f.count += 1
        self._entries += 1

    def _find(self, f: _Frame | None, domid: int, gfn: int) -> tuple[int, _Node | None]:
        """(bucket, node) of the pair; node None when absent. Scans one bucket."""
        if f is None:
            return 0, None
        heads = f.heads
        b = (gfn + domid) % RMAP_HASHTAB_SIZE if len(heads) > 1 else 0
        n = heads[b]
        while n is not None:
            if n.gfn == gfn and n.domid == domid:
                break
            n = n.next
        return b, n

    def remove(self, mfn: int, domid: int, gfn: int, convert: bool = True) -> None:
        f = self._frames.get(mfn)
        b, n = self._find(f, domid, gfn)
        if n is None:
            raise KeyError((mfn, domid, gfn))
        if n.prev is None:
            f.heads[b] = n.next
        else:
            n.prev.next = n.next
        if n.next is not None:
            n.next.prev = n.prev
        n.prev = n.next = None
        f.count -= 1
        self._entries -= 1
        if (convert and len(f.heads) > 1 and f.count <= RMAP_LIGHT_SHARED_PAGE
                and not f.walkers):
            self._to_list(f)

    def contains(self, mfn: int, domid: int, gfn: int) -> bool:
        return self._find(self._frames.get(mfn), domid, gfn)[1] is not None

    def count(self, mfn: int) -> int:
        f = self._frames.get(mfn)
        return f.count if f is not None else 0

    def entries(self, mfn: int) -> Iterator[tuple[int, int]]:
        f = self._frames.get(mfn)
        if f is None:
            return
        f.walkers += 1  # pins the representation until the walk ends
        try:
            heads = f.heads
            for b in range(len(heads)):
                n = heads[b]
                while n is not None:
                    nxt = n.next  # the caller may remove n
                    yield n.domid, n.gfn
                    n = nxt
        finally:
            f.walkers -= 1

    def release(self, mfn: int) -> None:
        f = self._frames.pop(mfn, None)
        if f is not None:
            self._entries -= f.count
            if len(f.heads) > 1:
                self._tables -= 1

    def representation(self, mfn: int) -> str:
        f = self._frames.get(mfn)
        return "hash" if f is not None and len(f.heads) > 1 else "list"

    def nbytes(self) -> int:
        return (self._entries * _NODE_BYTES + len(self._frames) * _FRAME_BYTES
                + self._tables * _TABLE_BYTES + sys.getsizeof(self._frames))

    def check(self) -> None:
        """Verify the bucket invariants of every frame (for tests)."""
        total = 0
        for mfn, f in self._frames.items():
            assert len(f.heads) in (1, RMAP_HASHTAB_SIZE), f"frame {mfn}: bad table"
            seen = 0
            for b, n in enumerate(f.heads):
                prev = None
                while n is not None:
                    assert n.prev is prev, f"frame {mfn}: broken prev link"
                    if len(f.heads) > 1:
                        assert (n.gfn + n.domid) % RMAP_HASHTAB_SIZE == b, "wrong bucket"
                    prev, n, seen = n, n.next, seen + 1
            assert seen == f.count, f"frame {mfn}: count {f.count} != {seen} nodes"
            total += seen
        assert total == self._entries, "entry total out of step"
        assert self._tables == sum(len(f.heads) > 1 for f in self._frames.values())
