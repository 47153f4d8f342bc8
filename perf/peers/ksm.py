"""Linux KSM as a measured peer of hvshare: merges, CoW breaks, munmap.

KSM (``mm/ksm.c``) does the job hvshare emulates: a kernel thread, ksmd,
scans anonymous memory marked ``MADV_MERGEABLE``, merges identical pages
into write-protected KSM pages and breaks the sharing with a copy on the
first write.  This module drives the real thing so that hvshare's
benchmarks can put its numbers next to the kernel's, measured side by side
on the same machine in the same run.  The knobs it changes are borrowed
through :func:`hvshare.perf.peers.ksm_session.ksm_session`; the page contents come
from :mod:`hvshare.perf.peers.contents`.

Design:

* **Counters are global, so measure deltas in a quiet system.**  A merge
  takes a baseline of ``pages_shared``/``pages_sharing`` right before ksmd
  starts, after ksmd swept away the rmap items of regions this process
  already unmapped; other processes with mergeable memory are listed in
  :attr:`KsmRegion.foreign_pids` so a report can flag a noisy run.  ksmd is
  stopped (``run=0``) as soon as the merge is complete, so it neither burns
  a core nor re-merges pages while copy-on-write or munmap is timed.
* **Merge time** is the time from ``run=1`` until the counters last
  changed: polling stops early when the expected counts (computed from the
  page contents and ``max_page_sharing``) are reached, or when two full
  scans pass without a change.
* **Copy-on-write break** writes one byte per merged page, flipping the byte
  at offset ``i % 4096`` of page ``i``: the broken pages then differ from
  each other (up to 4096 pages) and a later rescan does not merge them again,
  so the counters really drop.  :meth:`KsmRegion.write_floor` times the same
  writes on pages that are already private: the cost of the timing itself.
* Everything that measures returns a dict; where KSM cannot be used the dict
  is ``{"skipped": "<one-line reason>"}`` instead of an exception.

``python -m hvshare.perf.peers.ksm`` prints the headline numbers; ``python -m hvshare.perf
ksm`` runs the same through the benchmark runner (:func:`run`/:func:`report`).
"""
from __future__ import annotations

import contextlib
import errno
import math
import mmap
import os
import statistics
import sys
import time
import traceback
from typing import Callable, Iterator, Sequence

import numpy as np

from hvshare.hvcore.constants import PAGE_SIZE

from ..common import latency_percentiles, log_histogram, standalone
from ..figure import Figures
from .contents import CONTENTS, duplicate_groups, duplicate_groups_of, expected_counts, page_content
from .ksm_session import (current_session, fast_scan_knobs, ksm_session, run_scans,
                          sweep_stale, track_region)
from .ksm_sysfs import (CounterPoller, KsmUnavailable, foreign_mergers, ksm_available, read_knob,
                        run_until_settled, write_knob)

_KPF_KSM = 1 << 21          # /proc/kpageflags bit of a KSM page
_PM_PRESENT = 1 << 63       # /proc/self/pagemap: page present
_PM_PFN_MASK = (1 << 55) - 1


# --------------------------------------------------------------------------
# a merged region

class KsmRegion:
    """A private anonymous mapping whose pages KSM merged.

    Keeps the mapping alive (``mm``, ``array`` is its ``(n_pages, 4096)``
    view) with what the merge measured: ``merge_seconds``, ``pages_shared``
    and ``pages_sharing`` (deltas of the global counters), the expected
    counts, ``complete`` (expected counts reached), ``foreign_pids``.
    ``close()`` unmaps and returns the munmap time.  Do not keep other
    references to ``array`` across ``close()``: an exported buffer makes the
    unmap fail (``BufferError``).
    """

    def __init__(self, n_pages: int, content: str, seed: int):
        self.n_pages, self.content, self.seed = n_pages, content, seed
        self.mm: mmap.mmap | None = mmap.mmap(
            -1, n_pages * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            prot=mmap.PROT_READ | mmap.PROT_WRITE)
        # KSM splits huge pages before merging; 4 KiB pages keep it comparable.
        self.mm.madvise(mmap.MADV_NOHUGEPAGE)
        self.array: np.ndarray | None = np.frombuffer(self.mm, dtype=np.uint8).reshape(n_pages, PAGE_SIZE)
        self.merge_seconds = math.nan
        self.madvise_seconds = math.nan
        self.pages_shared = self.pages_sharing = 0
        self.expected_shared = self.expected_sharing = 0
        self.max_page_sharing = 0
        self.complete = False
        self.full_scans = 0
        self.foreign_pids: list[int] = []
        self.munmap_seconds: float | None = None
        self._base = (0, 0)
        track_region(self)

    # -- counters

    def counters(self) -> dict[str, int]:
        """Current deltas of the global counters against the merge baseline
        (only as fresh as ksmd's last scan: see :meth:`rescan`)."""
        shared, sharing = int(read_knob("pages_shared")), int(read_knob("pages_sharing"))
        return {"pages_shared": shared - self._base[0], "pages_sharing": sharing - self._base[1]}

    def rescan(self, full_scans: int = 2, timeout: float = 30.0) -> dict[str, int]:
        """Let ksmd run ``full_scans`` full scans, then stop it, so the
        counters catch up with writes and unmaps since the merge.  Returns
        :meth:`counters`."""
        with current_session() as s:
            run_scans(s, full_scans, timeout)
        return self.counters()

    def ksm_mask(self) -> np.ndarray:
        """Per page: is it mapped to a KSM page right now?  Read from
        ``/proc/self/pagemap`` and ``/proc/kpageflags`` (root), so it is exact
        and immediate, unlike the counters."""
        self._check_open()
        base = self.array.ctypes.data
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            raw = os.pread(f.fileno(), self.n_pages * 8, base // PAGE_SIZE * 8)
        ent = np.frombuffer(raw, dtype=np.uint64)
        present = (ent & np.uint64(_PM_PRESENT)) != 0
        pfn = ent & np.uint64(_PM_PFN_MASK)
        mask = np.zeros(self.n_pages, dtype=bool)
        uniq, inv = np.unique(pfn, return_inverse=True)
        flags = np.zeros(len(uniq), dtype=np.uint64)
        with open("/proc/kpageflags", "rb", buffering=0) as f:
            for i, p in enumerate(uniq.tolist()):
                if p:
                    flags[i] = int.from_bytes(os.pread(f.fileno(), 8, p * 8), "little")
        mask[:] = ((flags[inv] & np.uint64(_KPF_KSM)) != 0) & present
        return mask

    # -- copy-on-write

    def _targets(self, pages) -> tuple[np.ndarray, np.ndarray]:
        self._check_open()
        idx = np.arange(self.n_pages) if pages is None else np.asarray(pages, dtype=np.int64).ravel()
        return idx, idx * PAGE_SIZE + (idx % PAGE_SIZE)

    def cow_break(self, pages: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Write one byte into each page (all pages by default) and time every
        write alone: ``int64`` latencies in ns, one per page, in order.

        Page ``i`` gets the byte at offset ``i % 4096`` inverted, so the
        content changes visibly and broken pages stay distinct.
        """
        idx, pos = self._targets(pages)
        values = (self.array.reshape(-1)[pos] ^ 0xFF).tolist()
        return self._timed_writes(pos.tolist(), values)

    def write_floor(self, pages: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """The same timed one-byte writes, rewriting the current value: on
        pages already private this is the cost of the timing loop itself."""
        idx, pos = self._targets(pages)
        return self._timed_writes(pos.tolist(), self.array.reshape(-1)[pos].tolist())

    def _timed_writes(self, pos: list[int], values: list[int]) -> np.ndarray:
        lat = [0] * len(pos)
        clock = time.perf_counter_ns
        with memoryview(self.mm) as mv:
            for j, (p, v) in enumerate(zip(pos, values)):
                t0 = clock()
                mv[p] = v
                lat[j] = clock() - t0
        return np.array(lat, dtype=np.int64)

    def cow_break_batched(self, pages: Sequence[int] | np.ndarray | None = None) -> float:
        """Break all pages (all by default) with one vectorised numpy write
        (same bytes as :meth:`cow_break`); returns pages per second."""
        idx, pos = self._targets(pages)
        flat = self.array.reshape(-1)
        values = flat[pos] ^ 0xFF
        t0 = time.perf_counter()
        flat[pos] = values
        dt = time.perf_counter() - t0
        return len(idx) / dt if dt > 0 else math.inf

    # -- teardown

    def close(self) -> float:
        """Unmap the region; returns the munmap time in seconds (the first
        close's time again on later calls)."""
        if self.mm is not None:
            self.array = None
            mm, self.mm = self.mm, None
            t0 = time.perf_counter()
            mm.close()
            self.munmap_seconds = time.perf_counter() - t0
        return self.munmap_seconds or 0.0

    def _check_open(self) -> None:
        if self.mm is None:
            raise ValueError("KsmRegion is closed")

    def __enter__(self) -> "KsmRegion":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def summary(self) -> dict:
        """The merge measurements as a JSON-able dict."""
        return {
            "n_pages": self.n_pages, "content": self.content, "seed": self.seed,
            "merge_seconds": self.merge_seconds, "madvise_seconds": self.madvise_seconds,
            "pages_shared": self.pages_shared, "pages_sharing": self.pages_sharing,
            "expected_shared": self.expected_shared, "expected_sharing": self.expected_sharing,
            "max_page_sharing": self.max_page_sharing, "complete": self.complete,
            "full_scans": self.full_scans, "foreign_pids": self.foreign_pids,
        }


def merge(n_pages: int, content: str = "identical", seed: int = 0, *,
          pages_to_scan: int = 20000, timeout: float | None = None,
          settle_scans: int = 2, poll_seconds: float = 0.0005) -> KsmRegion:
    """Fill a new region with ``content``, let KSM merge it, return it.

    Runs in the current :func:`ksm_session` (or a private one for the call),
    with ``use_zero_pages=0`` (zero pages merge like any other),
    ``sleep_millisecs=0`` and ``pages_to_scan``; ksmd is stopped again once
    the expected counts are reached, or the counters stayed still for
    ``settle_scans`` full scans, or ``timeout`` s passed (``complete`` says
    which).  Raises :class:`KsmUnavailable` if KSM cannot be used.
    """
    if content not in CONTENTS:
        raise ValueError(f"content must be one of {CONTENTS}, not {content!r}")
    if timeout is None:
        timeout = 30.0 + n_pages * 1e-4
    with current_session() as s:
        s.set(run=0, **fast_scan_knobs(s, pages_to_scan))
        sweep_stale(s)
        region = KsmRegion(n_pages, content, seed)
        try:
            page_content(content, n_pages, seed, out=region.array)   # faults every page in
            mps = int(read_knob("max_page_sharing"))
            groups = [n_pages] if content != "clone" else duplicate_groups(region.array)
            region.expected_shared, region.expected_sharing = expected_counts(groups, mps)
            region.max_page_sharing = mps
            region.foreign_pids = foreign_mergers()
            _wait_merged([region], timeout, settle_scans, poll_seconds)
        except BaseException:
            region.close()
            raise
    return region


def _wait_merged(regions: list[KsmRegion], timeout: float, settle_scans: int,
                 poll_seconds: float) -> None:
    """Madvise every region, run ksmd until the counters reach what the
    first region expects or stop changing; the first region keeps what
    the merge measured."""
    lead = regions[0]
    poll = CounterPoller(["pages_shared", "pages_sharing", "full_scans"])
    try:
        lead._base = poll.read()[:2]
        t0 = time.perf_counter()
        for r in regions:
            r.mm.madvise(mmap.MADV_MERGEABLE)
        lead.madvise_seconds = time.perf_counter() - t0
        got = run_until_settled(poll, lambda: write_knob("run", 1), settle_scans, timeout,
                                want=(lead.expected_shared, lead.expected_sharing), poll_seconds=poll_seconds)
    finally:
        poll.close()
    lead.complete, lead.full_scans, lead.merge_seconds = got["complete"], got["full_scans"], got["seconds"]
    lead.pages_shared, lead.pages_sharing = got["counts"]



# --------------------------------------------------------------------------
# measurements (dicts; {"skipped": reason} where KSM cannot be used)

def _skip_reason(e: BaseException) -> str | None:
    if isinstance(e, KsmUnavailable):
        return str(e)
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"KSM read-only: {e.strerror or e}"
    return None


@contextlib.contextmanager
def _skippable(out: dict) -> Iterator[None]:
    """Turn 'KSM cannot be used' (found late: a busy lock, EPERM in a
    container) into ``out["skipped"]``; re-raise anything else."""
    try:
        yield
    except (KsmUnavailable, OSError) as e:
        reason = _skip_reason(e)
        if reason is None:
            raise
        what = {k: out[k] for k in ("n_pages", "content") if k in out}
        out.clear()
        out.update(what, skipped=reason)


def latency_stats(lat_ns: np.ndarray) -> dict[str, float]:
    """Percentiles (``CDF_PERCENTILES``: p50, p99 and more) and mean of latencies in ns."""
    return latency_percentiles(lat_ns, "ns")


def _memory_short(pages: int, margin: float) -> str | None:
    """Why ``pages`` pages (times ``margin``) do not fit in the memory
    available now, or None."""
    import psutil
    need, avail = pages * PAGE_SIZE, psutil.virtual_memory().available
    if need * margin > avail:
        return f"not enough memory: {need >> 20} MiB needed, {avail >> 20} MiB available"
    return None


def _fresh_merges(n_pages: int, content: str, seed: int, repeats: int) -> Iterator[KsmRegion]:
    """``repeats`` regions merged afresh, one after the other (each is
    unmapped before the next is made)."""
    for _ in range(repeats):
        with merge(n_pages, content, seed) as region:
            yield region


def measure_merge(n_pages: int = 50_000, content: str = "identical", seed: int = 0, repeats: int = 1) -> dict:
    """Merge ``n_pages`` of ``content`` ``repeats`` times (fresh regions).

    Returns the last region's :meth:`KsmRegion.summary` with
    ``merge_seconds`` replaced by the median, plus ``merge_seconds_all``,
    ``pages_per_second`` (pages merged per second of ksmd time) and
    ``sharing_ratio`` (``pages_sharing / pages_shared``).
    """
    out: dict = {"n_pages": n_pages, "content": content}
    with _skippable(out), ksm_session():
        times = []
        for region in _fresh_merges(n_pages, content, seed, repeats):
            times.append(region.merge_seconds)
            out.update(region.summary())
        out["merge_seconds_all"] = times
        out["merge_seconds"] = statistics.median(times)
        merged = out["pages_shared"] + out["pages_sharing"]
        out["pages_per_second"] = merged / out["merge_seconds"] if out["merge_seconds"] > 0 else math.inf
        out["sharing_ratio"] = out["pages_sharing"] / out["pages_shared"] if out["pages_shared"] else math.nan
    return out


def measure_cow_break(n_pages: int = 50_000, content: str = "identical", seed: int = 0,
                      repeats: int = 1) -> dict:
    """Per-page CoW break latencies on ``repeats`` freshly merged regions.

    Only pages that really are KSM pages are written (``ksm_mask``).  Returns
    ``p50_ns``/``p99_ns``/``mean_ns`` of the timed writes of all repeats
    together, their ``histogram`` (every write, in us), ``p50_ns_all`` and
    ``p99_ns_all`` (each repeat's), ``floor_p50_ns`` (the same writes
    again, no fault: the timing overhead), ``pages`` written,
    ``still_ksm_after`` and the last merge's summary under ``merge``.
    """
    out: dict = {"n_pages": n_pages, "content": content}
    with _skippable(out), ksm_session():
        lats, floors, each = [], [], []
        for region in _fresh_merges(n_pages, content, seed, repeats):
            targets = np.flatnonzero(region.ksm_mask())
            lats.append(region.cow_break(targets))
            floors.append(region.write_floor(targets))
            each.append(latency_stats(lats[-1]))
            out["pages"] = int(len(targets))
            out["still_ksm_after"] = int(region.ksm_mask().sum())
            out["merge"] = region.summary()
        lat = np.concatenate(lats)
        out.update(latency_stats(lat))
        out["histogram"] = log_histogram(lat / 1e3, "us")
        for key in ("p50_ns", "p99_ns"):
            out[f"{key}_all"] = [e[key] for e in each]
        out["floor_p50_ns"] = latency_stats(np.concatenate(floors))["p50_ns"]
        out["repeats"] = repeats
    return out


def measure_cow_batched(n_pages: int = 50_000, content: str = "identical", seed: int = 0, repeats: int = 3) -> dict:
    """CoW break of all merged pages by one numpy write; median of
    ``repeats`` fresh merges.  Returns ``pages_per_second``,
    ``seconds`` (for ``pages`` pages) and ``pages_per_second_all``."""
    out: dict = {"n_pages": n_pages, "content": content}
    with _skippable(out), ksm_session():
        rates = []
        for region in _fresh_merges(n_pages, content, seed, repeats):
            targets = np.flatnonzero(region.ksm_mask())
            rates.append(region.cow_break_batched(targets))
            out["pages"] = int(len(targets))
        out["pages_per_second_all"] = rates
        out["pages_per_second"] = statistics.median(rates)
        out["seconds"] = out["pages"] / out["pages_per_second"]
    return out


def measure_munmap(n_pages: int = 100_000, seed: int = 0, repeats: int = 1) -> dict:
    """munmap of ``n_pages`` all merged into ONE KSM page (hvshare's
    teardown case), next to munmap of as many private pages.

    ``max_page_sharing`` is raised to ``n_pages`` for the session (which
    means unmerging every KSM page of the system first, and again when it
    is restored).  Returns ``seconds`` (median), ``baseline_seconds``
    (median munmap of unmerged private pages), ``ratio``, ``seconds_all``,
    the merge summary under ``merge``; skipped if memory is short.
    """
    if reason := ksm_available():
        return {"n_pages": n_pages, "skipped": reason}
    out: dict = {"n_pages": n_pages}
    if short := _memory_short(n_pages, 1.5):
        return dict(out, skipped=short)
    with _skippable(out), ksm_session(max_page_sharing=max(n_pages, 2)):
        base, merged = [], []
        for _ in range(repeats):
            plain = KsmRegion(n_pages, "identical", seed)
            page_content("identical", n_pages, seed, out=plain.array)
            base.append(plain.close())
            with merge(n_pages, "identical", seed) as region:
                out["merge"] = region.summary()
                out["single_ksm_page"] = region.pages_shared == 1 and region.pages_sharing == n_pages - 1
                merged.append(region.close())
        out["seconds_all"] = merged
        out["baseline_seconds_all"] = base
        out["seconds"] = statistics.median(merged)
        out["baseline_seconds"] = statistics.median(base)
        out["ratio"] = out["seconds"] / out["baseline_seconds"] if out["baseline_seconds"] > 0 else math.nan
    return out


# --------------------------------------------------------------------------
# several regions merged together (two clones' memories, side by side)

def merge_regions(sizes: Sequence[int], fill: Callable[[int, np.ndarray], None], *,
                  content: str = "custom", seed: int = 0, pages_to_scan: int = 20000,
                  timeout: float | None = None, settle_scans: int = 2,
                  poll_seconds: float = 0.0005) -> list[KsmRegion]:
    """Regions of ``sizes`` pages, region ``i`` filled by ``fill(i, array)``,
    all marked mergeable at once and merged by KSM at full speed, as
    :func:`merge` does for one region (same knobs, same stopping rules).

    The counters are global, so the merge's measurements (``merge_seconds``,
    ``pages_shared``/``pages_sharing``, the expected counts from the pages
    of all regions together, ``complete``...) are those of the first
    region; the others carry only their mapping. Close every region (that
    is the munmap) inside the current session.
    """
    if timeout is None:
        timeout = 30.0 + sum(sizes) * 1e-4
    with current_session() as s:
        s.set(run=0, **fast_scan_knobs(s, pages_to_scan))
        sweep_stale(s)
        regions: list[KsmRegion] = []
        try:
            for i, n in enumerate(sizes):
                regions.append(KsmRegion(n, content, seed))
                fill(i, regions[-1].array)                         # faults every page in
            lead = regions[0]
            lead.max_page_sharing = int(read_knob("max_page_sharing"))
            groups = duplicate_groups_of([r.array for r in regions])
            lead.expected_shared, lead.expected_sharing = expected_counts(groups, lead.max_page_sharing)
            lead.foreign_pids = foreign_mergers()
            _wait_merged(regions, timeout, settle_scans, poll_seconds)
        except BaseException:
            # the interrupted fill's frames still hold views of a region:
            # free them, or the unmap fails (BufferError) and hides the error
            traceback.clear_frames(sys.exc_info()[2])
            for r in regions:
                with contextlib.suppress(BufferError):
                    r.close()
            raise
    return regions


def measure_merge_regions(sizes: Sequence[int], fill: Callable[[int, np.ndarray], None],
                          repeats: int = 1, content: str = "custom", seed: int = 0,
                          progress: Callable[[str], None] | None = None) -> dict:
    """KSM merging regions of ``sizes`` pages filled by ``fill(i, array)``
    (:func:`merge_regions`), then the munmap of each region, first to last
    (the first while the others still map the KSM pages), ``repeats``
    times with fresh regions.

    Returns the last merge's summary (``n_pages``: all regions' pages) with
    medians and every repeat: ``merge_seconds`` (``_all``),
    ``pages_per_second`` (pages merged, ``pages_shared + pages_sharing``,
    per second of merge), ``munmap_seconds`` (``_all``: the first region's
    munmap) and ``munmap_rest_seconds`` (``_all``: the others', together);
    ``{"skipped": reason}`` where KSM cannot be used or memory is short.
    """
    total = int(sum(sizes))
    out: dict = {"n_pages": total, "content": content, "sizes": list(sizes)}
    if reason := ksm_available():
        return dict(out, skipped=reason)
    if short := _memory_short(total, 1.3):
        return dict(out, skipped=short)
    with _skippable(out), ksm_session():
        merges, rates, unmaps, rest = [], [], [], []
        for k in range(repeats):
            regions = merge_regions(sizes, fill, content=content, seed=seed)
            try:
                lead = regions[0]
                summary = lead.summary()
                summary["n_pages"] = total
                out.update(summary)
                merged = lead.pages_shared + lead.pages_sharing
                merges.append(lead.merge_seconds)
                rates.append(merged / lead.merge_seconds if lead.merge_seconds > 0 else math.inf)
                unmaps.append(lead.close())
                rest.append(sum(r.close() for r in regions[1:]))
            finally:
                for r in regions:
                    r.close()
            if progress is not None:
                progress(f"KSM merge {k + 1}/{repeats}: {total:,} pages in {merges[-1]:.2f} s "
                         f"({rates[-1]:,.0f} pages/s{'' if out['complete'] else ', INCOMPLETE'}), "
                         f"munmap {unmaps[-1] * 1e3:.1f} ms")
        out.update(merge_seconds=statistics.median(merges), merge_seconds_all=merges,
                   pages_per_second=statistics.median(rates), pages_per_second_all=rates,
                   munmap_seconds=statistics.median(unmaps), munmap_seconds_all=unmaps,
                   munmap_rest_seconds=statistics.median(rest), munmap_rest_seconds_all=rest,
                   repeats=repeats)
    return out


# --------------------------------------------------------------------------
# benchmark-runner protocol and CLI

def run(quick: bool = False, munmap_pages: int | None = None) -> dict:
    """The headline KSM numbers as a ``perf`` benchmark result."""
    n = 5_000 if quick else 50_000
    m = munmap_pages or (20_000 if quick else 100_000)
    res = {
        "merge": measure_merge(n, "identical", repeats=1 if quick else 3),
        "merge_clone": measure_merge(n, "clone", repeats=1),
        "cow_break": measure_cow_break(n),
        "cow_batched": measure_cow_batched(n, repeats=1 if quick else 3),
        "munmap": measure_munmap(m, repeats=1 if quick else 3),
    }
    skipped = next((r["skipped"] for r in res.values() if "skipped" in r), None)
    figs = Figures()
    for m in (res["merge"], res["merge_clone"]):
        if "skipped" not in m:
            figs.add("merge_seconds", m["merge_seconds_all"], "s", content=m["content"], pages=m["n_pages"])
    c, b, u = res["cow_break"], res["cow_batched"], res["munmap"]
    if "skipped" not in c:
        figs.add("cow_break_p50", [v / 1e3 for v in c["p50_ns_all"]], "us", pages=c["pages"])
    if "skipped" not in b:
        figs.add("cow_batched_rate", b["pages_per_second_all"], "pages/s", pages=b["pages"])
    if "skipped" not in u:
        figs.add("munmap_seconds", u["seconds_all"], "s", pages=u["n_pages"], merged="one KSM page")
        figs.add("munmap_seconds", u["baseline_seconds_all"], "s", pages=u["n_pages"], merged="none")
    out = {"results": res, "figures": figs.dicts()}
    if skipped:
        out["skipped"] = skipped
    return out


def report(result: dict) -> str:
    from ..common import table
    if "skipped" in result:
        return f"KSM: skipped: {result['skipped']}"
    r = result["results"]
    rows = []
    for key in ("merge", "merge_clone"):
        m = r[key]
        rows.append([f"merge {m['n_pages']:,} {m['content']} pages", f"{m['merge_seconds']:.3f} s",
                     f"shared {m['pages_shared']:,} sharing {m['pages_sharing']:,} "
                     f"(ratio {m['sharing_ratio']:.1f}, {m['pages_per_second']:,.0f} pages/s"
                     f"{'' if m['complete'] else ', INCOMPLETE'})"])
    c = r["cow_break"]
    rows.append([f"CoW break, {c['pages']:,} pages one by one",
                 f"p50 {c['p50_ns'] / 1e3:.2f} us", f"p99 {c['p99_ns'] / 1e3:.2f} us "
                 f"(timing floor {c['floor_p50_ns']:.0f} ns)"])
    b = r["cow_batched"]
    rows.append([f"CoW break, {b['pages']:,} pages in one numpy write",
                 f"{b['pages_per_second']:,.0f} pages/s", f"{b['seconds'] * 1e3:.1f} ms"])
    u = r["munmap"]
    if "skipped" in u:
        rows.append(["munmap", "skipped", u["skipped"]])
    else:
        rows.append([f"munmap {u['n_pages']:,} pages merged into "
                     f"{u['merge']['pages_shared']} KSM page(s)", f"{u['seconds'] * 1e3:.1f} ms",
                     f"private pages {u['baseline_seconds'] * 1e3:.1f} ms (x{u['ratio']:.2f}); "
                     f"merge took {u['merge']['merge_seconds']:.2f} s"])
    foreign = sorted({p for v in r.values() for p in (v.get("merge", v).get("foreign_pids") or [])})
    text = "Linux KSM\n" + table(["measure", "value", "detail"], rows)
    if foreign:
        text += f"\nnote: other processes had mergeable memory (pids {foreign}); counters may be noisy"
    return text


def main(argv: list[str] | None = None) -> int:
    return standalone(argv, "python -m hvshare.perf.peers.ksm", "Linux KSM measured as hvshare's peer.",
                      "small sizes, single repeats", run, report,
                      options=[(("--munmap-pages",), dict(type=int, default=None, metavar="N",
                               help="pages merged into one KSM page for the munmap measure "
                                    "(default 100,000)"))],
                      unavailable=ksm_available)


if __name__ == "__main__":
    sys.exit(main())
