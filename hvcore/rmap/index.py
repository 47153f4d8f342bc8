"""The ``index`` policy: hvshare's own reverse map, O(1) at any degree.

Xen's bucket table still scans n/256 entries per lookup, because it finds an
entry by searching its frame's rmap. Here the search is gone: every entry is
a node of one global arena, and a per-domain index maps (domid, gfn) straight
to its node. Each frame's rmap is an intrusive doubly linked list through the
arena, so add, remove and contains are O(1) whatever the sharing degree.

Layout (numpy arrays, so the memory is flat and the batch forms vectorise):
- arena, one int32 row per node: next, prev (links, -1 = none), frame
  (-1 = free), gfn - a node's row sits in one cache line, so a remove
  touches few lines - plus ``_dom`` (int16: domids are below 0x8000):
  18 bytes per node. ``_nxt``, ``_prv``, ``_frm``, ``_gfn`` are column views.
  One row past the last node is the *sentinel*: index -1 reaches it, so
  vectorised code may read the frame of "node -1" (always -1) or write a
  link into it without masking the -1s out first;
- per frame: ``_head`` and ``_count`` (int32);
- per domain: ``_dense[domid]``, the node of each gfn (int32, -1 = none),
  4 bytes per guest page, made by ``domain_created`` (or lazily, up to
  ``_DENSE_LIMIT`` gfns); pairs it cannot cover live in a dict (``_sparse``);
- a free stack of recycled nodes. The arena grows by 1.5x, so an entry costs
  18 bytes (+50% slack at worst) plus its gfn's 4 index bytes: under 32 bytes,
  where Xen needs 32 per gfn_info plus a 4 KiB table per heavy frame. An
  arena with no live node left is freed (or, if small, just emptied).

Single-entry operations are plain Python on memoryviews of these arrays,
behind small accessors (``_find``/``_store``/``_clear`` for the index,
``_alloc1``/``_release1`` for nodes, ``_unlink_run`` for the links) and
one iterator, ``entries``, so nothing outside sees the representation. The
batch forms, vectorised over the same arrays, are in :mod:`.index_batch`.

Invariants:
- node ``n`` is live iff ``_frm[n] >= 0``; live nodes of frame ``m`` form
  one list from ``_head[m]`` (``_prv`` of the head is -1, ``_prv[_nxt[n]]
  == n``) of length ``_count[m]``; nodes in ``[0, _top)`` that are not live
  are exactly ``_free[:_nfree]``; ``[_top, _cap)`` holds no node;
- the sentinel row ``_cap`` has frame -1 (its links are scratch); outside a
  ``remove_many`` no frame column holds a value below -1;
- a (domid, gfn) is in at most one frame's rmap (a gfn maps one frame), and
  its index slot holds its node; the slot lives in the domain's array iff the
  array covers the gfn, else in ``_sparse``.
Batch forms check every pair first and raise before changing anything
(:mod:`.index_batch`).
"""
from __future__ import annotations

import mmap
import sys
from typing import Iterator

import numpy as np

from . import index_batch as batch
from .arena import MAX_DOMID, MAX_GFN
from .base import Rmap
from .index_batch import FRM, GFN, NONE, NXT, PRV, any_of, max_of

_GROWTH = 1.5               # arena growth factor: modest, to keep bytes/entry low
_MIN_ARENA = 64
#: an arena of _RESERVE_FROM nodes or more lives in a reservation (see
#: IndexRmap._grow) of _RESERVE_FACTOR times its rows, at least _RESERVE_MIN_ROWS
_RESERVE_FROM = 1 << 16
_RESERVE_MIN_ROWS = 1 << 22
_RESERVE_FACTOR = 8
_KEEP_ARENA = 4096          # an emptied arena up to this size is kept, not freed
_DENSE_LIMIT = 1 << 22      # lazily grown per-domain index: at most 16 MiB
_WALK_RATIO = 128           # collect a frame by walking if count * this < arena

__all__ = ["IndexRmap", "MAX_DOMID", "MAX_GFN"]


def _reserve(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Arena and domain arrays of ``rows`` rows in fresh anonymous mappings:
    address space only, backed (zeroed) by the kernel page by page as nodes
    are first written."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    arena = np.frombuffer(mmap.mmap(-1, rows * 16, flags=flags), np.int32).reshape(rows, 4)
    dom = np.frombuffer(mmap.mmap(-1, rows * 2, flags=flags), np.int16)
    return arena, dom


def _new_arena(cap: int) -> np.ndarray:
    """Rows for ``cap`` nodes plus the sentinel row (all -1)."""
    a = np.empty((cap + 1, 4), np.int32)
    a[cap] = -1
    return a


class IndexRmap(Rmap):
    """Arena of nodes + per-frame intrusive lists + per-domain gfn index."""

    name = "index"

    def __init__(self, nframes: int):
        super().__init__(nframes)
        self._head = np.full(nframes, -1, np.int32)
        self._count = np.full(nframes, 0, np.int32)   # written now: see FramePool
        # Single-entry ops go through memoryviews, much cheaper than numpy
        # scalar indexing. Every view is rebuilt whenever its array is replaced.
        self._head_view = memoryview(self._head)
        self._count_view = memoryview(self._count)
        self._dense: dict[int, np.ndarray] = {}
        self._dense_views: dict[int, memoryview] = {}
        self._sparse: dict[tuple[int, int], int] = {}
        self._ones = np.ones(0, np.int32)  # per-entry count steps (np.add.at / subtract.at)
        self._arena = _new_arena(0)
        self._keep_rows = 0         # an emptied arena this big is kept (reserve_nodes)
        self._reset_arena()

    # -- arena --------------------------------------------------------------
    def _reset_arena(self) -> None:
        """Empty the arena (no node is live). A big arena gives its memory
        back; a small one is kept, so a frame going 0 <-> 1 does not churn."""
        self._nfree = self._top = self._live = 0
        if 0 < self._arena.shape[0] - 1 <= max(_KEEP_ARENA, self._keep_rows):
            return
        self._arena = _new_arena(0)
        self._dom = np.zeros(1, np.int16)
        self._reserved = None
        self._set_free(np.empty(0, np.int32))
        self._make_views()

    def reserve_nodes(self, n: int) -> None:
        if self._cap < n:
            self._grow(n)
        self._arena[self._top:self._cap] = 0        # written now, not in a step
        self._dom[self._top:self._cap] = 0
        self._keep_rows = max(self._keep_rows, n)

    def _make_views(self) -> None:
        # Column views for the vectorised code, flat memoryviews for the rest.
        a = self._arena
        self._cap = a.shape[0] - 1
        self._nxt, self._prv, self._frm, self._gfn = a[:, NXT], a[:, PRV], a[:, FRM], a[:, GFN]
        self._arena_view = memoryview(a.reshape(-1))
        self._dom_view = memoryview(self._dom)

    def _set_free(self, arr: np.ndarray) -> None:
        self._free = arr
        self._free_view = memoryview(arr)

    def _grow(self, need: int) -> None:
        """Room for ``need`` nodes. A big arena lives in a reservation of
        untouched anonymous memory (:func:`_reserve`) several times its size:
        growing within it moves the sentinel row and takes a longer view, so
        no step copies the arena. Only outgrowing the reservation copies,
        into one _RESERVE_FACTOR times larger: rarely."""
        cap = max(need, int(self._cap * _GROWTH), _MIN_ARENA)
        base = self._reserved
        if cap < _RESERVE_FROM and base is None:
            arena = _new_arena(cap)
            arena[: self._top] = self._arena[: self._top]
            dom = np.zeros(cap + 1, np.int16)
            dom[: self._top] = self._dom[: self._top]
        elif base is not None and cap + 1 <= base[0].shape[0]:
            arena, dom = base[0][: cap + 1], base[1][: cap + 1]
            self._dom[self._cap] = 0        # the old sentinel row is a free row now
            arena[cap] = -1
        else:
            rows = max(_RESERVE_MIN_ROWS, _RESERVE_FACTOR * (cap + 1))
            self._reserved = base = _reserve(rows)
            arena, dom = base[0][: cap + 1], base[1][: cap + 1]
            arena[: self._top] = self._arena[: self._top]
            dom[: self._top] = self._dom[: self._top]
            arena[cap] = -1
        self._arena, self._dom = arena, dom
        self._make_views()

    def _alloc1(self) -> int:
        if self._nfree:
            self._nfree -= 1
            return self._free_view[self._nfree]
        if self._top == self._cap:
            self._grow(self._top + 1)
        self._top += 1
        return self._top - 1

    def _alloc(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nodes, recycled ones first: (int32 for storing, int64 for indexing)."""
        take = min(k, self._nfree)
        nf = self._nfree - take
        # A view of the stack: used up before anything is pushed on it again.
        reused = self._free[nf: self._nfree]
        self._nfree = nf
        if take == k:
            return reused, reused.astype(np.int64)
        rest = k - take
        if self._top + rest > self._cap:
            self._grow(self._top + rest)
        fresh = np.arange(self._top, self._top + rest, dtype=np.int32)
        self._top += rest
        nodes = np.concatenate([reused, fresh]) if take else fresh
        return nodes, nodes.astype(np.int64)

    def _reserve_free(self, k: int) -> None:
        if self._nfree + k > self._free.shape[0]:
            # The stack never holds more than the _top nodes handed out:
            # growing to that at once copies it while it is still short, not
            # (a millisecond per million) in the middle of a long teardown.
            cap = max(self._nfree + k, int(self._free.shape[0] * _GROWTH), self._top, _MIN_ARENA)
            new = np.empty(cap, np.int32)
            new[: self._nfree] = self._free[: self._nfree]
            self._set_free(new)

    def _release1(self, n: int) -> None:
        """Return one unlinked node to the free stack (its key already cleared)."""
        self._arena_view[(n << 2) + FRM] = -1
        self._live -= 1
        if self._live == 0:
            self._reset_arena()
            return
        self._reserve_free(1)
        self._free_view[self._nfree] = n
        self._nfree += 1

    def _free_nodes(self, nodes: np.ndarray, nodes32: np.ndarray) -> None:
        """Return unlinked nodes to the free stack (their keys already cleared)."""
        k = nodes.shape[0]
        self._frm[nodes] = NONE
        self._live -= k
        if self._live == 0:
            self._reset_arena()
            return
        self._reserve_free(k)
        self._free[self._nfree: self._nfree + k] = nodes32
        self._nfree += k

    def _ones_k(self, k: int) -> np.ndarray:
        # np.subtract.at takes its fast path only for same-dtype operands.
        if self._ones.shape[0] < k:
            self._ones = np.ones(max(k, 2 * self._ones.shape[0], 64), np.int32)
        return self._ones[:k]

    # -- (domid, gfn) -> node index -----------------------------------------
    def _find(self, domid: int, gfn: int) -> int:
        v = self._dense_views.get(domid)
        if v is not None and 0 <= gfn < len(v):
            return v[gfn]
        return self._sparse.get((domid, gfn), -1) if self._sparse else -1

    def _set_dense(self, domid: int, arr: np.ndarray) -> None:
        self._dense[domid] = arr
        self._dense_views[domid] = memoryview(arr)

    def _grow_dense(self, domid: int, need: int) -> np.ndarray:
        old = self._dense.get(domid)
        size = 0 if old is None else old.shape[0]
        # Lazy growth never passes _DENSE_LIMIT, so no sparse key becomes covered.
        new = np.full(min(max(need, int(size * _GROWTH)), max(_DENSE_LIMIT, need)), -1, np.int32)
        if old is not None:
            new[:size] = old
        self._set_dense(domid, new)
        return new

    def _store(self, domid: int, gfn: int, node: int) -> None:
        v = self._dense_views.get(domid)
        if v is None or gfn >= len(v):
            if gfn >= _DENSE_LIMIT:
                self._sparse[(domid, gfn)] = node
                return
            self._grow_dense(domid, gfn + 1)
            v = self._dense_views[domid]
        v[gfn] = node

    def _clear(self, domid: int, gfn: int) -> None:
        v = self._dense_views.get(domid)
        if v is not None and gfn < len(v):
            v[gfn] = -1
        else:
            self._sparse.pop((domid, gfn), None)

    @staticmethod
    def _groups(domids: np.ndarray) -> list:
        """[(domid, positions or None for all)] for each distinct domid
        (domids already range-checked)."""
        if domids.shape[0] == 0:
            return []
        if not any_of(domids != domids[:1]):
            return [(int(domids[0]), None)]
        # Batches span few domains: a bincount and one mask per domain beat a sort.
        present = np.bincount(domids).nonzero()[0]
        if present.shape[0] <= 8:
            return [(d, (domids == d).nonzero()[0]) for d in present.tolist()]
        order = np.argsort(domids, kind="stable")
        sd = domids[order]
        cuts = np.flatnonzero(sd[1:] != sd[:-1]) + 1
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [sd.shape[0]]])
        return [(int(sd[a]), order[a:b]) for a, b in zip(starts.tolist(), ends.tolist())]

    def _lookup_many(self, domids: np.ndarray, gfns: np.ndarray, groups=None) -> np.ndarray:
        """Node of each pair, -1 where absent (keys already range-checked)."""
        out = np.empty(domids.shape[0], np.int64)
        for d, idx in groups if groups is not None else self._groups(domids):
            g = gfns if idx is None else gfns[idx]
            arr = self._dense.get(d)
            vals = None
            if arr is not None:
                try:
                    vals = arr[g]  # the common case: the domain's index covers all
                except IndexError:
                    pass
            if vals is None:
                vals = np.full(g.shape[0], -1, np.int64)
                cov = g < (arr.shape[0] if arr is not None else 0)
                if arr is not None:
                    vals[cov] = arr[g[cov]]
                if self._sparse:
                    for j in np.flatnonzero(~cov).tolist():
                        vals[j] = self._sparse.get((d, int(g[j])), -1)
            if idx is None:
                out[:] = vals
            else:
                out[idx] = vals
        return out

    def _store_many(self, domids: np.ndarray, gfns: np.ndarray, nodes: np.ndarray | int,
                    groups=None) -> None:
        """Set the index slot of each pair to its node (-1: clear it)."""
        clear = isinstance(nodes, int)
        for d, idx in groups if groups is not None else self._groups(domids):
            g = gfns if idx is None else gfns[idx]
            v = nodes if clear or idx is None else nodes[idx]
            arr = self._dense.get(d)
            if arr is not None:
                try:
                    arr[g] = v  # the common case: the domain's index covers all
                    continue
                except IndexError:
                    pass
            if not clear:
                small = g[g < _DENSE_LIMIT]
                if small.shape[0] and (arr is None or max_of(small) >= arr.shape[0]):
                    arr = self._grow_dense(d, max_of(small) + 1)
            cov = g < (arr.shape[0] if arr is not None else 0)
            if arr is not None:
                arr[g[cov]] = v if clear else v[cov]
            for j in np.flatnonzero(~cov).tolist():
                if clear:
                    self._sparse.pop((d, int(g[j])), None)
                else:
                    self._sparse[(d, int(g[j]))] = int(v[j])

    def _clear_many(self, domids: np.ndarray, gfns: np.ndarray, groups=None) -> None:
        self._store_many(domids, gfns, -1, groups)

    # -- domains ------------------------------------------------------------
    def domain_created(self, domid: int, npages: int) -> None:
        old = self._dense.get(domid)
        if old is not None and old.shape[0] >= npages:
            return
        arr = np.full(npages, -1, np.int32)
        if old is not None:
            arr[: old.shape[0]] = old
        self._set_dense(domid, arr)
        # Keep "dense iff covered": move now-covered sparse slots in.
        for key in [k for k in self._sparse if k[0] == domid and k[1] < npages]:
            arr[key[1]] = self._sparse.pop(key)

    def domain_destroyed(self, domid: int) -> None:
        # The domain should have left every rmap; drop any leftovers so the
        # lists never hold a pair the index no longer knows.
        arr = self._dense.get(domid)
        # one pass without a temporary in the normal case (nothing left)
        left = [] if arr is None or arr.max(initial=-1) < 0 else np.flatnonzero(arr >= 0).tolist()
        left += [g for (d, g) in self._sparse if d == domid]
        if left:
            g = np.array(left, np.int64)
            dd = np.full(g.shape[0], domid, np.int64)
            self.remove_many(self._frm[self._lookup_many(dd, g)].astype(np.int64), dd, g)
        self._dense.pop(domid, None)
        self._dense_views.pop(domid, None)

    # -- single-entry accessors ---------------------------------------------
    def add(self, mfn: int, domid: int, gfn: int) -> None:
        if not (0 <= mfn < self.nframes and 0 <= domid <= MAX_DOMID and 0 <= gfn <= MAX_GFN):
            raise ValueError(f"rmap key out of range: mfn {mfn}, domid {domid}, gfn {gfn}")
        if self._find(domid, gfn) >= 0:
            raise ValueError(f"(d{domid}, gfn {gfn:#x}) is already in an rmap")
        n = self._alloc1()
        va, b = self._arena_view, n << 2
        h = self._head_view[mfn]
        va[b + NXT] = h
        va[b + PRV] = -1
        va[b + FRM] = mfn
        va[b + GFN] = gfn
        self._dom_view[n] = domid
        if h >= 0:
            va[(h << 2) + PRV] = n
        self._head_view[mfn] = n
        self._count_view[mfn] += 1
        self._store(domid, gfn, n)
        self._live += 1

    def _unlink_run(self, mfn: int, first: int, last: int, k: int) -> None:
        """Take the ``k`` nodes ``first`` .. ``last``, linked in that order,
        out of frame ``mfn``'s list (their own links are left as they are)."""
        va = self._arena_view
        p, x = va[(first << 2) + PRV], va[(last << 2) + NXT]
        if p >= 0:
            va[(p << 2) + NXT] = x
        else:
            self._head_view[mfn] = x
        if x >= 0:
            va[(x << 2) + PRV] = p
        self._count_view[mfn] -= k

    def remove(self, mfn: int, domid: int, gfn: int, convert: bool = True) -> None:
        n = self._find(domid, gfn)
        va, b = self._arena_view, n << 2
        if n < 0 or va[b + FRM] != mfn:
            raise KeyError((mfn, domid, gfn))
        self._unlink_run(mfn, n, n, 1)
        self._clear(domid, gfn)
        self._release1(n)

    def contains(self, mfn: int, domid: int, gfn: int) -> bool:
        n = self._find(domid, gfn)
        return n >= 0 and self._arena_view[(n << 2) + FRM] == mfn

    def count(self, mfn: int) -> int:
        return self._count_view[mfn] if 0 <= mfn < self.nframes else 0

    def entries(self, mfn: int) -> Iterator[tuple[int, int]]:
        n = self._head_view[mfn] if 0 <= mfn < self.nframes else -1
        while n >= 0:
            # Read the successor before yielding (the caller may remove n), and
            # re-read the views each step (an add elsewhere may regrow them).
            va, b = self._arena_view, n << 2
            nxt = va[b + NXT]
            yield self._dom_view[n], va[b + GFN]
            n = nxt

    def all_entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Straight from the arena columns: the live nodes (frame >= 0)."""
        frm = self._frm[: self._top]
        live = np.flatnonzero(frm >= 0)
        return (frm[live].astype(np.int64), self._dom[live].astype(np.int64),
                self._gfn[live].astype(np.int64))

    def counts_of(self, mfns: np.ndarray) -> np.ndarray:
        return self._count[np.asarray(mfns, dtype=np.int64)].astype(np.int64)

    def release(self, mfn: int) -> None:
        if self.count(mfn):
            # Normally empty; forget whatever is left, keeping the index exact.
            nodes = self._frame_nodes(mfn)
            self._clear_many(self._dom[nodes].astype(np.int64), self._gfn[nodes].astype(np.int64))
            self._head[mfn] = -1
            self._count[mfn] = 0
            self._free_nodes(nodes, nodes.astype(np.int32))

    # -- batch forms (vectorised: see index_batch) ------------------------------
    def add_many(self, mfns: np.ndarray, domids: np.ndarray, gfns: np.ndarray) -> None:
        batch.add_many(self, mfns, domids, gfns)

    def remove_many(self, mfns: np.ndarray, domids: np.ndarray, gfns: np.ndarray) -> None:
        batch.remove_many(self, mfns, domids, gfns)

    def move_all(self, src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
        return batch.move_all(self, src, dst)

    def _frame_nodes(self, mfn: int) -> np.ndarray:
        """All nodes of frame ``mfn``: walk a short list, scan ``_frm`` otherwise."""
        k = int(self._count[mfn])
        if k * _WALK_RATIO < self._top:
            out, n, va = [], self._head_view[mfn], self._arena_view
            for _ in range(k):
                out.append(n)
                n = va[n << 2]
            return np.array(out, np.int64)
        return np.flatnonzero(self._frm[: self._top] == mfn)

    # -- introspection --------------------------------------------------------
    def nbytes(self) -> int:
        arrays = [self._head, self._count, self._arena, self._dom, self._free, self._ones,
                  *self._dense.values()]
        sparse = sys.getsizeof(self._sparse) + 100 * len(self._sparse) if self._sparse else 0
        return sum(a.nbytes for a in arrays) + sparse

    def check(self) -> None:
        """Verify every invariant of the module docstring (for tests)."""
        top = self._top
        assert (self._arena[self._cap, FRM] == -1 and self._arena.shape[0] == self._cap + 1
                and self._dom.shape[0] == self._cap + 1 and top <= self._cap), "sentinel row"
        frm, nxt, prv = self._frm[:top], self._nxt[:top], self._prv[:top]
        assert (frm >= -1).all(), "a node still marked as being removed"
        live = np.flatnonzero(frm >= 0)
        assert live.shape[0] == self._live, "live count out of step"
        free = np.sort(self._free[: self._nfree])
        assert np.array_equal(free, np.flatnonzero(frm < 0)), "free stack != non-live nodes"
        cnt = np.bincount(frm[live], minlength=self.nframes)
        assert np.array_equal(cnt, self._count), "per-frame counts wrong"
        n, p = nxt[live], prv[live]
        assert (prv[n[n >= 0]] == live[n >= 0]).all(), "next.prev != node"
        assert (frm[n[n >= 0]] == frm[live[n >= 0]]).all(), "list crosses frames"
        assert (nxt[p[p >= 0]] == live[p >= 0]).all(), "prev.next != node"
        heads = live[p < 0]
        assert np.array_equal(np.sort(heads), np.sort(self._head[self._head >= 0])), "heads"
        assert (self._head[frm[heads]] == heads).all(), "head of wrong frame"
        assert ((self._head >= 0) == (self._count > 0)).all(), "empty frame with head"
        for mfn in np.flatnonzero(self._count).tolist():
            assert sum(1 for _ in self.entries(mfn)) == self._count[mfn], "list length"
        if live.shape[0]:
            got = self._lookup_many(self._dom[live].astype(np.int64), self._gfn[live].astype(np.int64))
            assert np.array_equal(got, live), "index does not point at the node"
        slots = sum(int((a >= 0).sum()) for a in self._dense.values()) + len(self._sparse)
        assert slots == live.shape[0], "stale index slots"
