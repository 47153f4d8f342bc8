"""The headline figures of a run, read defensively from the benches' JSON.

The headlines are the few figures the README's "Performance" table shows:
per bench a function (:data:`HEADLINES`) turns its result into rows of
figure, value, anchor (the peer or seed it is compared with), ratio and
goal; :func:`markdown` and :func:`headline_table` print them.  They are
read defensively: benchmarks evolve on their own, and a key that is not
(or no longer) there gives a headline whose value and ``met`` are None
rather than a crash.  The small readers that make this safe (:func:`dig`,
:func:`num`, :func:`cases`, :func:`pick`, :func:`find_dicts`,
:func:`benches_of`) live here too, and the plots and the comparison use
them.  The goals mirror those the benchmarks check themselves (perf.rmap's,
perf.teardown's at N = 100,000); where a bench states none, the goal here
is this suite's.  A bench may also carry ``"goals": {ratio_key: {"goal":
text, "met": bool}}``, which then wins over the goal written here.

Every figure carries its repeats: a headline's ``stats`` (and
``anchor_stats`` for a measured anchor) is the :func:`perf.common.summary`
of the repeats behind it, ``{"median", "min", "max", "n"}``, read by
:func:`perf.common.stats_of` from however the bench kept them; the value
shown is the bench's own figure (the median of the repeats, or a
percentile of all repeats' samples together) and the table prints it as
``1.62 ms [1.50–1.81], n=5`` (min–max of the repeats). A figure given
without ``stats`` is one measurement: n = 1.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from ..common import one_line, stats_of


# ---------------------------------------------------------------------------
# reading results defensively

def dig(d: Any, *path: Any) -> Any:
    """``d[p0][p1]...``, or None where any step is missing or of the wrong kind."""
    for p in path:
        if isinstance(d, dict):
            d = d.get(p)
        elif isinstance(d, list) and isinstance(p, int) and -len(d) <= p < len(d):
            d = d[p]
        else:
            return None
        if d is None:
            return None
    return d


def num(x: Any) -> float | None:
    """A finite number as float, else None (bools, strings, NaN are not figures)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        try:
            import numpy as np
            if isinstance(x, np.generic) and np.issubdtype(type(x), np.number):
                x = x.item()
            else:
                return None
        except ImportError:  # pragma: no cover - numpy is a dependency
            return None
    x = float(x)
    return x if math.isfinite(x) else None


def cases(result: Any) -> list[dict]:
    """The per-case dicts of a result: ``results`` as a list, or the dict
    values of ``results`` when it is keyed by case name."""
    r = dig(result, "results")
    if isinstance(r, list):
        return [c for c in r if isinstance(c, dict)]
    if isinstance(r, dict):
        return [c for c in r.values() if isinstance(c, dict)]
    return []


def pick(rows: list[dict], size_key: str = "entries", **match) -> dict | None:
    """Of the rows matching ``match`` (a value or a tuple of accepted
    values), the one with the largest ``size_key``."""
    def ok(row):
        for k, v in match.items():
            want = v if isinstance(v, tuple) else (v,)
            if row.get(k) not in want:
                return False
        return True
    found = [r for r in rows if ok(r)]
    if not found:
        return None
    return max(found, key=lambda r: num(r.get(size_key)) or 0)


def _ratio_key(result: Any, prefix: str) -> str | None:
    """The ratio named ``prefix`` + something (e.g. the degree it was taken at)."""
    ratios = dig(result, "ratios")
    if not isinstance(ratios, dict):
        return None
    keys = sorted((k for k in ratios if k.startswith(prefix)),
                  key=lambda k: (len(k), k))
    return keys[-1] if keys else None


def find_dicts(obj: Any, *keys: str) -> list[dict]:
    """Every dict anywhere in ``obj`` that has all of ``keys`` (depth first)."""
    out = []
    if isinstance(obj, dict):
        if all(k in obj for k in keys):
            out.append(obj)
        for v in obj.values():
            out += find_dicts(v, *keys)
    elif isinstance(obj, list):
        for v in obj:
            out += find_dicts(v, *keys)
    return out


# ---------------------------------------------------------------------------
# headlines

SEED_LIST_SECONDS = 7 * 60      # the seed: over 7 minutes with the list...
SEED_BUCKETS_SECONDS = 2.0      # ...under 2 seconds with the hash table


def _h(figure: str, unit: str, command: str, goal: str, *, value=None, anchor=None,
       anchor_value=None, ratio=None, ratio_of: str | None = None,
       met: Callable[[float | None, float | None], bool | None] | None = None,
       bench: str = "", ratio_key: str | None = None, result: Any = None,
       stats: dict | None = None, anchor_stats: dict | None = None) -> dict:
    value, anchor_value, ratio = num(value), num(anchor_value), num(ratio)
    stats, anchor_stats = _stats_for(value, stats), _stats_for(anchor_value, anchor_stats)
    if isinstance(anchor, tuple):          # (label, unit): "label: value unit" once measured
        label, aunit = anchor
        anchor = (f"{label}: {figure_text(anchor_value, aunit, anchor_stats)}"
                  if anchor_value is not None else f"{label}: not measured")
    try:
        ok = met(value, ratio) if met else None
    except TypeError:          # a None in the comparison
        ok = None
    # A goal the bench itself states wins over ours.
    own = dig(result, "goals", ratio_key) if ratio_key else None
    if isinstance(own, dict):
        goal = own.get("goal", goal)
        ok = own.get("met", ok)
    return {"figure": figure, "value": value, "stats": stats, "unit": unit, "anchor": anchor,
            "anchor_value": anchor_value, "anchor_stats": anchor_stats, "ratio": ratio, "ratio_of": ratio_of,
            "goal": goal, "met": None if ok is None else bool(ok),
            "command": command, "bench": bench}


def _stats_for(value: float | None, stats: dict | None) -> dict | None:
    """The repeats of a figure: ``stats`` as given, else (a figure with no
    recorded repeats) n = 1; None without a value."""
    if value is None:
        return None
    if isinstance(stats, dict) and isinstance(stats.get("n"), int) and stats["n"] >= 1:
        return stats
    return {"median": value, "min": value, "max": value, "n": 1}


def scaled(stats: dict | None, factor: float) -> dict | None:
    """``stats`` in another unit (``factor`` times every figure, n kept)."""
    if not isinstance(stats, dict):
        return None
    out = {k: v * factor for k, v in stats.items() if k in ("median", "min", "max")}
    if isinstance(stats.get("ci95"), list):
        out["ci95"] = [v * factor for v in stats["ci95"]]
    out["n"] = stats.get("n")
    return out


def spread_text(stats: dict | None) -> str:
    """`` [min–max], n=N`` of a figure's repeats (only ``, n=1`` for one)."""
    if not isinstance(stats, dict) or not stats.get("n"):
        return ""
    if stats["n"] == 1 or num(stats.get("min")) is None or num(stats.get("max")) is None:
        return f", n={stats['n']}"
    return f" [{_fmt(num(stats['min']))}–{_fmt(num(stats['max']))}], n={stats['n']}"


def figure_text(value: float | None, unit: str = "", stats: dict | None = None) -> str:
    """A figure as the table prints it, ``1.62 ms [1.50–1.81], n=5`` (the
    plots print the same text, so a plot and the table cannot disagree)."""
    value = num(value)
    if value is None:
        return "?"
    return f"{_fmt(value)} {unit}".rstrip() + spread_text(_stats_for(value, stats))


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "?"
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def _n(x: Any) -> str:
    v = num(x)
    return f"{int(v):,}" if v else "N"


def _rmap_headlines(r: Any) -> list[dict]:
    cmd = "python -m perf rmap"
    rows = cases(r)
    top = max((num(c.get("degree")) or 0 for c in rows), default=None) or None
    top_s = f"{int(top):,}" if top else "D"

    def row(policy, degree):
        return pick(rows, "degree", policy=policy, degree=degree)

    def at(policy, degree, field):
        return dig(row(policy, degree), field)

    lob_key = _ratio_key(r, "list_over_buckets_delete_at_")
    list_ns, buck_ns = at("list", top, "delete_ns"), at("buckets", top, "delete_ns")
    idx_top, idx_lo = at("index", top, "delete_ns"), at("index", 16, "delete_ns")
    idx_b, buck_b = at("index", top, "bytes_per_entry"), at("buckets", top, "bytes_per_entry")
    bpe_key = _ratio_key(r, "index_bytes_per_entry_at_")
    return [
        _h(f"rmap delete at degree {top_s}: buckets vs list", "ns", cmd,
           ">= 200x (seed: ~256x in theory, 7 min -> 2 s = 210x measured)", value=buck_ns,
           stats=stats_of(row("buckets", top), "delete_ns"),
           anchor=("list", "ns"), anchor_value=list_ns, anchor_stats=stats_of(row("list", top), "delete_ns"),
           ratio=dig(r, "ratios", lob_key) if lob_key else None, ratio_of="list/buckets",
           met=lambda v, q: q >= 200, bench="rmap", ratio_key=lob_key, result=r),
        _h(f"rmap index delete at degree {top_s} vs 16 (flat)", "ns", cmd,
           "<= 2x, O(1)", value=idx_top, stats=stats_of(row("index", top), "delete_ns"),
           anchor=("index at degree 16", "ns"), anchor_value=idx_lo,
           anchor_stats=stats_of(row("index", 16), "delete_ns"), ratio=dig(r, "ratios", "index_delete_flatness"),
           ratio_of=f"{top_s}/16", met=lambda v, q: q <= 2, bench="rmap",
           ratio_key="index_delete_flatness", result=r),
        _h(f"rmap index memory at degree {top_s}", "B/entry", cmd, "<= 32 B/entry",
           value=idx_b if idx_b is not None else dig(r, "ratios", bpe_key) if bpe_key else None,
           anchor=("buckets", "B/entry"), anchor_value=buck_b,
           ratio=(num(idx_b) / num(buck_b)) if num(idx_b) and num(buck_b) else None,
           ratio_of="index/buckets", met=lambda v, q: v <= 32, bench="rmap",
           ratio_key=bpe_key, result=r),
    ]


SEED_N = 100_000                # the seed's case: 100,000 gfns on one shared frame


def _teardown_headlines(r: Any) -> list[dict]:
    """perf.teardown: ``results`` rows (rmap, mode, n/entries, seconds,
    max_pause_ms, fault_p99_us, idle_fault_p99_us), ``munmap`` (Linux KSM
    peers by N) and ``ratios``. Its goals are for N = 100,000 (the seed's
    case); at other N (``--quick``) the figures are shown, not judged."""
    cmd = "python -m perf teardown"
    # one size key, whichever the bench wrote (copies: the result is not ours to change)
    rows = [dict(c, entries=c.get("entries", c.get("n"))) for c in cases(r)]
    pre = ("preemptible", "preempt", None)

    def at(rmap, n=None, mode=pre):
        match = dict(rmap=rmap, mode=mode)
        if n is not None:
            match["entries"] = n
        return pick(rows, **match)

    def judged(n, test):
        # the goal is stated for the seed's N; a smaller run is shown, not judged
        return lambda v, q: test(v, q) if num(n) == SEED_N else None

    buck = at("buckets", SEED_N) or at("buckets")
    n_b = dig(buck, "entries")
    n_lb = dig(r, "ratios", "list_over_buckets_n") or n_b
    lst, buck_lb = at("list", n_lb), at("buckets", n_lb)
    # index against munmap at the seed's N when both are there, else at the bench's N
    mun = dig(r, "munmap")
    mun = mun if isinstance(mun, dict) else {}
    idx, n_ik, peer = at("index", SEED_N), SEED_N, mun.get(str(SEED_N))
    if not (idx and num(dig(peer, "seconds"))):
        n_ik = dig(r, "ratios", "index_over_ksm_n")
        idx, peer = at("index", n_ik), mun.get(str(n_ik)) if n_ik is not None else None
        if not peer:
            k = _ksm_munmap(r)
            peer, n_ik = ({"seconds": k["seconds"], "n_pages": k["n_pages"]}, k["n_pages"]) if k else (None, n_ik)
    idx_s, mun_s = num(dig(idx, "seconds")), num(dig(peer, "seconds"))
    # freeze: the longest step of any preemptible teardown, the monolithic one beside it
    # (``list`` is judged apart, as perf.teardown does: one removal from a
    # long list takes milliseconds, which no chunking can split)
    pres = [c for c in rows if c.get("mode") in ("preemptible", "preempt") and c.get("rmap") != "list"
            and num(c.get("max_pause_ms")) is not None]
    worst = max(pres, key=lambda c: num(c["max_pause_ms"])) if pres else None
    mono = at("buckets", dig(worst, "entries"), "monolithic") or at("buckets", mode="monolithic")
    # faults: the preemptible case whose writer suffered most against idle
    fr = [c for c in pres if num(c.get("fault_p99_us")) and num(c.get("idle_fault_p99_us"))]
    fworst = max(fr, key=lambda c: num(c["fault_p99_us"]) / num(c["idle_fault_p99_us"])) if fr else None
    return [
        _h(f"teardown of {_n(n_b)} shared entries on one frame, buckets", "s", cmd,
           f"< 2 s at N={SEED_N:,}, as the seed", value=dig(buck, "seconds"), stats=stats_of(buck, "seconds"),
           anchor="seed (Xen, 2012): under 2 s", anchor_value=SEED_BUCKETS_SECONDS,
           ratio=(num(dig(buck, "seconds")) / SEED_BUCKETS_SECONDS) if num(dig(buck, "seconds")) else None,
           ratio_of="hvshare/seed", met=judged(n_b, lambda v, q: v < SEED_BUCKETS_SECONDS),
           bench="teardown", result=r),
        _h(f"teardown of {_n(n_lb)} shared entries: list vs buckets", "s", cmd,
           f">= 200x at N={SEED_N:,} (seed: 7 min -> 2 s)", value=dig(lst, "seconds"),
           stats=stats_of(lst, "seconds"), anchor=("buckets", "s"), anchor_value=dig(buck_lb, "seconds"),
           anchor_stats=stats_of(buck_lb, "seconds"),
           ratio=dig(r, "ratios", "list_over_buckets"), ratio_of="list/buckets",
           met=judged(n_lb, lambda v, q: q >= 200), bench="teardown", ratio_key="list_over_buckets", result=r),
        _h(f"teardown of {_n(n_ik)} shared entries, index vs Linux munmap (one KSM page)", "s", cmd,
           f"<= 3x at N={SEED_N:,}", value=idx_s, stats=stats_of(idx, "seconds"),
           anchor=("Linux munmap", "s"), anchor_value=mun_s, anchor_stats=stats_of(peer, "seconds"),
           ratio=(idx_s / mun_s) if idx_s and mun_s else dig(r, "ratios", "index_over_ksm"),
           ratio_of="index/munmap", met=judged(n_ik, lambda v, q: q <= 3), bench="teardown",
           ratio_key="index_over_ksm", result=r),
        _h("longest hypervisor step, preemptible teardown"
           + (f" ({worst.get('rmap')}, N={_n(worst.get('entries'))})" if worst else ""), "ms", cmd,
           "<= 1 ms at every N", value=dig(worst, "max_pause_ms"), stats=stats_of(worst, "max_pause_ms"),
           anchor=("monolithic, buckets" + (f" N={_n(mono.get('entries'))}" if mono else ""), "ms"),
           anchor_value=dig(mono, "max_pause_ms"), anchor_stats=stats_of(mono, "max_pause_ms"),
           ratio=(num(dig(mono, "max_pause_ms")) / num(worst["max_pause_ms"]))
           if num(dig(mono, "max_pause_ms")) and worst and num(worst["max_pause_ms"]) else None,
           ratio_of="monolithic/preemptible", met=lambda v, q: v <= 1.0, bench="teardown",
           ratio_key="max_pause_ms", result=r),
        _h("guest CoW fault p99 during a preemptible teardown"
           + (f" ({fworst.get('rmap')}, N={_n(fworst.get('entries'))})" if fworst else ""), "us", cmd,
           "<= 2x idle at every N", value=dig(fworst, "fault_p99_us"), stats=stats_of(fworst, "fault_p99_us"),
           anchor=("idle hypervisor", "us"), anchor_value=dig(fworst, "idle_fault_p99_us"),
           anchor_stats=stats_of(fworst, "idle_fault_p99_us"),
           ratio=(num(fworst["fault_p99_us"]) / num(fworst["idle_fault_p99_us"])) if fworst else None,
           ratio_of="teardown/idle", met=lambda v, q: q <= 2, bench="teardown",
           ratio_key="fault_p99_us", result=r),
    ]


def _ksm_munmap(r: Any) -> dict:
    """Linux KSM's munmap measure inside a teardown result (the shape of
    ``perf.peers.ksm.measure_munmap``), the largest one, or {}."""
    found = [d for d in find_dicts(r, "n_pages", "seconds", "baseline_seconds") if "skipped" not in d]
    if not found:
        return {}
    best = max(found, key=lambda d: num(d.get("n_pages")) or 0)
    return {"n_pages": best.get("n_pages"), "seconds": best.get("seconds")}


def _cow_headlines(r: Any) -> list[dict]:
    cmd = "python -m perf cow"
    res = dig(r, "results") or {}
    same = dig(res, "hvshare", "faults", "same") or {}
    ksm_p50 = num(dig(res, "ksm_cow", "p50_ns"))
    ksm_us = ksm_p50 / 1e3 if ksm_p50 is not None else None
    out = [
        _h("CoW fault p50 (same core) vs Linux KSM CoW break", "us", cmd, "<= 3x",
           value=same.get("p50_us"), stats=stats_of(same, "p50_us"), anchor=("KSM CoW break p50", "us"),
           anchor_value=ksm_us, anchor_stats=scaled(stats_of(dig(res, "ksm_cow"), "p50_ns"), 1e-3),
           ratio=dig(r, "ratios", "cow_p50_over_ksm"), ratio_of="hvshare/KSM",
           met=lambda v, q: q <= 3, bench="cow", ratio_key="cow_p50_over_ksm", result=r),
    ]
    for p, where in (("same", "same core"), ("cross", "other core")):
        f = dig(res, "hvshare", "faults", p) or {}
        q = dig(res, "pipe", p) or {}
        key = f"cow_p50_over_pipe_{p}"
        out.append(_h(f"CoW fault p50 ({where}) vs raw pipe round trip", "us", cmd, "<= 2x",
                      value=f.get("p50_us"), stats=stats_of(f, "p50_us"), anchor=("raw pipe round trip p50", "us"),
                      anchor_value=q.get("p50_us"), anchor_stats=stats_of(q, "p50_us"),
                      ratio=dig(r, "ratios", key), ratio_of="fault/pipe",
                      met=lambda v, q: q <= 2, bench="cow", ratio_key=key, result=r))
    b = dig(res, "hvshare", "batched", "pages_per_second")
    kb = dig(res, "ksm_batched", "pages_per_second")
    out.append(_h("batched unshare (CoW) rate vs Linux KSM batched CoW break", "pages/s", cmd, ">= 1x",
                  value=b, stats=stats_of(dig(res, "hvshare", "batched"), "pages_per_second"),
                  anchor=("KSM, one write over all pages", "pages/s"), anchor_value=kb,
                  anchor_stats=stats_of(dig(res, "ksm_batched"), "pages_per_second"),
                  ratio=dig(r, "ratios", "batched_over_ksm"), ratio_of="hvshare/KSM",
                  met=lambda v, q: q >= 1, bench="cow", ratio_key="batched_over_ksm", result=r))
    return out


def _dedup_headlines(r: Any) -> list[dict]:
    cmd = "python -m perf dedup"
    out = []
    for content, key in (("identical", "merge_rate_over_ksm"), ("clone", "merge_rate_over_ksm_clone")):
        hv, ksm = merge_rates(r, content)[:2]
        out.append(_h(f"dedup merge rate vs Linux KSM ({content} pages)", "pages/s", cmd, ">= 1x",
                      value=hv, stats=stats_of(dig(r, "results", content, "hvshare"), "pages_per_second"),
                      anchor=("Linux KSM ksmd, same pages", "pages/s"), anchor_value=ksm,
                      anchor_stats=stats_of(dig(r, "results", content, "ksm"), "pages_per_second"),
                      ratio=dig(r, "ratios", key), ratio_of="hvshare/KSM",
                      met=lambda v, q: q >= 1, bench="dedup", ratio_key=key, result=r))
    return out


def merge_rates(r: Any, content: str) -> tuple[float | None, float | None, float | None]:
    """(hvshare, Linux KSM, hvshare with the index rmap) merge rates in
    pages/s for one content: perf.dedup's ``results[content]`` with
    ``hvshare``/``ksm``/``hvshare_index`` dicts carrying ``pages_per_second``."""
    case = dig(r, "results", content)
    return (num(dig(case, "hvshare", "pages_per_second")), num(dig(case, "ksm", "pages_per_second")),
            num(dig(case, "hvshare_index", "pages_per_second")))


def _density_headlines(r: Any) -> list[dict]:
    """perf.density: clone guests that fit in one pool with dedup after
    each boot against without; the content predicts how many must fit."""
    cmd = "python -m perf density"
    w, wo = dig(r, "results", "with"), dig(r, "results", "without")
    pred = num(dig(w, "predicted"))
    return [_h("guest density: clone guests in one pool, dedup after each boot vs none", "guests", cmd,
               f"as many as the content predicts ({_n(pred) if pred else '?'})",
               value=dig(w, "guests"), stats=stats_of(w, "guests"), anchor=("without dedup", "guests"),
               anchor_value=dig(wo, "guests"), anchor_stats=stats_of(wo, "guests"),
               ratio=dig(r, "ratios", "density"), ratio_of="with/without",
               met=lambda v, q: v >= pred, bench="density", ratio_key="density", result=r)]


def _scale_headlines(r: Any) -> list[dict]:
    """perf.scale: ``results`` rows (rmap, pages, ops.{create,dedup,cow,
    destroy}) and ``peers`` by N, at the largest N and the index rmap."""
    cmd = "python -m perf scale"
    rows = [c for c in cases(r) if isinstance(c.get("ops"), dict)]
    row = pick(rows, "pages", rmap="index") or pick(rows, "pages")
    n = dig(row, "pages")
    ops = dig(row, "ops") or {}
    peer = dig(r, "peers", str(int(n))) if num(n) else None
    longest = max(((op, num(dig(o, "max_step_ms"))) for op, o in ops.items() if num(dig(o, "max_step_ms"))),
                  key=lambda t: t[1], default=(None, None))
    rmap = dig(row, "rmap") or "index"

    def ratio(key):
        return dig(r, "ratios", f"{key}_{rmap}_{int(n)}") if num(n) else None
    dst = dig(r, "ratios", f"destroy_index_over_munmap_{int(n)}") if num(n) else None
    return [
        _h(f"scale: longest step of any operation, two clones of {_n(n)} pages ({rmap}"
           + (f", {longest[0]}" if longest[0] else "") + ")", "ms", cmd, "<= 1 ms in every operation",
           value=longest[1], stats=stats_of(ops.get(longest[0]), "max_step_ms"),
           anchor=("longest destroy step", "ms"), anchor_value=dig(ops, "destroy", "max_step_ms"),
           anchor_stats=stats_of(ops.get("destroy"), "max_step_ms"),
           met=lambda v, q: v <= 1.0, bench="scale", result=r),
        _h(f"scale: create of a {_n(n)}-page clone vs numpy generating the same bytes ({rmap})", "s", cmd,
           "none stated (the floor)", value=dig(ops, "create", "seconds"), stats=stats_of(ops.get("create"), "seconds"),
           anchor=("numpy fill", "s"), anchor_value=dig(peer, "fill", "generate", "seconds"),
           anchor_stats=stats_of(dig(peer, "fill", "generate"), "seconds"), ratio=ratio("create_over_fill"),
           ratio_of="create/fill", bench="scale", result=r),
        _h(f"scale: one dedup pass over two {_n(n)}-page clones, merge rate vs ksmd ({rmap})", "pages/s", cmd, ">= 1x",
           value=dig(ops, "dedup", "pages_per_second"), stats=stats_of(ops.get("dedup"), "pages_per_second"),
           anchor=("Linux KSM ksmd, same pages", "pages/s"), anchor_value=dig(peer, "ksm", "pages_per_second"),
           anchor_stats=stats_of(dig(peer, "ksm"), "pages_per_second"), ratio=ratio("dedup_over_ksm"),
           ratio_of="hvshare/KSM", met=lambda v, q: q >= 1, bench="scale", result=r),
        _h(f"scale: destroy of a {_n(n)}-page clone (index) vs Linux munmap of the KSM-merged region", "s", cmd,
           "<= 3x", value=dig(pick(rows, "pages", rmap="index", pages=n), "ops", "destroy", "seconds"),
           stats=stats_of(dig(pick(rows, "pages", rmap="index", pages=n), "ops", "destroy"), "seconds"),
           anchor=("Linux munmap", "s"), anchor_value=dig(peer, "ksm", "munmap_seconds"),
           anchor_stats=stats_of(dig(peer, "ksm"), "munmap_seconds"), ratio=dst,
           ratio_of="index/munmap", met=lambda v, q: q <= 3, bench="scale", result=r),
    ]


def _real_headlines(r: Any) -> list[dict]:
    """perf.real: hvshare's dedup on snapshots of real programs against
    Linux KSM on the programs: frames saved, and scan-and-merge time
    against KSM's time to settle."""
    cmd = "python -m perf real"
    hv, ksm = dig(r, "hvshare"), dig(r, "ksm")
    return [_h("real programs: frames saved by dedup of their snapshots vs Linux KSM", "frames", cmd,
               "within 2%", value=dig(hv, "frames_saved"), anchor=("Linux KSM pages_sharing", "frames"),
               anchor_value=dig(ksm, "pages_sharing"), ratio=dig(r, "ratios", "frames_over_ksm"),
               ratio_of="hvshare/KSM", met=lambda v, q: abs(q - 1) <= 0.02, bench="real",
               ratio_key="frames_over_ksm", result=r),
            _h("real programs: dedup scan-and-merge time vs Linux KSM settle time", "s", cmd, "<= 0.5x",
               value=dig(hv, "scan_seconds"), anchor=("Linux KSM ksmd until settled", "s"),
               anchor_value=dig(ksm, "settle_seconds"), ratio=dig(r, "ratios", "time_over_ksm"),
               ratio_of="hvshare/KSM", met=lambda v, q: q <= 0.5, bench="real",
               ratio_key="time_over_ksm", result=r),
            _h(f"real programs: the hypervisor's longest step while it snapshots a stopped process of "
               f"{_pages(dig(r, 'big_snapshot', 'pages'))} pages", "ms", cmd, "<= 1 ms",
               value=dig(r, "big_snapshot", "max_step_ms"),
               anchor=("the snapshot's create", "s"), anchor_value=dig(r, "big_snapshot", "seconds"),
               met=lambda v, q: v <= 1.0, bench="real", result=r)]


def _pages(n) -> str:
    return f"{int(n):,}" if num(n) is not None else "?"


def _fork_headlines(r: Any) -> list[dict]:
    """perf.fork: ``results`` rows per N (pages, fork, reset, loop, frames,
    max_step_ms), the Linux ``peers`` by N and ``ratios``; the fork goal is
    judged at 1,048,576 pages only, the others at the largest N measured."""
    cmd = "python -m perf fork"
    goal_n = 1_048_576
    rows = [c for c in cases(r) if num(c.get("pages"))]
    top = pick(rows, "pages")
    at_goal = pick(rows, "pages", pages=goal_n)
    row = at_goal or top
    n, n_top = dig(row, "pages"), dig(top, "pages")

    def peer(n_, *path):
        return dig(r, "peers", str(int(n_)), *path) if num(n_) else None

    def ratio(key, n_):
        return dig(r, "ratios", f"{key}_{int(n_)}") if num(n_) else None

    fork_s, linux_s = num(dig(row, "fork", "seconds")), num(peer(n, "fork", "seconds"))
    reset_s = num(dig(top, "reset", "reset", "seconds"))
    redo_s = num(dig(top, "reset", "destroy_and_fork", "seconds"))
    k = dig(top, "reset", "k") or 64
    frames = [f for c in rows for f in (dig(c, "frames") or {}).values() if isinstance(f, dict)]
    f64 = dig(top, "frames", "64") or {}
    steps = [(c, num(c.get("max_step_ms"))) for c in rows if num(c.get("max_step_ms")) is not None]
    worst = max(steps, key=lambda t: t[1], default=(None, None))
    return [
        _h(f"fork of a {_n(n)}-page parent vs Linux fork() of {_n(n)} touched pages", "s", cmd,
           f"<= 1x at N={goal_n:,}", value=fork_s, stats=stats_of(dig(row, "fork"), "seconds"),
           anchor=("Linux fork until the child runs", "s"), anchor_value=linux_s,
           anchor_stats=stats_of(peer(n, "fork"), "seconds"),
           ratio=ratio("fork_over_linux", n), ratio_of="hvshare/Linux",
           met=lambda v, q: q <= 1 if num(n) == goal_n else None, bench="fork", result=r),
        _h(f"fork_reset after {_n(k)} dirty pages vs destroy + new fork ({_n(n_top)} pages)", "s", cmd,
           "<= 0.5x", value=reset_s, stats=stats_of(dig(top, "reset", "reset"), "seconds"),
           anchor=("destroy + new fork", "s"), anchor_value=redo_s,
           anchor_stats=stats_of(dig(top, "reset", "destroy_and_fork"), "seconds"),
           ratio=ratio("reset_over_destroy_fork", n_top), ratio_of="reset/(destroy+fork)",
           met=lambda v, q: q <= 0.5, bench="fork", result=r),
        _h(f"fork + 64 writes + reset loop vs Linux fork + 64 writes + exit ({_n(n_top)} pages)", "iterations/s",
           cmd, ">= 1x", value=dig(top, "loop", "64", "iterations_per_second"),
           stats=stats_of(dig(top, "loop", "64"), "iterations_per_second"),
           anchor=("Linux loop", "iterations/s"), anchor_value=peer(n_top, "loop", "64", "iterations_per_second"),
           anchor_stats=stats_of(peer(n_top, "loop", "64"), "iterations_per_second"),
           ratio=ratio("loop_over_linux_k64", n_top), ratio_of="hvshare/Linux",
           met=lambda v, q: q >= 1, bench="fork", result=r),
        _h(f"frames used by a fork that wrote 64 pages and read {_n(f64.get('m'))} ({_n(n_top)} pages)", "frames",
           cmd, "== K at every N and K", value=f64.get("frames_used"), anchor="the pages it wrote (K)",
           met=lambda v, q: all(f.get("ok") is True for f in frames) if frames else None,
           bench="fork", result=r),
        _h("fork: the hypervisor's longest step in fork, fork_reset and the loops"
           + (f" (N={_n(worst[0].get('pages'))})" if worst[0] else ""), "ms", cmd, "<= 1 ms at every N",
           value=worst[1], met=lambda v, q: v <= 1.0, bench="fork", result=r),
    ]


HEADLINES: dict[str, Callable[[Any], list[dict]]] = {
    "rmap": _rmap_headlines,
    "teardown": _teardown_headlines,
    "cow": _cow_headlines,
    "dedup": _dedup_headlines,
    "density": _density_headlines,
    "real": _real_headlines,
    "scale": _scale_headlines,
    "fork": _fork_headlines,
}


def benches_of(doc: dict) -> dict:
    """``{name: result}`` of a combined JSON, or of a single bench's JSON."""
    if isinstance(doc.get("benches"), dict):
        return doc["benches"]
    if "bench" in doc:
        return {doc["bench"]: doc}
    return {}


def headlines(doc: dict) -> list[dict]:
    """The headline figures of a combined (or single-bench) result. Every
    figure is listed even where its bench did not run (value None), so the
    table always has the same rows."""
    benches = benches_of(doc)
    out = []
    for name, fn in HEADLINES.items():
        result = benches.get(name)
        try:
            rows = fn(result if isinstance(result, dict) else {})
        except Exception as e:   # a shape no one foresaw: say so, keep going
            rows = [_h(f"{name}: headlines unreadable ({type(e).__name__}: {one_line(e)})", "",
                       f"python -m perf {name}", "", bench=name)]
        if isinstance(result, dict) and "skipped" in result and "results" not in result:
            for h in rows:
                h["skipped"] = result["skipped"]
        out += rows
    return out


def _value_text(h: dict) -> str:
    v = h.get("value")
    if v is None:
        return "-" if not h.get("skipped") else "skipped"
    return figure_text(v, h.get("unit", ""), h.get("stats"))


def _ratio_text(h: dict) -> str:
    q = h.get("ratio")
    if q is None:
        return "-"
    return f"{_fmt(q)}x" + (f" ({h['ratio_of']})" if h.get("ratio_of") else "")


def _met_text(h: dict) -> str:
    met = {True: "yes", False: "no", None: "n/a"}[h.get("met")]
    return f"{met}: {h['goal']}" if h.get("goal") else met


def markdown(doc: dict) -> str:
    """The README "Performance" table of a run."""
    hs = doc.get("headlines") or headlines(doc)
    m = doc.get("machine") or next((b.get("machine") for b in benches_of(doc).values()
                                    if isinstance(b, dict) and b.get("machine")), {}) or {}
    mem = num(m.get("memory_bytes"))
    lines = [
        f"Measured on {m.get('cores', '?')} cores, {f'{mem / 2**30:.0f} GiB' if mem else '? GiB'}, "
        f"Linux {m.get('kernel', '?')}, Python {m.get('python', '?')}, numpy {m.get('numpy', '?')}"
        + (" (quick run: small sizes, goals are for the full run)" if doc.get("quick") else "") + ".",
        "Each figure is the bench's value [min–max of the repeats], n = the repeats (n=1: one measurement).",
        "",
        "| figure | hvshare | anchor | ratio | goal met | command |",
        "|---|---|---|---|---|---|",
    ]
    for h in hs:
        cells = [h.get("figure", ""), _value_text(h), h.get("anchor") or "-", _ratio_text(h),
                 _met_text(h), f"`{h['command']}`" if h.get("command") else "-"]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def headline_table(doc: dict) -> str:
    """The headlines as a plain text table (the end of a suite run)."""
    rows = [["figure", "hvshare", "ratio", "goal met"]]
    rows += [[h["figure"], _value_text(h), _ratio_text(h), _met_text(h)] for h in doc.get("headlines", [])]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join([r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].ljust(widths[2]), r[3]]).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths + [8]))
    return "\n".join(lines)

