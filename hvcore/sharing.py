"""Sharing: nominate, share, add_to_physmap, range_share.

The operations of Xen's ``XENMEM_sharing_op`` that make frames shared
(docs/semantics.md, "Operations"). A private page is *nominated*: its
frame moves to ``dom_cow`` with a fresh handle and a one-entry rmap. A
*share* merges a client frame into a source frame, proven unchanged by
both handles, and frees the client frame. Foreign mappings (extra
references) are here too: they are what makes a nominate fail with
``E2BIG``.

Invariants this module keeps:

- the type count of a frame is always raised before pairs enter its rmap,
  so a frame's count covers every pair its rmap holds;
- a handle is given out once: the counter only grows, and the batch forms
  number handles as the element-wise loop would;
- every ``*_many`` has the result of its element-wise loop.
"""
from __future__ import annotations

import numpy as np

from .constants import DOMID_COW
from .domains import Domain, runs_by_domain
from .errors import C_HANDLE_INVALID, E2BIG, EBUSY, EINVAL, ENOMEM, S_HANDLE_INVALID, HVError
from .p2m import HOLE, RAM_RW, RAM_SHARED


class Sharing:
    """Making frames shared (a part of :class:`hvshare.hvcore.core.Hypervisor`).

    Uses the core's ``pool``, ``rmap``, ``domains``, the handle counter,
    the share scratch ``_mark`` and the two frame counters.
    """

    def _next_handles(self, k: int) -> np.ndarray:
        first = self._handle_counter + 1
        self._handle_counter += k
        return np.arange(first, first + k, dtype=np.uint64)

    def nominate(self, domid: int, gfn: int) -> int:
        """Make private page ``gfn`` of ``domid`` sharable; return its handle."""
        d = self.domain(domid)
        if d.dying:
            raise HVError(EBUSY, f"domain {domid} is dying")
        gfn = self._gfn(d, gfn)
        t = d.p2m.type[gfn]
        m = int(d.p2m.mfn[gfn])
        if t == RAM_SHARED:
            return int(self.pool.handle[m])
        if t != RAM_RW:
            raise HVError(EINVAL, f"gfn {gfn} of domain {domid} is not populated RAM")
        if self.pool.extra_refs[m]:
            raise HVError(E2BIG, f"gfn {gfn} of domain {domid} has extra references")
        h = int(self._next_handles(1)[0])
        pool = self.pool
        pool.owner[m] = DOMID_COW
        pool.handle[m] = h
        # The type count is always raised before the pair enters the rmap.
        pool.type_count[m] = 1
        self.rmap.add(m, domid, gfn)
        with d.p2m.changing():
            d.p2m.type[gfn] = RAM_SHARED
        self.nr_shared_mfns += 1
        d.tot_pages -= 1
        d.shr_pages += 1
        return h

    def nominate_many(self, domid: int, gfns) -> tuple[np.ndarray, np.ndarray]:
        """Nominate every gfn; returns (handles, codes), code 0 on success.

        Same result as nominating one by one in order: a gfn listed twice
        gets the same handle both times.
        """
        d = self.domain(domid)
        gfns = np.asarray(gfns, dtype=np.int64).ravel()
        codes, fresh = self._classify(d, gfns)
        self._make_shared(d, gfns[fresh], self._next_handles(int(fresh.sum())))
        return self._handles(d, gfns, codes), codes

    def _classify(self, d: Domain, gfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nominate's verdict per gfn without changing anything: the error
        codes, and which gfns a nominate in list order would make shared
        (first occurrences of sharable private pages)."""
        codes = np.zeros(len(gfns), dtype=np.int64)
        fresh = np.zeros(len(gfns), dtype=bool)
        if d.dying:
            codes[:] = EBUSY
            return codes, fresh
        inside = (gfns >= 0) & (gfns < d.npages)
        codes[~inside] = EINVAL
        idx = np.nonzero(inside)[0]
        t = d.p2m.type[gfns[idx]]
        m = d.p2m.mfn[gfns[idx]]
        codes[idx[t == HOLE]] = EINVAL
        rw = t == RAM_RW
        busy = rw & (self.pool.extra_refs[np.where(rw, m, 0)] != 0)
        codes[idx[busy]] = E2BIG
        cand = idx[rw & ~busy]
        gc = gfns[cand]
        if len(gc) > 1 and not (gc[1:] > gc[:-1]).all():     # duplicates possible
            cand = cand[np.unique(gc, return_index=True)[1]]
        fresh[cand] = True
        return codes, fresh

    def _make_shared(self, d: Domain, gfns: np.ndarray, handles: np.ndarray) -> None:
        """Turn distinct sharable private gfns into shared frames."""
        k = len(gfns)
        if k == 0:
            return
        pool = self.pool
        mfns = d.p2m.mfn[gfns]
        pool.owner[mfns] = DOMID_COW
        pool.handle[mfns] = handles
        pool.type_count[mfns] = 1           # raised before the rmap add
        self.rmap.add_many(mfns, np.full(k, d.domid, dtype=np.int64), gfns)
        with d.p2m.changing():
            d.p2m.type[gfns] = RAM_SHARED
        self.nr_shared_mfns += k
        d.tot_pages -= k
        d.shr_pages += k

    def _handles(self, d: Domain, gfns: np.ndarray, codes: np.ndarray) -> np.ndarray:
        handles = np.zeros(len(gfns), dtype=np.uint64)
        ok = codes == 0
        handles[ok] = self.pool.handle[d.p2m.mfn[gfns[ok]]]
        return handles

    # share / add_to_physmap
    def _shared_frame(self, d: Domain, gfn: int, handle: int, code: int) -> int:
        if not 0 <= gfn < d.npages or d.p2m.type[gfn] != RAM_SHARED:
            raise HVError(code, f"gfn {gfn} of domain {d.domid} is not shared")
        m = int(d.p2m.mfn[gfn])
        if int(self.pool.handle[m]) != handle:
            raise HVError(code, f"stale handle {handle} for gfn {gfn} of domain {d.domid}")
        return m

    def share(self, sd: int, sgfn: int, sh: int, cd: int, cgfn: int, ch: int) -> None:
        """Merge the client's frame into the source's; the source survives."""
        source = self.domain(sd)
        client = self.domain(cd)
        smfn = self._shared_frame(source, sgfn, sh, S_HANDLE_INVALID)
        cmfn = self._shared_frame(client, cgfn, ch, C_HANDLE_INVALID)
        if smfn == cmfn:
            return
        k = int(self.pool.type_count[cmfn])
        # Type count first, then the rmap: the source's count covers the
        # moved pairs before they appear in its rmap.
        self.pool.type_count[smfn] += k
        ds, gs = self.rmap.move_all(cmfn, smfn)
        self._repoint(ds, gs, smfn)
        self.pool.free_many(np.array([cmfn], dtype=np.int64))
        self.nr_shared_mfns -= 1
        self.nr_saved_mfns += 1

    def _repoint(self, domids: np.ndarray, gfns: np.ndarray, mfns) -> None:
        """Point (domid, gfn) pairs at shared frame(s) ``mfns``."""
        mfns = np.asarray(mfns, dtype=np.int64)     # one frame, or one per pair
        order, runs = runs_by_domain(domids)
        if order is not None:
            gfns = gfns[order]
            if mfns.ndim:
                mfns = mfns[order]
        for domid, lo, hi in runs:
            p2m = self.domains[domid].p2m
            with p2m.changing():
                p2m.mfn[gfns[lo:hi]] = mfns[lo:hi] if mfns.ndim else mfns

    def share_many(self, sd, sgfns, shs, cd, cgfns, chs) -> np.ndarray:
        """Share many (sd, sgfn) <- (cd, cgfn) pairs; a code per pair (0 = done).

        ``sd`` and ``cd`` are a domid each or one per pair. Pairs whose
        client frame has a single reference and whose frames no other pair
        of the batch frees (the common case of a dedup pass) are done
        together with numpy; any other pair is done on its own, in order.
        The result is the element-wise loop's.
        """
        sg = np.asarray(sgfns, dtype=np.int64).ravel()
        n = len(sg)
        (sds, s_one), (cds, c_one) = self._domids(sd, n), self._domids(cd, n)
        cg = np.asarray(cgfns, dtype=np.int64).ravel()
        sh = np.asarray(shs, dtype=np.uint64).ravel()
        ch = np.asarray(chs, dtype=np.uint64).ravel()
        if not (len(cg) == len(sh) == len(ch) == n):
            raise HVError(EINVAL, "share_many needs one source, client and handle per pair")
        codes = np.zeros(n, dtype=np.int64)
        if n == 0:
            return codes
        sm, s_ok = self._frames_of(sds if s_one is None else s_one, sg, sh)
        cm, c_ok = self._frames_of(cds if c_one is None else c_one, cg, ch)
        codes[~s_ok] = S_HANDLE_INVALID
        codes[s_ok & ~c_ok] = C_HANDLE_INVALID
        valid = s_ok & c_ok
        if not valid.any():
            return codes
        # A pair is "simple" if its client frame has one reference, appears
        # nowhere else in the batch, and its source frame is no pair's
        # client: such pairs commute with every other pair of the batch.
        # Counted in a scratch array: low 32 bits appearances, high bits
        # appearances as a client.
        mark = self._mark
        cv, sv = cm[valid], sm[valid]
        np.add.at(mark, cv, 1 + (1 << 32))
        np.add.at(mark, sv, 1)
        appear_c, mark_s = mark[cm], mark[sm]
        mark[cv] = 0
        mark[sv] = 0
        simple = (valid & (sm != cm) & (self.pool.type_count[cm] == 1)
                  & ((appear_c & 0xFFFFFFFF) == 1) & ((mark_s >> 32) == 0))
        self._share_simple(sm[simple], cm[simple], cds[simple], cg[simple])
        for i in np.nonzero(~simple)[0].tolist():
            try:
                self.share(int(sds[i]), int(sg[i]), int(sh[i]), int(cds[i]), int(cg[i]), int(ch[i]))
                codes[i] = 0
            except HVError as e:
                codes[i] = e.code
        return codes

    def _frames_of(self, domids, gfns: np.ndarray, handles: np.ndarray):
        """Frames of (domid, gfn) pairs and whether each is shared with that
        handle; ``domids`` is one per pair, or one domid for all.

        A share request's fixed cost bounds how many pairs fit in a step,
        so this is a few numpy calls per request plus two per domain named
        (pairs visited by domain, :func:`runs_by_domain`), not a dozen per domain.
        """
        n = len(gfns)
        if np.ndim(domids) == 0:
            order, runs = None, [(int(domids), 0, n)]
        else:
            order, runs = runs_by_domain(domids)
        g = gfns if order is None else gfns[order]
        if len(runs) == 1:
            npages = self.domains[runs[0][0]].npages
            inside = None if g.min() >= 0 and g.max() < npages else (g >= 0) & (g < npages)
        else:
            npages = np.repeat([self.domains[d].npages for d, _, _ in runs],
                               [hi - lo for _, lo, hi in runs])
            inside = (g >= 0) & (g < npages)
        if inside is not None:
            g = np.where(inside, g, 0)
        m = np.empty(n, dtype=np.int64)
        t = np.empty(n, dtype=np.uint8)
        for domid, lo, hi in runs:
            p2m = self.domains[domid].p2m
            m[lo:hi] = p2m.mfn[g[lo:hi]]
            t[lo:hi] = p2m.type[g[lo:hi]]
        if order is not None:                   # back to the pairs' order
            m[order], t[order], inside[order] = m.copy(), t.copy(), inside.copy()
        ok = t == RAM_SHARED
        if inside is not None:
            ok &= inside
        m[~ok] = 0
        ok &= self.pool.handle[m] == handles
        return m, ok

    def _share_simple(self, sm: np.ndarray, cm: np.ndarray, cds: np.ndarray,
                      cg: np.ndarray) -> None:
        k = len(sm)
        if k == 0:
            return
        np.add.at(self.pool.type_count, sm, 1)          # count before rmap
        self.rmap.move_singles(cm, sm, cds, cg)
        self._repoint(cds, cg, sm)
        self.pool.free_many(cm)
        self.nr_shared_mfns -= k
        self.nr_saved_mfns += k

    def add_to_physmap(self, sd: int, sgfn: int, sh: int, cd: int, cgfn: int) -> None:
        """Map shared frame (sd, sgfn) into hole ``cgfn`` of ``cd``."""
        source, client = self.domain(sd), self.domain(cd)
        smfn = self._shared_frame(source, sgfn, sh, S_HANDLE_INVALID)
        if client.dying:
            raise HVError(EBUSY, f"domain {cd} is dying")
        if not 0 <= cgfn < client.npages or client.p2m.type[cgfn] != HOLE:
            raise HVError(C_HANDLE_INVALID, f"gfn {cgfn} of domain {cd} is not a hole")
        self.pool.type_count[smfn] += 1                  # count before rmap
        self.rmap.add(smfn, cd, cgfn)
        with client.p2m.changing():
            client.p2m.mfn[cgfn] = smfn
            client.p2m.type[cgfn] = RAM_SHARED
        client.shr_pages += 1
        self.nr_saved_mfns += 1

    def range_share(self, sd: int, cd: int, first_gfn: int, last_gfn: int) -> int:
        """Nominate and share gfns first..last of both domains (inclusive).

        Xen's loop, per gfn: nominate in the source, then (if that worked)
        in the client, then share; pages that cannot be nominated are
        skipped. As in Xen, a range past the end of either domain, or one
        domain as both source and client, is EINVAL with nothing done. Returns the number of gfns that ended up sharing a frame.
        When every page of the range is still private in both domains (the
        usual first pass over two clones) the pairs are independent and the
        whole range is done with numpy, handles numbered as the loop would.
        """
        source, client = self.check_range(sd, cd, first_gfn, last_gfn)
        gfns = np.arange(first_gfn, last_gfn + 1, dtype=np.int64)
        s_codes, s_fresh = self._classify(source, gfns)
        c_codes, c_fresh = self._classify(client, gfns)
        s_ok = s_codes == 0
        c_ok = c_codes == 0
        if (s_ok & ~s_fresh).any() or (s_ok & c_ok & ~c_fresh).any():
            return self._range_share_loop(sd, cd, gfns)
        c_fresh &= s_ok
        # handles in the loop's order: source then client, gfn by gfn
        taken = s_fresh.astype(np.int64) + c_fresh
        before = np.cumsum(taken) - taken
        base = self._handle_counter + 1
        self._handle_counter += int(taken.sum())
        s_h = (base + before).astype(np.uint64)
        c_h = s_h + s_fresh.astype(np.uint64)
        self._make_shared(source, gfns[s_fresh], s_h[s_fresh])
        self._make_shared(client, gfns[c_fresh], c_h[c_fresh])
        pair = s_ok & c_ok
        g = gfns[pair]
        codes = self.share_many(sd, g, s_h[pair], cd, g, c_h[pair])
        return int((codes == 0).sum())

    def check_range(self, sd: int, cd: int, first_gfn: int, last_gfn: int):
        """The checks of :meth:`range_share`, for a caller that shares the
        range in pieces: (source, client), or HVError as range_share raises."""
        source, client = self.domain(sd), self.domain(cd)
        if sd == cd:
            raise HVError(EINVAL, f"range_share needs two domains, not domain {sd} twice")
        if first_gfn < 0 or first_gfn > last_gfn:
            raise HVError(EINVAL, "empty or negative gfn range")
        end = min(source.npages, client.npages)
        if last_gfn >= end:
            small = source if source.npages <= client.npages else client
            raise HVError(EINVAL, f"gfn {last_gfn} is past the end of domain {small.domid} "
                                  f"({small.npages} pages)")
        return source, client

    def _range_share_loop(self, sd: int, cd: int, gfns: np.ndarray) -> int:
        shared = 0
        for g in gfns.tolist():
            try:
                sh = self.nominate(sd, g)
                ch = self.nominate(cd, g)
                self.share(sd, g, sh, cd, g, ch)
                shared += 1
            except HVError as e:
                if e.code == ENOMEM:
                    raise
        return shared

    def map_foreign(self, domid: int, gfn: int) -> None:
        """Take an extra reference on a private page (as a foreign mapping
        would); such a page cannot be nominated (E2BIG)."""
        d = self.domain(domid)
        gfn = self._gfn(d, gfn)
        if d.p2m.type[gfn] == HOLE:
            raise HVError(EINVAL, f"gfn {gfn} of domain {domid} is a hole")
        self.pool.extra_refs[int(d.p2m.mfn[gfn])] += 1

    def unmap_foreign(self, domid: int, gfn: int) -> None:
        d = self.domain(domid)
        m = int(d.p2m.mfn[self._gfn(d, gfn)])
        if m < 0 or self.pool.extra_refs[m] == 0:
            raise HVError(EINVAL, f"gfn {gfn} of domain {domid} has no foreign mapping")
        self.pool.extra_refs[m] -= 1
