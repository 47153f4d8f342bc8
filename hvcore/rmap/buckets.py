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

The nodes are the list policy's: C-like structs in a ``NodeArena`` shared
by all frames (see ``arena.py``), walked by the same ``find``, so a bucket
costs the same per node visited as a list although its consecutive nodes
were allocated ~256 adds apart. A frame keeps its chain heads in ``heads``:
an int32 array of 1 (list) or 256 (the table: 1 KiB here, a 4 KiB page of
list heads in Xen).

Invariants:
- ``heads`` has 1 element (list) or 256 (hash); a node lives in bucket
  ``(gfn + domid) % 256`` of a hash, in ``heads[0]`` of a list;
- every bucket is a proper doubly linked list (``prv[head] == -1``,
  ``prv[nxt[n]] == n``) and ``count`` is the total number of nodes;
- ``heads`` is never replaced while ``walkers > 0`` (an ``entries`` walk
  holds it): conversions due then are skipped, not deferred, as in Xen;
- if ``table_alloc`` refuses the table the rmap stays a list (the next add
  tries again), exactly like Xen on ``-ENOMEM``.
"""
from __future__ import annotations

import sys
from array import array
from typing import Callable, Iterator

from .arena import NodeArena, check_key
from .base import Rmap

RMAP_HEAVY_SHARED_PAGE = 256   # add at this count converts list -> hash
RMAP_LIGHT_SHARED_PAGE = 64    # remove leaving this count converts hash -> list
RMAP_HASHTAB_SIZE = 256        # buckets per table (one 4 KiB page in Xen)


def _heads(k: int) -> array:
    return array("i", [-1]) * k


class _Frame:
    """Per-frame state: bucket heads, entry count, active walks."""

    __slots__ = ("heads", "count", "walkers")

    def __init__(self) -> None:
        self.heads = _heads(1)
        self.count = 0
        self.walkers = 0


_FRAME_BYTES = sys.getsizeof(_Frame()) + sys.getsizeof(_heads(1))
_TABLE_BYTES = sys.getsizeof(_heads(RMAP_HASHTAB_SIZE)) - sys.getsizeof(_heads(1))


class BucketsRmap(Rmap):
    """Per frame a list that turns into a 256-bucket hash when heavily shared."""

    name = "buckets"

    def __init__(self, nframes: int, table_alloc: Callable[[], bool] | None = None):
        super().__init__(nframes)
        # Asked before each list -> hash conversion; False = allocation failed.
        self.table_alloc = table_alloc
        self._frames: dict[int, _Frame] = {}
        self._arena = NodeArena()
        self._tables = 0

    # -- conversions --------------------------------------------------------
    def _to_hash(self, f: _Frame) -> None:
        a, table = self._arena, _heads(RMAP_HASHTAB_SIZE)
        # Walk the list from the head, head-inserting each node in its bucket.
        for n in a.nodes(f.heads[0]):
            b = (a.gfn[n] + a.dom[n]) % RMAP_HASHTAB_SIZE
            a.link(table[b], n)
            table[b] = n
        f.heads = table
        self._tables += 1

    def _to_list(self, f: _Frame) -> None:
        a, single = self._arena, _heads(1)
        # Bucket by bucket, each from its head, head-inserting into one list.
        for h in f.heads:
            for n in a.nodes(h):
                a.link(single[0], n)
                single[0] = n
        f.heads = single
        self._tables -= 1

    # -- accessors ----------------------------------------------------------
    def add(self, mfn: int, domid: int, gfn: int) -> None:
        f = self._frames.get(mfn)
        if f is None:
            check_key(domid, gfn)  # a refused pair changes nothing
            f = self._frames[mfn] = _Frame()
        if len(f.heads) == 1 and f.count >= RMAP_HEAVY_SHARED_PAGE and not f.walkers:
            check_key(domid, gfn)
            if self.table_alloc is None or self.table_alloc():
                self._to_hash(f)
        heads = f.heads
        b = (gfn + domid) % RMAP_HASHTAB_SIZE if len(heads) > 1 else 0
        heads[b] = self._arena.push(heads[b], domid, gfn)
        f.count += 1

    def remove(self, mfn: int, domid: int, gfn: int, convert: bool = True) -> None:
        f = self._frames.get(mfn)
        if f is None:
            raise KeyError((mfn, domid, gfn))
        heads, a = f.heads, self._arena
        b = (gfn + domid) % RMAP_HASHTAB_SIZE if len(heads) > 1 else 0
        n = a.find(heads[b], domid, gfn)  # scans one bucket
        if n < 0:
            raise KeyError((mfn, domid, gfn))
        x = a.drop(n)
        if x != -2:
            heads[b] = x
        f.count -= 1
        if (convert and len(heads) > 1 and f.count <= RMAP_LIGHT_SHARED_PAGE
                and not f.walkers):
            self._to_list(f)

    def contains(self, mfn: int, domid: int, gfn: int) -> bool:
        f = self._frames.get(mfn)
        if f is None:
            return False
        heads = f.heads
        b = (gfn + domid) % RMAP_HASHTAB_SIZE if len(heads) > 1 else 0
        return self._arena.find(heads[b], domid, gfn) >= 0

    def count(self, mfn: int) -> int:
        f = self._frames.get(mfn)
        return f.count if f is not None else 0

    def entries(self, mfn: int) -> Iterator[tuple[int, int]]:
        f = self._frames.get(mfn)
        if f is None:
            return
        f.walkers += 1  # pins the representation until the walk ends
        try:
            chain = self._arena.chain
            for h in f.heads:
                yield from chain(h)
        finally:
            f.walkers -= 1

    def release(self, mfn: int) -> None:
        f = self._frames.pop(mfn, None)
        if f is None:
            return
        if len(f.heads) > 1:
            self._tables -= 1
        if f.count:
            # Normally empty; free whatever is left.
            a = self._arena
            for h in f.heads:
                for n in a.nodes(h):
                    a.release(n)

    def representation(self, mfn: int) -> str:
        f = self._frames.get(mfn)
        return "hash" if f is not None and len(f.heads) > 1 else "list"

    def nbytes(self) -> int:
        return (self._arena.nbytes() + len(self._frames) * _FRAME_BYTES
                + self._tables * _TABLE_BYTES + sys.getsizeof(self._frames))

    def check(self) -> None:
        """Verify the bucket invariants of every frame (for tests)."""
        a, chained = self._arena, set()
        for mfn, f in self._frames.items():
            assert len(f.heads) in (1, RMAP_HASHTAB_SIZE), f"frame {mfn}: bad table"
            seen = 0
            for b, n in enumerate(f.heads):
                prev = -1
                while n >= 0:
                    assert a.prv[n] == prev, f"frame {mfn}: broken prev link"
                    assert n not in chained, f"frame {mfn}: node {n} in two places"
                    chained.add(n)
                    if len(f.heads) > 1:
                        assert (a.gfn[n] + a.dom[n]) % RMAP_HASHTAB_SIZE == b, "wrong bucket"
                    prev, n, seen = n, a.nxt[n], seen + 1
            assert seen == f.count, f"frame {mfn}: count {f.count} != {seen} nodes"
        a.check(chained)
        assert self._tables == sum(len(f.heads) > 1 for f in self._frames.values())
