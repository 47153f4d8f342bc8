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
  18 bytes per node. ``_nxt``, ``_prv``, ``_frm``, ``_gfn`` are column views;
- per frame: ``_head`` and ``_count`` (int32);
- per domain: ``_dense[domid]``, the node of each gfn (int32, -1 = none),
  4 bytes per guest page, made by ``domain_created`` (or lazily, up to
  ``_DENSE_LIMIT`` gfns); pairs it cannot cover live in a dict (``_sparse``);
- a free stack of recycled nodes. The arena grows by 1.5x, so an entry costs
  18 bytes (+50% slack at worst) plus its gfn's 4 index bytes: under 32 bytes,
  where Xen needs 32 per gfn_info plus a 4 KiB table per heavy frame. An
  arena with no live node left is freed (or, if small, just emptied).

Single-entry operations are plain Python on memoryviews of these arrays.
The batch forms are vectorised: ``add_many`` chains the new nodes per frame
and splices each chain in front of the old head; ``remove_many`` relinks
around each run of removed nodes, finding the surviving neighbours by
pointer jumping (log of the run length rounds); ``move_all`` splices the
whole list in O(1) and retags its nodes in one vectorised store.

Invariants:
- node ``n`` is live iff ``_frm[n] >= 0``; live nodes of frame ``m`` form
  one list from ``_head[m]`` (``_prv`` of the head is -1, ``_prv[_nxt[n]]
  == n``) of length ``_count[m]``; nodes in ``[0, _top)`` that are not live
  are exactly ``_free[:_nfree]``; ``[_top, cap)`` holds no node;
- a (domid, gfn) is in at most one frame's rmap (a gfn maps one frame), and
  its index slot holds its node; the slot lives in the domain's array iff the
  array covers the gfn, else in ``_sparse``.
Batch forms check every pair first and raise before changing anything.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterator

import numpy as np

from .base import Rmap

MAX_DOMID = 0x7FFF          # domids fit int16
MAX_GFN = 2**31 - 1         # gfns fit int32
_GROWTH = 1.5               # arena growth factor: modest, to keep bytes/entry low
_MIN_ARENA = 64
_KEEP_ARENA = 4096          # an emptied arena up to this size is kept, not freed
_DENSE_LIMIT = 1 << 22      # lazily grown per-domain index: at most 16 MiB
_SMALL_BATCH = 8            # below this a batch is a plain loop (less overhead)
_WALK_RATIO = 128           # collect a frame by walking if count * this < arena
NXT, PRV, FRM, GFN = 0, 1, 2, 3  # columns of an arena row


def _ints(a) -> np.ndarray:
    return np.asarray(a, dtype=np.int64).ravel()


class IndexRmap(Rmap):
    """Arena of nodes + per-frame intrusive lists + per-domain gfn index."""

    name = "index"

    def __init__(self, nframes: int, table_alloc: Callable[[], bool] | None = None):
        # table_alloc: accepted for a uniform factory call; no table here.
        super().__init__(nframes)
        self._head = np.full(nframes, -1, np.int32)
        self._count = np.zeros(nframes, np.int32)
        # Single-entry ops go through memoryviews: ~3x faster than numpy
        # scalar indexing. Every view is rebuilt whenever its array is replaced.
        self._vhead = memoryview(self._head)
        self._vcount = memoryview(self._count)
        self._dense: dict[int, np.ndarray] = {}
        self._vdense: dict[int, memoryview] = {}
        self._sparse: dict[tuple[int, int], int] = {}
        self._arena = np.empty((0, 4), np.int32)
        self._reset_arena()

    # -- arena --------------------------------------------------------------
    def _reset_arena(self) -> None:
        """Empty the arena (no node is live). A big arena gives its memory
        back; a small one is kept, so a frame going 0 <-> 1 does not churn."""
        if 0 < self._arena.shape[0] <= _KEEP_ARENA:
            self._nfree = self._top = self._live = 0
            return
        self._arena = np.empty((0, 4), np.int32)
        self._dom = np.empty(0, np.int16)
        self._set_free(np.empty(0, np.int32))
        self._nfree = 0
        self._top = 0
        self._live = 0
        self._views()

    def _views(self) -> None:
        # Column views for the vectorised code, flat memoryviews for the rest.
        a = self._arena
        self._nxt, self._prv, self._frm, self._gfn = a[:, NXT], a[:, PRV], a[:, FRM], a[:, GFN]
        self._va = memoryview(a.reshape(-1))
        self._vdom = memoryview(self._dom)

    def _set_free(self, arr: np.ndarray) -> None:
        self._free = arr
        self._vfree = memoryview(arr)

    def _grow(self, need: int) -> None:
        cap = max(need, int(self._arena.shape[0] * _GROWTH), _MIN_ARENA)
        arena = np.empty((cap, 4), np.int32)
        arena[: self._top] = self._arena[: self._top]
        dom = np.empty(cap, np.int16)
        dom[: self._top] = self._dom[: self._top]
        self._arena, self._dom = arena, dom
        self._views()

    def _alloc1(self) -> int:
        if self._nfree:
            self._nfree -= 1
            return self._vfree[self._nfree]
        if self._top == self._arena.shape[0]:
            self._grow(self._top + 1)
        self._top += 1
        return self._top - 1

    def _alloc(self, k: int) -> np.ndarray:
        take = min(k, self._nfree)
        reused = self._free[self._nfree - take: self._nfree].astype(np.int64)
        self._nfree -= take
        rest = k - take
        if self._top + rest > self._arena.shape[0]:
            self._grow(self._top + rest)
        fresh = np.arange(self._top, self._top + rest, dtype=np.int64)
        self._top += rest
        return np.concatenate([reused, fresh]) if take else fresh

    def _reserve_free(self, k: int) -> None:
        if self._nfree + k > self._free.shape[0]:
            cap = max(self._nfree + k, int(self._free.shape[0] * _GROWTH), _MIN_ARENA)
            new = np.empty(cap, np.int32)
            new[: self._nfree] = self._free[: self._nfree]
            self._set_free(new)

    def _release1(self, n: int) -> None:
        """Return one unlinked node to the free stack (its key already cleared)."""
        self._va[(n << 2) + FRM] = -1
        self._live -= 1
        if self._live == 0:
            self._reset_arena()
            return
        self._reserve_free(1)
        self._vfree[self._nfree] = n
        self._nfree += 1

    def _release_nodes(self, nodes: np.ndarray) -> None:
        """Return unlinked nodes to the free stack (their keys already cleared)."""
        k = nodes.shape[0]
        self._frm[nodes] = -1
        self._live -= k
        if self._live == 0:
            self._reset_arena()
            return
        self._reserve_free(k)
        self._free[self._nfree: self._nfree + k] = nodes
        self._nfree += k

    # -- (domid, gfn) -> node index -----------------------------------------
    def _find(self, domid: int, gfn: int) -> int:
        v = self._vdense.get(domid)
        if v is not None and 0 <= gfn < len(v):
            return v[gfn]
        return self._sparse.get((domid, gfn), -1) if self._sparse else -1

    def _set_dense(self, domid: int, arr: np.ndarray) -> None:
        self._dense[domid] = arr
        self._vdense[domid] = memoryview(arr)

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
        v = self._vdense.get(domid)
        if v is None or gfn >= len(v):
            if gfn >= _DENSE_LIMIT:
                self._sparse[(domid, gfn)] = node
                return
            self._grow_dense(domid, gfn + 1)
            v = self._vdense[domid]
        v[gfn] = node

    def _clear(self, domid: int, gfn: int) -> None:
        v = self._vdense.get(domid)
        if v is not None and gfn < len(v):
            v[gfn] = -1
        else:
            self._sparse.pop((domid, gfn), None)

    @staticmethod
    def _groups(domids: np.ndarray):
        """Yield (domid, positions or None for all) for each distinct domid."""
        if domids.shape[0] == 0:
            return
        d0 = domids[0]
        if (domids == d0).all():
            yield int(d0), None
            return
        # Batches span few domains: a bincount and one mask per domain beat a sort.
        present = np.flatnonzero(np.bincount(domids))
        if present.shape[0] <= 8:
            for d in present.tolist():
                yield d, np.flatnonzero(domids == d)
            return
        order = np.argsort(domids, kind="stable")
        sd = domids[order]
        cuts = np.flatnonzero(sd[1:] != sd[:-1]) + 1
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [sd.shape[0]]])
        for a, b in zip(starts.tolist(), ends.tolist()):
            yield int(sd[a]), order[a:b]

    def _lookup_many(self, domids: np.ndarray, gfns: np.ndarray, groups=None) -> np.ndarray:
        """Node of each pair, -1 where absent (gfns already range-checked)."""
        out = np.full(domids.shape[0], -1, np.int64)
        for d, idx in groups if groups is not None else self._groups(domids):
            g = gfns if idx is None else gfns[idx]
            arr = self._dense.get(d)
            if arr is not None and int(g.max()) < arr.shape[0]:
                vals = arr[g]  # the common case: the domain's index covers all
            else:
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
            if not clear:
                small = g[g < _DENSE_LIMIT]
                if small.shape[0] and (arr is None or int(small.max()) >= arr.shape[0]):
                    arr = self._grow_dense(d, int(small.max()) + 1)
            if arr is not None and int(g.max()) < arr.shape[0]:
                arr[g] = v
                continue
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

    def _in_range(self, m: np.ndarray, d: np.ndarray, g: np.ndarray) -> bool:
        return bool(((m >= 0) & (m < self.nframes) & (d >= 0) & (d <= MAX_DOMID)
                     & (g >= 0) & (g <= MAX_GFN)).all())

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
        left = [] if arr is None else np.flatnonzero(arr >= 0).tolist()
        left += [g for (d, g) in self._sparse if d == domid]
        if left:
            g = np.array(left, np.int64)
            dd = np.full(g.shape[0], domid, np.int64)
            self.remove_many(self._frm[self._lookup_many(dd, g)].astype(np.int64), dd, g)
        self._dense.pop(domid, None)
        self._vdense.pop(domid, None)

    # -- single-entry accessors ---------------------------------------------
    def add(self, mfn: int, domid: int, gfn: int) -> None:
        if not (0 <= mfn < self.nframes and 0 <= domid <= MAX_DOMID and 0 <= gfn <= MAX_GFN):
            raise ValueError(f"rmap key out of range: mfn {mfn}, domid {domid}, gfn {gfn}")
        if self._find(domid, gfn) >= 0:
            raise ValueError(f"(d{domid}, gfn {gfn:#x}) is already in an rmap")
        n = self._alloc1()
        va, b = self._va, n << 2
        h = self._vhead[mfn]
        va[b + NXT] = h
        va[b + PRV] = -1
        va[b + FRM] = mfn
        va[b + GFN] = gfn
        self._vdom[n] = domid
        if h >= 0:
            va[(h << 2) + PRV] = n
        self._vhead[mfn] = n
        self._vcount[mfn] += 1
        self._store(domid, gfn, n)
        self._live += 1

    def remove(self, mfn: int, domid: int, gfn: int, convert: bool = True) -> None:
        n = self._find(domid, gfn)
        va, b = self._va, n << 2
        if n < 0 or va[b + FRM] != mfn:
            raise KeyError((mfn, domid, gfn))
        p, x = va[b + PRV], va[b + NXT]
        if p >= 0:
            va[(p << 2) + NXT] = x
        else:
            self._vhead[mfn] = x
        if x >= 0:
            va[(x << 2) + PRV] = p
        self._vcount[mfn] -= 1
        self._clear(domid, gfn)
        self._release1(n)

    def contains(self, mfn: int, domid: int, gfn: int) -> bool:
        n = self._find(domid, gfn)
        return n >= 0 and self._va[(n << 2) + FRM] == mfn

    def count(self, mfn: int) -> int:
        return self._vcount[mfn] if 0 <= mfn < self.nframes else 0

    def entries(self, mfn: int) -> Iterator[tuple[int, int]]:
        n = self._vhead[mfn] if 0 <= mfn < self.nframes else -1
        while n >= 0:
            # Read the successor before yielding (the caller may remove n), and
            # re-read the views each step (an add elsewhere may regrow them).
            va, b = self._va, n << 2
            nxt = va[b + NXT]
            yield self._vdom[n], va[b + GFN]
            n = nxt

    def release(self, mfn: int) -> None:
        if self.count(mfn):
            # Normally empty; forget whatever is left, keeping the index exact.
            nodes = self._frame_nodes(mfn)
            self._clear_many(self._dom[nodes].astype(np.int64), self._gfn[nodes].astype(np.int64))
            self._head[mfn] = -1
            self._count[mfn] = 0
            self._release_nodes(nodes)

    # -- batch forms ----------------------------------------------------------
    def _frame_nodes(self, mfn: int) -> np.ndarray:
        """All nodes of frame ``mfn``: walk a short list, scan ``_frm`` otherwise."""
        k = int(self._count[mfn])
        if k * _WALK_RATIO < self._top:
            out, n, va = [], self._vhead[mfn], self._va
            for _ in range(k):
                out.append(n)
                n = va[n << 2]
            return np.array(out, np.int64)
        return np.flatnonzero(self._frm[: self._top] == mfn)

    def add_many(self, mfns: np.ndarray, domids: np.ndarray, gfns: np.ndarray) -> None:
        m, d, g = _ints(mfns), _ints(domids), _ints(gfns)
        k = m.shape[0]
        if not (k == d.shape[0] == g.shape[0]):
            raise ValueError("add_many: arrays of different lengths")
        if k < _SMALL_BATCH:
            if len(set(zip(d.tolist(), g.tolist()))) < k:
                raise ValueError("add_many: a pair appears twice")
            for mm, dd, gg in zip(m.tolist(), d.tolist(), g.tolist()):
                self.add(mm, dd, gg)  # add() checks presence before changing anything
            return
        if not self._in_range(m, d, g):
            raise ValueError("add_many: rmap key out of range")
        groups = list(self._groups(d))
        if (self._lookup_many(d, g, groups) >= 0).any():
            raise ValueError("add_many: a pair is already in an rmap")
        nodes = self._alloc(k)
        self._store_many(d, g, nodes, groups)
        if (self._lookup_many(d, g, groups) != nodes).any():
            # A pair appears twice in the batch: a later write hid an earlier one.
            self._clear_many(d, g, groups)
            self._live += k  # _release_nodes counts them down again
            self._release_nodes(nodes)
            raise ValueError("add_many: a pair appears twice")
        self._dom[nodes] = d
        self._gfn[nodes] = g
        self._frm[nodes] = m
        # Chain the new nodes per frame, last added first (what k head
        # insertions give), then splice each chain in front of the old head.
        mr, nr = m[::-1], nodes[::-1]
        if not (m == m[0]).all():
            order = np.argsort(mr, kind="stable")
            mr, nr = mr[order], nr[order]
        starts = np.flatnonzero(np.concatenate([[True], mr[1:] != mr[:-1]]))
        ends = np.concatenate([starts[1:] - 1, [k - 1]])
        frames = mr[starts]
        old = self._head[frames].astype(np.int64)
        nxt = np.empty(k, np.int64)
        nxt[:-1] = nr[1:]
        nxt[ends] = old
        prv = np.empty(k, np.int64)
        prv[1:] = nr[:-1]
        prv[starts] = -1
        self._nxt[nr] = nxt
        self._prv[nr] = prv
        had = old >= 0
        self._prv[old[had]] = nr[ends[had]]
        self._head[frames] = nr[starts]
        self._count[frames] += (ends - starts + 1).astype(np.int32)
        self._live += k

    @staticmethod
    def _surviving(nodes: np.ndarray, link: np.ndarray, gone: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """For each node, the first node along ``link`` that stays (-1: none).

        Pointer jumping: each round every still-pending node takes its
        target's target, so a run of L removed nodes needs log2(L) rounds.
        ``gone[-1]`` is a False sentinel, so -1 targets stop by themselves.
        """
        t = link[nodes].astype(np.int64)
        act = np.flatnonzero(gone[t])
        while act.shape[0]:
            t[act] = t[pos[t[act]]]
            act = act[gone[t[act]]]
        return t

    def remove_many(self, mfns: np.ndarray, domids: np.ndarray, gfns: np.ndarray) -> None:
        m, d, g = _ints(mfns), _ints(domids), _ints(gfns)
        k = m.shape[0]
        if not (k == d.shape[0] == g.shape[0]):
            raise ValueError("remove_many: arrays of different lengths")
        if k < _SMALL_BATCH:
            pairs = list(zip(m.tolist(), d.tolist(), g.tolist()))
            for p in pairs:
                if not self.contains(*p):
                    raise KeyError(p)
            if len(set(pairs)) < k:
                raise KeyError("remove_many: a pair appears twice")
            for p in pairs:
                self.remove(*p)
            return
        if not self._in_range(m, d, g):
            raise KeyError("remove_many: rmap key out of range")
        groups = list(self._groups(d))
        nodes = self._lookup_many(d, g, groups)
        bad = nodes < 0
        if not bad.any():
            bad = self._frm[nodes] != m
        if bad.any():
            i = int(np.argmax(bad))
            raise KeyError((int(m[i]), int(d[i]), int(g[i])))
        pos = np.empty(self._top, np.int32)  # node -> position in the batch
        pos[nodes] = np.arange(k, dtype=np.int32)
        if (pos[nodes] != np.arange(k)).any():
            raise KeyError("remove_many: a pair appears twice")
        # Frames losing every entry need no relinking.
        if (m == m[0]).all():
            frames, inv, cnts = m[:1], np.zeros(k, np.int64), np.array([k])
        elif self.nframes <= 8 * k:
            per = np.bincount(m, minlength=self.nframes)
            frames = np.flatnonzero(per)
            cnts, inv = per[frames], None
        else:
            frames, inv, cnts = np.unique(m, return_inverse=True, return_counts=True)
        whole = self._count[frames] == cnts
        self._head[frames[whole]] = -1
        self._count[frames] -= cnts.astype(np.int32)
        if inv is None:
            flag = np.zeros(self.nframes, bool)
            flag[frames[~whole]] = True
            part = flag[m]
        else:
            part = ~whole[inv]
        if part.any():
            pn = nodes[part]
            gone = np.zeros(self._top + 1, bool)  # last slot: sentinel for -1
            gone[pn] = True
            pos[pn] = np.arange(pn.shape[0], dtype=np.int32)
            succ = self._surviving(pn, self._nxt, gone, pos)
            pred = self._surviving(pn, self._prv, gone, pos)
            # Every node of a run writes the same (pred, succ): order is moot.
            has = pred >= 0
            self._nxt[pred[has]] = succ[has]
            self._head[m[part][~has]] = succ[~has]
            has = succ >= 0
            self._prv[succ[has]] = pred[has]
        self._clear_many(d, g, groups)
        self._release_nodes(nodes)

    def move_all(self, src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
        """Splice src's whole list in front of dst's: O(1) relinking, plus
        O(k) vectorised work to retag the nodes and return the pairs."""
        nodes = self._frame_nodes(src)
        doms = self._dom[nodes].astype(np.int64)
        gfns = self._gfn[nodes].astype(np.int64)
        if src == dst or nodes.shape[0] == 0:
            return doms, gfns
        self._frm[nodes] = dst
        tail = int(nodes[np.argmax(self._nxt[nodes] < 0)])
        hd = int(self._head[dst])
        self._nxt[tail] = hd
        if hd >= 0:
            self._prv[hd] = tail
        self._head[dst] = self._head[src]
        self._count[dst] += nodes.shape[0]
        self._head[src] = -1
        self._count[src] = 0
        return doms, gfns

    # -- introspection --------------------------------------------------------
    def nbytes(self) -> int:
        arrays = [self._head, self._count, self._nxt, self._prv, self._dom, self._gfn,
                  self._frm, self._free, *self._dense.values()]
        sparse = sys.getsizeof(self._sparse) + 100 * len(self._sparse) if self._sparse else 0
        return sum(a.nbytes for a in arrays) + sparse

    def check(self) -> None:
        """Verify every invariant of the module docstring (for tests)."""
        top = self._top
        frm, nxt, prv = self._frm[:top], self._nxt[:top], self._prv[:top]
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
