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
were allocated ~256 adds apart.

Per-frame state is flat too, as Xen keeps it in ``struct page_info``: one
int32 ``array.array`` per field, indexed by mfn (``nframes`` long, never
resized, so each also has a permanent numpy view for the batch paths):

- ``_head[m]``: a list frame's first node (-1: empty), or for a hashed
  frame ``-2 - t``, its table ``t`` (``_hashed``, ``_table``): the sign
  tells list from hash, so an add or a lookup reads one slot to find its
  chain;
- ``_count[m]``: the number of entries;
- ``_walkers[m]``: ``entries`` walks active on the frame.

Few frames are hashed, so their tables live apart, in one pool
``_buckets``: table ``t`` is the 256 bucket heads at ``[256 t, 256 t + 256)``
(1 KiB here, a 4 KiB page of list heads in Xen). Released tables are
reused (``_free_tables``, last freed first); once none is in use the pool
gives its memory back down to ``_KEEP_TABLES``. The pool grows in place,
so only transient numpy views of it are taken (a view pins its size).

Invariants:
- a frame is a list (``_head[m] >= -1``: its one chain starts there) or a
  hash (``_head[m] <= -2``: a node lives in bucket ``(gfn + domid) % 256``
  of its table), no two frames share a table, and ``_tables`` is the
  number of hashed frames;
- every chain is a proper doubly linked list (``prv[head] == -1``,
  ``prv[nxt[n]] == n``) and ``_count[m]`` is the total number of nodes of
  frame ``m``: ``_head[m] == -1`` means an empty list, the released state;
- a frame's representation never changes while ``_walkers[m] > 0`` (a walk
  holds its chains): conversions due then are skipped, not deferred, as
  in Xen;
- if ``table_alloc`` refuses the table the rmap stays a list (the next add
  tries again), exactly like Xen on ``-ENOMEM``;
- ``release`` puts the frame back in the released state (the walkers count
  belongs to the walks, not the frame: it is left alone).

Batches: ``add_many`` pushes a whole batch into the chains with numpy
(head insertion needs no search, ``NodeArena.push_many``), stopping only
at an add that converts; ``move_singles`` (a batch of shares) relinks each
one-entry frame's node into its new frame, as Xen moves the ``gfn_info``;
``release_many`` touches only the frames that still hold something. None of
them makes a Python object per frame: a batch's fixed cost bounds how many
pages fit in one hypervisor step of a dedup pass.
"""
from __future__ import annotations

from array import array
from typing import Callable, Iterator

import numpy as np

from .. import kernels
from .arena import FrameCounts, NodeArena, check_key, checked_batch
from .base import Rmap

RMAP_HEAVY_SHARED_PAGE = 256   # add at this count converts list -> hash
RMAP_LIGHT_SHARED_PAGE = 64    # remove leaving this count converts hash -> list
RMAP_HASHTAB_SIZE = 256        # buckets per table (one 4 KiB page in Xen)
_KEEP_TABLES = 16              # tables the pool keeps once none is in use
#: a chain expected longer than this is scanned by the compiled ``find``
LONG_CHAIN = 16

_B = RMAP_HASHTAB_SIZE
_EMPTY_TABLE = array("i", [-1]) * _B


def _int32s(k: int, fill: int) -> array:
    return array("i", [fill]) * k


def _hashed(t):
    """The ``_head`` of a frame hashed in table ``t`` (<= -2)."""
    return -2 - t


def _table(h):
    """The table of a hashed frame whose ``_head`` is ``h`` (ints or arrays)."""
    return -2 - h


def _group(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A batch's frames: ``(frames, inv, sizes, order)``, the distinct
    frames sorted, each entry's index in ``frames``, entries per frame, and
    the stable sort of ``m``. One sort: ``np.unique`` with inverse and
    counts costs several times more."""
    k = len(m)
    order = np.argsort(m, kind="stable")
    ms = m[order]
    first = np.empty(k, dtype=bool)
    first[0] = True
    np.not_equal(ms[1:], ms[:-1], out=first[1:])
    inv = np.empty(k, dtype=np.int64)
    inv[order] = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    return ms[starts], inv, np.diff(np.append(starts, k)), order


def _distinct(m: np.ndarray) -> bool:
    """Whether no frame appears twice in ``m`` (no sort when in mfn order)."""
    if len(m) < 2 or (m[1:] > m[:-1]).all():
        return True
    s = np.sort(m)
    return bool((s[1:] != s[:-1]).all())


def _rank(sizes: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Each entry's rank among the batch's entries to its frame, in order
    (``sizes``, ``order``: from ``_group``)."""
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return rank


class BucketsRmap(FrameCounts, Rmap):
    """Per frame a list that turns into a 256-bucket hash when heavily shared."""

    name = "buckets"

    def reserve_nodes(self, n: int) -> None:
        self._arena.reserve(n)

    def __init__(self, nframes: int, table_alloc: Callable[[], bool] | None = None):
        super().__init__(nframes)
        # Asked before each list -> hash conversion; False = allocation failed.
        self.table_alloc = table_alloc
        self._arena = NodeArena()
        self._head = _int32s(nframes, -1)
        self._count = _int32s(nframes, 0)
        self._walkers = _int32s(nframes, 0)
        self._headv, self._countv, self._walkersv = (
            np.frombuffer(a, dtype=np.int32) for a in (self._head, self._count, self._walkers))
        self._buckets = array("i")          # the tables' bucket heads
        self._poolv: np.ndarray | None = None   # its numpy view (see _pool)
        self._free_tables: list[int] = []
        self._tables = 0

    # -- tables -------------------------------------------------------------
    def _pool(self) -> np.ndarray:
        """A numpy view of the bucket pool, kept until the pool changes size
        (a view pins the size of an ``array.array``)."""
        v = self._poolv
        if v is None:
            v = self._poolv = np.frombuffer(self._buckets, dtype=np.int32)
        return v

    def _new_table(self) -> int:
        """A table number, its 256 buckets empty."""
        self._poolv = None
        pool, free = self._buckets, self._free_tables
        if free:
            t = free.pop()
            pool[t * _B:(t + 1) * _B] = _EMPTY_TABLE
        else:
            t = len(pool) // _B
            pool.extend(_EMPTY_TABLE)
        self._tables += 1
        return t

    def _free_table(self, t: int) -> None:
        self._poolv = None
        self._free_tables.append(t)
        self._tables -= 1
        if not self._tables and len(self._buckets) > _KEEP_TABLES * _B:
            del self._buckets[_KEEP_TABLES * _B:]
            self._free_tables = list(range(_KEEP_TABLES - 1, -1, -1))

    # -- conversions --------------------------------------------------------
    def _to_hash(self, mfn: int) -> None:
        """List -> hash: the list walked from its head, each node
        head-inserted into its bucket (``kernels.to_hash``)."""
        t = self._new_table()
        nxt, prv, dom, gfn = self._arena.views()
        kernels.to_hash(self._headv, self._pool(), nxt, prv, dom, gfn, mfn, t)

    def _to_list(self, mfn: int) -> None:
        """Hash -> list: bucket by bucket, each from its head, head-inserted
        into one list (``kernels.to_list``)."""
        nxt, prv, _, _ = self._arena.views()
        self._free_table(kernels.to_list(self._headv, self._pool(), nxt, prv, mfn))

    def _converts(self, mfn: int) -> bool:
        """Whether an add to ``mfn`` now would convert it (Xen's check)."""
        return (self._head[mfn] >= -1 and self._count[mfn] >= RMAP_HEAVY_SHARED_PAGE
                and not self._walkers[mfn])

    # -- accessors ----------------------------------------------------------
    # The per-entry paths of the benchmarks: ``_table`` is inlined and each
    # slot read once (an array subscript costs tens of ns, as much as the
    # dict and object lookups it replaced).
    def add(self, mfn: int, domid: int, gfn: int) -> None:
        head = self._head
        h = head[mfn]
        if h < -1:                      # a hash: no conversion to check
            pool, b = self._buckets, (-2 - h) * _B + (gfn + domid) % _B
            pool[b] = self._arena.push(pool[b], domid, gfn)
            self._count[mfn] += 1
            return
        count = self._count
        c = count[mfn]
        if c >= RMAP_HEAVY_SHARED_PAGE and not self._walkers[mfn]:
            check_key(domid, gfn)  # a refused pair changes nothing
            if self.table_alloc is None or self.table_alloc():
                self._to_hash(mfn)
                self.add(mfn, domid, gfn)
                return
        head[mfn] = self._arena.push(h, domid, gfn)
        count[mfn] = c + 1

    def add_many(self, mfns: np.ndarray, domids: np.ndarray, gfns: np.ndarray) -> None:
        """``add`` of every entry, in order, with numpy.

        Head insertion needs no search, so a run of adds that converts no
        frame is one batch push into the chains (``NodeArena.push_many``).
        An add that finds its list frame's count at 256 converts it exactly
        there: the entries before it are pushed as a batch, that one goes
        through ``add`` (conversion, ``table_alloc``), then the rest.
        """
        m, d, g, stop = checked_batch(mfns, domids, gfns)
        self._link_many(m[:stop], d[:stop], g[:stop])
        if stop < len(m):
            check_key(int(d[stop]), int(g[stop]))      # raises

    def _link_many(self, m: np.ndarray, d: np.ndarray, g: np.ndarray,
                   nodes: np.ndarray | None = None) -> None:
        """Add (m, d, g) entries in order: new nodes, or ``nodes`` (live,
        in no chain, holding the keys) moved in."""
        lo, stop = 0, len(m)
        while lo < stop:
            t = self._push_until_conversion(m[lo:], d[lo:], g[lo:],
                                            None if nodes is None else nodes[lo:])
            if t < 0:
                break
            lo += t
            if nodes is not None:
                self._arena.release(int(nodes[lo]))     # add() takes this slot back
            self.add(int(m[lo]), int(d[lo]), int(g[lo]))
            lo += 1

    def move_singles(self, srcs: np.ndarray, dsts: np.ndarray, domids: np.ndarray,
                     gfns: np.ndarray) -> None:
        """Each node is unlinked from its frame and linked into its new one
        (Xen moves the ``gfn_info``: rmap_del then rmap_add), batched: a
        source that is a one-entry list holds its node as its head."""
        srcs = np.asarray(srcs, dtype=np.int64).ravel()
        d = np.asarray(domids, dtype=np.int64).ravel()
        g = np.asarray(gfns, dtype=np.int64).ravel()
        if len(srcs) == 0:
            return
        a = self._arena
        nodes = self._headv[srcs]       # a node: a list (hashed: <= -2, empty: -1)
        if not (nodes.min() >= 0 and (self._countv[srcs] == 1).all()
                and not self._walkersv[srcs].any() and _distinct(srcs)
                and (np.frombuffer(a.gfn, dtype=np.int32)[nodes] == g).all()
                and (np.frombuffer(a.dom, dtype=np.uint16)[nodes] == d).all()):
            super().move_singles(srcs, dsts, d, g)
            return
        self._headv[srcs] = -1          # released: their nodes move
        self._countv[srcs] = 0
        self._link_many(np.asarray(dsts, dtype=np.int64).ravel(), d, g, nodes)

    def _push_until_conversion(self, m: np.ndarray, d: np.ndarray, g: np.ndarray,
                               nodes: np.ndarray | None) -> int:
        """Push entries (new nodes, or ``nodes``) up to the first one whose
        add would convert its frame to a hash: returns its index (not
        pushed), or -1 if all were pushed.

        The batches of a dedup pass take short paths (a batch's fixed cost
        bounds how many pages fit in one hypervisor step): one entry for
        each of distinct frames in mfn order (nominate, shares into
        distinct sources), every entry into one frame (identical pages)."""
        k = len(m)
        if k == 0:
            return -1
        if k == 1 and nodes is None:
            if self._converts(int(m[0])):
                return 0
            self.add(int(m[0]), int(d[0]), int(g[0]))
            return -1
        m0 = int(m[0])
        if m0 == m[-1] and not np.count_nonzero(m != m0):
            return self._push_one_frame(m0, d, g, nodes)
        conv = None
        if (m[1:] > m[:-1]).all():
            # distinct frames, one entry each: entry i finds its own count
            frames, heads, counts = m, self._headv[m], self._countv[m]
            if (counts >= RMAP_HEAVY_SHARED_PAGE).any():
                conv = ((heads >= -1) & (counts >= RMAP_HEAVY_SHARED_PAGE)
                        & (self._walkersv[m] == 0))
            elif heads.min() >= -1:     # lists only: entry i in front of list i
                self._headv[m] = self._arena.push_many(d, g, None, heads, nodes)
                self._countv[m] += 1
                return -1
            inv, sizes = np.arange(k), np.ones(k, dtype=np.int64)
        else:
            frames, inv, sizes, order = _group(m)
            heads, counts = self._headv[frames], self._countv[frames]
            lists = heads >= -1
            if (lists & (counts + sizes > RMAP_HEAVY_SHARED_PAGE)).any():
                # entry j of a list frame (its rank among the batch's adds to
                # that frame) finds the count at counts + j; a walk pins it
                base = np.where(lists & (self._walkersv[frames] == 0), counts, -k - _B)
                conv = base[inv] + _rank(sizes, order) >= RMAP_HEAVY_SHARED_PAGE
        if conv is not None and conv.any():
            t = int(conv.argmax())
            if t > 0:               # the entries before it convert nothing
                self._push_until_conversion(m[:t], d[:t], g[:t],
                                            None if nodes is None else nodes[:t])
            return t
        self._push_chains(frames, inv, sizes, heads, d, g, nodes)
        return -1

    def _push_one_frame(self, mfn: int, d: np.ndarray, g: np.ndarray,
                        nodes: np.ndarray | None) -> int:
        """``_push_until_conversion`` of entries all to frame ``mfn``."""
        k, h, c = len(d), self._head[mfn], self._count[mfn]
        if h < -1:
            # a hashed frame: its 256 buckets are the chains
            t = _table(h)
            view = np.frombuffer(self._buckets, dtype=np.int32)[t * _B:(t + 1) * _B]
            view[:] = self._arena.push_many(d, g, (g + d) % _B, view, nodes)
        elif c + k > RMAP_HEAVY_SHARED_PAGE and not self._walkers[mfn]:
            t = max(RMAP_HEAVY_SHARED_PAGE - c, 0)      # the add that finds 256
            if t > 0:
                self._push_one_frame(mfn, d[:t], g[:t], None if nodes is None else nodes[:t])
            return t
        else:
            self._head[mfn] = int(self._arena.push_many(d, g, np.zeros(k, dtype=np.int64),
                                                        [h], nodes)[0])
        self._count[mfn] = c + k
        return -1

    def _push_chains(self, frames: np.ndarray, inv: np.ndarray, sizes: np.ndarray,
                     heads: np.ndarray, d: np.ndarray, g: np.ndarray,
                     nodes: np.ndarray | None) -> None:
        """Push entry i in front of its chain in frame ``frames[inv[i]]``
        (``heads``: the frames' ``_head``; no frame converts): one batch
        over every chain's head."""
        lists = heads >= -1
        push = self._arena.push_many
        if lists.all():
            self._headv[frames] = push(d, g, inv, heads, nodes)
            self._countv[frames] += sizes
            return
        # every chain's head in one array: a list frame has one chain, a
        # hashed frame 256 (its buckets), from offset[frame]
        nh = np.where(lists, 1, _B)
        offset = np.cumsum(nh) - nh
        chain = offset[inv] + np.where(lists[inv], 0, (g + d) % _B)
        hashed = np.flatnonzero(~lists)
        slots = (_table(heads[hashed]) * _B)[:, None] + np.arange(_B)  # in the pool
        at = offset[hashed][:, None] + np.arange(_B)                    # in chains
        li = np.flatnonzero(lists)
        pool = np.frombuffer(self._buckets, dtype=np.int32)
        chains = np.empty(int(nh.sum()), dtype=np.int64)
        chains[at] = pool[slots]
        chains[offset[li]] = heads[li]
        chains = push(d, g, chain, chains, nodes)
        pool[slots] = chains[at]
        self._headv[frames[li]] = chains[offset[li]]
        self._countv[frames] += sizes

    def remove(self, mfn: int, domid: int, gfn: int, convert: bool = True) -> None:
        a, hd = self._arena, self._head[mfn]
        if hd >= -1:
            heads, b, h = self._head, mfn, hd
        else:
            heads, b = self._buckets, (-2 - hd) * _B + (gfn + domid) % _B
            h = heads[b]
        c = self._count[mfn]
        if (c if hd >= -1 else c >> 8) <= LONG_CHAIN:
            n = a.find(h, domid, gfn)  # scans one bucket
        else:
            n = a.find_compiled(h, domid, gfn)
        if n < 0:
            raise KeyError((mfn, domid, gfn))
        x = a.drop(n)
        if x != -2:
            heads[b] = x
        c -= 1
        self._count[mfn] = c
        if c <= RMAP_LIGHT_SHARED_PAGE and hd < -1 and convert and not self._walkers[mfn]:
            self._to_list(mfn)

    def remove_many(self, mfns: np.ndarray, domids: np.ndarray, gfns: np.ndarray) -> None:
        """``remove`` of every entry, in order, in one compiled loop
        (``kernels.chains_remove``): each entry found by the scan of its
        chain, a frame converted back to a list at the removal that leaves it
        light, exactly as one by one."""
        if not self._arena.remove_chains(mfns, domids, gfns, self.nframes, self._headv, self._countv,
                                         self._walkersv, self._pool(), RMAP_LIGHT_SHARED_PAGE,
                                         self._free_table):
            super().remove_many(mfns, domids, gfns)       # the loop gives the errors

    def contains(self, mfn: int, domid: int, gfn: int) -> bool:
        h = self._head[mfn]
        c = self._count[mfn]
        if h < -1:
            h = self._buckets[(-2 - h) * _B + (gfn + domid) % _B]
            c >>= 8
        if c <= LONG_CHAIN:
            return self._arena.find(h, domid, gfn) >= 0
        return self._arena.find_compiled(h, domid, gfn) >= 0

    def count(self, mfn: int) -> int:
        return self._count[mfn]

    def heads(self, mfn: int) -> list[int]:
        """The frame's chain heads: one (a list) or 256 (its buckets)."""
        h = self._head[mfn]
        if h >= -1:
            return [h]
        t = _table(h)
        return self._buckets[t * _B:(t + 1) * _B].tolist()

    def entries(self, mfn: int) -> Iterator[tuple[int, int]]:
        walkers = self._walkers
        walkers[mfn] += 1  # pins the representation until the walk ends
        try:
            chain, h = self._arena.chain, self._head[mfn]
            if h >= -1:
                yield from chain(h)
            else:
                pool, t = self._buckets, _table(h)  # the pool grows in place: stays valid
                for b in range(t * _B, (t + 1) * _B):
                    yield from chain(pool[b])
        finally:
            walkers[mfn] -= 1

    def all_entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every chain of every frame at once (``NodeArena.walk_chains``):
        a list frame's one chain, a hashed frame's 256 buckets."""
        head = self._headv
        lists = np.flatnonzero(head >= 0)
        hashed = np.flatnonzero(head < -1)
        cm, ch = [lists], [head[lists].astype(np.int64)]
        if len(hashed):
            pool = np.frombuffer(self._buckets, dtype=np.int32)
            slots = (_table(head[hashed].astype(np.int64)) * _B)[:, None] + np.arange(_B)
            bh = pool[slots].ravel().astype(np.int64)
            used = bh >= 0
            cm.append(np.repeat(hashed, _B)[used])
            ch.append(bh[used])
        frames, heads = np.concatenate(cm), np.concatenate(ch)
        chains, nodes = self._arena.walk_chains(heads)
        return frames[chains], *self._arena.keys(nodes)

    def release(self, mfn: int) -> None:
        if self._count[mfn]:
            # Normally empty; free whatever is left.
            a = self._arena
            for h in self.heads(mfn):
                for n in a.nodes(h):
                    a.release(n)
            self._count[mfn] = 0
        h = self._head[mfn]
        self._head[mfn] = -1
        if h < -1:
            self._free_table(_table(h))

    def release_many(self, mfns: np.ndarray) -> None:
        """``release`` of the frames that hold anything (a node or a table):
        an empty list frame is already in its released state."""
        m = np.asarray(mfns, dtype=np.int64).ravel()
        for mfn in m[self._headv[m] != -1].tolist():
            self.release(mfn)

    def representation(self, mfn: int) -> str:
        return "hash" if self._head[mfn] < -1 else "list"

    def nbytes(self) -> int:
        arrays = (self._head, self._count, self._walkers, self._buckets)
        return (self._arena.nbytes() + sum(a.buffer_info()[1] * a.itemsize for a in arrays)
                + 8 * len(self._free_tables))

    def check(self) -> None:
        """Verify the bucket invariants of every frame (for tests)."""
        a, chained = self._arena, set()
        head, count = self._headv, self._countv
        assert (self._walkersv >= 0).all(), "negative walkers"
        used = _table(head[head < -1]).tolist()
        assert len(set(used)) == len(used) == self._tables, "tables out of step"
        ntables = len(self._buckets) // _B
        assert len(self._buckets) == ntables * _B, "partial table"
        assert sorted(used + self._free_tables) == list(range(ntables)), "table lost"
        assert not count[head == -1].any(), "entries without a head"
        for mfn in np.flatnonzero(head != -1).tolist():
            hs, seen = self.heads(mfn), 0
            for b, n in enumerate(hs):
                prev = -1
                while n >= 0:
                    assert a.prv[n] == prev, f"frame {mfn}: broken prev link"
                    assert n not in chained, f"frame {mfn}: node {n} in two places"
                    chained.add(n)
                    if len(hs) > 1:
                        assert (a.gfn[n] + a.dom[n]) % _B == b, "wrong bucket"
                    prev, n, seen = n, a.nxt[n], seen + 1
            assert seen == count[mfn], f"frame {mfn}: count {count[mfn]} != {seen} nodes"
        a.check(chained)
