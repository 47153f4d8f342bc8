"""The node arena of the ``list`` and ``buckets`` policies: Xen's
``gfn_info`` structs, stored the way C stores them.

In Xen an rmap node is a small C struct (gfn, domain, list links); walking a
chain costs about the same per node whichever order the nodes were
allocated in, because every visit is a couple of loads from flat memory. A
Python object per node does not behave like that: the object and its gfn
(another int object) sit wherever the allocator put them, so a chain whose
consecutive nodes were allocated far apart - a hash bucket, whose nodes
arrive 256 adds apart - costs several times more per node than a list
walked in allocation order. That would make the benchmarks measure
CPython's object layout instead of the algorithms.

So the nodes of all frames of a policy live in one arena of parallel flat
arrays (``array.array``, C integers without per-element objects), indexed by
node number:

- ``nxt``, ``prv`` (int32): the chain links, -1 = none (Xen's ``list_head``);
- ``gfn`` (int32) and ``dom`` (uint16): the pair (Xen's ``gfn``, ``domain``).

14 bytes per node. A walk reads ``gfn[n]`` (and ``dom[n]`` when the gfn
matches) and ``nxt[n]``: two loads from two flat arrays, whatever ``n`` is.
The walks (``find``, ``chain``) bind the arrays to locals, so a visit costs
the same Python work in every chain of both policies.

Slots are recycled through a LIFO free stack (a freed node is the next one
handed out, like a C allocator's free list). The arena grows by doubling,
copying in place (the array objects stay the same, so a walk holding them
stays valid); once no node is live it shrinks back to ``_KEEP`` slots.

Invariants:
- every slot in ``[0, top)`` is either live (in exactly one chain of the
  owning policy) or on the free stack, never both; ``[top, cap)`` holds no
  node; ``live == top - len(free)``;
- the four arrays always have the same length ``cap``;
- the arena only allocates, frees and walks: which chain a node is in, and
  the chain heads, belong to the policy.
"""
from __future__ import annotations

from array import array
from typing import Callable, Iterator

import numpy as np

from .. import kernels

MAX_DOMID = 0x7FFF          # domids fit 15 bits (Xen's guests are below 0x7FF0)
MAX_GFN = 2**31 - 1         # gfns fit int32
_MIN_CAP = 64
_KEEP = 4096                # an emptied arena keeps this many slots


def _zeros(code: str, n: int) -> array:
    return array(code, bytes(n * array(code).itemsize))


def check_key(domid: int, gfn: int) -> None:
    """Refuse a pair the arrays cannot hold (ValueError)."""
    if not (0 <= domid <= MAX_DOMID and 0 <= gfn <= MAX_GFN):
        raise ValueError(f"rmap key out of range: domid {domid}, gfn {gfn}")


def checked_batch(mfns, domids, gfns) -> tuple:
    """A batch of keys as int64 arrays ``(m, d, g)`` and how many of its
    entries come before the first key the arrays cannot hold (``add_many``
    adds those, then refuses that key with :func:`check_key`)."""
    import numpy as np
    m = np.asarray(mfns, dtype=np.int64).ravel()
    d = np.asarray(domids, dtype=np.int64).ravel()
    g = np.asarray(gfns, dtype=np.int64).ravel()
    if not len(m) == len(d) == len(g):
        raise ValueError("add_many: arrays of different lengths")
    bad = (d < 0) | (d > MAX_DOMID) | (g < 0) | (g > MAX_GFN)
    return m, d, g, int(bad.argmax()) if bad.any() else len(m)


def compiled_batch(mfns, domids, gfns, nframes: int):
    """A batch of keys as int64 arrays ``(m, d, g)`` for a compiled kernel,
    or None when a frame number is outside ``[0, nframes)`` (the kernels do
    not check bounds: the Python loop then gives the batch its errors)."""
    m = np.ascontiguousarray(mfns, dtype=np.int64).ravel()
    d = np.ascontiguousarray(domids, dtype=np.int64).ravel()
    g = np.ascontiguousarray(gfns, dtype=np.int64).ravel()
    if not len(m) == len(d) == len(g):
        raise ValueError("remove_many: arrays of different lengths")
    if len(m) and (m.min() < 0 or m.max() >= nframes):
        return None
    return m, d, g


class NodeArena:
    """Parallel flat arrays of rmap nodes, with a free stack of slots."""

    __slots__ = ("nxt", "prv", "dom", "gfn", "free", "top", "live", "_views", "keep")

    def __init__(self) -> None:
        self.keep = _KEEP            # slots an emptied arena keeps
        self.nxt = _zeros("i", 0)
        self.prv = _zeros("i", 0)
        self.dom = _zeros("H", 0)
        self.gfn = _zeros("i", 0)
        self.free = _zeros("i", 0)   # recycled slots, the next one last
        self.top = 0                 # slots [0, top) have been handed out
        self.live = 0
        self._views = None

    def views(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """numpy views ``(nxt, prv, dom, gfn)`` of the whole arrays, for the
        compiled kernels; kept until the arrays are resized (a view pins an
        ``array.array``'s size, so ``_resize`` drops them first)."""
        v = self._views
        if v is None:
            v = self._views = (np.frombuffer(self.nxt, dtype=np.int32),
                               np.frombuffer(self.prv, dtype=np.int32),
                               np.frombuffer(self.dom, dtype=np.uint16),
                               np.frombuffer(self.gfn, dtype=np.int32))
        return v

    def _resize(self, cap: int) -> None:
        """Make every array ``cap`` slots long, in place (realloc + copy)."""
        self._views = None
        for a in (self.nxt, self.prv, self.dom, self.gfn):
            k = len(a)
            if cap > k:
                a.frombytes(bytes((cap - k) * a.itemsize))
            else:
                del a[cap:]

    # -- allocation ---------------------------------------------------------
    def push(self, head: int, domid: int, gfn: int) -> int:
        """A new node for (domid, gfn) in front of chain ``head``; returns it
        (the caller stores it as the chain's new head)."""
        if not (0 <= domid <= MAX_DOMID and 0 <= gfn <= MAX_GFN):
            check_key(domid, gfn)
        free = self.free
        if free:
            n = free.pop()
        else:
            n = self.top
            if n == len(self.nxt):
                self._resize(max(_MIN_CAP, 2 * n))
            self.top = n + 1
        self.live += 1
        self.dom[n] = domid
        self.gfn[n] = gfn
        self.nxt[n] = head
        self.prv[n] = -1
        if head >= 0:
            self.prv[head] = n
        return n

    def push_many(self, domids: np.ndarray, gfns: np.ndarray, chain: np.ndarray | None,
                  heads: np.ndarray, nodes: np.ndarray | None = None) -> np.ndarray:
        """``push`` of every (domids[i], gfns[i]) in order, entry ``i`` in
        front of chain ``chain[i]`` (an index into ``heads``, the chains'
        current head nodes; None: entry i is chain i's only new node).
        Returns the chains' new heads.

        Same result as the loop: slots are taken from the free stack in pop
        order, then from ``top``; in each chain the later entry is nearer
        the head. Keys must already be checked (``check_key``). With
        ``nodes`` (live nodes of no chain, holding their keys), those are
        linked instead of new ones: ``domids`` and ``gfns`` are not used.
        """
        k = len(gfns)
        heads = np.asarray(heads, dtype=np.int64)
        if k == 0:
            return heads.copy()
        if nodes is None:
            nodes = self._take(k)
            np.frombuffer(self.dom, dtype=np.uint16)[nodes] = domids
            np.frombuffer(self.gfn, dtype=np.int32)[nodes] = gfns
        else:
            nodes = np.asarray(nodes, dtype=np.int64)
        if chain is None:               # entry i alone in front of chain i
            np.frombuffer(self.nxt, dtype=np.int32)[nodes] = heads
            prv = np.frombuffer(self.prv, dtype=np.int32)
            prv[nodes] = -1
            was = heads >= 0
            if was.any():
                prv[heads[was]] = nodes[was]
            return nodes
        nxt = np.frombuffer(self.nxt, dtype=np.int32)
        prv = np.frombuffer(self.prv, dtype=np.int32)
        order = np.argsort(chain, kind="stable")
        c, n = np.asarray(chain)[order], nodes[order]
        first = np.ones(k, dtype=bool)
        first[1:] = c[1:] != c[:-1]
        last = np.ones(k, dtype=bool)
        last[:-1] = first[1:]
        old = heads[c[first]]
        v = np.empty(k, dtype=np.int64)
        v[1:] = n[:-1]
        v[first] = old
        nxt[n] = v
        v[:-1] = n[1:]
        v[last] = -1
        prv[n] = v
        was = old >= 0
        prv[old[was]] = n[first][was]
        out = heads.copy()
        out[c[last]] = n[last]
        return out

    def _take(self, k: int) -> np.ndarray:
        """``k`` slots, in the order ``k`` pushes would take them."""
        nodes = np.empty(k, dtype=np.int64)
        free = self.free
        f = min(k, len(free))
        if f:
            nodes[:f] = np.frombuffer(free, dtype=np.int32)[len(free) - f:][::-1]
            del free[len(free) - f:]
        if f < k:
            top, need = self.top, self.top + k - f
            cap = len(self.nxt)
            if need > cap:
                while cap < need:
                    cap = max(_MIN_CAP, 2 * cap)
                self._resize(cap)
            nodes[f:] = np.arange(top, need)
            self.top = need
        self.live += k
        return nodes

    def link(self, head: int, n: int) -> None:
        """Put node ``n`` in front of chain ``head`` (n becomes the head)."""
        self.nxt[n] = head
        self.prv[n] = -1
        if head >= 0:
            self.prv[head] = n

    def drop(self, n: int) -> int:
        """Unlink node ``n`` from its chain and free it. Returns -2 if ``n``
        was not the head, else its successor (the chain's new head)."""
        nxt, prv = self.nxt, self.prv
        p, x = prv[n], nxt[n]
        if x >= 0:
            prv[x] = p
        self.live -= 1
        if self.live:
            self.free.append(n)
        else:
            self.clear()             # (then p and x are -1)
        if p >= 0:
            nxt[p] = x
            return -2
        return x

    def release(self, n: int) -> None:
        """Free a node whose chain is being dropped whole (no unlinking)."""
        self.live -= 1
        if self.live:
            self.free.append(n)
        else:
            self.clear()

    def reserve(self, n: int) -> None:
        """At least ``n`` slots from now on, kept when the arena empties
        (the new slots are written: zero-filled)."""
        if len(self.nxt) < n:
            self._resize(n)
        self.keep = max(self.keep, n)

    def clear(self) -> None:
        """Forget every node; a big arena gives its memory back (down to
        what :meth:`reserve` asked for)."""
        self.top = self.live = 0
        del self.free[:]
        if len(self.nxt) > self.keep:
            self._resize(self.keep)

    # -- walks ----------------------------------------------------------------
    def find(self, n: int, domid: int, gfn: int) -> int:
        """The node of (domid, gfn) in chain ``n``, or -1: Xen's linear scan
        from the head, one node at a time."""
        nxt, gf, dm = self.nxt, self.gfn, self.dom
        while n >= 0:
            if gf[n] == gfn and dm[n] == domid:
                return n
            n = nxt[n]
        return -1

    def chain(self, n: int) -> Iterator[tuple[int, int]]:
        """(domid, gfn) of each node of chain ``n``, head first. The caller
        may release the node it was just given: its successor is read first."""
        nxt, gf, dm = self.nxt, self.gfn, self.dom
        while n >= 0:
            x = nxt[n]
            yield dm[n], gf[n]
            n = x

    def nodes(self, n: int) -> list[int]:
        """Node numbers of chain ``n``, head first."""
        nxt, out = self.nxt, []
        while n >= 0:
            out.append(n)
            n = nxt[n]
        return out

    def walk_chains(self, heads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What ``chain(heads[c])`` visits for every ``c``: ``(chains, nodes)``,
        node ``nodes[i]`` in the walk of ``heads[chains[i]]``, in walk order.

        One compiled walk per chain (``kernels.walk_chains``), each cut at a
        link outside the arrays or after ``top`` + 1 nodes: a damaged arena
        (a link to a free slot, a cycle, a shared successor) still gives what
        ``chain`` would, up to that bound.
        """
        heads = np.asarray(heads, dtype=np.int64)
        if len(heads) == 0:
            empty = np.empty(0, np.int64)
            return empty, empty
        return kernels.walk_chains(self.views()[0], heads, self.top)

    def find_compiled(self, n: int, domid: int, gfn: int) -> int:
        """``find``, compiled (``kernels.chain_find``): for long chains, where
        a visit in Python costs far more than the call."""
        nxt, _, dom, gf = self.views()
        return kernels.chain_find(nxt, gf, dom, n, domid, gfn)

    def release_many(self, nodes: np.ndarray) -> None:
        """``release`` of every node of ``nodes``, in order (unlinked already)."""
        k = len(nodes)
        self.live -= k
        if self.live:
            self.free.frombytes(np.asarray(nodes, dtype=np.int32).tobytes())
        else:
            self.clear()

    def remove_chains(self, mfns, domids, gfns, nframes: int, head: np.ndarray, count: np.ndarray,
                      walkers: np.ndarray, tables: np.ndarray, light: int,
                      free_table: Callable[[int], None] | None = None) -> bool:
        """``remove_many`` of a chain policy (list, buckets) on this arena:
        every key, in order, in one compiled loop (``kernels.chains_remove``:
        ``head``/``count`` per frame; a frame left with ``light`` entries or
        fewer whose head is one of ``tables`` goes back to a list unless it
        has ``walkers``, its table given to ``free_table``). The removed
        nodes are released; a key that is absent stops the loop and raises
        KeyError, the keys before it removed. False, nothing done, if the
        batch cannot go to the kernel (see :func:`compiled_batch`)."""
        batch = compiled_batch(mfns, domids, gfns, nframes)
        if batch is None:
            return False
        m, d, g = batch
        nxt, prv, dom, gfn = self.views()
        freed, freed_tables = np.empty(len(m), np.int64), np.empty(len(m), np.int64)
        done, nt = kernels.chains_remove(head, count, walkers, tables, nxt, prv, dom, gfn,
                                         m, d, g, light, freed, freed_tables)
        del nxt, prv, dom, gfn          # (views pin the arena's size: clear may shrink it)
        self.release_many(freed[:done])
        for t in freed_tables[:nt].tolist():
            free_table(t)
        if done < len(m):
            raise KeyError((int(m[done]), int(d[done]), int(g[done])))
        return True

    def keys(self, nodes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """``(domids, gfns)`` of ``nodes``, int64 (None: of every slot below
        ``top``, as ``walk_chains`` may say: a copy, no gather)."""
        dom = np.frombuffer(self.dom, dtype=np.uint16, count=self.top)
        gfn = np.frombuffer(self.gfn, dtype=np.int32, count=self.top)
        if nodes is not None:
            dom, gfn = dom[nodes], gfn[nodes]
        return dom.astype(np.int64), gfn.astype(np.int64)

    # -- introspection --------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of the arrays (capacity, not just live nodes)."""
        return sum(a.buffer_info()[1] * a.itemsize
                   for a in (self.nxt, self.prv, self.dom, self.gfn, self.free))

    def check(self, chained: set[int]) -> None:
        """Verify the arena invariants; ``chained`` is the set of nodes the
        policy found in its chains (they must be exactly the live ones)."""
        cap = len(self.nxt)
        assert len(self.prv) == len(self.dom) == len(self.gfn) == cap, "arrays out of step"
        assert 0 <= self.top <= cap, "top beyond capacity"
        free = set(self.free.tolist())
        assert len(free) == len(self.free), "slot freed twice"
        assert all(0 <= n < self.top for n in free | chained), "node beyond top"
        assert not free & chained, "a chained node is on the free stack"
        assert self.live == len(chained) == self.top - len(free), "live count out of step"


class FrameCounts:
    """``counts_of`` for a policy that keeps each frame's entry count in a
    numpy view ``_countv`` indexed by mfn (``list`` and ``buckets``)."""

    _countv: np.ndarray

    def counts_of(self, mfns: np.ndarray) -> np.ndarray:
        return self._countv[np.asarray(mfns, dtype=np.int64)].astype(np.int64)
