"""Plots of the benchmark results: one PNG per question.

``python -m hvshare.perf plots [RUN.json DIR]`` or ``python -m hvshare.perf all --plots DIR``.
matplotlib is an optional dependency (the ``perf`` extra): it is imported
only here, only when a plot is drawn, and its absence is one clear
sentence. Figures are drawn through ``matplotlib.figure.Figure`` directly
(no pyplot, no GUI backend, no global state).

Every plot reads the result contract (:mod:`hvshare.perf.figure`: a bench's
``figures``, ``histograms`` and ``traces``) and nothing else: a point or
bar is a figure's median with an error bar from the min to the max of its
repeats, n in the legend; a text that quotes a figure prints it as the
table does (:meth:`hvshare.perf.figure.Figure.text`).
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

from hvshare.hvcore.constants import RMAP_POLICIES, TEARDOWN_MODES

from ..common import histogram_cdf
from ..figure import Figure, find, select, series
from ..goals import SEED_BUCKETS_SECONDS, SEED_LIST_SECONDS, SEED_N, STEP_MS
from .headlines import benches_of

POLICY_STYLE = {"list": ("tab:red", "o"), "buckets": ("tab:blue", "s"), "index": ("tab:green", "^")}
#: the caption line of a plot with error bars
BARS_NOTE = "bars: min-max of the repeats, n in the legend (n=1: one measurement)"


class MatplotlibMissing(RuntimeError):
    """matplotlib cannot be imported; ``str(exc)`` says how to get it."""


class Skip(Exception):
    """Nothing to draw for this plot; ``str(exc)`` is why."""


def _figure(nrows: int = 1, ncols: int = 1, size=(8, 5)):
    try:
        importlib.import_module("matplotlib")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure as MplFigure
    except ImportError as e:
        raise MatplotlibMissing(
            f"matplotlib is not installed ({e}); install it with "
            "pip install 'hvshare[perf]' (or pip install 'matplotlib>=3.7')") from None
    fig = MplFigure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _compact(v: float, _pos=None) -> str:
    """Tick labels people read at a glance: 600, 2k, 1.5M, 0.02."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def _log(a, axis: str = "y", base: float = 10) -> None:
    """A log axis with plain tick labels (on the minor ticks too when the
    data span under two decades, else the axis could have a single label)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    getattr(a, f"set_{axis}scale")("log", base=base)
    ax = a.yaxis if axis == "y" else a.xaxis
    ax.set_major_formatter(FuncFormatter(_compact))
    lo, hi = sorted(a.get_ylim() if axis == "y" else a.get_xlim())
    if base == 10 and hi / max(lo, 1e-300) < 100:
        ax.set_minor_locator(LogLocator(base, subs=(2, 5)))
        ax.set_minor_formatter(FuncFormatter(_compact))
    else:
        ax.set_minor_formatter(NullFormatter())


def _ticks(a, xs) -> None:
    from matplotlib.ticker import NullLocator
    xs = sorted(set(xs))
    a.set_xticks(xs, [f"{x:,}" if x < 1e6 else _compact(x) for x in xs], fontsize=8)
    a.xaxis.set_minor_locator(NullLocator())


def _yerr(figs: list[Figure]):
    """Error bar lengths (below, above) of the figures' medians; None when all are n = 1."""
    if all(f.n == 1 for f in figs):
        return None
    return [[f.median - f.min for f in figs], [f.max - f.median for f in figs]]


def _n_text(figs: list[Figure]) -> str:
    ns = sorted({f.n for f in figs})
    return f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}-{ns[-1]}"


def _line(a, figs: list[Figure], x: str, label: str, **style) -> None:
    """The figures' medians against their label ``x``, with min-max bars."""
    figs = sorted(figs, key=lambda f: f.labels[x])
    if figs:
        a.errorbar([f.labels[x] for f in figs], [f.median for f in figs], yerr=_yerr(figs), capsize=3,
                   elinewidth=1, label=f"{label} ({_n_text(figs)})", **style)


def _bars(a, xs, figs: list[Figure | None], width: float, label: str, **style) -> None:
    got = [(x, f) for x, f in zip(xs, figs) if f]
    if got:
        a.bar([x for x, _ in got], [f.median for _, f in got], width, yerr=_yerr([f for _, f in got]),
              capsize=3, label=f"{label} ({_n_text([f for _, f in got])})", **style)


def _title(fig, title: str, result: dict, note: str = "") -> None:
    m = result.get("machine") or {}
    sub = ", ".join(b for b in (f"{m['cores']} cores" if m.get("cores") else "",
                                f"Linux {m['kernel']}" if m.get("kernel") else "",
                                "quick run" if result.get("quick") else "") if b)
    fig.suptitle(title + (f"\n{sub}" if sub else "") + (f"\n{note}" if note else ""), fontsize=11)


def _policies(figs: list[Figure], key: str = "policy") -> list[str]:
    have = {f.labels[key] for f in figs}
    return [p for p in RMAP_POLICIES if p in have]


# ---------------------------------------------------------------------------
# the plots: each takes a bench's result, draws into a matplotlib figure and returns a note

def plot_rmap(result: dict):
    """Per-entry add/lookup/delete cost against sharing degree per policy
    (log-log: a slope of 1 is O(D), flat is O(1)), and bytes per entry."""
    fig, ax = _figure(2, 2, (10, 7.5))
    for a, name in zip(ax.flat, ("add", "lookup", "delete", "bytes_per_entry")):
        figs = select(result, name)
        if not figs:
            raise Skip(f"no {name} figures")
        for p in _policies(figs):
            color, marker = POLICY_STYLE[p]
            _line(a, [f for f in figs if f.labels["policy"] == p], "degree", p, color=color, marker=marker)
        _log(a, "x", 2)
        _log(a, "y")
        _ticks(a, [f.labels["degree"] for f in figs])
        a.set_xlabel("sharing degree (entries in one frame's rmap)")
        a.set_ylabel(f"{figs[0].unit} per entry" if name != "bytes_per_entry" else "bytes per entry")
        a.set_title(name.replace("_", " "))
        if name == "bytes_per_entry":
            a.axhline(32, color="gray", ls=":", lw=1, label="goal: index <= 32 B")
        a.legend(fontsize=8)
        a.grid(True, which="both", alpha=0.3)
    _title(fig, "Reverse map: cost per entry against sharing degree", result, BARS_NOTE)
    return fig, ""


def plot_teardown_time(result: dict):
    """Teardown time against the number of shared entries per policy and
    mode, with Linux munmap of as many pages merged into one KSM page."""
    figs = select(result, "seconds")
    if not figs:
        raise Skip("no teardown seconds figures")
    fig, ax = _figure(1, 1, (10.5, 5.5))
    a = ax[0, 0]
    for p in _policies(figs, "rmap"):
        color, marker = POLICY_STYLE[p]
        for mode in TEARDOWN_MODES:
            mine = [f for f in figs if f.labels["rmap"] == p and f.labels["mode"] == mode]
            _line(a, mine, "entries", f"{p}, {mode}", color=color, marker=marker, ms=8,
                  ls="--" if mode == "monolithic" else "-", markerfacecolor="none" if mode == "monolithic" else color)
    _line(a, select(result, "munmap_ksm"), "entries", "Linux munmap, one KSM page", color="black", marker="D")
    _line(a, select(result, "munmap_private"), "entries", "Linux munmap, private pages", color="gray",
          marker=".", ls=":")
    a.scatter([SEED_N, SEED_N], [SEED_LIST_SECONDS, SEED_BUCKETS_SECONDS], marker="*", s=120, color="orange",
              zorder=5, label="seed (Xen 2012): list > 7 min, hash < 2 s")
    _log(a, "x")
    _log(a, "y")
    a.set_xlabel("shared entries torn down (gfns of the dying domain on one frame)")
    a.set_ylabel("teardown time (s)")
    a.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _title(fig, "Teardown time against shared entries", result, BARS_NOTE)
    return fig, ""


def plot_teardown_steps(result: dict):
    """The hypervisor's step durations during a preemptible and a monolithic
    teardown (buckets, the largest N): the freeze made visible. The steps
    are the last repeat's (a trace); the dashed line and its band are the
    case's longest step over all repeats, the table's figure."""
    picked = []
    for mode in TEARDOWN_MODES:
        mine = series(result, "traces", "steps", mode=mode, rmap="buckets") or series(result, "traces", "steps",
                                                                                      mode=mode)
        if mine:
            picked.append(max(mine, key=lambda t: t["labels"]["entries"]))
    if not picked:
        raise Skip("no step traces")
    fig, ax = _figure(len(picked), 1, (9, 2.8 * len(picked) + 1))
    top = max(max(t["y"]) for t in picked)
    right = max(x + y for t in picked for x, y in zip(t["x"], t["y"]))
    for a, t in zip(ax[:, 0], picked):
        lab = t["labels"]
        a.bar(t["x"], t["y"], width=[max(d, 1e-3) for d in t["y"]], align="edge", edgecolor="none",
              color="tab:red" if lab["mode"] == "monolithic" else "tab:blue")
        a.set_yscale("log", nonpositive="clip")
        longest = find(result, "max_step", **lab)
        if longest:
            if longest.n > 1:
                a.axhspan(longest.min, longest.max, color="black", alpha=0.08, lw=0)
            a.axhline(longest.median, color="black", ls="--", lw=1, label=f"longest step: {longest.text()}")
            a.legend(fontsize=8, loc="lower right")
            top = max(top, longest.max)
        a.axhline(STEP_MS, color="gray", ls=":", lw=1)
        a.set_ylim(min(0.01, top / 10), top * 2)
        a.set_xlim(0, right * 1.02)
        a.set_xlabel("time since the teardown started (ms)")
        a.set_ylabel("step (ms, log)")
        a.set_title(f"{lab['rmap']}, {lab['mode']}, {lab['entries']:,} entries: {len(t['y']):,} steps "
                    "(the last repeat)", fontsize=10)
        a.grid(True, alpha=0.3)
    _title(fig, "Hypervisor step durations during a teardown", result, f"dotted: the {STEP_MS:g} ms goal")
    return fig, ""


COW_SERIES = (("fault", {"placement": "same"}, "hvshare CoW fault, same core", "tab:blue", "-"),
              ("fault", {"placement": "cross"}, "hvshare CoW fault, other core", "tab:cyan", "-"),
              ("floor", {"placement": "same"}, "floor probe, same core", "tab:purple", "-."),
              ("pipe", {"placement": "same"}, "raw pipe round trip, same core", "tab:gray", ":"),
              ("pipe", {"placement": "cross"}, "raw pipe round trip, other core", "silver", ":"),
              ("ksm_cow", {}, "Linux KSM CoW break", "black", "--"))


def plot_cow_latency(result: dict):
    """CDF of the CoW fault round trip (same core, other core) beside the
    raw pipe round trip, the floor probe and Linux KSM's CoW break: every
    sample of all repeats (their histograms), and at the half-way line each
    series' p50 figure with the min-max of the repeats' p50s."""
    fig, ax = _figure(1, 1, (12, 5.5))
    a = ax[0, 0]
    drawn = 0
    for name, labels, text, color, ls in COW_SERIES:
        p50 = find(result, f"{name}_p50", **labels)
        hs = series(result, "histograms", name, **labels)
        if hs:
            xs, fs = histogram_cdf(hs[0])
            a.plot([hs[0]["lo"][0]] + xs, [0.0] + fs, color=color, ls=ls, drawstyle="steps-post",
                   label=f"{text}\np50 {p50.text() if p50 else '-'}, {hs[0]['n']:,} samples")
            drawn += 1
        if p50:
            a.errorbar([p50.median], [0.5], xerr=_yerr([p50]), fmt="o", color=color, capsize=4, ms=4,
                       label=None if hs else f"{text}\np50 {p50.text()} (percentiles only)")
    if not drawn:
        raise Skip("no latency histograms in the cow result")
    _log(a, "x")
    a.axhline(0.5, color="gray", lw=0.5)
    a.set_xlabel("round trip / fault latency (us)")
    a.set_ylabel("fraction of faults at most this long")
    a.set_ylim(0, 1.02)
    a.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _title(fig, "Copy-on-write fault latency, CDF of all repeats", result,
           "dots at 0.5: p50, bars: min-max of the repeats' p50s")
    return fig, ""


def plot_dedup(result: dict):
    """Merge rate of hvshare's dedup scanner against Linux KSM's ksmd per
    page content, and the scanner's rate against its batch size, with
    ksmd's on the same content as a line."""
    contents = ("identical", "clone")
    sweep = select(result, "sweep_merge_rate")
    fig, ax = _figure(1, 2 if sweep else 1, (12 if sweep else 7, 5))
    a = ax[0, 0]
    bars = [("merge_rate", {"rmap": "buckets"}, "hvshare dedup, rmap buckets", "tab:blue"),
            ("merge_rate", {"rmap": "index"}, "hvshare dedup, rmap index", "tab:green"),
            ("ksm_merge_rate", {}, "Linux KSM (ksmd, full speed)", "black")]
    bars = [b for b in bars if select(result, b[0], **b[1])]
    if not bars:
        raise Skip("no merge rates in the dedup result")
    w = 0.8 / len(bars)
    for i, (name, labels, text, color) in enumerate(bars):
        _bars(a, [x - 0.4 + w * (i + 0.5) for x in range(len(contents))],
              [find(result, name, content=c, **labels) for c in contents], w, text, color=color)
    a.set_xticks(range(len(contents)), [f"{c} pages" for c in contents])
    a.set_ylabel("pages merged per second")
    a.set_title("merge rate, nothing shared -> fully merged")
    a.legend(fontsize=9)
    a.grid(True, axis="y", alpha=0.3)
    if sweep:
        b = ax[0, 1]
        for content, color in (("clone", "tab:blue"), ("identical", "tab:purple")):
            _line(b, [f for f in sweep if f.labels["content"] == content], "batch_pages", f"hvshare, {content} pages",
                  marker="o", color=color)
            k = find(result, "ksm_merge_rate", content=content)
            if k and any(f.labels["content"] == content for f in sweep):
                b.axhline(k.median, color=color, ls="--", lw=1.2, label=f"Linux KSM, {content}: {k.text()}")
        b.set_xscale("log", base=2)
        _ticks(b, [f.labels["batch_pages"] for f in sweep])
        b.set_xlabel("pages per nominate/share request (batch_pages, log2)")
        b.set_ylabel("pages merged per second")
        b.set_ylim(bottom=0)
        b.set_title("hvshare: merge rate against batch size; ksmd in the same run")
        b.legend(fontsize=8)
        b.grid(True, alpha=0.3)
    for x in ax.flat:
        from matplotlib.ticker import FuncFormatter
        x.yaxis.set_major_formatter(FuncFormatter(_compact))
    _title(fig, "Dedup merge rate: hvshare against Linux KSM", result, BARS_NOTE)
    return fig, ""


def plot_density(result: dict):
    """Clone guests that fit in one pool without and with dedup, next to
    what the content predicts."""
    keys = [("without", "without dedup"), ("with", "dedup after each boot")]
    got = [(find(result, "guests", dedup=k), find(result, "predicted_guests", dedup=k), text) for k, text in keys]
    got = [g for g in got if g[0]]
    if not got:
        raise Skip("no guests figures")
    fig, ax = _figure(1, 1, (7, 5))
    a = ax[0, 0]
    a.bar(range(len(got)), [g.median for g, _, _ in got], 0.6, color=["tab:gray", "tab:blue"][:len(got)],
          label=f"guests created ({_n_text([g for g, _, _ in got])})")
    for i, (g, p, _) in enumerate(got):
        a.annotate(g.text(unit=False), (i, g.median), ha="center", va="bottom", fontsize=10)
        if p:
            a.hlines(p.median, i - 0.4, i + 0.4, colors="black", linestyles="--", zorder=3,
                     label="predicted by the content" if i == 0 else None)
    a.set_ylim(0, max(max(g.median, p.median if p else 0) for g, p, _ in got) * 1.25)
    a.set_xticks(range(len(got)), [t for _, _, t in got])
    a.set_ylabel("clone guests that fit in the pool")
    a.legend(fontsize=9)
    a.grid(True, axis="y", alpha=0.3)
    _title(fig, "Guest density with and without dedup", result)
    return fig, ""


SCALE_OPS = {"create": "tab:red", "dedup": "tab:blue", "cow": "tab:orange", "destroy": "tab:green"}


def plot_scale_steps(result: dict):
    """Each operation's longest hypervisor step (wall: solid, CPU: dashed,
    hollow markers) against the domain size, one panel per rmap policy,
    log axes, with the 1 ms line."""
    figs = select(result, "max_step")
    if not figs:
        raise Skip("no max_step figures")
    policies = _policies(figs, "rmap")
    fig, ax = _figure(1, len(policies), (6 * len(policies), 5))
    for a, p in zip(ax[0], policies):
        for op, color in SCALE_OPS.items():
            _line(a, select(result, "max_step", rmap=p, op=op), "pages", f"{op}, wall", color=color, marker="o")
            _line(a, select(result, "max_step_cpu", rmap=p, op=op), "pages", f"{op}, CPU", color=color,
                  marker="o", ls="--", markerfacecolor="none")
        a.axhline(STEP_MS, color="gray", ls=":", lw=1)
        pages = [f.labels["pages"] for f in figs]
        if len(set(pages)) == 1:
            a.set_xlim(pages[0] / 2, pages[0] * 2)
        _log(a, "x")
        _log(a, "y")
        _ticks(a, pages)
        a.set_xlabel("pages per domain")
        a.set_ylabel("longest hypervisor step (ms)")
        a.set_title(f"rmap {p}")
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    lo, hi = min(a.get_ylim()[0] for a in ax[0]), max(a.get_ylim()[1] for a in ax[0])
    for a in ax[0]:                   # one scale: the policies compare at a glance
        a.set_ylim(lo, hi)
    _title(fig, "Longest hypervisor step per operation against domain size", result,
           f"dotted: the {STEP_MS:g} ms goal; {BARS_NOTE}")
    return fig, ""


#: (bench, file name, function)
PLOTS: list[tuple[str, str, Callable]] = [
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
    """Draw every plot whose bench is in ``doc`` (a suite's or one bench's
    JSON). Returns ``(file name, path, note)`` per plot; a plot that could
    not be drawn has path None and the reason as note. Raises
    :class:`MatplotlibMissing` before anything is written."""
    _figure()
    benches = benches_of(doc)
    os.makedirs(out_dir, exist_ok=True)
    out = []
    for bench, name, fn in PLOTS:
        result = benches.get(bench)
        if result is None:
            continue
        if not result.get("figures"):
            out.append((name, None, f"{bench}: no figures ({result.get('skipped', 'not run')})"))
            continue
        try:
            fig, note = fn(result)
        except Skip as e:
            out.append((name, None, str(e)))
            continue
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        out.append((name, path, note))
    return out


def report(written: list[tuple[str, str | None, str]]) -> str:
    """One line per plot: where it went, or why it was not drawn."""
    return "\n".join(f"plot {path}" + (f"  (note: {note})" if note else "") if path
                     else f"plot {name}: not drawn, {note}" for name, path, note in written)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys
    p = argparse.ArgumentParser(prog="python -m hvshare.perf plots",
                                description="Draw the plots of a JSON written by 'python -m hvshare.perf all' or one bench.")
    p.add_argument("json", nargs="?", default=RUN_JSON, help=f"result JSON (default: {RUN_JSON})")
    p.add_argument("out_dir", nargs="?", default=PLOTS_DIR, help=f"directory for the PNG files (default: {PLOTS_DIR})")
    a = p.parse_args(argv)
    with open(a.json) as f:
        doc = json.load(f)
    try:
        written = write_all(doc, a.out_dir)
    except MatplotlibMissing as e:
        print(f"plots: {e}", file=sys.stderr)
        return 1
    print(report(written) or "plots: nothing to draw (no rmap, cow, teardown, dedup, density or scale figures)")
    return 0
