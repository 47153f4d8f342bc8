"""The memory-sharing core: domains, p2m, shared frames and their rmaps.

This is the hypervisor's state machine, with no I/O: the hypervisor process
(``hvcore.process``) calls it one request at a time, which is what makes it a
model of one hypervisor CPU. Semantics follow Xen's ``XENMEM_sharing_op``
(see docs/semantics.md):

- A private page (``ram_rw``) is *nominated*: its frame moves to ``dom_cow``,
  gets a fresh handle (a version) and an rmap ``{(d, gfn)}``.
- *share* merges a client frame into a source frame: every (d, gfn) of the
  client's rmap moves to the source, p2m entries are repointed and the
  client frame is freed. Contents are never compared; the handles prove that
  neither page changed since it was nominated.
- *unshare* (a CoW fault) gives the writer a private copy, or, for the last
  gfn of a frame, the frame itself.
- A dying domain's shared entries are dropped by :meth:`relinquish`, a
  preemptible loop with a saved cursor (the seed's first fix).

Counters, as Xen reports them:

- ``nr_shared_mfns``: frames currently shared (owned by ``dom_cow``);
- ``nr_saved_mfns``: gfns backed by shared frames minus shared frames, i.e.
  the frames sharing saves;
- per domain ``shr_pages`` (gfns backed by shared frames) and ``tot_pages``
  (private frames it owns).

Every operation has a batch form (``*_many``) that does the same as the
element-wise loop with numpy over the whole batch: these are the hot paths.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
# np.unique(return_inverse=...) imports numpy.ma on first use: tens of
# milliseconds inside the first batched unshare. Pay it at start instead.
import numpy.ma  # noqa: F401  (imported for its side effect)

from . import p2m as p2m_mod
from .errors import (C_HANDLE_INVALID, E2BIG, EBUSY, EINVAL, ENOMEM, ESRCH,
                     S_HANDLE_INVALID, HVError)
from .p2m import HOLE, INVALID_MFN, RAM_RW, RAM_SHARED, P2M
from .constants import DEFAULT_RMAP, DOMID_COW, DOMID_FIRST_RESERVED, PAGE_SIZE
from .pool import FramePool
from .rmap import make_rmap

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
#: a p2m type window of only shared gfns, as bytes (see Hypervisor._chunk)
_ALL_SHARED = bytes([RAM_SHARED]) * 4096

STATES = ("running", "paused", "crashed", "dying")


@dataclass(eq=False)
class Domain:
    domid: int
    name: str
    npages: int
    p2m: P2M
    state: str = "running"
    tot_pages: int = 0          # private frames owned
    shr_pages: int = 0          # gfns backed by shared frames
    #: teardown cursor: next gfn to relinquish (Xen's next_shared_gfn_to_relinquish)
    relinquish_cursor: int = 0
    relinquished: int = 0       # shared entries dropped so far by teardown
    teardown_phase: str = ""    # "", "shared", "private"
    info: dict = field(default_factory=dict)   # runtime extras (guest pid, counters)

    @property
    def dying(self) -> bool:
        return self.state == "dying"


def _runs(domids: np.ndarray) -> tuple[np.ndarray | None, list[tuple[int, int, int]]]:
    """Pairs grouped by domain for per-domain array work: ``(order,
    runs)``, ``runs`` being ``(domid, lo, hi)`` slices of the pairs taken
    in ``order`` (None: the pairs' own order, when they name one domain)."""
    n = len(domids)
    if n == 0:
        return None, []
    first = int(domids[0])
    if (domids == first).all():
        return None, [(first, 0, n)]
    order = np.argsort(domids, kind="stable")
    ds = domids[order]
    cut = (np.flatnonzero(ds[1:] != ds[:-1]) + 1).tolist()
    bounds = [0] + cut + [n]
    return order, [(int(ds[lo]), lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


class Hypervisor:
    """All frames, domains and rmaps of one emulated host."""

    def __init__(self, nframes: int, rmap: str = DEFAULT_RMAP, **rmap_options):
        self.pool = FramePool(nframes)
        self.token = self.pool.token
        self.rmap_policy = rmap
        self.rmap = make_rmap(rmap, nframes, **rmap_options)
        self.domains: dict[int, Domain] = {}
        self._mark = np.zeros(nframes, dtype=np.int64)   # scratch of share_many
        self._next_domid = 1
        # Xen: the handle counter starts at 1 and is pre-incremented, so the
        # first handle given out is 2.
        self._handle_counter = 1
        self.nr_shared_mfns = 0
        self.nr_saved_mfns = 0

    # ------------------------------------------------------------------
    # domains
    def create_domain(self, pages: int, content=None, name: str | None = None,
                      paused: bool = False, holes=None) -> Domain:
        """A new domain of ``pages`` gfns, private pages filled from ``content``.

        ``content``: None (zero pages), an array ``(pages, 4096)`` uint8, or
        ``callable(start_gfn, count) -> array (count, 4096)`` called in chunks.
        ``holes``: gfns left unpopulated (their content is ignored).
        """
        if pages <= 0:
            raise HVError(EINVAL, "a domain needs at least one page")
        if holes is None and pages > self.pool.nfree:
            # before any array is sized by an untrusted page count
            raise HVError(ENOMEM, f"{pages} frames asked, {self.pool.nfree} free")
        domid = self._next_domid
        if domid >= DOMID_FIRST_RESERVED:
            raise HVError(ENOMEM, "no domid left")
        populated = np.ones(pages, dtype=bool)
        if holes is not None:
            holes = np.asarray(holes, dtype=np.int64)
            if len(holes) and (holes.min() < 0 or holes.max() >= pages):
                raise HVError(EINVAL, "a hole outside the domain")
            populated[holes] = False
        gfns = np.nonzero(populated)[0]
        mfns = self.pool.alloc_many(len(gfns), owner=domid)
        try:
            p2m = P2M(self.token, domid, pages)
        except BaseException:
            self.pool.free_many(mfns)
            raise
        full = np.full(pages, INVALID_MFN, dtype=np.int64)
        full[gfns] = mfns
        try:
            self._fill(full, content)
        except BaseException:
            p2m.close()
            self.pool.free_many(mfns)
            raise
        self._next_domid += 1
        p2m.mfn[gfns] = mfns
        p2m.type[gfns] = RAM_RW
        d = Domain(domid, name or f"dom{domid}", pages, p2m,
                   state="paused" if paused else "running", tot_pages=len(gfns))
        self.domains[domid] = d
        self.rmap.domain_created(domid, pages)
        return d

    def _fill(self, mfns: np.ndarray, content) -> None:
        """Fill frames ``mfns`` (one per gfn, -1 for holes) from ``content``."""
        data = self.pool.data
        step = 4096
        for start in range(0, len(mfns), step):
            chunk = mfns[start:start + step]
            keep = chunk >= 0
            if content is None:
                data[chunk[keep]] = 0
                continue
            if callable(content):
                pages = content(start, len(chunk))
            else:
                pages = content[start:start + len(chunk)]
            pages = np.asarray(pages, dtype=np.uint8)
            if pages.shape != (len(chunk), PAGE_SIZE):
                raise HVError(EINVAL, f"content for gfns {start}.. must have shape "
                                      f"({len(chunk)}, {PAGE_SIZE}), not {pages.shape}")
            data[chunk[keep]] = pages[keep]

    def domain(self, domid: int) -> Domain:
        try:
            return self.domains[domid]
        except (KeyError, TypeError):
            raise HVError(ESRCH, f"no domain {domid}") from None

    def _gfn(self, d: Domain, gfn: int) -> int:
        if not 0 <= gfn < d.npages:
            raise HVError(EINVAL, f"gfn {gfn} outside domain {d.domid}'s {d.npages} pages")
        return gfn

    def _gfns(self, d: Domain, gfns) -> np.ndarray:
        gfns = np.asarray(gfns, dtype=np.int64).ravel()
        if len(gfns) and (gfns.min() < 0 or gfns.max() >= d.npages):
            raise HVError(EINVAL, f"gfn outside domain {d.domid}'s {d.npages} pages")
        return gfns

    def _next_handles(self, k: int) -> np.ndarray:
        first = self._handle_counter + 1
        self._handle_counter += k
        return np.arange(first, first + k, dtype=np.uint64)

    # ------------------------------------------------------------------
    # nominate
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

    # ------------------------------------------------------------------
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
        s_dom = self.domain(sd)
        c_dom = self.domain(cd)
        smfn = self._shared_frame(s_dom, sgfn, sh, S_HANDLE_INVALID)
        cmfn = self._shared_frame(c_dom, cgfn, ch, C_HANDLE_INVALID)
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
        order, runs = _runs(domids)
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

    def _domids(self, domid, n: int) -> tuple[np.ndarray, int | None]:
        """One domid per pair, each checked to exist (ESRCH otherwise), and
        the domid if it is the same for every pair (else None)."""
        if np.ndim(domid) == 0:
            self.domain(int(domid))
            return np.full(n, int(domid), dtype=np.int64), int(domid)
        domids = np.asarray(domid, dtype=np.int64).ravel()
        if len(domids) != n:
            raise HVError(EINVAL, "share_many needs one source, client and handle per pair")
        present = sorted(set(domids.tolist()))
        for x in present:
            self.domain(x)
        return domids, present[0] if len(present) == 1 else None

    def _frames_of(self, domids, gfns: np.ndarray, handles: np.ndarray):
        """Frames of (domid, gfn) pairs and whether each is shared with that
        handle; ``domids`` is one per pair, or one domid for all.

        A share request's fixed cost bounds how many pairs fit in a step,
        so this is a few numpy calls per request plus two per domain named
        (pairs visited by domain, :func:`_runs`), not a dozen per domain.
        """
        n = len(gfns)
        if np.ndim(domids) == 0:
            order, runs = None, [(int(domids), 0, n)]
        else:
            order, runs = _runs(domids)
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
        s_dom, c_dom = self.domain(sd), self.domain(cd)
        smfn = self._shared_frame(s_dom, sgfn, sh, S_HANDLE_INVALID)
        if c_dom.dying:
            raise HVError(EBUSY, f"domain {cd} is dying")
        if not 0 <= cgfn < c_dom.npages or c_dom.p2m.type[cgfn] != HOLE:
            raise HVError(C_HANDLE_INVALID, f"gfn {cgfn} of domain {cd} is not a hole")
        self.pool.type_count[smfn] += 1                  # count before rmap
        self.rmap.add(smfn, cd, cgfn)
        with c_dom.p2m.changing():
            c_dom.p2m.mfn[cgfn] = smfn
            c_dom.p2m.type[cgfn] = RAM_SHARED
        c_dom.shr_pages += 1
        self.nr_saved_mfns += 1

    def range_share(self, sd: int, cd: int, first_gfn: int, last_gfn: int) -> int:
        """Nominate and share gfns first..last of both domains (inclusive).

        Xen's loop, per gfn: nominate in the source, then (if that worked)
        in the client, then share; pages that cannot be nominated are
        skipped. Returns the number of gfns that ended up sharing a frame.
        When every page of the range is still private in both domains (the
        usual first pass over two clones) the pairs are independent and the
        whole range is done with numpy, handles numbered as the loop would.
        """
        s_dom, c_dom = self.domain(sd), self.domain(cd)
        if first_gfn < 0 or first_gfn > last_gfn:
            raise HVError(EINVAL, "empty or negative gfn range")
        last = min(last_gfn, s_dom.npages - 1, c_dom.npages - 1)
        gfns = np.arange(first_gfn, last + 1, dtype=np.int64)
        if len(gfns) == 0:
            return 0
        s_codes, s_fresh = self._classify(s_dom, gfns)
        c_codes, c_fresh = self._classify(c_dom, gfns)
        s_ok = s_codes == 0
        c_ok = c_codes == 0
        if sd == cd or (s_ok & ~s_fresh).any() or (s_ok & c_ok & ~c_fresh).any():
            return self._range_share_loop(sd, cd, gfns)
        c_fresh &= s_ok
        # handles in the loop's order: source then client, gfn by gfn
        taken = s_fresh.astype(np.int64) + c_fresh
        before = np.cumsum(taken) - taken
        base = self._handle_counter + 1
        self._handle_counter += int(taken.sum())
        s_h = (base + before).astype(np.uint64)
        c_h = s_h + s_fresh.astype(np.uint64)
        self._make_shared(s_dom, gfns[s_fresh], s_h[s_fresh])
        self._make_shared(c_dom, gfns[c_fresh], c_h[c_fresh])
        pair = s_ok & c_ok
        g = gfns[pair]
        codes = self.share_many(sd, g, s_h[pair], cd, g, c_h[pair])
        return int((codes == 0).sum())

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

    # ------------------------------------------------------------------
    # unshare (CoW) and guest writes
    def unshare(self, domid: int, gfn: int) -> bool:
        """Break sharing of ``gfn`` for ``domid``; True if a copy was made."""
        d = self.domain(domid)
        gfn = self._gfn(d, gfn)
        if d.p2m.type[gfn] != RAM_SHARED:
            raise HVError(EINVAL, f"gfn {gfn} of domain {domid} is not shared")
        m = d.p2m.mfn.item(gfn)
        return self._unshare_one(d, gfn) != m

    def _unshare_one(self, d: Domain, gfn: int, copy: bool = True) -> int:
        """The CoW fault of one shared gfn; returns the frame that backs it
        now (its old frame if it was the last gfn: no copy). Scalar code with
        Python ints, no numpy batch machinery: a guest fault is the
        latency-critical path. ``copy=False`` leaves a new frame's bytes
        as they are, for a caller that overwrites the whole page."""
        pool = self.pool
        p2m = d.p2m
        domid = d.domid
        m = p2m.mfn.item(gfn)
        count = pool.type_count.item(m)
        if count == 1:
            # Last gfn: no copy, the frame becomes private to d again.
            p2m._begin()
            try:
                self.rmap.remove(m, domid, gfn)
                self.rmap.release(m)
                pool.type_count[m] = 0
                pool.owner[m] = domid
                pool.handle[m] = 0
                p2m.type[gfn] = RAM_RW
            finally:
                p2m._end()
            self.nr_shared_mfns -= 1
            new = m
        else:
            new = pool.alloc(domid)                 # ENOMEM before any change
            p2m._begin()
            try:
                if copy:
                    b = self._bytes()
                    b[new * PAGE_SIZE:(new + 1) * PAGE_SIZE] = b[m * PAGE_SIZE:(m + 1) * PAGE_SIZE]
                self.rmap.remove(m, domid, gfn)
                pool.type_count[m] = count - 1
                p2m.mfn[gfn] = new
                p2m.type[gfn] = RAM_RW
            finally:
                p2m._end()
            self.nr_saved_mfns -= 1
        d.shr_pages -= 1
        d.tot_pages += 1
        return new

    def _bytes(self) -> memoryview:
        """The pool as one flat writable memoryview: slicing it costs a
        fraction of numpy's fancy indexing for a few bytes (dropped by
        :meth:`close` so the segment can be unmapped)."""
        mv = self.__dict__.get("_pool_bytes")
        if mv is None:
            mv = self._pool_bytes = memoryview(self.pool.data.reshape(-1))
        return mv

    def _copy_frames(self, dst: np.ndarray, src: np.ndarray) -> None:
        """Copy frames ``src`` into frames ``dst`` through a small reused
        buffer: a gather of the whole batch would be one temporary of up to
        16 MiB (freshly mapped, so page-faulted) per call."""
        data = self.pool.data
        k = len(dst)
        if k > 1 and abs(int(dst[-1]) - int(dst[0])) == k - 1:
            step = np.diff(dst)
            if (step == step[0]).all():
                # a run of consecutive frames (the free list hands those out):
                # gather straight into it, one pass
                if step[0] < 0:
                    dst, src = dst[::-1], src[::-1]
                lo = int(dst[0])
                np.take(data, src, axis=0, out=data[lo:lo + k], mode="clip")
                return
        buf = self.__dict__.get("_copy_buf")
        if buf is None:
            buf = self._copy_buf = np.empty((64, PAGE_SIZE), dtype=np.uint8)
        step = len(buf)
        for i in range(0, len(src), step):
            k = min(step, len(src) - i)
            np.take(data, src[i:i + k], axis=0, out=buf[:k], mode="clip")
            data[dst[i:i + k]] = buf[:k]

    def unshare_many(self, domid: int, gfns, copy: bool = True) -> int:
        """Unshare distinct shared gfns of one domain; returns copies made.

        All or nothing: if the copies need more frames than are free, ENOMEM
        is raised and nothing changed. The last gfn of a frame takes the
        frame itself (no copy). ``copy=False`` skips copying the old
        contents into the new frames, for a caller that overwrites every
        one of those pages whole.
        """
        d = self.domain(domid)
        gfns = np.unique(self._gfns(d, gfns))
        if len(gfns) == 0:
            return 0
        if (d.p2m.type[gfns] != RAM_SHARED).any():
            raise HVError(EINVAL, f"unshare of a gfn that is not shared in domain {domid}")
        return self._unshare_many(d, gfns, copy)

    def _unshare_many(self, d: Domain, gfns: np.ndarray, copy: bool = True) -> int:
        """:meth:`unshare_many` of distinct, shared gfns (checked by the caller)."""
        domid = d.domid
        pool = self.pool
        ms = d.p2m.mfn[gfns]
        frames, inverse, counts = np.unique(ms, return_inverse=True, return_counts=True)
        # Frames all of whose gfns are in this batch: their last gfn (the
        # last of the batch) keeps the frame.
        whole = counts == pool.type_count[frames]
        if whole.any():
            last_pos = len(gfns) - 1 - np.unique(inverse[::-1], return_index=True)[1]
            keeps = np.zeros(len(gfns), dtype=bool)
            keeps[last_pos[whole]] = True
            cp = ~keeps
            ncopy = int(cp.sum())
        else:
            cp = slice(None)
            ncopy = len(gfns)
        new = pool.alloc_many(ncopy, owner=domid)       # may raise ENOMEM: nothing done yet
        with d.p2m.changing():
            if copy and ncopy:
                self._copy_frames(new, ms[cp])
            self.rmap.remove_many(ms, np.full(len(gfns), domid, dtype=np.int64), gfns)
            pool.type_count[frames] -= counts
            kept = frames[whole]
            if len(kept):
                self.rmap.release_many(kept)
                pool.owner[kept] = domid
                pool.handle[kept] = 0
            d.p2m.mfn[gfns[cp]] = new
            d.p2m.type[gfns] = RAM_RW
        self.nr_shared_mfns -= len(kept)
        self.nr_saved_mfns -= ncopy
        d.shr_pages -= len(gfns)
        d.tot_pages += len(gfns)
        return ncopy

    def write(self, domid: int, gfn: int, offset: int, data) -> bool:
        """A guest write of bytes-like ``data`` at ``offset`` of ``gfn``;
        True if it was a CoW fault (the page was shared)."""
        try:
            d = self.domains[domid]
        except (KeyError, TypeError):
            raise HVError(ESRCH, f"no domain {domid}") from None
        if not 0 <= gfn < d.npages:
            raise HVError(EINVAL, f"gfn {gfn} outside domain {domid}'s {d.npages} pages")
        if type(data) is not bytes:
            data = memoryview(data).cast("B")
        n = len(data)
        if offset < 0 or offset + n > PAGE_SIZE:
            raise HVError(EINVAL, "write crosses the page boundary")
        if d.state == "dying":
            raise HVError(EBUSY, f"domain {domid} is dying")
        p2m = d.p2m
        t = p2m.type.item(gfn)
        if t == HOLE:
            raise HVError(EINVAL, f"gfn {gfn} of domain {domid} is a hole")
        p2m._begin()
        try:
            if t == RAM_SHARED:
                m = self._unshare_one(d, gfn, copy=n < PAGE_SIZE)
            else:
                m = p2m.mfn.item(gfn)
            at = m * PAGE_SIZE + offset
            self._bytes()[at:at + n] = data
        finally:
            p2m._end()
        return t == RAM_SHARED

    def write_pages(self, domid: int, gfns, pages) -> int:
        """Write whole pages; returns the number of CoW faults taken.

        A gfn listed twice gets its last page. ENOMEM leaves everything as it
        was. The new frames of CoW faults are not filled with the old
        contents first: every byte of them is overwritten.
        """
        d = self.domain(domid)
        gfns = self._gfns(d, gfns)
        pages = np.asarray(pages, dtype=np.uint8).reshape(len(gfns), PAGE_SIZE)
        if d.dying:
            raise HVError(EBUSY, f"domain {domid} is dying")
        # keep the last occurrence of each gfn
        rev_u, rev_i = np.unique(gfns[::-1], return_index=True)
        if len(rev_u) < len(gfns):
            pick = len(gfns) - 1 - rev_i
            gfns, pages = rev_u, pages[pick]
        t = d.p2m.type[gfns]
        if (t == HOLE).any():
            raise HVError(EINVAL, f"write to a hole of domain {domid}")
        shared = gfns[t == RAM_SHARED]
        with d.p2m.changing():
            if len(shared):
                self._unshare_many(d, shared, copy=False)
            self.pool.data[d.p2m.mfn[gfns]] = pages
        return len(shared)

    def write_many(self, domid: int, gfns, offsets, lengths, data) -> int:
        """Many small writes in one call: write ``i`` puts the next
        ``lengths[i]`` bytes of ``data`` at ``offsets[i]`` of ``gfns[i]``,
        in order (a later write to the same bytes wins). Returns the CoW
        faults taken (shared gfns written). Vectorised: one batched unshare,
        then one scatter of every byte. ENOMEM leaves everything as it was.
        """
        d = self.domain(domid)
        gfns = self._gfns(d, gfns)
        k = len(gfns)
        offsets = np.asarray(offsets, dtype=np.int64).ravel()
        lengths = np.asarray(lengths, dtype=np.int64).ravel()
        data = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        if len(offsets) != k or len(lengths) != k:
            raise HVError(EINVAL, f"{k} gfns need as many offsets and lengths")
        if k and ((offsets < 0).any() or (lengths < 0).any() or (offsets + lengths > PAGE_SIZE).any()):
            raise HVError(EINVAL, "a write crosses the page boundary")
        total = int(lengths.sum())
        if total != len(data):
            raise HVError(EINVAL, f"the writes take {total} bytes, {len(data)} given")
        if d.dying:
            raise HVError(EBUSY, f"domain {domid} is dying")
        if k == 0:
            return 0
        ug = np.unique(gfns)
        t = d.p2m.type[ug]
        if (t == HOLE).any():
            raise HVError(EINVAL, f"write to a hole of domain {domid}")
        shared = ug[t == RAM_SHARED]
        with d.p2m.changing():
            if len(shared):
                self._unshare_many(d, shared)
            starts = d.p2m.mfn[gfns] * PAGE_SIZE + offsets
            if total == k:                  # one byte each: the common case
                pos = starts
            else:
                ends = np.cumsum(lengths)
                pos = np.repeat(starts - (ends - lengths), lengths) + np.arange(total)
            if len(ug) < k:
                # a gfn written twice: the last write of each byte wins
                pos, last = np.unique(pos[::-1], return_index=True)
                data = data[::-1][last]
            self.pool.data.reshape(-1)[pos] = data
        return len(shared)

    def read(self, domid: int, gfn: int) -> bytes:
        d = self.domain(domid)
        gfn = self._gfn(d, gfn)
        if d.p2m.type[gfn] == HOLE:
            raise HVError(EINVAL, f"gfn {gfn} of domain {domid} is a hole")
        return self.pool.data[int(d.p2m.mfn[gfn])].tobytes()

    # ------------------------------------------------------------------
    # foreign mappings (extra references)
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

    # ------------------------------------------------------------------
    # teardown
    def drop_shared(self, domid: int, gfns: np.ndarray) -> int:
        """Drop shared gfns of a dying domain from their frames' rmaps and
        clear them from its p2m. A frame whose last pair goes is freed. Never
        allocates, cannot fail. Returns the number of frames freed."""
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
        d.relinquished += k
        return len(freed)

    def _drop_few(self, d: Domain, gfns: np.ndarray, ms: np.ndarray) -> int:
        """drop_shared of a few gfns (a preemptible teardown's chunk on a
        list or bucket rmap, whose removals take ~10-100 us each): entry by
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
        d.relinquished += k
        return len(freed)

    def kill(self, domid: int) -> Domain:
        """Mark a domain dying: from now on nominate on it fails with EBUSY,
        so no sharing can appear behind the teardown cursor."""
        d = self.domain(domid)
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
        units = (d.info.get("chunk_units", RELINQUISH_SHARED_COST) if chunk_seconds
                 else RELINQUISH_BUDGET)
        while d.teardown_phase == "shared":
            start = d.relinquish_cursor
            if start >= d.npages:
                d.teardown_phase = "private"
                d.relinquish_cursor = 0
                break
            # The whole chunk is timed, scan included: over a long run of
            # holes and private gfns the scan is all the work there is.
            t0 = time.perf_counter()
            n, shared = self._chunk(typ, start, units)
            self.drop_shared(domid, shared)
            d.relinquish_cursor = start + n
            if chunk_seconds:
                took = max(time.perf_counter() - t0, 1e-6)
                units = int(units * min(4.0, max(0.25, chunk_seconds / took)))
                units = min(max(units & -RELINQUISH_SHARED_COST, RELINQUISH_SHARED_COST),
                            MAX_CHUNK_UNITS)
                d.info["chunk_units"] = units
            if should_yield():
                return False
        while d.relinquish_cursor < d.npages:         # the private phase
            self._release_private(d, RELEASE_CHUNK)
            if should_yield():
                return False
        # Forgetting the domain (up to ~1 ms at 1M gfns: the rmap's and the
        # p2m's per-domain state) starts a step of its own if this one is spent.
        self._forget(d)
        return True

    def _relinquish_all(self, d: Domain) -> bool:
        """The rest of a teardown with no preemption check."""
        if d.teardown_phase == "shared":
            start = d.relinquish_cursor
            shared = np.flatnonzero(d.p2m.type[start:] == RAM_SHARED) + start
            for lo in range(0, len(shared), RELINQUISH_SLAB):
                self.drop_shared(d.domid, shared[lo:lo + RELINQUISH_SLAB])
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

    def destroy_domain(self, domid: int) -> int:
        """Kill and tear down at once; returns shared entries relinquished."""
        d = self.kill(domid)
        self.relinquish(domid)
        return d.relinquished

    # ------------------------------------------------------------------
    # audit and statistics
    def audit(self) -> int:
        """Check every invariant of docs/semantics.md, "Audit invariants"; return the error count."""
        return len(self.audit_report())

    def audit_report(self) -> list[str]:
        """The audit's findings, one sentence each (empty when all hold)."""
        errs: list[str] = []
        pool, rmap = self.pool, self.rmap
        shared = np.nonzero(pool.owner == DOMID_COW)[0]
        if len(shared) != self.nr_shared_mfns:
            errs.append(f"{len(shared)} frames owned by dom_cow, nr_shared_mfns says {self.nr_shared_mfns}")
        walked_m, walked_d, walked_g = [], [], []
        for m in shared.tolist():
            n = rmap.count(m)
            if n == 0:
                errs.append(f"shared frame {m} has an empty rmap")
            if n != pool.type_count[m]:
                errs.append(f"frame {m}: rmap has {n} entries, type count is {pool.type_count[m]}")
            if pool.handle[m] == 0:
                errs.append(f"shared frame {m} has no handle")
            walked = list(rmap.entries(m))
            if len(walked) != n:
                errs.append(f"frame {m}: rmap walk gave {len(walked)} entries, count is {n}")
            if walked:
                pairs = np.array(walked, dtype=np.int64)
                walked_m.append(np.full(len(pairs), m, dtype=np.int64))
                walked_d.append(pairs[:, 0])
                walked_g.append(pairs[:, 1])
        empty = [np.empty(0, np.int64)]
        all_m = np.concatenate(walked_m + empty)
        all_d = np.concatenate(walked_d + empty)
        all_g = np.concatenate(walked_g + empty)
        entries = len(all_m)
        seen: dict[int, np.ndarray] = {}
        for domid in np.unique(all_d).tolist():
            sel = all_d == domid
            gfns, ms = all_g[sel], all_m[sel]
            d = self.domains.get(domid)
            if d is None:
                errs.append(f"rmaps name domain {domid}, which does not exist")
                continue
            bad = (gfns < 0) | (gfns >= d.npages)
            if bad.any():
                errs.append(f"rmaps name {int(bad.sum())} gfns outside domain {domid}")
                gfns, ms = gfns[~bad], ms[~bad]
            wrong = (d.p2m.mfn[gfns] != ms) | (d.p2m.type[gfns] != RAM_SHARED)
            if wrong.any():
                errs.append(f"domain {domid} gfn {int(gfns[wrong][0])} is in the rmap of frame "
                            f"{int(ms[wrong][0])} but not mapped ram_shared to it "
                            f"({int(wrong.sum())} such)")
            seen[domid] = np.unique(gfns)
            if len(seen[domid]) != len(gfns):
                errs.append(f"domain {domid}: a gfn is in rmaps more than once")
        total_shr = 0
        for d in self.domains.values():
            typ, mfn = d.p2m.type, d.p2m.mfn
            sh = np.nonzero(typ == RAM_SHARED)[0]
            total_shr += len(sh)
            if len(sh) != d.shr_pages:
                errs.append(f"domain {d.domid}: {len(sh)} shared p2m entries, shr_pages says {d.shr_pages}")
            if len(sh) and (pool.owner[mfn[sh]] != DOMID_COW).any():
                errs.append(f"domain {d.domid}: a ram_shared entry points at a frame dom_cow does not own")
            got = seen.get(d.domid, empty[0])
            if len(got) != len(sh):
                errs.append(f"domain {d.domid}: {len(sh)} shared entries but {len(got)} in rmaps")
            rw = np.nonzero(typ == RAM_RW)[0]
            if len(rw) != d.tot_pages:
                errs.append(f"domain {d.domid}: {len(rw)} private entries, tot_pages says {d.tot_pages}")
            if len(rw) and (pool.owner[mfn[rw]] != d.domid).any():
                errs.append(f"domain {d.domid}: a ram_rw entry points at a frame it does not own")
        if entries != total_shr:
            errs.append(f"rmaps hold {entries} entries, p2ms {total_shr} shared entries")
        if self.nr_saved_mfns != entries - self.nr_shared_mfns:
            errs.append(f"nr_saved_mfns is {self.nr_saved_mfns}, gfns backed by shared frames "
                        f"minus shared frames is {entries - self.nr_shared_mfns}")
        owned = int((pool.owner >= 0).sum())
        if owned != pool.nframes - pool.nfree:
            errs.append(f"{owned} frames owned but {pool.nframes - pool.nfree} off the free list")
        private = sum(d.tot_pages for d in self.domains.values())
        if owned - len(shared) != private:
            errs.append(f"{owned - len(shared)} frames owned by domains, their p2ms map {private}")
        return errs

    def stats(self) -> dict:
        return {
            "frames_total": self.pool.nframes,
            "frames_free": self.pool.nfree,
            "nr_shared_mfns": self.nr_shared_mfns,
            "nr_saved_mfns": self.nr_saved_mfns,
            "rmap": self.rmap_policy,
            "domains": len(self.domains),
        }

    def close(self) -> None:
        """Free every segment (the p2ms and the pool)."""
        self.__dict__.pop("_pool_bytes", None)
        for d in list(self.domains.values()):
            d.p2m.close()
        self.domains.clear()
        self.pool.close()

    def __enter__(self) -> "Hypervisor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
