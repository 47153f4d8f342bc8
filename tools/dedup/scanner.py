"""The scanner: one pass finds identical pages and shares them.

A pass (:meth:`Scanner.plan`, then :meth:`Scanner.execute`) snapshots every
running domain's p2m, hashes the private pages, groups equal hashes, and
merges each group into its source in rounds: nominate, re-check, verify the
bytes, share. docs/design.md, "Dedup", walks through the phases and says
why no page can be merged with different content: the bytes are compared
after nominate made both pages read-only, and a handle retired by a later
write makes the share fail.

Invariants a pass keeps:

- a pair is shared only if its bytes compared equal after both pages were
  nominated;
- every candidate ends the pass merged, unshared, volatile or skipped, and
  each is counted once.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import numpy as np
import posix_ipc

from hvshare.hvcore import shm
from hvshare.hvcore.constants import PAGE_SIZE
from hvshare.hvcore.errors import C_HANDLE_INVALID, ESRCH, S_HANDLE_INVALID
from hvshare.hvcore.p2m import RAM_RW, RAM_SHARED, P2MView

from .backend import Backend, step_delta
from .knobs import BATCH_PAGES
from .pages import WORDS_PER_PAGE, checksums, rows_equal, snapshot

__all__ = ["Scanner", "Plan", "Batch", "PassResult", "NOMINATE_FACTOR", "ROUND_PAGES"]

#: A nominate_many request carries up to this many times ``batch_pages``
#: gfns: per page, nominate costs the hypervisor a third to a half of what
#: share does.
NOMINATE_FACTOR = 3
#: Members (client pages) per merge round: nominated, verified and shared
#: together, so the scanner's own work is done once per round and every
#: request is filled to its limit whatever domains the round spans.
ROUND_PAGES = 4096
#: Members compared per slice of a round's compare run while the hypervisor
#: shares the previous round (about 0.2 ms: the requests in flight take longer)
COMPARE_SLICE = 512
# entry kinds, in source-preference order
_SHARED_FRAME, _CANDIDATE = 0, 1
# a private page's status as of its last scan (for the gauges)
UNKNOWN, UNSHARED, VOLATILE = 0, 1, 2


@dataclass(eq=False)
class _Domain:
    """Per-domain scan state: its p2m mapping and the last pass's checksums."""
    domid: int
    p2m_name: str
    npages: int
    view: P2MView
    sums: np.ndarray            # uint64 checksum per gfn at its last scan
    have: np.ndarray            # bool: sums[gfn] is meaningful
    status: np.ndarray          # uint8 UNKNOWN / UNSHARED / VOLATILE
    typ: np.ndarray | None = None   # this pass's snapshot
    mfn: np.ndarray | None = None


# plans and results

@dataclass
class Batch:
    """One merge round (up to ``round_pages`` members, sent in requests of
    up to ``batch_pages``): pair ``i`` merges client ``(cd[i], cg[i])`` into
    source ``(sd[i], sg[i])``; ``group[i]`` is the pair's hash group."""
    sd: np.ndarray
    sg: np.ndarray
    cd: np.ndarray
    cg: np.ndarray
    group: np.ndarray

    def __len__(self) -> int:
        return len(self.cg)


@dataclass
class Plan:
    """The result of the snapshot, hash and group phases of a pass."""
    batches: list[Batch]
    full: bool                  # the pass covers every gfn of the scanned domains
    scanned: int                # private pages examined
    zero: int                   # zero pages among them
    volatile: int               # skipped: checksum changed since the last scan
    unmatched: int              # no other page with the same hash
    started: float              # perf_counter() at the start of the pass
    nr_saved_before: int
    phase_seconds: dict = field(default_factory=dict)
    steps_before: dict | None = None    # backend.steps() when the pass began


@dataclass
class PassResult:
    """What one pass did (``to_dict()`` carries the keys ``hvctl dedup
    --json`` promises: scanned, merged, seconds, nr_saved_mfns)."""
    scanned: int                # private pages examined (zero test and/or hash)
    zero: int                   # zero pages among them
    merged: int                 # pairs shared: pages (or duplicate shared frames)
                                # merged into a source frame
    volatile: int               # skipped: checksum changed since their last scan
    skipped: int                # dropped between hashing and sharing (written,
                                # not nominable, stale handle at share)
    mismatched: int             # members whose bytes differed from their source
                                # at verification (hash collision or late write)
    unmatched: int              # candidates with no identical page
    batches: int                # merge rounds executed (each nominates, verifies
                                # and shares up to round_pages members)
    requests: int               # backend requests (nominate_many + share_many)
    max_request_ms: float       # longest backend request, seen from the scanner
    seconds: float              # the whole pass
    nr_saved_mfns: int          # the hypervisor's nr_saved_mfns after the pass
    saved_delta: int            # ... minus before
    full_scan: bool
    phase_seconds: dict = field(default_factory=dict)   # snapshot, hash, group, merge
    counters: dict = field(default_factory=dict)        # Scanner.counters after
    max_pause_ms: float | None = None                   # from the backend, if it knows
    hv_steps: dict | None = None        # the hypervisor's steps during the pass
                                        # (step_delta), if the backend knows

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(eq=False)
class _Round:
    """A merge round between its nominate and its share: its pages (domid,
    gfn, handle, code, type), each pair's pages and frames, the pairs
    skipped and compared; once verified, the pairs to share in order."""
    b: Batch
    p_d: np.ndarray
    p_g: np.ndarray
    handle: np.ndarray
    code: np.ndarray
    typ: np.ndarray
    s_i: np.ndarray
    c_i: np.ndarray
    s_m: np.ndarray
    c_m: np.ndarray
    skipped: np.ndarray
    cmp: np.ndarray
    compare: "_Compare"
    ps: np.ndarray | None = None
    pc: np.ndarray | None = None
    mismatched: int = 0
    lonely: int = 0


class _Compare:
    """The byte compare of a round's members with their sources
    (:func:`rows_equal`), a slice at a time, members by source (a source
    is read once per slice): :meth:`step` is idle work while the
    hypervisor shares the previous round."""

    def __init__(self, frames: memoryview, c_m: np.ndarray, s_m: np.ndarray, idx: np.ndarray):
        self.frames, self.c_m, self.s_m = frames, c_m, s_m
        self.idx = idx[np.argsort(s_m[idx], kind="stable")]
        self.eq = np.zeros(len(c_m), dtype=bool)
        self.done = 0

    def step(self, pages: int = COMPARE_SLICE) -> bool:
        """Compare the next ``pages`` members; whether any are left."""
        sel = self.idx[self.done:self.done + pages]
        if len(sel):
            self.eq[sel] = rows_equal(self.frames, self.c_m[sel], self.s_m[sel])
            self.done += len(sel)
        return self.done < len(self.idx)

    def result(self) -> np.ndarray:
        """Which pairs compared equal, once every member is compared."""
        self.step(len(self.idx))
        return self.eq


# the scanner


class Scanner:
    """Finds identical pages of running domains and shares them.

    ``after_nominate(batch)`` and ``before_share(batch)``, if set, are
    called in every merge batch right after its nominate requests and right
    before its share request: a seam for tests that interleave guest writes
    with the merge (and for tracing). Watch mode (:class:`.watch.Watcher`)
    drives one scanner a window at a time.
    """

    COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                "full_scans", "pages_scanned", "pages_merged", "pages_skipped", "passes")

    def __init__(self, backend: Backend, *, batch_pages: int = BATCH_PAGES,
                 round_pages: int = ROUND_PAGES, skip_volatile: bool = True):
        if batch_pages < 1:
            raise ValueError("batch_pages must be at least 1")
        self.backend = backend
        self.batch_pages = int(batch_pages)
        self.round_pages = max(int(round_pages), self.batch_pages)
        self.skip_volatile = skip_volatile
        self.after_nominate: Callable[[Batch], None] | None = None
        self.before_share: Callable[[Batch], None] | None = None
        self.counters = {k: 0 for k in self.COUNTERS}
        self._mm, size = shm.attach_readonly(backend.pool_name())
        self._frames = memoryview(self._mm)
        self._words = np.frombuffer(self._mm, dtype=np.uint64).reshape(size // PAGE_SIZE, WORDS_PER_PAGE)
        nframes = len(self._words)
        # hash cache of shared frames, valid within one full scan
        self._fsum = np.zeros(nframes, dtype=np.uint64)
        self._fknown = np.zeros(nframes, dtype=bool)
        self._doms: dict[int, _Domain] = {}

    # -- domains ---------------------------------------------------------
    def _refresh(self) -> list[_Domain]:
        """Map new running domains, forget gone ones, snapshot every p2m."""
        listed = {int(d): (name, int(n)) for d, name, n in self.backend.domains()}
        for domid in list(self._doms):
            st = self._doms[domid]
            if domid not in listed or listed[domid][0] != st.p2m_name:
                st.view.close()
                del self._doms[domid]
        for domid, (name, npages) in listed.items():
            if domid in self._doms:
                continue
            try:
                view = P2MView(name)
            except posix_ipc.ExistentialError:      # destroyed since it was listed
                continue
            self._doms[domid] = _Domain(domid, name, npages, view,
                                        np.zeros(npages, dtype=np.uint64),
                                        np.zeros(npages, dtype=bool),
                                        np.zeros(npages, dtype=np.uint8))
        doms = [self._doms[d] for d in sorted(self._doms)]
        for st in doms:
            st.typ, st.mfn = snapshot(st.view)
        return doms

    # -- phases 1-4: snapshot, hash, group ------------------------------
    def plan(self, domids: Iterable[int] | None = None, *,
             windows: dict[int, tuple[int, int]] | None = None,
             new_scan: bool | None = None) -> Plan:
        """Snapshot, hash and group: the merge batches of one pass.

        ``domids`` limits the candidates to those domains (default: every
        running domain); frames shared by any running domain are merge
        targets either way. ``windows`` (watch mode) limits candidates to
        ``{domid: (first_gfn, end_gfn)}``; without it the pass is a full
        scan. ``new_scan`` (default: a full scan) forgets the hashes of
        shared frames, which are kept within one full scan.
        """
        t0 = time.perf_counter()
        steps = getattr(self.backend, "steps", None)
        steps_before = steps() if callable(steps) else None
        saved_before = int(self.backend.nr_saved_mfns())
        doms = self._refresh()
        full = windows is None
        if new_scan is None:
            new_scan = full
        if windows is None:
            want = set(self._doms) if domids is None else {int(d) for d in domids}
            windows = {st.domid: (0, st.npages) for st in doms if st.domid in want}
        else:
            windows = {int(d): (max(0, int(lo)), min(self._doms[int(d)].npages, int(hi)))
                       for d, (lo, hi) in windows.items() if int(d) in self._doms}
        if new_scan:
            self._fknown[:] = False     # a new full scan re-hashes shared frames
        t1 = time.perf_counter()

        # shared frames: one entry per frame (first gfn mapping it), refs
        sh = [(st, np.nonzero(st.typ == RAM_SHARED)[0]) for st in doms]
        sh_d = np.concatenate([np.full(len(g), st.domid, np.int64) for st, g in sh] + [_I64])
        sh_g = np.concatenate([g for _, g in sh] + [_I64]).astype(np.int64)
        sh_m = np.concatenate([st.mfn[g] for st, g in sh] + [_I64])
        frames, first, refs = np.unique(sh_m, return_index=True, return_counts=True)
        known = np.zeros_like(self._fknown)
        known[frames] = self._fknown[frames]        # forget frames no longer shared
        self._fknown = known
        new = frames[~known[frames]]
        if len(new):
            self._fsum[new], _ = checksums(self._words, self._frames, new)
            self._fknown[new] = True
        # a shared gfn's checksum is its frame's: a later CoW write shows as a change
        for st, g in sh:
            st.sums[g] = self._fsum[st.mfn[g]]
            st.have[g] = True

        # candidates: private gfns in the windows
        cd, cg, cm = [], [], []
        for domid, (lo, hi) in windows.items():
            st = self._doms[domid]
            g = np.nonzero(st.typ[lo:hi] == RAM_RW)[0].astype(np.int64) + lo
            cd.append(np.full(len(g), domid, np.int64))
            cg.append(g)
            cm.append(st.mfn[g])
        cd = np.concatenate(cd + [_I64])
        cg = np.concatenate(cg + [_I64])
        cm = np.concatenate(cm + [_I64])
        sums, zero = checksums(self._words, self._frames, cm)
        volatile = np.zeros(len(cg), dtype=bool)
        for domid in windows:
            st = self._doms[domid]
            sel = cd == domid
            g = cg[sel]
            if self.skip_volatile:
                volatile[sel] = st.have[g] & (st.sums[g] != sums[sel])
            st.sums[g] = sums[sel]
            st.have[g] = True
        t2 = time.perf_counter()

        # partners (watch windows): earlier unmatched pages with a matching checksum
        pd, pg, pm, psum = self._partners(windows, np.unique(sums[~volatile])) if not full \
            else (_I64, _I64, _I64, _U64)

        # entries: shared frames first in each group, then candidates
        keep_c = ~volatile
        e_d = np.concatenate([sh_d[first], cd[keep_c], pd])
        e_g = np.concatenate([sh_g[first], cg[keep_c], pg])
        e_key = np.concatenate([self._fsum[frames], sums[keep_c], psum])
        e_kind = np.concatenate([np.full(len(frames), _SHARED_FRAME, np.int8),
                                 np.full(int(keep_c.sum()) + len(pg), _CANDIDATE, np.int8)])
        e_refs = np.concatenate([refs, np.ones(int(keep_c.sum()) + len(pg), np.int64)])
        e_win = np.concatenate([np.zeros(len(frames), bool), np.ones(int(keep_c.sum()), bool),
                                np.zeros(len(pg), bool)])
        order = np.lexsort((-e_refs, e_kind, e_key))
        e_d, e_g, e_key, e_kind, e_win = (a[order] for a in (e_d, e_g, e_key, e_kind, e_win))
        n = len(e_key)
        starts = np.ones(n, dtype=bool)
        starts[1:] = e_key[1:] != e_key[:-1]
        gid = np.cumsum(starts) - 1
        size = np.bincount(gid, minlength=0) if n else _I64
        n_win = np.bincount(gid, weights=e_win) if n else _U64
        n_shared = np.bincount(gid, weights=e_kind == _SHARED_FRAME) if n else _U64
        keep_g = (size >= 2) & ((n_win > 0) | (n_shared >= 2))
        first_of = np.nonzero(starts)[0]            # the source of each group
        member = keep_g[gid] & ~starts
        src = first_of[gid[member]]
        unmatched_win = e_win & ~keep_g[gid]
        # status of this window's candidates, as of this scan
        self._set_status(e_d[unmatched_win], e_g[unmatched_win], UNSHARED)
        self._set_status(cd[volatile], cg[volatile], VOLATILE)

        batches = []
        md, mg, sd_, sg_, mgid = e_d[member], e_g[member], e_d[src], e_g[src], gid[member]
        for s in range(0, len(mg), self.round_pages):
            e = s + self.round_pages
            batches.append(Batch(sd_[s:e], sg_[s:e], md[s:e], mg[s:e], mgid[s:e]))
        t3 = time.perf_counter()
        return Plan(batches, full, scanned=len(cg), zero=int(zero.sum()),
                    volatile=int(volatile.sum()), unmatched=int(unmatched_win.sum()),
                    started=t0, nr_saved_before=saved_before,
                    phase_seconds={"snapshot": t1 - t0, "hash": t2 - t1, "group": t3 - t2},
                    steps_before=steps_before)

    def _partners(self, windows, keys):
        """Private pages outside the windows, unmatched at their last scan,
        whose remembered checksum is one of ``keys``; re-hashed now, and
        kept only if they still have it."""
        out_d, out_g, out_m = [], [], []
        for st in self._doms.values():
            lo, hi = windows.get(st.domid, (0, 0))
            cand = (st.typ == RAM_RW) & (st.status == UNSHARED) & st.have
            cand[lo:hi] = False
            g = np.nonzero(cand)[0]
            g = g[np.isin(st.sums[g], keys)]
            out_d.append(np.full(len(g), st.domid, np.int64))
            out_g.append(g.astype(np.int64))
            out_m.append(st.mfn[g])
        d = np.concatenate(out_d + [_I64])
        g = np.concatenate(out_g + [_I64])
        m = np.concatenate(out_m + [_I64])
        now, _ = checksums(self._words, self._frames, m)
        same = now == self._lookup_sums(d, g)
        return d[same], g[same], m[same], now[same]

    def _lookup_sums(self, d: np.ndarray, g: np.ndarray) -> np.ndarray:
        out = np.zeros(len(g), dtype=np.uint64)
        for domid in np.unique(d).tolist():
            sel = d == domid
            out[sel] = self._doms[domid].sums[g[sel]]
        return out

    def _set_status(self, d: np.ndarray, g: np.ndarray, status: int) -> None:
        if len(d) == 0:
            return
        for domid in np.unique(d).tolist():
            st = self._doms.get(domid)
            if st is not None:
                st.status[g[d == domid]] = status

    # -- phase 5: merge ---------------------------------------------------
    def execute(self, plan: Plan, stop: threading.Event | None = None) -> PassResult:
        """Nominate, verify and share every round of ``plan``; once ``stop``
        (if given) is set, the rounds left wait for a later pass."""
        t0 = time.perf_counter()
        be = self.backend
        requests0, be.max_request_s = be.requests, 0.0
        totals = np.zeros(4, dtype=np.int64)    # merged, skipped, mismatched, unmatched
        rounds = 0
        # Round r's pairs are shared once round r + 1 is nominated: the
        # hypervisor shares them while the scanner compares round r + 1's
        # bytes (its compare is the share's idle work).
        verified = None
        for batch in plan.batches:
            if stop is not None and stop.is_set():
                break
            rounds += 1
            rnd = self._nominate(batch)
            if verified is not None:
                totals += self._share(verified, idle=rnd.compare.step)
            verified = self._verify(rnd)
        if verified is not None:
            totals += self._share(verified)
        merged, skipped, mismatched, unmatched = totals.tolist()
        t1 = time.perf_counter()
        saved = int(self.backend.nr_saved_mfns())
        c = self.counters
        c["passes"] += 1
        full = plan.full and rounds == len(plan.batches)
        c["full_scans"] += int(full)
        c["pages_scanned"] += plan.scanned
        c["pages_merged"] += merged
        c["pages_skipped"] += skipped
        self._gauges()
        steps = getattr(self.backend, "steps", None)
        hv_steps, pause_ms = None, None
        if callable(steps) and plan.steps_before is not None:
            after = steps()
            hv_steps, pause_ms = step_delta(plan.steps_before, after), after["max_pause_ms"]
        elif callable(getattr(self.backend, "max_pause_ms", None)):
            pause_ms = self.backend.max_pause_ms()
        return PassResult(
            scanned=plan.scanned, zero=plan.zero, merged=merged, volatile=plan.volatile,
            skipped=skipped, mismatched=mismatched, unmatched=plan.unmatched + unmatched,
            batches=rounds, requests=be.requests - requests0,
            max_request_ms=round(be.max_request_s * 1e3, 3),
            seconds=time.perf_counter() - plan.started, nr_saved_mfns=saved,
            saved_delta=saved - plan.nr_saved_before, full_scan=full,
            phase_seconds={**plan.phase_seconds, "merge": t1 - t0},
            counters=dict(c), max_pause_ms=pause_ms, hv_steps=hv_steps)

    def scan_pass(self, domids: Iterable[int] | None = None) -> PassResult:
        """One full pass over ``domids`` (default: every running domain)."""
        return self.execute(self.plan(domids))

    def _nominate(self, b: Batch) -> "_Round":
        """Nominate every distinct page of round ``b`` and re-read where
        each page is; the round's byte compare is set up, not run."""
        k = len(b)
        # a. nominate every distinct page of the round: per domain, at most
        #    NOMINATE_FACTOR * batch_pages gfns per request
        nstep = NOMINATE_FACTOR * self.batch_pages
        all_d = np.concatenate([b.sd, b.cd])
        all_g = np.concatenate([b.sg, b.cg])
        pages, inv = np.unique(all_d << 40 | all_g, return_inverse=True)
        p_d, p_g = pages >> 40, pages & ((1 << 40) - 1)
        handle = np.zeros(len(pages), dtype=np.uint64)
        code = np.zeros(len(pages), dtype=np.int64)
        typ = np.zeros(len(pages), dtype=np.uint8)
        mfn = np.zeros(len(pages), dtype=np.int64)
        for domid in np.unique(p_d).tolist():
            sel = np.nonzero(p_d == domid)[0]
            handle[sel], code[sel] = self.backend.nominate_many(domid, p_g[sel], nstep)
        if self.after_nominate:
            self.after_nominate(b)
        # b. where each page is now; a page not ram_shared lost its handle
        for domid in np.unique(p_d).tolist():
            sel = np.nonzero(p_d == domid)[0]
            st = self._doms.get(domid)
            if st is None:
                code[sel] = ESRCH
                continue
            typ[sel], mfn[sel] = snapshot(st.view, p_g[sel])
        good = (code == 0) & (typ == RAM_SHARED)
        s_i, c_i = inv[:k], inv[k:]
        valid = good[s_i] & good[c_i]
        s_m, c_m = mfn[s_i], mfn[c_i]
        # c. verify, on the frames, after nominate (see _Compare)
        cmp = valid & (s_m != c_m)
        return _Round(b, p_d, p_g, handle, code, typ, s_i, c_i, s_m, c_m, ~valid, cmp,
                      _Compare(self._frames, c_m, s_m, np.nonzero(cmp)[0]))

    def _verify(self, r: "_Round") -> "_Round":
        """Finish the round's compare, regroup the members that differ, and
        order the verified pairs for sharing."""
        eq = r.compare.result()
        bad = r.cmp & ~eq
        # a shared source that failed its compare: forget its cached hash
        self._fknown[r.s_m[bad]] = False
        extra_s, extra_c, r.lonely = self._regroup(np.nonzero(bad)[0], r.c_i, r.c_m, r.b.group)
        ps = np.concatenate([r.s_i[eq], extra_s])
        pc = np.concatenate([r.c_i[eq], extra_c])
        # d. share the verified pairs, at most batch_pages per request, the
        #    members of one source together: the hypervisor's cost of a
        #    share is mostly per frame touched, so a request naming each
        #    source frame once is cheaper than one grouped by domains
        order = np.lexsort((ps, r.p_d[pc]))
        r.ps, r.pc, r.mismatched = ps[order], pc[order], int(bad.sum())
        return r

    def _share(self, r: "_Round", idle: Callable[[], bool] | None = None) -> list[int]:
        """Share a verified round's pairs: (merged, skipped, mismatched,
        unmatched). ``idle``: the next round's compare, run while the
        hypervisor works (:meth:`Backend.share_many`)."""
        ps, pc, p_d, p_g, handle = r.ps, r.pc, r.p_d, r.p_g, r.handle
        merged = failed = 0
        written = (r.code == 0) & (r.typ != RAM_SHARED)     # CoW-faulted since nominate
        if len(ps):
            if self.before_share:
                self.before_share(r.b)
            # one call per client domain: its requests name few domains
            codes = np.empty(len(ps), dtype=np.int64)
            cut = np.flatnonzero(np.diff(p_d[pc])) + 1
            for lo, hi in zip([0, *cut.tolist()], [*cut.tolist(), len(ps)]):
                s_, c_ = ps[lo:hi], pc[lo:hi]
                codes[lo:hi] = self.backend.share_many(p_d[s_], p_g[s_], handle[s_], p_d[c_],
                                                       p_g[c_], handle[c_], self.batch_pages, idle=idle)
            merged = int((codes == 0).sum())
            failed = len(codes) - merged
            # the side whose handle went stale was written
            written[ps[codes == S_HANDLE_INVALID]] = True
            written[pc[codes == C_HANDLE_INVALID]] = True
        self._set_status(p_d[written], p_g[written], VOLATILE)
        return [merged, int(r.skipped.sum()) + failed, r.mismatched, r.lonely]

    def _regroup(self, bad: np.ndarray, c_i: np.ndarray, c_m: np.ndarray,
                 group: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Members that differ from their source, grouped by exact bytes
        (within their hash group): pairs (source page, client page) of the
        batch's page table, and how many found no twin. Rare (a collision or
        a write between hashing and nominate), so a sort of whole pages is
        affordable."""
        if len(bad) == 0:
            return _I64, _I64, 0
        rows = np.ascontiguousarray(self._words[c_m[bad]]).view(np.dtype((np.void, PAGE_SIZE)))
        _, content = np.unique(rows.ravel(), return_inverse=True)
        key = group[bad].astype(np.int64) * (int(content.max()) + 1) + content.ravel()
        order = np.argsort(key, kind="stable")
        key_s = key[order]
        starts = np.ones(len(order), dtype=bool)
        starts[1:] = key_s[1:] != key_s[:-1]
        head = order[np.nonzero(starts)[0][np.cumsum(starts) - 1]]
        twin = ~starts
        sizes = np.bincount(np.cumsum(starts) - 1)
        return c_i[bad[head[twin]]], c_i[bad[order[twin]]], int((sizes == 1).sum())

    def _gauges(self) -> None:
        """KSM-like gauges from a fresh snapshot of every running domain."""
        ms, unshared, volatile = [], 0, 0
        for st in self._doms.values():
            typ, mfn = snapshot(st.view)
            ms.append(mfn[typ == RAM_SHARED])
            rw = typ == RAM_RW
            unshared += int((rw & (st.status == UNSHARED)).sum())
            volatile += int((rw & (st.status == VOLATILE)).sum())
        allm = np.concatenate(ms + [_I64])
        frames = len(np.unique(allm))
        self.counters.update(pages_shared=frames, pages_sharing=len(allm) - frames,
                             pages_unshared=unshared, pages_volatile=volatile)

    # -- clean-up ---------------------------------------------------------

    def close(self) -> None:
        """Unmap the pool and every p2m; release the backend's own
        resources for batch requests (``release()``, if it has one)."""
        release = getattr(self.backend, "release", None)
        if callable(release):
            release()
        for st in self._doms.values():
            st.view.close()
        self._doms.clear()
        self._words = None
        if self._frames is not None:
            self._frames.release()
            self._frames = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass
            self._mm = None

    def __enter__(self) -> "Scanner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_I64 = np.empty(0, dtype=np.int64)
_U64 = np.empty(0, dtype=np.uint64)
