"""Soak: ``python -m hvshare.perf soak [--quick] [--json PATH]``.

N writer guests (32; 8 with ``--quick``) write batches of pages for D
seconds (60; 10 with ``--quick``), each from its own thread through its
guest's pipe, while the dedup scanner runs pass after pass and, half-way,
a domain whose pages all share one frame is torn down by the kill
controller. Page contents depend only on (gfn, version) with a few
versions, so the scanner keeps merging pages the writers wrote alike
across guests, and the writers keep taking CoW faults on them.

The full soak also runs at real size: two clone domains of BIG_PAGES
(250,000) pages each sit beside the writers, so the scanner's passes and
the teardown work against 500,000 more entries. Their guests check, at
the end, that every page still reads what it read before the soak.

At the end every guest reads each of its pages from its own mapping and
compares it with what its writer last wrote there: a write that was
answered but did not land is a **lost write** (there must be none). Also
reported: faults per second, writes, dedup passes and merges, the teardown
(seconds, entries, its longest step) and the hypervisor's longest step over
the whole soak (``max_pause_ms``), and the audit.

Every thread of the hypervisor has a core to itself; the writers' and the
clone domains' guests and this process (writers, scanner, kill controller)
share the others (:class:`hvshare.perf.placement.Placement`, checked when
the writers stop and recorded in ``placements``).
"""
from __future__ import annotations

import struct
import threading
import time

import numpy as np

from hvshare.hvcore.constants import PAGE_SIZE

from . import load, placement
from .common import table
from .figure import Figures
from .placement import Placement, alone_and_rest

VERSIONS = 4                 # few versions: writers often write pages alike
BIG_PAGES = 250_000          # each of the two clone domains of the full soak
BATCH = 8                    # pages per write message


def _page(gfn: int, version: int) -> bytes:
    return struct.pack("<QQ", gfn, version) * (PAGE_SIZE // 16)


class _Writer(threading.Thread):
    """One guest's writer: random batches of distinct gfns, random versions;
    remembers the last version written to each gfn."""

    def __init__(self, hv, domid: int, pages: int, seed: int, stop: threading.Event):
        super().__init__(daemon=True, name=f"writer-{domid}")
        self.hv, self.domid, self.pages, self.stop = hv, domid, pages, stop
        self.rng = np.random.default_rng(seed)
        self.last = np.full(pages, -1, dtype=np.int64)      # -1: never written (image content)
        self.writes = self.pages_written = self.faults = 0
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            with self.hv.guest(self.domid) as g:
                while not self.stop.is_set():
                    gfns = self.rng.choice(self.pages, BATCH, replace=False)
                    vers = self.rng.integers(0, VERSIONS, BATCH)
                    data = np.frombuffer(b"".join(_page(int(x), int(v)) for x, v in zip(gfns, vers)),
                                         np.uint8).reshape(BATCH, PAGE_SIZE)
                    self.faults += g.write_pages(gfns, data)
                    self.last[gfns] = vers              # answered: it must be there
                    self.writes += 1
                    self.pages_written += BATCH
        except Exception as e:          # reported, and counted against the soak
            self.error = e

    def verify(self, image: np.ndarray) -> tuple[int, int]:
        """(pages checked, pages that do not read what was last written)."""
        with self.hv.guest(self.domid) as g:
            got = g.read_pages(np.arange(self.pages))
        lost = 0
        for gfn in range(self.pages):
            v = int(self.last[gfn])
            want = image[gfn].tobytes() if v < 0 else _page(gfn, v)
            lost += got[gfn].tobytes() != want
        return self.pages, lost


def _dedup_loop(socket_path: str, stop: threading.Event, out: dict) -> None:
    try:
        from hvshare.tools.api import HypervisorClient
        from hvshare.tools.dedup import Scanner, SocketBackend
    except ImportError:                 # pragma: no cover - the scanner ships with hvshare
        out["skipped"] = "no dedup scanner"
        return
    with HypervisorClient(socket_path) as c, Scanner(SocketBackend(c)) as sc:
        while not stop.is_set():
            r = sc.scan_pass()
            out["passes"] = out.get("passes", 0) + 1
            out["merged"] = out.get("merged", 0) + r.merged


def run(quick: bool = False) -> dict:
    from hvshare.tools.api import hvshare_session
    nguests, seconds, pages = (8, 10.0, 256) if quick else (32, 60.0, 512)
    victim_pages = 8192 if quick else 32768
    big_pages = 0 if quick else BIG_PAGES
    frames = nguests * pages * 2 + victim_pages + 2 * big_pages + 4096
    hv_cpus, rest = alone_and_rest()
    with hvshare_session(frames=frames, rmap="buckets") as hv, Placement() as pl:
        bigs = [hv.create(big_pages, "clone", seed=9) for _ in range(2 if big_pages else 0)]
        big_sums = []
        for b in bigs:
            with hv.guest(b) as g:
                big_sums.append(g.checksum(0, big_pages))
        doms = [hv.create(pages, "clone", seed=5) for _ in range(nguests)]
        with hv.guest(doms[0]) as g:
            image = g.read_pages(np.arange(pages)).copy()       # what every clone starts with
        victim = hv.create(victim_pages, "zero")
        dd: dict = {}
        stop_dedup = threading.Event()
        _dedup_loop_once(hv.socket_path)                       # start from shared clones
        pl.pin("hypervisor", hv.pid, hv_cpus)
        for d in bigs + doms:
            pl.pin("guest", hv.domain(d)["pid"], rest)
        pl.pin("driver", 0, rest)
        start = hv.info()
        stop = threading.Event()
        writers = [_Writer(hv, d, pages, seed=i, stop=stop) for i, d in enumerate(doms)]
        dedup = threading.Thread(target=_dedup_loop, args=(hv.socket_path, stop_dedup, dd), daemon=True)
        t0 = time.monotonic()
        for w in writers:
            w.start()
        dedup.start()
        time.sleep(seconds / 2)
        td: dict = {}
        killer = threading.Thread(target=lambda: td.update(_destroy(hv.socket_path, victim)), daemon=True)
        killer.start()                                         # under load, beside the writers
        time.sleep(max(0.0, t0 + seconds - time.monotonic()))
        stop.set()
        for w in writers:
            w.join(30)
        duration = time.monotonic() - t0
        placed = pl.check()
        killer.join(600)
        teardown = td
        stop_dedup.set()
        dedup.join(60)
        end = hv.info()
        checked = lost = 0
        for w in writers:
            c, n = w.verify(image)
            checked += c
            lost += n
        big_shared = sum(hv.domain(b)["shr_pages"] for b in bigs)
        for b, sums in zip(bigs, big_sums):           # idle clones: nothing may change
            with hv.guest(b) as g:
                checked += big_pages
                lost += int((g.checksum(0, big_pages) != sums).sum())
        audit = hv.audit()
        kinds = {k: v["max_ms"] for k, v in end["pause_by_op"].items() if k != "create"}
        window = _window_steps(start, end)
    faults = end["cow_faults"] - start["cow_faults"]
    figs = Figures()
    figs.add("faults_rate", [faults / duration], "faults/s")
    figs.add("lost_writes", [lost], "pages")
    figs.add("max_step", [max(kinds.values())] if kinds else [], "ms")
    figs.add("teardown_seconds", [teardown.get("seconds")], "s")
    return {
        "figures": figs.dicts(),
        "guests": nguests, "pages_per_guest": pages, "seconds": round(duration, 3),
        "big_domains": len(bigs), "big_pages": big_pages, "big_shared_pages": big_shared,
        "writes": sum(w.writes for w in writers), "pages_written": sum(w.pages_written for w in writers),
        "faults": faults, "faults_per_s": round(faults / duration, 1),
        "dedup_passes": dd.get("passes", 0), "dedup_merged": dd.get("merged", 0),
        "dedup_skipped": dd.get("skipped"),
        "teardown": {k: teardown.get(k) for k in ("seconds", "entries", "continuations", "max_pause_ms")},
        "max_pause_ms": max(kinds.values()) if kinds else None,
        "max_pause_op": max(kinds, key=kinds.get) if kinds else None,
        "sched": end.get("sched"),
        "window": window,
        "checked_pages": checked, "lost_writes": lost, "audit_errors": audit,
        "writer_errors": [f"{type(w.error).__name__}: {w.error}" for w in writers if w.error],
        "placements": [placed],
    }


def _window_steps(start: dict, end: dict) -> dict:
    """The hypervisor's steps during the soak (boot and the first full dedup
    pass left out), from the difference of its log2 step histograms:
    ``steps``, ``over_1ms`` (steps of 1 ms or more: the 1,024 us bucket
    up; ``over_1ms_by_op`` per kind of step), and ``max_lt_ms`` with ``max_op``, the upper bound of the longest
    step's bucket and what it was."""
    def hist(info, kind):
        return {h["lt_us"]: h["count"] for h in info["pause_by_op"].get(kind, {}).get("histogram", [])}
    steps = over = 0
    top, top_op = 0, None
    by_op: dict[str, int] = {}
    for kind in end["pause_by_op"]:
        a, b = hist(start, kind), hist(end, kind)
        for lt_us, n in b.items():
            grew = n - a.get(lt_us, 0)
            if grew <= 0:
                continue
            steps += grew
            if lt_us > 1024:
                over += grew
                by_op[kind] = by_op.get(kind, 0) + grew
            if lt_us > top:
                top, top_op = lt_us, kind
    return {"steps": steps, "over_1ms": over, "over_1ms_by_op": by_op, "max_lt_ms": top / 1e3,
            "max_op": top_op}


def _destroy(socket_path: str, domid: int) -> dict:
    from hvshare.tools.api import HypervisorClient
    with HypervisorClient(socket_path, timeout=None) as c:
        r = c.destroy(domid)
    r["finished_at"] = time.monotonic()
    return r


def _dedup_loop_once(socket_path: str) -> None:
    from hvshare.tools.api import HypervisorClient
    from hvshare.tools.dedup import Scanner, SocketBackend
    with HypervisorClient(socket_path) as c, Scanner(SocketBackend(c)) as sc:
        sc.scan_pass()


def report(result: dict) -> str:
    r = result
    td, w = r["teardown"], r["window"]
    rows = [[r["guests"], r["seconds"], r["faults"], r["faults_per_s"], r["writes"], r["dedup_passes"],
             r["dedup_merged"], r["max_pause_ms"], r["lost_writes"], r["audit_errors"]]]
    big = (f"; beside them {r['big_domains']} clone domains of {r['big_pages']:,} pages "
           f"({r['big_shared_pages']:,} shared entries at the end)" if r.get("big_domains") else "")
    lines = [f"Soak: {r['guests']} writer guests of {r['pages_per_guest']} pages, a dedup pass after "
             f"another, a teardown half-way{big}",
             table(["guests", "seconds", "faults", "faults/s", "writes", "passes", "merged",
                    "max step ms", "lost", "audit"], rows),
             f"teardown under load: {td['entries']:,} shared entries in {td['seconds']:.3f} s, "
             f"{td['continuations']} continuations, longest step {td['max_pause_ms']} ms",
             f"longest hypervisor step: {r['max_pause_ms']} ms ({r['max_pause_op']}), scheduled "
             f"{r.get('sched')}; during the soak: {w['steps']:,} steps, {w['over_1ms']:,} of 1 ms "
             f"or more, the longest under {w['max_lt_ms']:g} ms ({w['max_op']})",
             f"{r['checked_pages']:,} pages verified, {r['lost_writes']} lost writes",
             f"Placement: {placement.summary(r.get('placements'))}",
             f"Load: {load.summary(r.get('load'))}"]
    if r["writer_errors"]:
        lines.append("writer errors: " + "; ".join(r["writer_errors"]))
    return "\n".join(lines)
