"""Dedup merge rate: the scanner through the real hypervisor, next to Linux KSM.

``python -m hvshare.perf dedup [--quick] [--json PATH]``

What is measured, in one run on one machine:

- **hvshare**: guest memory is filled with exactly the bytes KSM gets
  (:func:`hvshare.perf.peers.contents.page_content`: ``identical`` -- one random page repeated
  -- and ``clone`` -- :func:`hvshare.perf.peers.contents.ksm_clone_pages`'s image, zero and
  private pages), split over ``domains`` domains of a fresh hypervisor
  process (``clone``: four guests, ``identical``: one). Then, from nothing
  shared to fully merged, end to end: a :class:`hvshare.tools.dedup.Scanner` over
  :class:`hvshare.tools.dedup.SocketBackend` (mapping the pool, one pass: hash,
  group, nominate, verify, share through the control socket), as
  ``hvctl dedup`` runs it. Median of ``repeats`` fresh hypervisors (3
  with ``--quick``, 5 otherwise), alternating with KSM's repeats so that
  a change in the machine's load weighs on both.
- **Linux KSM** (:func:`hvshare.perf.peers.ksm.measure_merge`, which sets and restores
  the knobs): ksmd merging the same content at full speed
  (``sleep_millisecs=0``, ``pages_to_scan=20000``). Skipped, with the
  reason, where KSM cannot be driven.

**Merge rate** = pages backed by a shared page at the end (hvshare:
``pages_shared + pages_sharing``, KSM: the same counters) / seconds.

**Savings** are compared as frames freed: hvshare's ``nr_saved_mfns``
against KSM's ``pages_sharing``. KSM caps one KSM page at
``max_page_sharing`` (256) mappings and starts a duplicate KSM page beyond
that, so on content with big groups (every zero page, the all-identical
case) it frees fewer frames by design: ``ksm_cap_frames`` is that
difference, computed from the content (:func:`hvshare.perf.peers.contents.expected_counts`
with the real cap and with none). The savings match when hvshare's frames
saved equal KSM's ``pages_sharing`` plus ``ksm_cap_frames`` (and equal
what the content predicts).

**Where the time goes**: the hypervisor's own time serving the scanner's
``nominate_many`` and ``share_many`` requests (its step accounting,
``info``'s ``pause_by_op``), the scanner's hash and group phases, and the
rest (the scanner's merge work and the socket round trips).

**Steps**: the hypervisor bounds each ``nominate_many`` / ``share_many``
step by the scanner's budget (``hvshare.tools.dedup.REQUEST_BUDGET_MS``) and answers
how many pages it did; per run, the hypervisor-side duration of each
request kind (count, mean, longest, how many took 1 ms or more).
**Batch sizes**: the same pass at several ``batch_pages``, now the most
pages a request may carry (a step does what fits its budget): a cap below
what fits makes more, shorter steps.

A second hypervisor configuration, ``--rmap index`` (the O(1) rmap), is
measured in the full run: the default ``buckets`` rmap's per-entry cost is
most of the hypervisor's share of a pass.

Figures: ``merge_rate``/``merge_seconds`` per content and rmap,
``ksm_merge_rate``/``ksm_merge_seconds`` per content, ``sweep_merge_rate``
per content and batch size; the goals: :mod:`hvshare.perf.goals`.
"""
from __future__ import annotations

import time

import numpy as np

from .common import sigterm_exits, smoke, table
from .figure import Figures, text_of
from .peers import contents, ksm
from .report.headlines import report_goals

#: pages per guest-channel write while filling guest memory (the protocol's limit)
_FILL_BATCH = 4096


def _fill(hv, content: np.ndarray, domains: int) -> list[int]:
    """Domains whose memory, concatenated, is ``content`` (written through
    each guest's channel: plain writes to private pages)."""
    n = len(content)
    bounds = np.linspace(0, n, domains + 1).astype(int)
    doms = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        d = hv.create(int(hi - lo), "zero")
        with hv.guest(d) as g:
            for s in range(lo, hi, _FILL_BATCH):
                e = min(hi, s + _FILL_BATCH)
                g.write_pages(np.arange(s - lo, e - lo), content[s:e])
        doms.append(d)
    return doms


def one_merge(content: np.ndarray, domains: int, rmap: str = "buckets",
              batch_pages: int | None = None) -> dict:
    """One pass from nothing shared to fully merged on a fresh hypervisor."""
    from hvshare.tools.api import hvshare_session
    from hvshare.tools.dedup import BATCH_PAGES, SCANNER_OPS, Scanner, SocketBackend
    batch_pages = batch_pages or BATCH_PAGES
    n = len(content)
    with hvshare_session(frames=n + 64 * domains + 256, rmap=rmap) as hv:
        _fill(hv, content, domains)
        backend = SocketBackend(hv)

        def scan():
            t0 = time.perf_counter()
            with Scanner(backend, batch_pages=batch_pages) as sc:
                res = sc.scan_pass()
            return time.perf_counter() - t0, res
        seconds, res = scan()
        audit = hv.audit()
    c = res.counters
    steps = res.hv_steps or {}
    hv_ms = sum(steps[op]["mean_ms"] * steps[op]["count"] for op in SCANNER_OPS if op in steps)
    ph = res.phase_seconds
    return {
        "seconds": seconds, "pages_merged": c["pages_shared"] + c["pages_sharing"],
        "pages_per_second": (c["pages_shared"] + c["pages_sharing"]) / seconds,
        "nr_saved_mfns": res.nr_saved_mfns, "pages_shared": c["pages_shared"],
        "requests": res.requests, "rounds": res.batches, "batch_pages": batch_pages,
        "hv_seconds": hv_ms / 1e3, "hash_seconds": ph["hash"], "group_seconds": ph["group"],
        "other_seconds": seconds - hv_ms / 1e3 - ph["hash"] - ph["group"],
        "steps": {op: steps[op] for op in SCANNER_OPS if op in steps},
        "steps_all": steps.get("all"), "max_request_ms": res.max_request_ms,
        "max_step_ms": max((steps[op]["max_ms"] or steps[op]["max_lt_ms"] for op in SCANNER_OPS
                            if op in steps), default=0.0),
        "audit_errors": audit,
    }


def _hv_runs(runs: list[dict], figs: Figures, labels: dict) -> dict:
    """Every :func:`one_merge` run's seconds and rate as figures; the last
    run's counts and steps as the detail (the same content merges the same
    way every time)."""
    figs.add("merge_seconds", [r["seconds"] for r in runs], "s", **labels)
    figs.add("merge_rate", [r["pages_per_second"] for r in runs], "pages/s", **labels)
    out = dict(runs[-1], repeats=len(runs), **labels)
    del out["seconds"], out["pages_per_second"]          # figures now
    return out


def savings(groups: np.ndarray, hvs: dict, k: dict) -> dict:
    """Frames saved by each, and whether they match once KSM's cap is counted."""
    cap = int(k.get("max_page_sharing") or 256)
    _, capped = contents.expected_counts(groups, cap)
    _, uncapped = contents.expected_counts(groups, 1 << 62)
    out = {"hvshare_saved": hvs["nr_saved_mfns"], "content_predicts": uncapped,
           "ksm_max_page_sharing": cap, "ksm_cap_frames": uncapped - capped}
    if "pages_sharing" in k:
        out["ksm_saved"] = k["pages_sharing"]
        out["match"] = (hvs["nr_saved_mfns"] == uncapped == k["pages_sharing"] + uncapped - capped)
    else:
        out["match"] = hvs["nr_saved_mfns"] == uncapped
    return out


#: pages of a ``--smoke`` run
SMOKE_PAGES = 2048


def run(quick: bool = False) -> dict:
    with sigterm_exits():             # a killed run still stops its hypervisors
        return _run(quick)


def _ksm_runs(runs: list[dict], figs: Figures, labels: dict) -> dict:
    """Every single-repeat :func:`hvshare.perf.peers.ksm.measure_merge` result's
    time and rate as figures, the last one's counts as the detail; a skip
    if one was skipped."""
    skipped = [r for r in runs if "skipped" in r]
    if skipped:
        return skipped[0]
    figs.add("ksm_merge_seconds", [r["merge_seconds"] for r in runs], "s", **labels)
    figs.add("ksm_merge_rate", [r["pages_per_second"] for r in runs], "pages/s", **labels)
    out = dict(runs[-1])
    for key in ("merge_seconds", "merge_seconds_all", "pages_per_second"):
        out.pop(key, None)                               # figures now
    return out


def _run(quick: bool) -> dict:
    from hvshare.tools.dedup import BATCH_PAGES, REQUEST_BUDGET_MS
    n = (SMOKE_PAGES if smoke() else 10_000) if quick else 50_000
    repeats = (1 if smoke() else 3) if quick else 5
    cases = {"identical": 1, "clone": 4}        # content -> hvshare domains
    results: dict = {}
    figs = Figures()
    for content, domains in cases.items():
        pages = contents.page_content(content, n, seed=0)
        groups = np.array([n]) if content == "identical" else contents.duplicate_groups(pages)
        # hvshare and KSM alternate, so that a change in the machine's load
        # during the run weighs on both
        hv_runs, k_runs = [], []
        for _ in range(repeats):
            hv_runs.append(one_merge(pages, domains))
            k_runs.append(ksm.measure_merge(n, content, seed=0, repeats=1))
        hv = _hv_runs(hv_runs, figs, {"content": content, "rmap": "buckets", "pages": n})
        k = _ksm_runs(k_runs, figs, {"content": content, "pages": n})
        r = {"hvshare": dict(hv, domains=domains), "ksm": k, "savings": savings(groups, hv, k)}
        if not quick:
            r["hvshare_index"] = dict(_hv_runs([one_merge(pages, domains, rmap="index") for _ in range(3)],
                                                  figs, {"content": content, "rmap": "index", "pages": n}),
                                      domains=domains)
        results[content] = r
        del pages
    # batch sizes: the hypervisor's step per request kind
    sweep_sizes = sorted({BATCH_PAGES, 256} if quick else {32, 64, BATCH_PAGES, 128, 256})
    sweep_contents = ("clone",) if quick else ("clone", "identical")
    sweep = []
    for content in sweep_contents:
        pages = contents.page_content(content, n, seed=0)
        for bs in sweep_sizes:
            r = one_merge(pages, cases[content], batch_pages=bs)
            figs.add("sweep_merge_rate", [r["pages_per_second"]], "pages/s", content=content, batch_pages=bs,
                     pages=n)
            sweep.append({"content": content, "batch_pages": bs, "steps": r["steps"],
                          "hv_seconds": r["hv_seconds"]})
    out = {"figures": figs.dicts(), "results": results, "sweep": sweep, "pages": n, "repeats": repeats,
           "batch_pages": BATCH_PAGES, "request_budget_ms": REQUEST_BUDGET_MS}
    skipped = next((r["ksm"]["skipped"] for r in results.values() if "skipped" in r["ksm"]), None)
    if skipped:
        out["ksm_skipped"] = skipped
    return out


def report(result: dict) -> str:
    n = result["pages"]
    budget = result.get("request_budget_ms")
    lines = [f"Merge from nothing shared to fully merged, {n:,} pages, through the hypervisor "
             f"process (median of {result['repeats']}; up to {result['batch_pages']} pages per request"
             + (f", steps of {budget:g} ms of work" if budget else "") + ")"]
    rows = []
    for content, r in result["results"].items():
        for key, label in (("hvshare", "hvshare, rmap buckets"), ("hvshare_index", "hvshare, rmap index")):
            h = r.get(key)
            lab = {"content": content, "rmap": h and h.get("rmap")}
            if h:
                rows.append([f"{content}: {label} ({h['domains']} dom)", text_of(result, "merge_seconds", **lab),
                             text_of(result, "merge_rate", **lab), h["nr_saved_mfns"],
                             f"hypervisor {h['hv_seconds']:.2f} s, hash {h['hash_seconds']:.2f} s, "
                             f"rest {h['other_seconds']:.2f} s; {h['requests']} requests, "
                             f"longest step {h.get('max_step_ms', 0):.2f} ms"])
        k = r["ksm"]
        if "skipped" in k:
            rows.append([f"{content}: Linux KSM", "-", "-", "-", k["skipped"]])
        else:
            rows.append([f"{content}: Linux KSM", text_of(result, "ksm_merge_seconds", content=content),
                         text_of(result, "ksm_merge_rate", content=content),
                         k["pages_sharing"], f"{k['pages_shared']:,} KSM pages"
                         + ("" if k["complete"] else ", INCOMPLETE")])
    lines.append(table(["", "seconds", "pages/s", "frames saved", "detail"], rows))
    lines.append("")
    lines.append("Savings (frames freed; KSM caps a KSM page at max_page_sharing mappings)")
    rows = []
    for content, r in result["results"].items():
        s = r["savings"]
        rows.append([content, s["hvshare_saved"], s.get("ksm_saved", "-"), s["ksm_cap_frames"],
                     s["content_predicts"], "yes" if s["match"] else "NO"])
    lines.append(table(["", "hvshare", "KSM", "KSM cap cost", "content predicts",
                        "hvshare = KSM + cap cost"], rows))
    lines.append("")
    lines.append("Hypervisor step per request (its own clock) by the most pages a request carries")
    rows = []
    for s in result["sweep"]:
        for op, st in s["steps"].items():
            rows.append([s["content"], s["batch_pages"], op, st["count"], st["mean_ms"],
                         st["max_ms"] if st["max_ms"] is not None else f"<{st['max_lt_ms']:g}",
                         st["over_1ms"], text_of(result, "sweep_merge_rate", content=s["content"],
                                                 batch_pages=s["batch_pages"])])
    lines.append(table(["content", "batch", "request", "count", "mean ms", "max ms", ">= 1 ms",
                        "pass pages/s"], rows))
    lines.append("")
    lines.append(report_goals("dedup", result))
    if "ksm_skipped" in result:
        lines.append(f"KSM: {result['ksm_skipped']}")
    return "\n".join(lines)
