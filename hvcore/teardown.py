"""Teardown: kill, the preemptible relinquish loop, destroy.

A dying domain gives back its memory in two phases
(docs/semantics.md, "Teardown"). First the *shared* phase walks the p2m
from a saved cursor (Xen's ``next_shared_gfn_to_relinquish``) and drops
each shared entry from its frame's rmap; a frame whose last entry goes is
freed. Then the *private* phase frees the domain's own frames. Between
chunks the loop asks whether other work waits and, if so, returns
"restart" with the cursor saved: the seed's second fix.

Invariants this module keeps:

- a dying domain accepts no nominate (``EBUSY``), so no sharing can appear
  behind the cursor;
- dropping entries never allocates and cannot fail;
- a domain is forgotten only when every entry is a hole, so nothing of it
  is left in any rmap;
- a domain with forks cannot be killed (``EBUSY``); a fork drops its
  reference on its parent when it is forgotten.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from .budget import ChunkCost
from .domains import Domain
from .errors import EBUSY, EINVAL, HVError
from .p2m import HOLE, INVALID_MFN, RAM_RW, RAM_SHARED

#: Teardown preemption, as in Xen's relinquish loop: each shared gfn costs
#: 0x10, any other gfn 1; every RELINQUISH_BUDGET units the loop checks
#: whether other work is pending (every 512 shared or 8192 other gfns).
RELINQUISH_SHARED_COST = 0x10
RELINQUISH_OTHER_COST = 1
RELINQUISH_BUDGET = 0x2000
#: Private frames freed per step in the last teardown phase.
RELEASE_CHUNK = 8192
#: Largest chunk an adaptive teardown (``chunk_seconds``) may take at once.
MAX_CHUNK_UNITS = 1 << 22
#: gfns per batch of a teardown that nothing preempts (bounds its scratch).
RELINQUISH_SLAB = 1 << 18
#: a teardown chunk of at most this many shared gfns is dropped entry by entry
SMALL_DROP = 8
#: a p2m type window of only shared gfns, as bytes (see Teardown._chunk)
_ALL_SHARED = bytes([RAM_SHARED]) * 4096


class Teardown:
    """Giving a dying domain's memory back (a part of :class:`hvshare.hvcore.core.Hypervisor`).

    Uses the core's ``pool``, ``rmap``, ``domains`` and the frame counters.
    """

    def drop_shared(self, domid: int, gfns: np.ndarray) -> int:
        """Drop distinct shared gfns of a domain from their frames' rmaps and
        clear them from its p2m (a dying domain's teardown, a fork's reset).
        A frame whose last pair goes is freed. Never allocates, cannot
        fail. Returns the number of frames freed."""
        d = self.domains[domid]
        k = len(gfns)
        if k == 0:
            return 0
        pool = self.pool
        ms = d.p2m.mfn[gfns]
        if k <= SMALL_DROP:
            return self._drop_few(d, gfns, ms)
        m0 = ms[0]
        if ms[-1] == m0 and not np.count_nonzero(ms != m0):
            # One frame (a teardown chunk of a heavily shared frame): no sort.
            self.rmap.remove_many(ms, np.full(k, domid, dtype=np.int64), gfns)
            left = int(pool.type_count[m0]) - k
            pool.type_count[m0] = left
            freed = ms[:1] if left == 0 else ms[:0]
        else:
            frames, counts = np.unique(ms, return_counts=True)
            self.rmap.remove_many(ms, np.full(k, domid, dtype=np.int64), gfns)
            pool.type_count[frames] -= counts
            freed = frames[pool.type_count[frames] == 0]
        if len(freed):
            self.rmap.release_many(freed)
        with d.p2m.changing():
            d.p2m.mfn[gfns] = INVALID_MFN
            d.p2m.type[gfns] = HOLE
        if len(freed):
            pool.free_many(freed)
        self.nr_shared_mfns -= len(freed)
        self.nr_saved_mfns -= k - len(freed)
        d.shr_pages -= k
        return len(freed)

    def _drop_few(self, d: Domain, gfns: np.ndarray, ms: np.ndarray) -> int:
        """drop_shared of a few gfns (a preemptible teardown's chunk on a
        list or bucket rmap, whose removals are slow one by one): entry by
        entry, as the batch rmap call would, without the batch's fixed cost."""
        remove, tc, domid = self.rmap.remove, self.pool.type_count, d.domid
        mlist, glist = ms.tolist(), gfns.tolist()
        for m, g in zip(mlist, glist):
            remove(m, domid, g)
        k, m0 = len(mlist), mlist[0]
        if mlist.count(m0) == k:        # one frame (a heavily shared one): one update
            left = int(tc[m0]) - k
            tc[m0] = left
            freed = [m0] if left == 0 else []
        else:
            for m in mlist:
                tc[m] -= 1
            freed = [m for m in set(mlist) if tc[m] == 0]
        for m in freed:
            self.rmap.release(m)
        # the gfns are distinct (each was removed once): a run is a slice
        lo = min(glist)
        where = slice(lo, lo + k) if max(glist) - lo == k - 1 else gfns
        with d.p2m.changing():
            d.p2m.mfn[where] = INVALID_MFN
            d.p2m.type[where] = HOLE
        if freed:
            self.pool.free_many(np.array(freed, dtype=np.int64))
        self.nr_shared_mfns -= len(freed)
        self.nr_saved_mfns -= k - len(freed)
        d.shr_pages -= k
        return len(freed)

    def kill(self, domid: int) -> Domain:
        """Mark a domain dying: from now on nominate on it fails with EBUSY,
        so no sharing can appear behind the teardown cursor."""
        d = self.domain(domid)
        if d.forks:
            raise HVError(EBUSY, f"domain {domid} has forks ({', '.join(map(str, sorted(d.forks)))}): "
                                 f"destroy them first")
        if not d.dying:
            d.state = "dying"
            d.teardown_phase = "shared"
            d.relinquish_cursor = 0
        return d

    @staticmethod
    def _chunk(typ: np.ndarray, start: int, units: int) -> tuple[int, np.ndarray]:
        """Xen's loop over ``units`` work units from gfn ``start``: how many
        gfns it covers (at least one) and the shared ones among them."""
        q = units // RELINQUISH_SHARED_COST
        if q and units % RELINQUISH_SHARED_COST == 0:
            # The common window is all shared: q gfns spend the units exactly.
            # (A small window is checked as bytes: numpy's fixed cost is
            # most of a chunk's overhead when a chunk is a few gfns.)
            w = typ[start:start + q]
            k = len(w)
            if (w.tobytes() == _ALL_SHARED[:k] if k <= len(_ALL_SHARED)
                    else np.count_nonzero(w == RAM_SHARED) == k):
                return k, np.arange(start, start + k)
        window = typ[start:start + units]
        cost = np.where(window == RAM_SHARED, RELINQUISH_SHARED_COST, RELINQUISH_OTHER_COST)
        n = max(int(np.searchsorted(np.cumsum(cost), units, side="right")), 1)
        return n, np.flatnonzero(window[:n] == RAM_SHARED) + start

    def relinquish(self, domid: int, should_yield: Callable[[], bool] | None = None,
                   chunk_seconds: float | None = None) -> bool:
        """One preemptible teardown step of a dying domain.

        Walks the p2m from the saved cursor in chunks of work units (0x10
        per shared gfn, 1 per other), dropping each chunk's shared entries
        at once; after each chunk it asks ``should_yield()`` and, if so,
        saves the cursor and returns False ("restart"). Then the private
        frames are freed, RELEASE_CHUNK per check, and the domain is gone:
        returns True.

        Chunks are Xen's RELINQUISH_BUDGET (0x2000 units: 512 shared gfns)
        unless ``chunk_seconds`` is given: then each chunk is sized from the
        last one's duration to take about that long, so a fast rmap does
        much per check and a slow one (a long list) still yields in time.

        Without ``should_yield`` this is the monolithic teardown: no check
        can answer yes, so the chunks make no difference to the outcome and
        the rest of the teardown runs in batches of RELINQUISH_SLAB gfns.
        """
        d = self.domain(domid)
        if not d.dying:
            raise HVError(EINVAL, f"domain {domid} is not dying")
        typ = d.p2m.type
        if should_yield is None:
            return self._relinquish_all(d)
        # An adaptive teardown starts with one shared gfn (on a long list
        # rmap one removal can take a millisecond) and grows up to 4x a
        # chunk; its units stay a multiple of 0x10.
        if chunk_seconds and d.chunk_cost is None:
            d.chunk_cost = ChunkCost.rate(first=RELINQUISH_SHARED_COST, growth=4.0)
        units = RELINQUISH_BUDGET
        while d.teardown_phase == "shared":
            start = d.relinquish_cursor
            if start >= d.npages:
                d.teardown_phase = "private"
                d.relinquish_cursor = 0
                break
            # The whole chunk is timed, scan included: over a long run of
            # holes and private gfns the scan is all the work there is.
            if chunk_seconds:
                units = d.chunk_cost.items(chunk_seconds, chunk_seconds)
                units = min(max(units & -RELINQUISH_SHARED_COST, RELINQUISH_SHARED_COST),
                            MAX_CHUNK_UNITS)
            t0 = time.perf_counter()
            n, shared = self._chunk(typ, start, units)
            self.drop_shared(domid, shared)
            d.relinquished += len(shared)
            d.relinquish_cursor = start + n
            if chunk_seconds:
                d.chunk_cost.learn(units, time.perf_counter() - t0)
            if should_yield():
                return False
        while d.relinquish_cursor < d.npages:         # the private phase
            self._release_private(d, RELEASE_CHUNK)
            if should_yield():
                return False
        # Forgetting the domain (the rmap's and the p2m's per-domain state,
        # O(pages)) starts a step of its own if this one is spent.
        self._forget(d)
        return True

    def _relinquish_all(self, d: Domain) -> bool:
        """The rest of a teardown with no preemption check."""
        if d.teardown_phase == "shared":
            start = d.relinquish_cursor
            shared = np.flatnonzero(d.p2m.type[start:] == RAM_SHARED) + start
            for lo in range(0, len(shared), RELINQUISH_SLAB):
                self.drop_shared(d.domid, shared[lo:lo + RELINQUISH_SLAB])
            d.relinquished += len(shared)
            d.teardown_phase = "private"
            d.relinquish_cursor = 0
        while d.relinquish_cursor < d.npages:
            self._release_private(d, RELINQUISH_SLAB)
        self._forget(d)
        return True

    def _release_private(self, d: Domain, chunk: int) -> None:
        """Free the private frames of the next ``chunk`` gfns from the
        cursor (the caller forgets the domain once the p2m is done)."""
        start = d.relinquish_cursor
        if start < d.npages:
            typ = d.p2m.type
            sl = slice(start, start + chunk)
            private = np.flatnonzero(typ[sl] == RAM_RW) + start
            if len(private):
                mfns = d.p2m.mfn[private]
                with d.p2m.changing():
                    d.p2m.mfn[private] = INVALID_MFN
                    typ[private] = HOLE
                self.pool.extra_refs[mfns] = 0
                self.pool.free_many(mfns)
                d.tot_pages -= len(private)
            d.relinquish_cursor = min(start + chunk, d.npages)

    def _forget(self, d: Domain) -> None:
        # Every entry is a hole now: nothing of d is left in any rmap.
        assert d.shr_pages == 0 and d.tot_pages == 0
        self.rmap.domain_destroyed(d.domid)
        d.p2m.close()
        d.teardown_phase = "gone"
        del self.domains[d.domid]
        if d.parent is not None:
            self._fork_released(d)      # the fork's reference on its parent goes last

    def destroy_domain(self, domid: int) -> int:
        """Kill and tear down at once; returns shared entries relinquished."""
        d = self.kill(domid)
        self.relinquish(domid)
        return d.relinquished
