"""CoW fault round trip as a guest feels it, next to its floors and Linux KSM.

What is measured, all in one run on one machine:

- **hvshare CoW fault**: a guest of a real hypervisor process writes one
  byte to a page it shares with another domain and waits for the answer;
  the guest times each round trip itself (``time_writes``), so the number is
  what a vCPU would stall for: pipe out, unshare (allocate, copy 4 KiB,
  repoint, rmap delete), the write, pipe back. Two placements with
  ``os.sched_setaffinity``: hypervisor and guest on the **same** core (two
  context switches per fault) and on **different** cores (two cross-CPU
  wake-ups).
- **hvshare batched CoW**: the guest writes one byte to every shared page,
  ``batch`` writes per ``G_WRITE_MANY`` message (one vectorised unshare and
  one scatter per message): pages per second, KSM's batched case. Also
  whole pages (``batched_pages``): ``batch`` pages per ``G_WRITE_PAGES``.
- **raw pipe round trip** of two Python processes (``perf.peers.pipe``), same and
  cross core: the floor any hvshare request pays.
- **Linux KSM** (``perf.peers.ksm``): the kernel's CoW break of a merged page
  (p50/p99 per page) and a batched break (one numpy write over all merged
  pages, pages per second). Skipped, with the reason, where KSM cannot be
  driven.

Ratios (the result; absolute times are context on a shared machine):
``cow_p50_over_ksm`` (same-core hvshare fault p50 / KSM CoW-break p50),
``batched_over_ksm`` (hvshare batched pages/s / KSM batched pages/s, one
byte per page both), ``batched_pages_over_ksm`` (the same with whole pages),
``cow_p50_over_pipe`` per placement (what the fault costs on top of a bare
round trip).
"""
from __future__ import annotations

import os
import statistics

import numpy as np

from .peers import ksm, pipe
from .common import fmt_value, latency_percentiles, log_histogram, merge_histograms, table

PLACEMENTS = ("same", "cross")


def _cpus(placement: str, allowed=None):
    """(hypervisor and this process's CPU, the guest's), or why not."""
    allowed = sorted(allowed or os.sched_getaffinity(0))
    if placement == "same":
        return allowed[0], allowed[0]
    if len(allowed) < 2:
        return f"cross-core placement needs 2 CPUs, this process may use {len(allowed)}"
    return allowed[0], allowed[1]


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

    def repeat(self, cpus) -> dict:
        """Fault latency (all pages shared again, first 10 %: warm-up) and
        the hypervisor's own step time per fault, with ``cpus`` (hypervisor
        and this process, guest) pinned."""
        hv, n = self.hv, self.n
        old = os.sched_getaffinity(0)
        try:
            os.sched_setaffinity(hv.pid, {cpus[0]})
            os.sched_setaffinity(self.guest_pid, {cpus[1]})
            os.sched_setaffinity(0, {cpus[0]})
            hv.range_share(self.src, self.dst, 0, n - 1)    # every page of dst shared again
            c0, t0 = self.guest_steps()
            lat = self.g.time_writes(0, n)
            c1, t1 = self.guest_steps()
        finally:
            os.sched_setaffinity(0, old)
        out = _stats(lat[n // 10:])
        out["step_us"] = (t1 - t0) * 1e3 / (c1 - c0) if c1 > c0 else float("nan")
        return out

    def unpin(self) -> None:
        old = os.sched_getaffinity(0)
        os.sched_setaffinity(self.hv.pid, old)
        os.sched_setaffinity(self.guest_pid, old)

    def batched(self, batch: int, repeats: int) -> dict:
        hv, n, g = self.hv, self.n, self.g
        out = {}
        for key, timed in (("batched", g.time_write_many), ("batched_pages", g.time_write_pages)):
            hv.range_share(self.src, self.dst, 0, n - 1)
            timed(0, min(n, batch), batch)              # warm-up: first-use costs
            rates = []
            for _ in range(repeats):
                hv.range_share(self.src, self.dst, 0, n - 1)
                r = timed(0, n, batch)
                assert r["cow_faults"] == n, r
                rates.append(n / r["seconds"])
            out[key] = {"pages": n, "batch": batch, "pages_per_second": statistics.median(rates),
                        "pages_per_second_all": rates, **_spread(rates, "pages_per_second")}
        return out


def _spread(vals: list, key: str) -> dict:
    vals = [v for v in vals if v == v]
    if not vals:
        return {}
    return {f"{key}_min": min(vals), f"{key}_max": max(vals)}


def _median_of(runs: list[dict], keys=("p50_us", "p99_us", "step_us")) -> dict:
    """The repeat whose p50 is the median one, with each of ``keys`` as
    the median of the repeats (``KEY_all``: every repeat's, ``KEY_min``,
    ``KEY_max``: their spread) and the latencies of all repeats together
    (``histogram``)."""
    out = dict(sorted(runs, key=lambda r: r["p50_us"])[len(runs) // 2])
    pooled = merge_histograms(r.get("histogram") for r in runs)
    if pooled:
        out["histogram"] = pooled
    for k in keys:
        vals = [r[k] for r in runs if k in r and r[k] == r[k]]
        if vals:
            out[k] = statistics.median(vals)
            out[f"{k}_all"] = vals
            out.update(_spread(vals, k))
    out["repeats"] = len(runs)
    return out


def measure(n: int, batch: int, repeats: int) -> dict:
    """Per placement, ``repeats`` rounds of, side by side: the hvshare
    fault, the raw pipe round trip and the floor probe; then batched CoW."""
    from tools.api import hvshare_session
    from . import floor
    hvs: dict = {"faults": {}}
    pipes, floors = {}, {}
    with hvshare_session(frames=2 * n + 1024) as hv:
        f = _Faults(hv, n)
        try:
            for placement in PLACEMENTS:
                cpus = _cpus(placement)
                if isinstance(cpus, str):
                    hvs["faults"][placement] = {"skipped": cpus}
                    pipes[placement] = {"size": pipe.REQUEST_SIZE, "placement": placement, "skipped": cpus}
                    floors[placement] = {"placement": placement, "skipped": cpus}
                    continue
                fr, pr, lr = [], [], []
                for _ in range(repeats):           # interleaved: the machine's drift hits all three
                    fr.append(f.repeat(cpus))
                    pr.append(_stats(pipe.round_trips(pipe.REQUEST_SIZE, placement, n)))
                    lr.append(floor.measure(placement, n, rounds=1)["runs"][0])
                hvs["faults"][placement] = {**_median_of(fr), "cpus": list(cpus)}
                pipes[placement] = {"size": pipe.REQUEST_SIZE, "placement": placement, "cpus": list(cpus),
                                    **_median_of(pr, ("p50_us", "p99_us"))}
                floors[placement] = {"placement": placement, "cpus": list(cpus),
                                     **_median_of(lr, ("p50_us", "p99_us"))}
            f.unpin()
            hvs.update(f.batched(batch, repeats))
            hvs["audit_errors"] = hv.audit()
        finally:
            f.g.close()
    return {"hvshare": hvs, "pipe": pipes, "floor": floors}


def run(quick: bool = False) -> dict:
    n = 2000 if quick else 20000
    repeats = 3 if quick else 5
    res = measure(n, batch=1024, repeats=repeats)
    hvs, pipes, floors = res["hvshare"], res["pipe"], res["floor"]
    ksm_cow = ksm.measure_cow_break(n, repeats=repeats)
    ksm_batched = ksm.measure_cow_batched(n, repeats=repeats)
    ratios: dict = {}
    same = hvs["faults"].get("same", {})
    if "p50_us" in same and "p50_ns" in ksm_cow:
        ratios["cow_p50_over_ksm"] = same["p50_us"] * 1e3 / ksm_cow["p50_ns"]
    if "pages_per_second" in ksm_batched:
        for key in ("batched", "batched_pages"):
            ratios[f"{key}_over_ksm"] = hvs[key]["pages_per_second"] / ksm_batched["pages_per_second"]
    for p in PLACEMENTS:
        f, q, fl = hvs["faults"].get(p, {}), pipes[p], floors[p]
        if "p50_us" in f and "p50_us" in q:
            ratios[f"cow_p50_over_pipe_{p}"] = f["p50_us"] / q["p50_us"]
            ratios[f"cow_p99_over_pipe_{p}"] = f["p99_us"] / q["p99_us"]
        if "p50_us" in f and "p50_us" in fl:
            ratios[f"cow_p50_over_floor_{p}"] = f["p50_us"] / fl["p50_us"]
        if "p50_us" in fl and "p50_us" in q:
            ratios[f"floor_p50_over_pipe_{p}"] = fl["p50_us"] / q["p50_us"]
    out = {"results": {"hvshare": hvs, "pipe": pipes, "floor": floors, "ksm_cow": ksm_cow,
                       "ksm_batched": ksm_batched},
           "ratios": ratios, "pages": n, "repeats": repeats}
    skipped = ksm_cow.get("skipped") or ksm_batched.get("skipped")
    if skipped:
        out["ksm_skipped"] = skipped
    return out


def report(result: dict) -> str:
    r = result["results"]
    rows = []
    for p in PLACEMENTS:
        f = r["hvshare"]["faults"].get(p, {})
        rows.append([f"hvshare CoW fault, {p} core", *_lat(f)])
        rows.append([f"  its hypervisor step, {p} core", *(_range(f, "step_us") if "step_us" in f else ["-"]),
                     "-", "-", "pause_by_op guest, per fault"])
        rows.append([f"floor probe (perf.floor), {p} core", *_lat(r.get("floor", {}).get(p, {}))])
        rows.append([f"raw pipe round trip, {p} core", *_lat(r["pipe"][p])])
    k = r["ksm_cow"]
    rows.append(["KSM CoW break (kernel)", *(["-", "-", "-", "-", k["skipped"]] if "skipped" in k else
                                             [k["p50_ns"] / 1e3, "-", k["p99_ns"] / 1e3, "-",
                                              f"{k['pages']:,} pages"])])
    lines = [f"CoW fault round trip as a guest sees it ({result['pages']:,} pages; medians of "
             f"{result['repeats']} interleaved repeats, [min..max])",
             table(["", "p50 us", "p50 spread", "p99 us", "p99 spread", "detail"], rows), ""]
    b, bp, kb = r["hvshare"]["batched"], r["hvshare"].get("batched_pages"), r["ksm_batched"]
    rows = [[f"hvshare, 1 byte x {b['batch']} pages per message", *_range(b, "pages_per_second"),
             f"{b['pages']:,} pages"],
            *([[f"hvshare, {bp['batch']} whole pages per message", *_range(bp, "pages_per_second"),
                f"{bp['pages']:,} pages"]] if bp else []),
            ["KSM, one write over all merged pages",
             *(["-", "-", kb["skipped"]] if "skipped" in kb else
               [kb["pages_per_second"], "-", f"{kb['pages']:,} pages"])]]
    lines += ["Batched CoW", table(["", "pages/s", "spread", "detail"], rows), ""]
    lines.append("Ratios: " + (", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items()) or "none"))
    return "\n".join(lines)


def _range(d: dict, key: str) -> list:
    lo, hi = d.get(f"{key}_min"), d.get(f"{key}_max")
    spread = f"[{fmt_value(float(lo))}..{fmt_value(float(hi))}]" if lo is not None else "-"
    return [d[key], spread]


def _lat(d: dict) -> list:
    if "skipped" in d or "p50_us" not in d:
        return ["-", "-", "-", "-", d.get("skipped", "not measured")]
    cpus = d.get("cpus")
    return [*_range(d, "p50_us"), *_range(d, "p99_us"),
            (f"cpus {cpus[0]}/{cpus[1]}, " if cpus else "") + f"n={d['n']:,}"]
