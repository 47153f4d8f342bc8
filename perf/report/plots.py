"""Plots of the benchmark results: one PNG per question.

``python -m perf all --plots DIR`` (or ``--from RUN.json --plots DIR`` to
redraw an earlier run). matplotlib is an optional dependency (the ``perf``
extra): it is imported only here, only when a plot is drawn, and its
absence is one clear sentence rather than a traceback.

Every plot function takes a bench's JSON dict and a path, draws what the
dict carries and raises :class:`Skip` with the reason when it carries
nothing to draw: the benches evolve separately from these plots, so a
missing key must cost a plot (or a panel), never the run. Figures are drawn
through ``matplotlib.figure.Figure`` directly (no pyplot), so no GUI
backend or global state is involved.

Every figure shows its repeats: a point or bar is the bench's figure with
an error bar from the min to the max of its repeats
(:func:`perf.common.stats_of`) and n in the legend or the title; a figure
whose repeats the JSON does not keep is drawn with n = 1 and no bar.
Texts that quote a figure use :func:`perf.report.headlines.figure_text`,
as the table does, on the same field of the same JSON.
"""
from __future__ import annotations

import importlib
import os
import re
from typing import Any, Callable

from hvcore.constants import TEARDOWN_MODES

from ..common import histogram_cdf, stats_of
from .headlines import (SEED_BUCKETS_SECONDS, SEED_LIST_SECONDS, benches_of, cases, dig, figure_text,
                        find_dicts, merge_rates, num, scaled)

POLICY_STYLE = {"list": ("tab:red", "o"), "buckets": ("tab:blue", "s"), "index": ("tab:green", "^")}
MODE_LINE = {"preemptible": "-", "preempt": "-", "monolithic": "--"}


class MatplotlibMissing(RuntimeError):
    """matplotlib cannot be imported; ``str(exc)`` says how to get it."""


class Skip(Exception):
    """Nothing to draw for this plot; ``str(exc)`` is why."""


def _figure(nrows: int = 1, ncols: int = 1, size=(8, 5)):
    try:
        importlib.import_module("matplotlib")   # the package itself: the clear test of "installed"
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MatplotlibMissing(
            f"matplotlib is not installed ({e}); install it with "
            "pip install 'hvshare[perf]' (or pip install 'matplotlib>=3.7')") from None
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _compact(v: float, _pos=None) -> str:
    """Tick labels people read at a glance: 600, 2k, 1.5M, 0.02."""
    if v == 0:
        return "0"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def _log(a, axis: str = "y", base: float = 10) -> None:
    """A log axis with plain tick labels (also on the minor ticks when the
    data span at most two decades, else the axis would have no label)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    getattr(a, f"set_{axis}scale")("log", base=base)
    ax = a.yaxis if axis == "y" else a.xaxis
    ax.set_major_formatter(FuncFormatter(_compact))
    lo, hi = sorted(a.get_ylim() if axis == "y" else a.get_xlim())   # limits of the log axis
    if base == 10 and hi / max(lo, 1e-300) < 100:
        ax.set_minor_locator(LogLocator(base, subs=(2, 5)))
        ax.set_minor_formatter(FuncFormatter(_compact))
    else:
        ax.set_minor_formatter(NullFormatter())


def _yerr(ys: list[float], stats: list[dict | None]) -> list[list[float]] | None:
    """Error bar lengths (below, above) of ``ys`` from the min and max of
    each one's repeats; 0 where there is one measurement, None (no bars
    at all) where every point is one."""
    if not any(s and s.get("n", 1) > 1 for s in stats):
        return None
    lo = [max(y - s["min"], 0.0) if s and s.get("n", 1) > 1 else 0.0 for y, s in zip(ys, stats)]
    hi = [max(s["max"] - y, 0.0) if s and s.get("n", 1) > 1 else 0.0 for y, s in zip(ys, stats)]
    return [lo, hi]


def _n_text(stats: list[dict | None]) -> str:
    """``n=5``, or ``n=1-40`` when the points' repeats differ."""
    ns = sorted({s.get("n", 1) if s else 1 for s in stats})
    return f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}-{ns[-1]}"


def _errorbar(a, xs, ys, stats, label: str, **style):
    """Points (with lines) and their min-max bars; n joins the label."""
    return a.errorbar(xs, ys, yerr=_yerr(ys, stats), capsize=3, elinewidth=1,
                      label=f"{label} ({_n_text(stats)})", **style)


#: the caption line of a plot with error bars
BARS_NOTE = "bars: min-max of the repeats, n in the legend (n=1: one measurement)"


def _save(fig, path: str) -> None:
    fig.savefig(path, dpi=110)


def _subtitle(result: dict) -> str:
    m = result.get("machine") or {}
    bits = [f"{m['cores']} cores" if m.get("cores") else None,
            f"Linux {m['kernel']}" if m.get("kernel") else None,
            f"Python {m['python']}" if m.get("python") else None,
            "quick run" if result.get("quick") else None]
    return ", ".join(b for b in bits if b)


def _title(fig, title: str, result: dict, note: str = "") -> None:
    sub = _subtitle(result)
    fig.suptitle(title + (f"\n{sub}" if sub else "") + (f"\n{note}" if note else ""), fontsize=11)


# ---------------------------------------------------------------------------
# rmap

def plot_rmap(result: dict, path: str) -> str:
    """Per-entry add/lookup/delete cost against sharing degree per policy
    (log-log: a slope of 1 is O(D), flat is O(1)), and bytes per entry."""
    rows = [c for c in cases(result) if num(c.get("degree")) and c.get("policy")]
    if not rows:
        raise Skip("no per-degree rows (results[].policy/degree)")
    from matplotlib.ticker import NullLocator
    fig, ax = _figure(2, 2, (10, 7.5))
    panels = [("add_ns", "add"), ("lookup_ns", "lookup"), ("delete_ns", "delete"),
              ("bytes_per_entry", "memory")]
    drawn = 0
    for a, (field, name) in zip(ax.flat, panels):
        for policy in sorted({r["policy"] for r in rows}, key=lambda p: list(POLICY_STYLE).index(p)
                             if p in POLICY_STYLE else 9):
            pts = sorted(((num(r["degree"]), num(r.get(field)), stats_of(r, field))
                          for r in rows if r["policy"] == policy), key=lambda p: p[0])
            pts = [p for p in pts if p[1] is not None and p[1] > 0]
            if not pts:
                continue
            color, marker = POLICY_STYLE.get(policy, (None, "x"))
            xs, ys, st = zip(*pts)
            _errorbar(a, list(xs), list(ys), list(st), policy, marker=marker, color=color)
            drawn += 1
        _log(a, "x", 2)
        _log(a, "y")
        degrees = sorted({num(r["degree"]) for r in rows})
        a.set_xticks(degrees, [f"{int(d):,}" for d in degrees], fontsize=8)
        a.xaxis.set_minor_locator(NullLocator())
        a.set_xlabel("sharing degree (entries in one frame's rmap)")
        if field == "bytes_per_entry":
            a.set_ylabel("bytes per entry (tracemalloc)")
            a.set_title("memory per entry")
            a.axhline(32, color="gray", ls=":", lw=1)
            a.annotate("goal: index <= 32 B", (0.02, 32), xycoords=("axes fraction", "data"),
                       va="bottom", fontsize=8, color="gray")
        else:
            a.set_ylabel(f"ns per {name} (median)")
            a.set_title(f"{name}: cost per entry")
        if a.lines:
            a.legend(fontsize=8)
        a.grid(True, which="both", alpha=0.3)
    if not drawn:
        raise Skip("rows carry none of add_ns/lookup_ns/delete_ns/bytes_per_entry")
    # O(D) guide on the delete panel, through the list's first point
    lst = sorted((num(r["degree"]), num(r.get("delete_ns"))) for r in rows if r["policy"] == "list"
                 and num(r.get("delete_ns")))
    if len(lst) >= 2:
        (x0, y0), x1 = lst[0], lst[-1][0]
        ax[1, 0].plot([x0, x1], [y0, y0 * x1 / x0], color="gray", ls=":", lw=1, label="O(D) guide")
        ax[1, 0].legend(fontsize=8)
    _title(fig, "Reverse map: cost per entry against sharing degree", result, BARS_NOTE)
    _save(fig, path)
    return ""


# ---------------------------------------------------------------------------
# teardown

def _ksm_munmap_points(result: dict) -> tuple[list, list]:
    """(merged, private) munmap points (pages, seconds, stats of the
    repeats) of Linux KSM found anywhere in the result (the shape of
    ``perf.peers.ksm.measure_munmap``), one per number of pages."""
    merged, private = {}, {}
    for d in find_dicts(result, "n_pages", "seconds", "baseline_seconds"):
        n, s, b = num(d.get("n_pages")), num(d.get("seconds")), num(d.get("baseline_seconds"))
        if n and s:
            merged[n] = (n, s, stats_of(d, "seconds"))
        if n and b:
            private[n] = (n, b, stats_of(d, "baseline_seconds"))
    return [merged[k] for k in sorted(merged)], [private[k] for k in sorted(private)]


def _teardown_rows(result: dict) -> list[dict]:
    """The teardown cases with ``entries`` set (the bench may call it ``n``)."""
    return [dict(c, entries=c.get("entries", c.get("n"))) for c in cases(result)]


def plot_teardown_time(result: dict, path: str) -> str:
    """Teardown time against the number of shared entries per policy and
    mode, with Linux KSM's munmap of as many pages merged into one KSM page."""
    rows = [c for c in _teardown_rows(result) if num(c.get("entries")) and num(c.get("seconds"))]
    if not rows:
        raise Skip("no cases with entries and seconds")
    fig, ax = _figure(1, 1, (10.5, 5.5))
    a = ax[0, 0]
    series: dict[tuple, list] = {}
    for c in rows:
        series.setdefault((c.get("rmap", "?"), c.get("mode", "")), []).append(
            (num(c["entries"]), num(c["seconds"]), stats_of(c, "seconds")))
    for (policy, mode), pts in sorted(series.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        xs, ys, st = zip(*sorted(pts, key=lambda p: p[0]))
        color, marker = POLICY_STYLE.get(policy, (None, "x"))
        _errorbar(a, list(xs), list(ys), list(st), f"{policy}, {mode}" if mode else str(policy),
                  marker=marker, color=color, ls=MODE_LINE.get(mode, "-."), ms=8,
                  markerfacecolor="none" if mode == "monolithic" else color)     # hollow: monolithic
    merged, private = _ksm_munmap_points(result)
    for pts, label, style in ((merged, "Linux KSM munmap (one KSM page)", dict(marker="D", color="black")),
                              (private, "Linux munmap, private pages", dict(marker=".", color="gray", ls=":"))):
        if pts:
            xs, ys, st = zip(*pts)
            _errorbar(a, list(xs), list(ys), list(st), label, **style)
    notes = []
    if max(n for c in rows for n in [num(c["entries"])]) >= 50_000:
        a.scatter([100_000, 100_000], [SEED_LIST_SECONDS, SEED_BUCKETS_SECONDS], marker="*", s=120,
                  color="orange", zorder=5, label="seed (Xen 2012): list > 7 min, hash < 2 s")
    else:   # the seed's 100,000 would squeeze this run's points into a corner
        notes.append("the seed's case (100,000 entries) is not in this run")
    _log(a, "x")
    _log(a, "y")
    a.set_xlabel("shared entries torn down (gfns of the dying domain on one frame)")
    a.set_ylabel("teardown time (s)")
    a.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))    # outside: no point hidden
    if not merged:
        notes.append("Linux KSM munmap not in the JSON")
    note = "; ".join(notes)
    _title(fig, "Teardown time against shared entries", result, "; ".join(notes + [BARS_NOTE]))
    _save(fig, path)
    return note


def _steps(c: dict) -> tuple[list[float], list[float] | None]:
    d = c.get("steps_ms")
    starts = c.get("steps_start_ms", c.get("steps_t_ms"))
    if not isinstance(d, list) or not d:
        return [], None
    durs = [num(x) or 0.0 for x in d]
    if isinstance(starts, list) and len(starts) == len(durs):
        return durs, [num(x) or 0.0 for x in starts]
    return durs, None


def plot_teardown_steps(result: dict, path: str) -> str:
    """The hypervisor's step durations during a preemptible and a monolithic
    teardown: the freeze made visible. Needs ``steps_ms`` per case (and
    ``steps_start_ms`` for a true timeline); without them the longest pause
    and the guests' fault p99 per case are drawn instead, and the note says so.
    The steps drawn are one repeat's (the last); the longest step quoted,
    and drawn as a line with its min-max band, is the case's
    ``max_pause_ms`` over all repeats: the table's figure."""
    rows = _teardown_rows(result)
    with_steps = [c for c in rows if _steps(c)[0]]
    if with_steps:
        picked = []
        for mode in TEARDOWN_MODES:
            mine = [c for c in with_steps if c.get("mode") == mode]
            if mine:
                prefer = [c for c in mine if c.get("rmap") == "buckets"] or mine
                picked.append(max(prefer, key=lambda c: num(c.get("entries")) or 0))
        picked = picked or with_steps[:2]
        fig, ax = _figure(len(picked), 1, (9, 2.8 * len(picked) + 1))
        note = ""
        top = max(max(_steps(c)[0]) for c in picked)
        for c in picked:
            top = max(top, (stats_of(c, "max_pause_ms") or {}).get("max", 0.0))
        right = 0.0
        for a, c in zip(ax[:, 0], picked):
            durs, starts = _steps(c)
            if starts is None:   # back to back: the time the hypervisor was busy
                starts = [sum(durs[:i]) for i in range(len(durs))]
                note = ("steps_start_ms not in the JSON: steps drawn back to back "
                        "(hypervisor busy time, gaps between steps left out)")
                a.set_xlabel("hypervisor busy time since the teardown started (ms)")
            else:
                a.set_xlabel("time since the teardown started (ms)")
            a.bar(starts, durs, width=[max(d, 1e-3) for d in durs], align="edge", edgecolor="none",
                  color="tab:red" if c.get("mode") == "monolithic" else "tab:blue")
            # log scale: sub-millisecond steps and a seconds-long freeze on one axis
            a.set_yscale("log", nonpositive="clip")
            a.set_ylabel("step duration (ms, log)")
            pause = stats_of(c, "max_pause_ms")
            if pause:
                if pause["n"] > 1:
                    a.axhspan(pause["min"], pause["max"], color="black", alpha=0.08, lw=0)
                a.axhline(num(c["max_pause_ms"]), color="black", ls="--", lw=1,
                          label=f"longest step: {figure_text(c['max_pause_ms'], 'ms', pause)}"
                                + (" (band: min-max)" if pause["n"] > 1 else ""))
                a.legend(fontsize=8, loc="lower right")
            a.set_ylim(min(0.01, top / 10), top * 2)
            right = max(right, max(t + d for t, d in zip(starts, durs)))
            reps = num(c.get("repeats"))
            a.set_title(f"{c.get('rmap', '?')}, {c.get('mode', '?')}, {_n(c.get('entries'))} entries: "
                        f"{len(durs):,} step{'s' if len(durs) != 1 else ''}"
                        + (f" of the last of {int(reps)} repeats" if reps and reps > 1 else ""), fontsize=10)
            a.grid(True, alpha=0.3)
        for a in ax[:, 0]:        # same scales: the freeze is the difference in shape
            a.set_xlim(0, right * 1.02)
        _title(fig, "Hypervisor step durations during a teardown", result, note)
        _save(fig, path)
        return note
    # No per-step data: draw what is there.
    pause = [c for c in rows if num(c.get("max_pause_ms")) is not None]
    if not pause:
        raise Skip("no steps_ms and no max_pause_ms in the teardown cases")
    top = {}
    for c in pause:
        key = (c.get("rmap", "?"), c.get("mode", "?"))
        if key not in top or (num(c.get("entries")) or 0) > (num(top[key].get("entries")) or 0):
            top[key] = c
    keys = sorted(top, key=lambda k: (str(k[0]), str(k[1])))
    faults = [k for k in keys if num(top[k].get("fault_p99_us")) is not None]
    fig, ax = _figure(1, 2 if faults else 1, (11 if faults else 7, 5))
    a = ax[0, 0]
    labels = [f"{p}\n{m}\n{_n(top[(p, m)].get('entries'))}" for p, m in keys]
    p99 = [num(top[k].get("p99_step_ms")) for k in keys]
    w = 0.4 if any(v is not None for v in p99) else 0.8
    longest = [num(top[k]["max_pause_ms"]) for k in keys]
    st = [stats_of(top[k], "max_pause_ms") for k in keys]
    a.bar([i - (w / 2 if w < 0.8 else 0) for i in range(len(keys))], longest, w, yerr=_yerr(longest, st),
          capsize=3, color=["tab:red" if k[1] == "monolithic" else "tab:blue" for k in keys],
          label=f"longest step ({_n_text(st)})")
    if w < 0.8:
        a.bar([i + w / 2 for i in range(len(keys))], [v or 0 for v in p99], w, color="tab:gray",
              label="p99 step")
        a.legend(fontsize=8)
    a.set_xticks(range(len(keys)), labels, fontsize=8)
    _log(a, "y")
    a.set_ylabel("hypervisor step (ms)")
    a.set_title("teardown steps: longest and p99 (largest N per case)")
    a.grid(True, axis="y", which="both", alpha=0.3)
    if faults:
        b = ax[0, 1]
        x = range(len(faults))
        during = [num(top[k]["fault_p99_us"]) for k in faults]
        st = [stats_of(top[k], "fault_p99_us") for k in faults]
        b.bar([i - 0.2 for i in x], during, 0.4, yerr=_yerr(during, st), capsize=3,
              label=f"during the teardown ({_n_text(st)})", color="tab:orange")
        idle = [num(top[k].get("idle_fault_p99_us")) or 0 for k in faults]
        if any(idle):
            st = [stats_of(top[k], "idle_fault_p99_us") for k in faults]
            b.bar([i + 0.2 for i in x], idle, 0.4, yerr=_yerr(idle, st), capsize=3,
                  label=f"idle hypervisor ({_n_text(st)})", color="tab:gray")
        b.set_xticks(list(x), [f"{p}\n{m}" for p, m in faults], fontsize=8)
        _log(b, "y")
        b.set_ylabel("guest CoW fault p99 (us)")
        b.set_title("a guest's CoW faults meanwhile")
        b.legend(fontsize=8)
        b.grid(True, axis="y", which="both", alpha=0.3)
    note = "per-step durations (steps_ms) not in the JSON: longest pause per case instead"
    _title(fig, "Teardown freeze: preemptible against monolithic", result, f"{note}; {BARS_NOTE}")
    _save(fig, path)
    return note


def _n(x: Any) -> str:
    v = num(x)
    return f"{int(v):,}" if v is not None else "?"


# ---------------------------------------------------------------------------
# CoW fault latency

_PCT = re.compile(r"^p(\d+(?:\.\d+)?)_(us|ns)$")
_SAMPLES = ("samples_us", "lat_us", "latencies_us", "samples_ns", "lat_ns", "latencies_ns")
_TO_US = {"us": 1.0, "ns": 1e-3, "ms": 1e3}


def _latency_series(d: Any) -> tuple[str, list[float], list[float]]:
    """(kind, x in us, fraction at most x) of one latency dict: the CDF of
    its whole distribution (``histogram``, else raw samples), else the
    points of its percentiles; kind is "histogram", "samples",
    "percentiles" or "" (nothing)."""
    if not isinstance(d, dict) or "skipped" in d:
        return "", [], []
    h = d.get("histogram")
    if isinstance(h, dict) and h.get("n"):
        xs, fs = histogram_cdf(h)
        if h["lo"][0] > 0:              # the curve rises from 0 at the lowest bucket's edge
            xs, fs = [h["lo"][0]] + xs, [0.0] + fs
        scale = _TO_US.get(h.get("unit", "us"), 1.0)
        return "histogram", [x * scale for x in xs], fs
    for k in _SAMPLES:
        v = d.get(k)
        if isinstance(v, list) and v:
            scale = _TO_US[k.rsplit("_", 1)[1]]
            xs = sorted(x * scale for x in (num(y) for y in v) if x is not None)
            return "samples", xs, [(i + 1) / len(xs) for i in range(len(xs))]
    pcts = []
    for k, v in d.items():
        m = _PCT.match(k)
        if m and num(v) is not None:
            pcts.append((float(m.group(1)), num(v) * _TO_US[m.group(2)]))
    pcts.sort()
    return ("percentiles" if pcts else ""), [v for _, v in pcts], [p / 100 for p, _ in pcts]


def _p50_stats(d: dict) -> tuple[float | None, dict | None]:
    """The p50 of a latency dict in us and the stats of its repeats' p50s."""
    for key, factor in (("p50_us", 1.0), ("p50_ns", 1e-3)):
        if num(d.get(key)) is not None:
            return num(d[key]) * factor, scaled(stats_of(d, key), factor)
    return None, None


def plot_cow_latency(result: dict, path: str) -> str:
    """CDF of the CoW fault round trip (same core, other core), the raw
    pipe round trip under it, and Linux KSM's CoW break: every fault of all
    repeats (from the JSON's histogram or samples; else through its
    percentiles), and at the half-way line each series' p50 with the
    min-max of the repeats' p50s. The legend, outside the axes, gives n."""
    r = dig(result, "results") or {}
    series = [
        ("hvshare CoW fault, same core", dig(r, "hvshare", "faults", "same"), "tab:blue", "-"),
        ("hvshare CoW fault, other core", dig(r, "hvshare", "faults", "cross"), "tab:cyan", "-"),
        ("raw pipe round trip, same core", dig(r, "pipe", "same"), "tab:gray", ":"),
        ("raw pipe round trip, other core", dig(r, "pipe", "cross"), "silver", ":"),
        ("Linux KSM CoW break", dig(r, "ksm_cow"), "black", "--"),
    ]
    fig, ax = _figure(1, 1, (12, 5.5))
    a = ax[0, 0]
    kinds = set()
    for label, d, color, ls in series:
        kind, xs, fs = _latency_series(d)
        if not kind:
            continue
        kinds.add(kind)
        p50, st = _p50_stats(d)
        count = num(dig(d, "histogram", "n")) or num(d.get("n"))
        text = f"{label}\np50 {figure_text(p50, 'us', st)}" if p50 is not None else label
        text += f", {int(count):,} samples" if count and kind != "percentiles" else ""
        if kind == "percentiles":
            text += f"; {len(fs)} percentiles, p{fs[0] * 100:g}-p{fs[-1] * 100:g}"
            a.plot(xs, fs, color=color, ls=ls, marker="o", label=text)
        else:
            a.plot(xs, fs, color=color, ls=ls, drawstyle="steps-post", label=text)
        if p50 is not None:
            a.errorbar([p50], [0.5], xerr=_yerr([p50], [st]), fmt="o", color=color, capsize=4, ms=4)
    if not kinds:
        raise Skip("no latency histogram, samples or percentiles in the cow result")
    _log(a, "x")
    a.axhline(0.5, color="gray", lw=0.5)
    a.set_xlabel("round trip / fault latency (us)")
    a.set_ylabel("fraction of faults at most this long")
    a.set_ylim(0, 1.02)
    a.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))    # outside: no curve hidden
    whole = kinds & {"histogram", "samples"}
    note = ("" if "percentiles" not in kinds else
            "drawn through each series' percentiles (the JSON keeps no distribution)" if not whole
            else "percentiles only where the JSON keeps no distribution")
    _title(fig, "Copy-on-write fault latency, CDF of all repeats", result,
           "; ".join(filter(None, [note, "dots at 0.5: p50, bars: min-max of the repeats' p50s, n in the legend"])))
    _save(fig, path)
    return note


# ---------------------------------------------------------------------------
# dedup

def plot_dedup(result: dict, path: str) -> str:
    """Merge rate of hvshare's dedup scanner against Linux KSM's ksmd per
    page content (as ratios when the rates are not in the JSON), and the
    scanner's rate against its batch size (a log2 axis: the sizes are
    powers of two) when the bench swept it, with ksmd's rate on the same
    content in the same run as a line."""
    from matplotlib.ticker import FuncFormatter, NullLocator
    contents = ("identical", "clone")
    rates = {c: merge_rates(result, c) for c in contents}
    which = ("hvshare", "ksm", "hvshare_index")          # merge_rates' order
    rate_stats = {c: [stats_of(dig(result, "results", c, w), "pages_per_second") for w in which]
                  for c in contents}
    sweep = [s for s in (dig(result, "sweep") or []) if isinstance(s, dict)
             and num(s.get("batch_pages")) and num(s.get("pages_per_second"))]
    fig, ax = _figure(1, 2 if sweep else 1, (12 if sweep else 7, 5))
    a = ax[0, 0]
    if any(hv is not None or k is not None for hv, k, _ in rates.values()):
        x = list(range(len(contents)))
        series = [("hvshare dedup, rmap buckets", 0, "tab:blue"), ("hvshare dedup, rmap index", 2, "tab:green"),
                  ("Linux KSM (ksmd, full speed)", 1, "black")]
        series = [s for s in series if any(rates[c][s[1]] is not None for c in contents)]
        w = 0.8 / len(series)
        for i, (label, j, color) in enumerate(series):
            ys = [rates[c][j] or 0 for c in contents]
            st = [rate_stats[c][j] for c in contents]
            a.bar([xi - 0.4 + w * (i + 0.5) for xi in x], ys, w, yerr=_yerr(ys, st), capsize=3,
                  label=f"{label} ({_n_text(st)})", color=color)
        a.set_xticks(x, [f"{c} pages" for c in contents])
        a.set_ylabel("pages merged per second")
        a.yaxis.set_major_formatter(FuncFormatter(_compact))
        a.set_title("merge rate, nothing shared -> fully merged")
        note = ""
    else:
        keys = [("identical pages", "merge_rate_over_ksm"), ("clone pages", "merge_rate_over_ksm_clone")]
        vals = [(lbl, num(dig(result, "ratios", k))) for lbl, k in keys]
        vals = [(lbl, v) for lbl, v in vals if v is not None]
        if not vals:
            raise Skip("no merge rates and no merge_rate_over_ksm ratios in the dedup result")
        a.bar(range(len(vals)), [v for _, v in vals], color="tab:blue")
        a.set_xticks(range(len(vals)), [lbl for lbl, _ in vals])
        a.axhline(1, color="black", ls="--", lw=1, label="Linux KSM (= 1)")
        a.set_ylabel("merge rate, hvshare / Linux KSM")
        note = "rates not in the JSON: ratios only"
    a.legend(fontsize=9)
    a.grid(True, axis="y", alpha=0.3)
    if sweep:
        b = ax[0, 1]
        colors = {"clone": "tab:blue", "identical": "tab:purple"}
        for content in sorted({s.get("content", "?") for s in sweep}):
            mine = sorted((s for s in sweep if s.get("content", "?") == content), key=lambda s: num(s["batch_pages"]))
            xs = [num(s["batch_pages"]) for s in mine]
            ys = [num(s["pages_per_second"]) for s in mine]
            color = colors.get(content)
            _errorbar(b, xs, ys, [stats_of(s, "pages_per_second") for s in mine], f"hvshare, {content} pages",
                      marker="o", color=color)
            ksm_rate, ksm_st = rates.get(content, (None,) * 3)[1], rate_stats.get(content, (None,) * 3)[1]
            if ksm_rate is not None:
                b.axhline(ksm_rate, color=color, ls="--", lw=1.2,
                          label=f"Linux KSM, {content} pages: {figure_text(ksm_rate, 'pages/s', ksm_st)}")
                if ksm_st and ksm_st["n"] > 1:
                    b.axhspan(ksm_st["min"], ksm_st["max"], color=color, alpha=0.1, lw=0)
        sizes = sorted({num(s["batch_pages"]) for s in sweep})
        b.set_xscale("log", base=2)
        b.set_xticks(sizes, [f"{int(v):,}" for v in sizes])
        b.xaxis.set_minor_locator(NullLocator())
        b.set_xlabel("pages per nominate/share request (batch_pages, log2)")
        b.set_ylabel("pages merged per second")
        b.yaxis.set_major_formatter(FuncFormatter(_compact))
        b.set_ylim(bottom=0)
        b.set_title("hvshare: merge rate against batch size; ksmd in the same run")
        b.legend(fontsize=8)
        b.grid(True, alpha=0.3)
    _title(fig, "Dedup merge rate: hvshare against Linux KSM", result, "; ".join(filter(None, [note, BARS_NOTE])))
    _save(fig, path)
    return note


# ---------------------------------------------------------------------------
# density

def plot_density(result: dict, path: str) -> str:
    """Clone guests that fit in one pool without and with dedup, next to
    what the content predicts."""
    r = dig(result, "results") or {}
    found = [(label, num(dig(r, key, "guests")), num(dig(r, key, "predicted")), stats_of(dig(r, key), "guests"))
             for key, label in (("without", "without dedup"), ("with", "dedup after each boot"))]
    found = [b for b in found if b[1] is not None]
    bars, st = [b[:3] for b in found], [b[3] for b in found]
    if not bars:
        raise Skip("no results.with/without guests in the density result")
    fig, ax = _figure(1, 1, (7, 5))
    a = ax[0, 0]
    x = range(len(bars))
    ys = [g for _, g, _ in bars]
    a.bar(x, ys, 0.6, yerr=_yerr(ys, st), capsize=4, color=["tab:gray", "tab:blue"][:len(bars)],
          label=f"guests created ({_n_text(st)})")
    for i, (_, g, _) in enumerate(bars):
        a.annotate(figure_text(g, "", st[i]), (i, g), ha="center", va="bottom", fontsize=10)
    for k, (i, p) in enumerate((i, p) for i, (_, _, p) in enumerate(bars) if p is not None):
        a.hlines(p, i - 0.4, i + 0.4, colors="black", linestyles="--", zorder=3,
                 label="predicted by the content" if k == 0 else None)
    a.set_ylim(0, max(max(g, p or 0) for _, g, p in bars) * 1.25)
    a.set_xticks(list(x), [b[0] for b in bars])
    a.set_ylabel("clone guests that fit in the pool")
    frames, pages = num(result.get("frames")), num(result.get("pages"))
    if frames and pages:
        a.set_title(f"pool of {int(frames):,} frames, guests of {int(pages):,} pages")
    a.legend(fontsize=9)
    a.grid(True, axis="y", alpha=0.3)
    _title(fig, "Guest density with and without dedup", result)
    _save(fig, path)
    return ""


# ---------------------------------------------------------------------------
# scale

SCALE_OPS = {"create": "tab:red", "dedup": "tab:blue", "cow": "tab:orange", "destroy": "tab:green"}


def plot_scale_steps(result: dict, path: str) -> str:
    """Each operation's longest hypervisor step (wall: solid, CPU: dashed,
    hollow markers) against the domain size, one panel per rmap policy,
    log axes, with the 1 ms line."""
    rows = [c for c in cases(result) if num(c.get("pages")) and isinstance(c.get("ops"), dict)]
    if not rows:
        raise Skip("no results with pages and ops")
    from matplotlib.ticker import NullLocator
    policies = sorted({c.get("rmap", "?") for c in rows}, key=lambda p: list(POLICY_STYLE).index(p)
                      if p in POLICY_STYLE else 9)
    fig, ax = _figure(1, len(policies), (6 * len(policies), 5))
    wall_only = False
    for a, policy in zip(ax[0], policies):
        mine = [c for c in rows if c.get("rmap", "?") == policy]
        for op, color in SCALE_OPS.items():
            mine = sorted(mine, key=lambda c: num(c["pages"]))
            wall = [(num(c["pages"]), num(dig(c, "ops", op, "max_step_ms")), stats_of(dig(c, "ops", op), "max_step_ms"))
                    for c in mine]
            wall = [p for p in wall if p[1]]
            cpu = [(num(c["pages"]), num(dig(c, "ops", op, "max_step_cpu_ms")),
                    stats_of(dig(c, "ops", op), "max_step_cpu_ms")) for c in mine
                   if dig(c, "ops", op, "cpu_from") == "cpu"]
            cpu = [p for p in cpu if p[1]]
            wall_only = wall_only or len(cpu) < len(wall)
            if wall:
                xs, ys, st = zip(*wall)
                _errorbar(a, list(xs), list(ys), list(st), f"{op}, wall", color=color, marker="o")
            if cpu:
                xs, ys, st = zip(*cpu)
                _errorbar(a, list(xs), list(ys), list(st), f"{op}, CPU", color=color, marker="o", ls="--",
                          markerfacecolor="none")
        a.axhline(1.0, color="gray", ls=":", lw=1)
        a.annotate("1 ms", (0.01, 1.0), xycoords=("axes fraction", "data"), va="bottom", fontsize=8,
                   color="gray")
        sizes = sorted({num(c["pages"]) for c in mine})
        if len(sizes) == 1:
            a.set_xlim(sizes[0] / 2, sizes[0] * 2)
        _log(a, "x")
        _log(a, "y")
        a.set_xticks(sizes, [_compact(x) for x in sizes])
        a.xaxis.set_minor_locator(NullLocator())
        a.set_xlabel("pages per domain")
        a.set_ylabel("longest hypervisor step (ms)")
        a.set_title(f"rmap {policy}")
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    lo = min(a.get_ylim()[0] for a in ax[0])
    hi = max(a.get_ylim()[1] for a in ax[0])
    for a in ax[0]:                   # one scale: the policies compare at a glance
        a.set_ylim(lo, hi)
    note = "CPU time per step not reported for some operations: wall time only there" if wall_only else ""
    _title(fig, "Longest hypervisor step per operation against domain size", result,
           "; ".join(filter(None, [note, BARS_NOTE])))
    _save(fig, path)
    return note


# ---------------------------------------------------------------------------
# all of them

#: (bench, file name, function)
PLOTS: list[tuple[str, str, Callable[[dict, str], str]]] = [
    ("rmap", "rmap_cost.png", plot_rmap),
    ("teardown", "teardown_time.png", plot_teardown_time),
    ("teardown", "teardown_steps.png", plot_teardown_steps),
    ("cow", "cow_latency.png", plot_cow_latency),
    ("dedup", "dedup_merge.png", plot_dedup),
    ("density", "density.png", plot_density),
    ("scale", "scale_steps.png", plot_scale_steps),
]


#: the run behind the README's table and plots, and where its plots go
RUN_JSON = os.path.join("docs", "perf", "run.json")
PLOTS_DIR = os.path.join("docs", "perf")


def write_all(doc: dict, out_dir: str) -> list[tuple[str, str | None, str]]:
    """Draw every plot whose bench is in ``doc`` (a combined or a single
    bench JSON). Returns ``(file name, path, note)`` per plot; a plot that
    could not be drawn has path None and the reason as note.
    Raises :class:`MatplotlibMissing` before anything is written."""
    _figure()          # fail early and once if matplotlib is missing
    benches = benches_of(doc)
    os.makedirs(out_dir, exist_ok=True)
    out = []
    for bench, name, fn in PLOTS:
        result = benches.get(bench)
        if not isinstance(result, dict):
            continue
        path = os.path.join(out_dir, name)
        if "skipped" in result and "results" not in result:
            out.append((name, None, f"{bench} did not run: {result['skipped']}"))
            continue
        try:
            out.append((name, path, fn(result, path)))
        except Skip as e:
            out.append((name, None, str(e)))
        except MatplotlibMissing:
            raise
        except Exception as e:   # one bad plot must not cost the others
            out.append((name, None, f"{type(e).__name__}: {e}"))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys
    p = argparse.ArgumentParser(prog="python -m perf plots",
                                description="Draw the plots of a JSON written by 'python -m perf all' or one bench.")
    p.add_argument("json", nargs="?", default=RUN_JSON, help=f"result JSON (default: {RUN_JSON})")
    p.add_argument("out_dir", nargs="?", default=PLOTS_DIR,
                   help=f"directory for the PNG files (default: {PLOTS_DIR}, the README's plots)")
    a = p.parse_args(argv)
    with open(a.json) as f:
        doc = json.load(f)
    try:
        written = write_all(doc, a.out_dir)
    except MatplotlibMissing as e:
        print(f"plots: {e}", file=sys.stderr)
        return 1
    if not written:
        print("plots: nothing to draw (no rmap, cow, teardown, dedup, density or scale result in the JSON)")
    print(report(written))
    return 0


def report(written: list[tuple[str, str | None, str]]) -> str:
    """One line per plot: where it went, or why it was not drawn."""
    return "\n".join(f"plot {path}" + (f"  (note: {note})" if note else "") if path
                     else f"plot {name}: not drawn, {note}" for name, path, note in written)
