"""Sharing statistics: what the shared frames save, and where the sharing lies.

Xen reports two counters (``nr_shared_mfns``, ``nr_saved_mfns``) and each
domain's ``shr_pages``; ``xl info`` prints the first two in MiB as
``sharing_used_memory`` and ``sharing_freed_memory``
(:func:`memory_counters`). The *sharing report* (:class:`SharingScan`)
says more, from the frame table and every p2m:

- the frames saved, split into zero pages and other pages (a shared frame
  whose 4096 bytes are all zero);
- the sharing degree: how many shared frames have 1, 2, 3-4, 5-8, ...
  references (log2 buckets), and the largest;
- how much lies within one domain and how much across domains, as Barker
  et al. (USENIX ATC 2012) split it: a frame referenced ``n_d`` times by
  each of ``D`` domains saves ``sum(n_d) - 1`` frames, of which
  ``sum(n_d - 1)`` each domain would save alone (*intra*) and ``D - 1``
  only sharing across domains saves (*inter*). Frames are also counted by
  kind: all references in one domain, or in several;
- per domain: its shared gfns, the frames saved attributed to it (each
  reference to a frame of degree ``k`` carries ``(k - 1) / k``: the
  domains' shares add up to the total).

The report is a scan, not one step: the frame table and the p2ms grow
with the host, so it is done in chunks (a job in the hypervisor process,
between guest faults and other requests; :class:`SharingScan` lists its
phases). The zero test reads the bytes of shared frames only, which
cannot change while they stay shared. When nothing changes while it runs
the report is exact; a frame whose reference count moved between the walk
of the p2ms and the walk of the frame table is counted as ``unsettled``
(its savings are not split into intra and inter), and frames shared or
unshared meanwhile may be missed or counted.
"""
from __future__ import annotations

import mmap
import time

import numpy as np

from .budget import MIN_CHUNK_ITEMS, ChunkCost
from .constants import DOMID_COW, PAGE_SIZE
from .p2m import RAM_SHARED

#: pages in a MiB (xl's divisor: ``(1 << 20) / pagesize``)
PAGES_PER_MIB = (1 << 20) // PAGE_SIZE
#: degree buckets: bucket 0 is degree 1, bucket b >= 1 is degrees
#: 2**(b-1)+1 .. 2**b (2, 3-4, 5-8, ...); 33 covers every int32 degree
DEGREE_BUCKETS = 33
#: items in the first chunk of each phase; later chunks follow the last
#: one's rate (:meth:`hvshare.hvcore.budget.ChunkCost.rate`)
FIRST_CHUNK = 256
#: in the last phase, the weight of a shared frame whose first and last
#: words are zero (it is then read whole) against one that is not
ZERO_WEIGHT = 8
_WORDS = PAGE_SIZE // 8
#: the phases, in order: each is a pass over its own kind of item
PHASES = ("clear", "walk", "refs", "find", "frames")


def memory_counters(hv) -> dict:
    """``xl info``'s two sharing lines: ``sharing_freed_memory`` (frames
    sharing saves, ``nr_saved_mfns``) and ``sharing_used_memory`` (shared
    frames, ``nr_shared_mfns``), in whole MiB as xl prints them."""
    return {"sharing_freed_memory": hv.nr_saved_mfns // PAGES_PER_MIB,
            "sharing_used_memory": hv.nr_shared_mfns // PAGES_PER_MIB}


def degree_buckets(k: np.ndarray) -> np.ndarray:
    """The log2 bucket of each degree ``k >= 1`` (see DEGREE_BUCKETS):
    the bit length of ``k - 1``, exact for every int32."""
    return np.frexp(np.asarray(k, dtype=np.float64) - 1)[1].astype(np.int64)


def bucket_range(b: int) -> tuple[int, int]:
    """The degrees of bucket ``b``: (lowest, highest)."""
    return (1, 1) if b == 0 else ((1 << (b - 1)) + 1, 1 << b)


def maybe_zero(words: np.ndarray, mfns: np.ndarray) -> np.ndarray:
    """Frames whose first and last words are zero: the only ones
    :func:`zero_frames` reads whole."""
    return (words[mfns, 0] == 0) & (words[mfns, _WORDS - 1] == 0)


def zero_frames(words: np.ndarray, mfns: np.ndarray) -> np.ndarray:
    """Which of frames ``mfns`` hold only zero bytes (``words``: the pool
    as ``(nframes, 512)`` uint64)."""
    zero = maybe_zero(words, mfns)
    cand = np.flatnonzero(zero)
    if len(cand):
        zero[cand] = ~words[mfns[cand]].any(axis=1)
    return zero


def _scratch(n: int, dtype) -> np.ndarray:
    """``n`` items of fresh memory in small pages, first touched by the
    phase ``clear`` a chunk at a time: a transparent huge page would be
    zeroed whole (2 MiB) by the first write to it, inside one chunk."""
    nbytes = max(1, n * np.dtype(dtype).itemsize)
    mm = mmap.mmap(-1, nbytes)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        mm.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(mm, dtype=dtype, count=n)


class _Scratch:
    """The per-frame scratch of a sharing report: references, distinct
    domains and the last domain seen on each frame. One set is kept with
    the core between reports (:func:`reserve_scratch`); a report that
    finds it in use makes its own."""

    def __init__(self, n: int):
        self.refs = _scratch(n, np.int32)
        self.ndoms = _scratch(n, np.int16)
        self.last = _scratch(n, np.int16)
        self.busy = False


def reserve_scratch(hv) -> None:
    """Make and back (write) the scratch the core's sharing reports share,
    now rather than in their steps: what a hypervisor backed at start does."""
    s = _Scratch(hv.pool.nframes)
    for a in (s.refs, s.ndoms, s.last):
        a[:] = 0
    hv.report_scratch = s


def _parts_slice(parts: list, ends: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Items ``[lo, hi)`` of the arrays ``parts`` laid end to end (``ends``:
    their cumulative lengths), copying only those items."""
    first = int(np.searchsorted(ends, lo, side="right"))
    out, start = [], int(ends[first - 1]) if first else 0
    for j in range(first, len(parts)):
        if start >= hi:
            break
        a = parts[j]
        out.append(a[max(lo - start, 0):hi - start])
        start += len(a)
    return out[0] if len(out) == 1 else np.concatenate(out + [np.zeros(0, np.int64)])


class SharingScan:
    """One sharing report of hypervisor core ``hv``, computed in chunks by
    :meth:`step` (or at once by :meth:`run`); :meth:`report` is the answer.

    Phases (:data:`PHASES`), each a pass over items of one kind, so that
    items of a phase cost about the same and a chunk sized by the last
    one's rate stays near its time:

    - ``clear``: the per-frame scratch, frame by frame (its pages are first
      touched here, a chunk at a time);
    - ``walk``: every domain's p2m, gfn by gfn: the frames of its shared
      gfns are collected;
    - ``refs``: those references, domain by domain in domid order:
      references and distinct domains per frame, each domain's savings;
    - ``find``: the frame table, frame by frame: the shared frames are
      collected;
    - ``frames``: those frames (a likely zero one weighs ZERO_WEIGHT):
      degree, zero test, the intra/inter split.
    """

    def __init__(self, hv, first_chunk: int = FIRST_CHUNK):
        """``first_chunk``: items in the first chunk of each phase."""
        self.hv = hv
        self.first_chunk = first_chunk
        n = hv.pool.nframes
        kept = getattr(hv, "report_scratch", None)
        if kept is None or kept.busy:
            kept = _Scratch(n)
        kept.busy = True
        self._scratch = kept
        self.refs = kept.refs       # references seen on each frame
        self.ndoms = kept.ndoms     # distinct domains seen on it
        self.last = kept.last       # 1 + index of the last of them
        self.words = hv.pool.data.view(np.uint64)
        self.domains = sorted(hv.domains)
        self.offsets = np.cumsum([0] + [hv.domains[x].npages for x in self.domains])
        self.walked: list[tuple[int, np.ndarray]] = []   # (domain index, mfns)
        #: the phase's items as parts laid end to end (refs: (mfns, domain
        #: indices); frames: the shared frames found) and their ends
        self.parts: list = []
        self.ends = np.zeros(0, np.int64)
        self.found: list = []
        self.phase, self.cursor = 0, 0
        self.total = n
        self.cost = ChunkCost.rate(first_chunk)
        self.started = time.monotonic()
        self.steps = 0
        self.saved_by = np.zeros(len(self.domains))     # savings attributed per domain
        self.hist = np.zeros(DEGREE_BUCKETS, dtype=np.int64)
        self.max_degree = 0
        self.t = dict(frames=0, gfns=0, zero_frames=0, zero_saved=0, intra_frames=0,
                      inter_frames=0, intra_saved=0, inter_saved=0, unsettled_frames=0,
                      unsettled_saved=0)

    @property
    def done(self) -> bool:
        return self.phase == len(PHASES)

    def release(self) -> None:
        """The scan is over (done or dropped): its scratch may serve the next."""
        self._scratch.busy = False

    def describe(self) -> str:
        """Where the scan stands, for a sentence."""
        if self.done:
            return "done"
        return f"phase {PHASES[self.phase]}, {self.cursor:,} of {self.total:,} items"

    # -- driving ------------------------------------------------------------
    def run(self) -> dict:
        """The whole scan at once; the report."""
        while not self.done:
            self._chunk(self.total - self.cursor)
        return self.report()

    def step(self, should_yield, chunk_seconds: float) -> bool:
        """Chunks, each sized to take about ``chunk_seconds``, until
        ``should_yield()`` or the end; True once done. The first chunk
        always runs, so every step progresses."""
        self.steps += 1
        clock = time.perf_counter
        while not self.done:
            t0 = clock()
            k = max(MIN_CHUNK_ITEMS, self.cost.items(chunk_seconds, chunk_seconds))
            phase = self.phase
            did = self._chunk(min(k, self.total - self.cursor))
            if self.phase == phase:
                self.cost.learn(did, clock() - t0)
            if not self.done and should_yield():
                return False
        return True

    def _chunk(self, k: int) -> int:
        """Items ``[cursor, cursor + k)`` of the current phase (fewer in
        ``frames``, where a likely zero frame weighs more); the weight
        done. The last chunk of a phase starts the next."""
        lo = self.cursor
        name = PHASES[self.phase]
        if name == "frames":
            hi, did = self._frames(lo, k)
        else:
            hi, did = lo + k, k
            getattr(self, "_" + name)(lo, hi)
        self.cursor = hi
        while not self.done and self.cursor >= self.total:
            self._next_phase()
        return max(did, 1)

    def _next_phase(self) -> None:
        self.phase += 1
        self.cursor = 0
        self.cost = ChunkCost.rate(self.first_chunk)
        name = PHASES[self.phase] if not self.done else None
        if name is None:
            self.release()
        if name == "walk":
            self.total = int(self.offsets[-1])
        elif name == "refs":
            # kept as the walk left them: one large concatenation would be a
            # long step of its own (its fresh pages)
            self._set_parts([m for _, m in self.walked])
        elif name == "find":
            self.walked, self.parts = [], []
            self.found = []
            self.total = self.hv.pool.nframes
        elif name == "frames":
            self._set_parts(self.found)
            self.found = []

    def _set_parts(self, parts: list) -> None:
        self.parts = parts
        self.ends = np.cumsum([len(p) for p in parts], dtype=np.int64)
        self.total = int(self.ends[-1]) if len(parts) else 0

    # -- phases ---------------------------------------------------------------
    def _clear(self, lo: int, hi: int) -> None:
        self.refs[lo:hi] = 0
        self.ndoms[lo:hi] = 0
        self.last[lo:hi] = 0

    def _walk(self, lo: int, hi: int) -> None:
        """gfns ``[lo, hi)`` of the domains' gfns laid end to end."""
        off = self.offsets
        first = int(np.searchsorted(off, lo, side="right")) - 1
        for i in range(first, len(self.domains)):
            a, b = max(lo, int(off[i])), min(hi, int(off[i + 1]))
            if a >= b:
                break
            d = self.hv.domains.get(self.domains[i])
            if d is None:               # destroyed since the scan began
                continue
            g0 = a - int(off[i])
            gfns = np.flatnonzero(d.p2m.type[g0:g0 + b - a] == RAM_SHARED) + g0
            if len(gfns):
                self.walked.append((i, d.p2m.mfn[gfns]))

    def _refs(self, lo: int, hi: int) -> None:
        """References ``[lo, hi)``: domain index ``ref_i`` has a gfn on
        frame ``ref_m``, domains one after another in domid order (so one
        ``last`` per frame tells a new domain from one already counted)."""
        m = _parts_slice(self.parts, self.ends, lo, hi)
        first = int(np.searchsorted(self.ends, lo, side="right"))
        last = int(np.searchsorted(self.ends, hi - 1, side="right"))
        i = np.repeat(np.array([w for w, _ in self.walked[first:last + 1]], np.int64),
                      np.diff(np.clip(np.concatenate(([0], self.ends))[first:last + 2], lo, hi)))
        np.add.at(self.refs, m, 1)
        tag = i + 1
        new = self.last[m] != tag
        if new.any():
            key = np.unique(m[new] * (1 << 16) + tag[new])     # (frame, domain) pairs
            fm, ft = key >> 16, key & 0xFFFF
            np.add.at(self.ndoms, fm, 1)
            end = np.ones(len(fm), dtype=bool)                 # a frame's last domain
            end[:-1] = fm[1:] != fm[:-1]
            self.last[fm[end]] = ft[end]
        k = self.hv.pool.type_count[m]
        self.saved_by += np.bincount(i, weights=1.0 - 1.0 / np.maximum(k, 1),
                                     minlength=len(self.domains))

    def _find(self, lo: int, hi: int) -> None:
        sh = np.flatnonzero(self.hv.pool.owner[lo:hi] == DOMID_COW)
        if len(sh):
            self.found.append(sh + lo)

    def _frames(self, lo: int, k: int) -> tuple[int, int]:
        """Found frames from ``lo`` weighing at most ``k`` (at least one):
        (where the next chunk starts, the weight done)."""
        pool = self.hv.pool
        sh = _parts_slice(self.parts, self.ends, lo, min(lo + k, self.total))
        weight = np.cumsum(np.where(maybe_zero(self.words, sh), ZERO_WEIGHT, 1))
        n = max(1, int(np.searchsorted(weight, k, side="right")))
        sh = sh[:n]
        sh = sh[pool.owner[sh] == DOMID_COW]         # still shared
        if len(sh):
            self._count(sh, pool.type_count[sh])
        return lo + n, int(weight[n - 1])

    def _count(self, sh: np.ndarray, deg: np.ndarray) -> None:
        t = self.t
        saved = deg - 1
        t["frames"] += len(sh)
        t["gfns"] += int(deg.sum())
        zero = zero_frames(self.words, sh)
        t["zero_frames"] += int(zero.sum())
        t["zero_saved"] += int(saved[zero].sum())
        self.hist += np.bincount(degree_buckets(deg), minlength=DEGREE_BUCKETS)[:DEGREE_BUCKETS]
        self.max_degree = max(self.max_degree, int(deg.max()))
        settled = self.refs[sh] == deg
        nd = self.ndoms[sh].astype(np.int64)
        many = deg > 1
        t["intra_frames"] += int((settled & many & (nd == 1)).sum())
        t["inter_frames"] += int((settled & (nd > 1)).sum())
        t["intra_saved"] += int((deg - nd)[settled].sum())
        t["inter_saved"] += int((nd - 1)[settled].sum())
        t["unsettled_frames"] += int((~settled).sum())
        t["unsettled_saved"] += int(saved[~settled].sum())

    # -- the answer -------------------------------------------------------------
    def report(self) -> dict:
        """The report as JSON-able values (see the module and docs/counters.md)."""
        t, hv = self.t, self.hv
        saved = t["gfns"] - t["frames"]
        top = int(degree_buckets(np.array([self.max_degree]))[0]) if self.max_degree else -1
        hist = [{"min": bucket_range(b)[0], "max": bucket_range(b)[1], "frames": int(self.hist[b])}
                for b in range(top + 1)]
        domains = []
        for domid, att in zip(self.domains, self.saved_by.tolist()):
            d = hv.domains.get(domid)
            if d is None:
                continue
            domains.append({"domid": domid, "name": d.name, "shr_pages": d.shr_pages,
                            "saved": round(att, 3),
                            "saved_mib": round(att / PAGES_PER_MIB, 3),
                            "shared_mib": round(d.shr_pages / PAGES_PER_MIB, 3)})
        return {
            "shared_frames": t["frames"], "shared_gfns": t["gfns"], "saved_frames": saved,
            "saved_mib": round(saved / PAGES_PER_MIB, 3),
            "zero": {"frames": t["zero_frames"], "saved": t["zero_saved"]},
            "other": {"frames": t["frames"] - t["zero_frames"], "saved": saved - t["zero_saved"]},
            "degree": {"max": self.max_degree, "histogram": hist},
            "intra": {"frames": t["intra_frames"], "saved": t["intra_saved"]},
            "inter": {"frames": t["inter_frames"], "saved": t["inter_saved"]},
            "unsettled": {"frames": t["unsettled_frames"], "saved": t["unsettled_saved"]},
            "domains": domains,
            "nr_shared_mfns": hv.nr_shared_mfns, "nr_saved_mfns": hv.nr_saved_mfns,
            "steps": self.steps, "seconds": round(time.monotonic() - self.started, 6),
        }


def sharing_report(hv) -> dict:
    """The sharing report of ``hv`` computed at once (an in-process caller;
    the hypervisor process runs :class:`SharingScan` as a job)."""
    return SharingScan(hv).run()
