"""CoW fault round trip as a guest feels it, next to its floors and Linux KSM.

What is measured, all in one run on one machine:

- **hvshare CoW fault**: a guest of a real hypervisor process writes one
  byte to a page it shares with another domain and waits for the answer;
  the guest times each round trip itself (``time_writes``), so the number is
  what a vCPU would stall for: pipe out, unshare (allocate, copy 4 KiB,
  repoint, rmap delete), the write, pipe back. Two placements, every
  thread of the hypervisor, of the guest (its control channel's thread
  runs ``time_writes``) and of this process pinned
  (:class:`hvshare.perf.placement.Placement`): all on the **same** core
  (two context switches per fault), or the guest on **another** core (two
  cross-CPU wake-ups). Each repeat checks its placement and records it
  (``placements``); one that did not hold makes its figures a broken
  measurement.
- **hvshare batched CoW**: the guest writes one byte to every shared page,
  ``batch`` writes per ``G_WRITE_MANY`` message (one vectorised unshare and
  one scatter per message): pages per second, KSM's batched case. Also
  whole pages (``batched_pages``): ``batch`` pages per ``G_WRITE_PAGES``.
- **raw pipe round trip** of two Python processes (``hvshare.perf.peers.pipe``), same and
  cross core: the floor any hvshare request pays.
- **Linux KSM** (``hvshare.perf.peers.ksm``): the kernel's CoW break of a merged page
  (p50/p99 per page) and a batched break (one numpy write over all merged
  pages, pages per second). Skipped, with the reason, where KSM cannot be
  driven.

Figures (:mod:`hvshare.perf.figure`): ``fault_p50``/``fault_p99``, ``pipe_*``,
``floor_*`` per placement, ``fault_step``, ``ksm_cow_p50``/``_p99``,
``batched_rate`` per write kind and ``ksm_batched_rate``; the goals they
are judged by are :mod:`hvshare.perf.goals`' (ratios of medians, side by side).
"""
from __future__ import annotations

import numpy as np

from .common import latency_percentiles, log_histogram, merge_histograms, smoke, table
from .figure import Figures, text_of
from .peers import ksm, pipe
from .placement import PLACEMENTS, Placement, describe, placement_cpus
from .report.headlines import report_goals


def _stats(lat_ns: np.ndarray) -> dict:
    return {"n": int(len(lat_ns)), **latency_percentiles(lat_ns / 1e3), "histogram": log_histogram(lat_ns / 1e3)}


class _Faults:
    """A hypervisor process with a writer guest sharing every page with
    another domain: one repeat of the fault latency per call."""

    def __init__(self, hv, n: int):
        self.hv, self.n = hv, n
        self.src = hv.create(n, "zero")
        self.dst = hv.create(n, "zero")
        self.guest_pid = hv.domain(self.dst)["pid"]
        self.g = hv.guest(self.dst)

    def guest_steps(self) -> tuple[int, float]:
        k = self.hv.info()["pause_by_op"].get("guest", {})
        return k.get("count", 0), k.get("total_ms", 0.0)

    def repeat(self, cpus, records: list, **labels) -> dict:
        """Fault latency (all pages shared again, first 10 %: warm-up) and
        the hypervisor's own step time per fault, with every thread of the
        hypervisor and this process on ``cpus[0]``, the guest's on
        ``cpus[1]``; the placement's record, ``labels`` its case, is
        appended to ``records``. The old masks are back afterwards."""
        hv, n = self.hv, self.n
        with Placement() as pl:
            pl.pin("hypervisor", hv.pid, {cpus[0]})
            pl.pin("guest", self.guest_pid, {cpus[1]})
            pl.pin("driver", 0, {cpus[0]})
            hv.range_share(self.src, self.dst, 0, n - 1)    # every page of dst shared again
            pl.repin()                                      # a thread the share started
            c0, t0 = self.guest_steps()
            lat = self.g.time_writes(0, n)
            c1, t1 = self.guest_steps()
            records.append(pl.check(**labels))
        out = _stats(lat[n // 10:])
        out["step_us"] = (t1 - t0) * 1e3 / (c1 - c0) if c1 > c0 else float("nan")
        return out

    def batched(self, batch: int, repeats: int, figs: Figures) -> None:
        """Pages per second of a write to every shared page, ``batch``
        writes per message: one byte each, then whole pages."""
        hv, n, g = self.hv, self.n, self.g
        for write, timed in (("one byte", g.time_write_many), ("whole page", g.time_write_pages)):
            hv.range_share(self.src, self.dst, 0, n - 1)
            timed(0, min(n, batch), batch)              # warm-up: first-use costs
            rates = []
            for _ in range(repeats):
                hv.range_share(self.src, self.dst, 0, n - 1)
                r = timed(0, n, batch)
                assert r["cow_faults"] == n, r
                rates.append(n / r["seconds"])
            figs.add("batched_rate", rates, "pages/s", write=write, batch=batch)


def _add(figs: Figures, hists: list, prefix: str, runs: list[dict], placement: str) -> None:
    """The repeats' p50 and p99 as figures, and their latencies together as one histogram."""
    for p in (50, 99):
        figs.add(f"{prefix}_p{p}", [r[f"p{p}_us"] for r in runs], "us", placement=placement)
    pooled = merge_histograms(r.get("histogram") for r in runs)
    if pooled:
        hists.append({"name": prefix, "labels": {"placement": placement}, **pooled})


def measure(n: int, batch: int, repeats: int, figs: Figures, hists: list) -> dict:
    """Per placement, ``repeats`` rounds of, side by side: the hvshare
    fault, the raw pipe round trip and the floor probe; then batched CoW.
    Returns what is not a figure: the CPUs, skipped placements, every
    repeat's placement record (``placements``), the audit."""
    from hvshare.tools.api import hvshare_session
    from . import floor
    out: dict = {"cpus": {}, "skipped_placements": {}, "placements": []}
    records = out["placements"]
    with hvshare_session(frames=2 * n + 1024) as hv:
        f = _Faults(hv, n)
        try:
            for placement in PLACEMENTS:
                cpus = placement_cpus(placement)
                if isinstance(cpus, str):
                    out["skipped_placements"][placement] = cpus
                    continue
                fr, pr, lr = [], [], []
                for i in range(repeats):           # interleaved: the machine's drift hits all three
                    fr.append(f.repeat(cpus, records, placement=placement, repeat=i))
                    pr.append(_stats(pipe.round_trips(pipe.REQUEST_SIZE, placement, n, records=records)))
                    fl = floor.measure(placement, n, rounds=1)
                    records.append(fl["placement_record"])
                    lr.append(fl["runs"][0])
                for prefix, runs in (("fault", fr), ("pipe", pr), ("floor", lr)):
                    _add(figs, hists, prefix, runs, placement)
                figs.add("fault_step", [r["step_us"] for r in fr], "us", placement=placement)
                out["cpus"][placement] = list(cpus)
            f.batched(batch, repeats, figs)
            out["audit_errors"] = hv.audit()
        finally:
            f.g.close()
    return out


#: pages of a ``--smoke`` run (one batched message of each kind)
SMOKE_PAGES = 1024


def run(quick: bool = False) -> dict:
    n = (SMOKE_PAGES if smoke() else 2000) if quick else 20000
    repeats = (1 if smoke() else 3) if quick else 5
    figs, hists = Figures(), []
    out = measure(n, batch=1024, repeats=repeats, figs=figs, hists=hists)
    k = ksm.measure_cow_break(n, repeats=repeats)
    kb = ksm.measure_cow_batched(n, repeats=repeats)
    if "skipped" not in k:
        for p in (50, 99):
            figs.add(f"ksm_cow_p{p}", [v / 1e3 for v in k[f"p{p}_ns_all"]], "us")
        hists.append({"name": "ksm_cow", "labels": {}, **k["histogram"]})
    if "skipped" not in kb:
        figs.add("ksm_batched_rate", kb["pages_per_second_all"], "pages/s")
    out.update(figures=figs.dicts(), histograms=hists, pages=n, repeats=repeats, batch=1024)
    skipped = k.get("skipped") or kb.get("skipped")
    if skipped:
        out["ksm_skipped"] = skipped
    return out


def report(result: dict) -> str:
    rows = []
    for p in PLACEMENTS:
        for prefix, what in (("fault", "hvshare CoW fault"), ("floor", "floor probe (perf.floor)"),
                             ("pipe", "raw pipe round trip")):
            rows.append([f"{what}, {p} core", text_of(result, f"{prefix}_p50", placement=p),
                         text_of(result, f"{prefix}_p99", placement=p)])
        rows.append([f"  its hypervisor step, {p} core", text_of(result, "fault_step", placement=p), "-"])
    rows.append(["Linux KSM CoW break", text_of(result, "ksm_cow_p50"), text_of(result, "ksm_cow_p99")])
    lines = [f"CoW fault round trip as a guest sees it ({result['pages']:,} pages; medians of "
             f"{result['repeats']} interleaved repeats [min–max])", table(["", "p50", "p99"], rows, "l"), ""]
    rows = [[f"hvshare, {w} x {result['batch']} per message", text_of(result, "batched_rate", write=w)]
            for w in ("one byte", "whole page")]
    rows.append(["Linux KSM, one write over all merged pages", text_of(result, "ksm_batched_rate")])
    lines += ["Batched CoW", table(["", "pages/s"], rows, "l"), "", "Where the fault's threads ran:"]
    for p in PLACEMENTS:
        recs = [r for r in result.get("placements", ()) if r["labels"].get("placement") == p
                and "repeat" in r["labels"]]
        if recs:
            lines.append(f"  {p} core, held in {sum(r['held'] for r in recs)} of {len(recs)} repeats; "
                         f"the first: {describe(recs[0])}")
    lines += ["", report_goals("cow", result)]
    if result.get("ksm_skipped"):
        lines.append(f"KSM: {result['ksm_skipped']}")
    return "\n".join(lines)

