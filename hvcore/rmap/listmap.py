"""The ``list`` policy: Xen's reverse map before the 2012 series.

Each shared frame keeps a doubly linked list of ``gfn_info`` nodes, one per
(domid, gfn) pointing at it. New entries go to the head; finding an entry
is a linear scan from the head, node by node. So ``contains`` and
``remove`` cost O(n) at sharing degree n, and removing every entry of an
n-entry rmap one by one (what domain teardown does) costs O(n^2). That
slowness is deliberate: this policy is the baseline the benchmarks measure
the other two against.

The nodes are C-like structs in a ``NodeArena`` (see ``arena.py``) shared
by all frames, so a visit costs the same whatever the allocation order;
a frame keeps only its head node and its count.

Invariants (per frame, kept by ``add``/``remove``):
- ``prv[head] == -1``; for every node ``n`` with ``nxt[n] >= 0``,
  ``prv[nxt[n]] == n``;
- ``count`` equals the number of nodes reachable from ``head``.
Frames with no state yet behave as empty lists; ``release`` drops the state
and frees the frame's nodes.
"""
from __future__ import annotations

import sys
from typing import Iterator

import numpy as np

from .arena import NodeArena, check_key, checked_batch
from .base import Rmap


class _Frame:
    """Per-frame list head (a node number, -1 = empty) and entry count."""

    __slots__ = ("head", "count")

    def __init__(self) -> None:
        self.head = -1
        self.count = 0


_FRAME_BYTES = sys.getsizeof(_Frame())


class ListRmap(Rmap):
    """One head-inserted, linearly searched linked list per frame."""

    name = "list"

    def __init__(self, nframes: int):
        super().__init__(nframes)
        self._frames: dict[int, _Frame] = {}
        self._arena = NodeArena()

    def add(self, mfn: int, domid: int, gfn: int) -> None:
        f = self._frames.get(mfn)
        n = self._arena.push(f.head if f is not None else -1, domid, gfn)
        if f is None:
            f = self._frames[mfn] = _Frame()
        f.head = n
        f.count += 1

    def add_many(self, mfns: np.ndarray, domids: np.ndarray, gfns: np.ndarray) -> None:
        """``add`` of every entry, in order: one batch push (head insertion
        needs no search). A refused key refuses it and every later entry."""
        m, d, g, stop = checked_batch(mfns, domids, gfns)
        if stop:
            fr, inv = np.unique(m[:stop], return_inverse=True)
            frames, get = self._frames, self._frames.get
            fl = [get(x) for x in fr.tolist()]
            for i in [i for i, f in enumerate(fl) if f is None]:
                fl[i] = frames[int(fr[i])] = _Frame()
            old = np.array([f.head for f in fl], dtype=np.int64)
            new = self._arena.push_many(d[:stop], g[:stop], inv.ravel(), old)
            added = np.bincount(inv.ravel(), minlength=len(fr))
            for f, h, c in zip(fl, new.tolist(), added.tolist()):
                f.head = h
                f.count += c
        if stop < len(m):
            check_key(int(d[stop]), int(g[stop]))      # raises

    def remove(self, mfn: int, domid: int, gfn: int, convert: bool = True) -> None:
        f = self._frames.get(mfn)
        a = self._arena
        n = a.find(f.head, domid, gfn) if f is not None else -1  # O(count)
        if n < 0:
            raise KeyError((mfn, domid, gfn))
        x = a.drop(n)
        if x != -2:
            f.head = x
        f.count -= 1

    def contains(self, mfn: int, domid: int, gfn: int) -> bool:
        f = self._frames.get(mfn)
        return f is not None and self._arena.find(f.head, domid, gfn) >= 0

    def count(self, mfn: int) -> int:
        f = self._frames.get(mfn)
        return f.count if f is not None else 0

    def entries(self, mfn: int) -> Iterator[tuple[int, int]]:
        f = self._frames.get(mfn)
        if f is not None:
            yield from self._arena.chain(f.head)

    def release(self, mfn: int) -> None:
        f = self._frames.pop(mfn, None)
        if f is not None and f.count:
            # Normally empty; free whatever is left.
            a = self._arena
            for n in a.nodes(f.head):
                a.release(n)

    def nbytes(self) -> int:
        return (self._arena.nbytes() + len(self._frames) * _FRAME_BYTES
                + sys.getsizeof(self._frames))

    def check(self) -> None:
        """Verify the list invariants of every frame (for tests)."""
        a, chained = self._arena, set()
        for mfn, f in self._frames.items():
            n, prev, seen = f.head, -1, 0
            while n >= 0:
                assert a.prv[n] == prev, f"frame {mfn}: broken prev link"
                assert n not in chained, f"frame {mfn}: node {n} in two places"
                chained.add(n)
                prev, n, seen = n, a.nxt[n], seen + 1
            assert seen == f.count, f"frame {mfn}: count {f.count} != {seen} nodes"
        a.check(chained)
