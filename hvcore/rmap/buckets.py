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

Batches: ``add_many`` pushes a whole batch into the chains with numpy
(head insertion needs no search), stopping only at an add that converts;
``move_singles`` (a batch of shares) relinks each one-entry frame's node
into its new frame, as Xen moves the ``gfn_info``. A released frame's
state (its ``_Frame`` and head array) is kept, up to ``_SPARE_FRAMES``, for
the next new frame: a dedup pass makes (nominate) about as many frames as
it frees (share), and making one costs more than the rest of its add.
"""
from __future__ import annotations

import sys
from array import array
from typing import Callable, Iterator

import numpy as np

from .arena import NodeArena, check_key, checked_batch
from .base import Rmap

RMAP_HEAVY_SHARED_PAGE = 256   # add at this count converts list -> hash
RMAP_LIGHT_SHARED_PAGE = 64    # remove leaving this count converts hash -> list
RMAP_HASHTAB_SIZE = 256        # buckets per table (one 4 KiB page in Xen)
_SPARE_FRAMES = 8192           # released frame states kept for reuse


_NONE = array("i", [-1])


def _heads(k: int) -> array:
    return _NONE * k


def _group(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(m, return_inverse=True, return_counts=True)``, by one
    sort (several times faster on a few hundred values)."""
    k = len(m)
    order = np.argsort(m, kind="stable")
    ms = m[order]
    first = np.empty(k, dtype=bool)
    first[0] = True
    np.not_equal(ms[1:], ms[:-1], out=first[1:])
    inv = np.empty(k, dtype=np.int64)
    inv[order] = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    return ms[starts], inv, np.diff(np.append(starts, k))


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
        self._spare: list[_Frame] = []     # released frames, for reuse

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
            f = self._frames[mfn] = self._new_frames([mfn])[0]
        if len(f.heads) == 1 and f.count >= RMAP_HEAVY_SHARED_PAGE and not f.walkers:
            check_key(domid, gfn)
            if self.table_alloc is None or self.table_alloc():
                self._to_hash(f)
        heads = f.heads
        b = (gfn + domid) % RMAP_HASHTAB_SIZE if len(heads) > 1 else 0
        heads[b] = self._arena.push(heads[b], domid, gfn)
        f.count += 1

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
        (Xen moves the ``gfn_info``: rmap_del then rmap_add), batched."""
        srcs = np.asarray(srcs, dtype=np.int64).ravel()
        d = np.asarray(domids, dtype=np.int64).ravel()
        g = np.asarray(gfns, dtype=np.int64).ravel()
        sl = srcs.tolist()
        frames = self._frames
        fl = list(map(frames.get, sl))
        nodes = np.array([f.heads[0] if f is not None and f.count == 1 and len(f.heads) == 1
                          and not f.walkers else -1 for f in fl], dtype=np.int64)
        a = self._arena
        if len(nodes) == 0 or nodes.min() < 0 or len(set(sl)) < len(sl) or not (
                (np.frombuffer(a.dom, dtype=np.uint16)[nodes] == d).all()
                and (np.frombuffer(a.gfn, dtype=np.int32)[nodes] == g).all()):
            super().move_singles(srcs, dsts, d, g)
            return
        for m in sl:
            del frames[m]
        # kept for reuse as they are: _new_frames and add() reset them
        self._spare += fl[:max(0, _SPARE_FRAMES - len(self._spare))]
        self._link_many(np.asarray(dsts, dtype=np.int64).ravel(), d, g, nodes)

    def _push_until_conversion(self, m: np.ndarray, d: np.ndarray, g: np.ndarray,
                               nodes: np.ndarray | None) -> int:
        """Push entries (new nodes, or ``nodes``) up to the first one whose
        add would convert its frame to a hash: returns its index (not
        pushed), or -1 if all were pushed."""
        k = len(m)
        if k == 0:
            return -1
        if k == 1 and nodes is None:
            f = self._frames.get(int(m[0]))
            if f is not None and len(f.heads) == 1 and f.count >= RMAP_HEAVY_SHARED_PAGE \
                    and not f.walkers:
                return 0
            self.add(int(m[0]), int(d[0]), int(g[0]))
            return -1
        frames = self._frames
        ml = m.tolist()
        fl = list(map(frames.get, ml))
        if fl.count(None) == k and len(set(ml)) == k:
            # k new frames, one entry each (nominate): no conversion possible
            heads = self._arena.push_many(d, g, None, np.full(k, -1, dtype=np.int64), nodes)
            for f, h in zip(self._new_frames(ml, reset=False), heads.tolist()):
                f.heads[0] = h
                f.count = 1
            return -1
        if ml.count(ml[0]) == k:
            fr, inv, added = m[:1], np.zeros(k, dtype=np.int64), np.array([k])
            fl = fl[:1]
        else:
            fr, inv, added = _group(m)
            fl = list(map(frames.get, fr.tolist()))
        new = [i for i, f in enumerate(fl) if f is None]
        if len(new) == len(fl):
            counts = np.zeros(len(fl), dtype=np.int64)
            hashed = pinned = np.zeros(len(fl), dtype=bool)
        else:
            info = np.array([(0, 1, 0) if f is None else (f.count, len(f.heads), f.walkers)
                             for f in fl], dtype=np.int64).reshape(-1, 3)
            counts, hashed, pinned = info[:, 0], info[:, 1] > 1, info[:, 2] > 0
        if (counts + added).max() > RMAP_HEAVY_SHARED_PAGE and not hashed.all():
            # entry j of a list frame (its rank among the batch's adds to
            # that frame) finds the count at counts + j; a walk pins it
            order = np.argsort(inv, kind="stable")
            starts = np.concatenate([[0], np.cumsum(added)[:-1]])
            rank = np.empty(k, dtype=np.int64)
            rank[order] = np.arange(k) - np.repeat(starts, added)
            conv = ~hashed[inv] & ~pinned[inv] & (counts[inv] + rank >= RMAP_HEAVY_SHARED_PAGE)
            if conv.any():
                t = int(conv.argmax())
                if t > 0:           # the entries before it convert nothing
                    self._push_until_conversion(m[:t], d[:t], g[:t],
                                                None if nodes is None else nodes[:t])
                return t
        if new:
            for i, f in zip(new, self._new_frames(fr[new].tolist())):
                fl[i] = f
        # every chain's head in one array: a list frame has one chain, a
        # hash frame 256 (its buckets), at offset[frame]
        nh = np.where(hashed, RMAP_HASHTAB_SIZE, 1)
        offset = np.cumsum(nh) - nh
        chain = offset[inv]
        if hashed.any():
            chain += np.where(hashed[inv], (g + d) % RMAP_HASHTAB_SIZE, 0)
            old = np.empty(int(nh.sum()), dtype=np.int64)
            tables = []
            for i in np.nonzero(hashed)[0].tolist():
                view = np.frombuffer(fl[i].heads, dtype=np.int32)
                o = int(offset[i])
                old[o:o + RMAP_HASHTAB_SIZE] = view
                tables.append((o, view))
            lists = np.nonzero(~hashed)[0]
            lf = [fl[i] for i in lists.tolist()]
            old[offset[lists]] = [f.heads[0] for f in lf]
            heads = self._arena.push_many(d, g, chain, old, nodes)
            for o, view in tables:
                view[:] = heads[o:o + RMAP_HASHTAB_SIZE]
            lh = heads[offset[lists]].tolist()
        else:
            lf = fl
            lh = self._arena.push_many(d, g, chain, [f.heads[0] for f in fl], nodes).tolist()
        for f, h in zip(lf, lh):
            f.heads[0] = h
        for f, c in zip(fl, added.tolist()):
            f.count += c
        return -1

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
        if f is not None:
            self._drop_frame(f)

    def release_many(self, mfns: np.ndarray) -> None:
        pop, drop = self._frames.pop, self._drop_frame
        for f in [pop(m, None) for m in np.asarray(mfns).tolist()]:
            if f is not None:
                drop(f)

    def _drop_frame(self, f: _Frame) -> None:
        if len(f.heads) > 1:
            self._tables -= 1
        if f.count:
            # Normally empty; free whatever is left.
            a = self._arena
            for h in f.heads:
                for n in a.nodes(h):
                    a.release(n)
        self._recycle(f)

    def _recycle(self, f: _Frame) -> None:
        """Keep a released frame's state for a later new frame: a dedup pass
        frees (share) about as many frames as it makes (nominate)."""
        if f.walkers or len(self._spare) >= _SPARE_FRAMES:
            return                  # a walk still holds it: let it go
        if len(f.heads) > 1:
            f.heads = _heads(1)
        self._spare.append(f)

    def _new_frames(self, mfns: list, reset: bool = True) -> list:
        """Frames for ``mfns`` (not yet in the map), recycled first; empty,
        or with ``reset=False`` with head and count for the caller to set."""
        spare, k = self._spare, len(mfns)
        take = min(k, len(spare))
        fl = spare[len(spare) - take:]
        del spare[len(spare) - take:]
        if reset:
            for f in fl:
                f.heads[0] = -1
                f.count = 0
        fl += [_Frame() for _ in range(k - take)]
        self._frames.update(zip(mfns, fl))
        return fl

    def representation(self, mfn: int) -> str:
        f = self._frames.get(mfn)
        return "hash" if f is not None and len(f.heads) > 1 else "list"

    def nbytes(self) -> int:
        return (self._arena.nbytes() + (len(self._frames) + len(self._spare)) * _FRAME_BYTES
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
