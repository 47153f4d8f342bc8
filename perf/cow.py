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
from .common import latency_percentiles, table

PLACEMENTS = ("same", "cross")


def _cpus(placement: str, allowed=None):
    allowed = sorted(allowed or os.sched_getaffinity(0))
    if placement == "same":
        return allowed[0], allowed[0]
    if len(allowed) < 2:
        return f"cross-core placement needs 2 CPUs, this process may use {len(allowed)}"
    return allowed[0], allowed[1]


def _stats(lat_ns: np.ndarray) -> dict:
    return {"n": int(len(lat_ns)), **latency_percentiles(lat_ns / 1e3)}


def measure_hvshare(n: int, batch: int, repeats: int) -> dict:
    """hvshare CoW fault latency per placement, and batched CoW throughput."""
    from tools.api import hvshare_session
    out: dict = {"faults": {}, "batched": {}}
    old = os.sched_getaffinity(0)
    with hvshare_session(frames=2 * n + 1024) as hv:
        src = hv.create(n, "zero")
        dst = hv.create(n, "zero")
        guest_pid = hv.domain(dst)["pid"]
        g = hv.guest(dst)
        try:
            for placement in PLACEMENTS:
                cpus = _cpus(placement, old)
                if isinstance(cpus, str):
                    out["faults"][placement] = {"skipped": cpus}
                    continue
                os.sched_setaffinity(hv.pid, {cpus[0]})
                os.sched_setaffinity(guest_pid, {cpus[1]})
                os.sched_setaffinity(0, {cpus[0]})
                runs = []
                for _ in range(repeats):
                    hv.range_share(src, dst, 0, n - 1)      # every page of dst shared again
                    lat = g.time_writes(0, n)
                    runs.append(_stats(lat[n // 10:]))      # first 10 %: warm-up
                r = _median_run(runs)
                r["cpus"] = list(cpus)
                out["faults"][placement] = r
            os.sched_setaffinity(hv.pid, old)
            os.sched_setaffinity(guest_pid, old)
            for key, timed in (("batched", g.time_write_many), ("batched_pages", g.time_write_pages)):
                hv.range_share(src, dst, 0, n - 1)
                timed(0, min(n, batch), batch)              # warm-up: first-use costs
                rates = []
                for _ in range(repeats):
                    hv.range_share(src, dst, 0, n - 1)
                    r = timed(0, n, batch)
                    assert r["cow_faults"] == n, r
                    rates.append(n / r["seconds"])
                out[key] = {"pages": n, "batch": batch, "pages_per_second": statistics.median(rates),
                            "pages_per_second_all": rates}
            out["audit_errors"] = hv.audit()
        finally:
            os.sched_setaffinity(0, old)
            g.close()
    return out


def _median_run(runs: list[dict]) -> dict:
    """The repeat whose p50 is the median one."""
    runs = sorted(runs, key=lambda r: r["p50_us"])
    return dict(runs[len(runs) // 2])


def run(quick: bool = False) -> dict:
    n = 2000 if quick else 20000
    repeats = 1 if quick else 3
    hvs = measure_hvshare(n, batch=1024, repeats=repeats)
    pipes = {p: pipe.measure(pipe.REQUEST_SIZE, p, n=n) for p in PLACEMENTS}
    ksm_cow = ksm.measure_cow_break(n)
    ksm_batched = ksm.measure_cow_batched(n, repeats=repeats)
    ratios: dict = {}
    same = hvs["faults"].get("same", {})
    if "p50_us" in same and "p50_ns" in ksm_cow:
        ratios["cow_p50_over_ksm"] = same["p50_us"] * 1e3 / ksm_cow["p50_ns"]
    if "pages_per_second" in ksm_batched:
        for key in ("batched", "batched_pages"):
            ratios[f"{key}_over_ksm"] = hvs[key]["pages_per_second"] / ksm_batched["pages_per_second"]
    for p in PLACEMENTS:
        f, q = hvs["faults"].get(p, {}), pipes[p]
        if "p50_us" in f and "p50_us" in q:
            ratios[f"cow_p50_over_pipe_{p}"] = f["p50_us"] / q["p50_us"]
    out = {"results": {"hvshare": hvs, "pipe": pipes, "ksm_cow": ksm_cow, "ksm_batched": ksm_batched},
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
        q = r["pipe"][p]
        rows.append([f"hvshare CoW fault, {p} core", *_lat(f)])
        rows.append([f"raw pipe round trip, {p} core", *_lat(q)])
    k = r["ksm_cow"]
    rows.append(["KSM CoW break (kernel)", *(["-", "-", k["skipped"]] if "skipped" in k else
                                             [k["p50_ns"] / 1e3, k["p99_ns"] / 1e3, f"{k['pages']:,} pages"])])
    lines = [f"CoW fault round trip as a guest sees it ({result['pages']:,} pages, "
             f"median of {result['repeats']})",
             table(["", "p50 us", "p99 us", "detail"], rows), ""]
    b, bp, kb = r["hvshare"]["batched"], r["hvshare"].get("batched_pages"), r["ksm_batched"]
    rows = [[f"hvshare, 1 byte x {b['batch']} pages per message", b["pages_per_second"], f"{b['pages']:,} pages"],
            *([[f"hvshare, {bp['batch']} whole pages per message", bp["pages_per_second"],
                f"{bp['pages']:,} pages"]] if bp else []),
            ["KSM, one write over all merged pages",
             *(["-", kb["skipped"]] if "skipped" in kb else [kb["pages_per_second"], f"{kb['pages']:,} pages"])]]
    lines += ["Batched CoW", table(["", "pages/s", "detail"], rows), ""]
    lines.append("Ratios: " + (", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items()) or "none"))
    return "\n".join(lines)


def _lat(d: dict) -> list:
    if "skipped" in d or "p50_us" not in d:
        return ["-", "-", d.get("skipped", "not measured")]
    cpus = d.get("cpus")
    return [d["p50_us"], d["p99_us"], (f"cpus {cpus[0]}/{cpus[1]}, " if cpus else "") + f"n={d['n']:,}"]
