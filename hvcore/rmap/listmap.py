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
a frame keeps only its head node and its count, in two flat int32 arrays
indexed by mfn (as Xen keeps the list head in ``struct page_info``), so
the audit reads every frame's head with numpy.

Invariants (per frame, kept by ``add``/``remove``):
- ``prv[head] == -1``; for every node ``n`` with ``nxt[n] >= 0``,
  ``prv[nxt[n]] == n``;
- ``count`` equals the number of nodes reachable from ``head``.
Frames with no state yet behave as empty lists; ``release`` drops the state
and frees the frame's nodes.
"""
from __future__ import annotations

from array import array
from typing import Iterator

import numpy as np

from .arena import FrameCounts, NodeArena, check_key, checked_batch
from .base import Rmap

#: a list longer than this is scanned by the compiled ``find``
LONG_CHAIN = 16
_NO_TABLES = np.empty(0, np.int32)


class ListRmap(FrameCounts, Rmap):
    """One head-inserted, linearly searched linked list per frame."""

    name = "list"

    def reserve_nodes(self, n: int) -> None:
        self._arena.reserve(n)

    def __init__(self, nframes: int):
        super().__init__(nframes)
        self._head = array("i", [-1]) * nframes     # -1: empty (released)
        self._count = array("i", [0]) * nframes
        self._headv, self._countv = (np.frombuffer(a, dtype=np.int32)
                                     for a in (self._head, self._count))
        self._arena = NodeArena()

    def add(self, mfn: int, domid: int, gfn: int) -> None:
        head = self._head
        head[mfn] = self._arena.push(head[mfn], domid, gfn)
        self._count[mfn] += 1

    def add_many(self, mfns: np.ndarray, domids: np.ndarray, gfns: np.ndarray) -> None:
        """``add`` of every entry, in order: one batch push (head insertion
        needs no search). A refused key refuses it and every later entry."""
        m, d, g, stop = checked_batch(mfns, domids, gfns)
        if stop:
            fr, inv = np.unique(m[:stop], return_inverse=True)
            inv = inv.ravel()
            self._headv[fr] = self._arena.push_many(d[:stop], g[:stop], inv, self._headv[fr])
            self._countv[fr] += np.bincount(inv, minlength=len(fr)).astype(np.int32)
        if stop < len(m):
            check_key(int(d[stop]), int(g[stop]))      # raises

    def remove(self, mfn: int, domid: int, gfn: int, convert: bool = True) -> None:
        a = self._arena
        if self._count[mfn] <= LONG_CHAIN:
            n = a.find(self._head[mfn], domid, gfn)  # O(count)
        else:
            n = a.find_compiled(self._head[mfn], domid, gfn)
        if n < 0:
            raise KeyError((mfn, domid, gfn))
        x = a.drop(n)
        if x != -2:
            self._head[mfn] = x
        self._count[mfn] -= 1

    def remove_many(self, mfns: np.ndarray, domids: np.ndarray, gfns: np.ndarray) -> None:
        """``remove`` of every entry, in order, in one compiled loop
        (``kernels.chains_remove``), each entry found by its linear scan."""
        if not self._arena.remove_chains(mfns, domids, gfns, self.nframes, self._headv, self._countv,
                                         self._countv, _NO_TABLES, -1):
            super().remove_many(mfns, domids, gfns)       # the loop gives the errors

    def contains(self, mfn: int, domid: int, gfn: int) -> bool:
        if self._count[mfn] <= LONG_CHAIN:
            return self._arena.find(self._head[mfn], domid, gfn) >= 0
        return self._arena.find_compiled(self._head[mfn], domid, gfn) >= 0

    def count(self, mfn: int) -> int:
        return self._count[mfn]

    def entries(self, mfn: int) -> Iterator[tuple[int, int]]:
        yield from self._arena.chain(self._head[mfn])

    def all_entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every frame's chain at once (``NodeArena.walk_chains``)."""
        frames = np.flatnonzero(self._headv != -1)
        chains, nodes = self._arena.walk_chains(self._headv[frames])
        return frames[chains], *self._arena.keys(nodes)

    def release(self, mfn: int) -> None:
        if self._count[mfn]:
            # Normally empty; free whatever is left.
            a = self._arena
            for n in a.nodes(self._head[mfn]):
                a.release(n)
        self._head[mfn] = -1
        self._count[mfn] = 0

    def release_many(self, mfns: np.ndarray) -> None:
        """``release`` of the frames that still hold a node."""
        m = np.asarray(mfns, dtype=np.int64).ravel()
        for mfn in m[self._headv[m] != -1].tolist():
            self.release(mfn)

    def nbytes(self) -> int:
        return (self._arena.nbytes() + self._head.buffer_info()[1] * 4
                + self._count.buffer_info()[1] * 4)

    def check(self) -> None:
        """Verify the list invariants of every frame (for tests)."""
        a, chained = self._arena, set()
        assert not self._countv[self._headv == -1].any(), "entries without a head"
        for mfn in np.flatnonzero(self._headv != -1).tolist():
            n, prev, seen = self._head[mfn], -1, 0
            while n >= 0:
                assert a.prv[n] == prev, f"frame {mfn}: broken prev link"
                assert n not in chained, f"frame {mfn}: node {n} in two places"
                chained.add(n)
                prev, n, seen = n, a.nxt[n], seen + 1
            assert seen == self._count[mfn], f"frame {mfn}: count {self._count[mfn]} != {seen} nodes"
        a.check(chained)
