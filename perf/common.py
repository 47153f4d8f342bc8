"""Shared helpers of the benchmarks: machine description, repeats and
their statistics (median, spread, n), latency percentiles and whole
distributions (log-linear histograms), tables and their cells, one-line
reasons, SIGTERM."""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import statistics
import threading
import time
from typing import Any, Callable, Sequence


def machine_info() -> dict:
    import numpy
    try:
        import psutil
        mem = psutil.virtual_memory().total
    except Exception:  # pragma: no cover - psutil is a dependency
        mem = None
    return {
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "machine": platform.machine(),
    }


def repeat_times(fn: Callable[[], object], repeats: int = 5) -> list[float]:
    """Wall time of each of ``repeats`` calls of ``fn()``, in seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_time(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, in seconds."""
    return statistics.median(repeat_times(fn, repeats))


# ---------------------------------------------------------------------------
# repeats: a figure is the median of its repeats, with their spread and n

#: confidence of the interval of the median that :func:`summary` gives
CI_LEVEL = 0.95


def median_ci_ranks(n: int, level: float = CI_LEVEL) -> tuple[int, int] | None:
    """1-based ranks (lo, hi) of the order statistics that bracket the
    median with at least ``level`` confidence whatever the distribution
    (the number of samples below the median is Binomial(n, 1/2)); None
    when ``n`` is too small for any pair to reach ``level`` (n < 6 at 95 %)."""
    from math import comb
    tail, lo = 0.0, 0
    for i in range(n + 1):        # P(B <= i) while it stays within the allowed tail
        tail += comb(n, i) / 2 ** n
        if tail > (1 - level) / 2:
            break
        lo = i + 1
    return (lo, n + 1 - lo) if lo >= 1 else None


def summary(samples) -> dict | None:
    """``{"median", "min", "max", "n"}`` of the repeats ``samples`` (NaN and
    None dropped), plus ``"ci95": [lo, hi]``, the order-statistic 95 %
    interval of the median, where n is large enough (:func:`median_ci_ranks`).
    None when there is no sample."""
    vals = sorted(float(v) for v in samples if v is not None and v == v)
    if not vals:
        return None
    out = {"median": statistics.median(vals), "min": vals[0], "max": vals[-1], "n": len(vals)}
    ranks = median_ci_ranks(len(vals))
    if ranks:
        out["ci95"] = [vals[ranks[0] - 1], vals[ranks[1] - 1]]
    return out


def stats_of(d: Any, key: str) -> dict | None:
    """The :func:`summary` of figure ``key`` of the result dict ``d``, read
    from whichever way the bench kept its repeats: ``KEY_stats`` (a summary),
    ``KEY_spread`` (``{"all": [...]}``), ``KEY_all`` or ``KEY_each`` (every
    repeat's value), or ``d["all"][KEY]``; a rate (``..._per_second``) kept
    only as the time of each repeat (``seconds_all``, ``merge_seconds_all``)
    is the same work over each repeat's time. A figure with none of them is
    one measurement as far as the JSON shows: n = 1, its value as min and
    max. None when ``d`` has no such figure."""
    if not isinstance(d, dict):
        return None
    s = d.get(f"{key}_stats")
    if isinstance(s, dict) and isinstance(s.get("n"), int) and s["n"] > 0:
        return s
    spread = d.get(f"{key}_spread")
    lists = [spread.get("all") if isinstance(spread, dict) else None, d.get(f"{key}_all"),
             d.get(f"{key}_each"), d["all"].get(key) if isinstance(d.get("all"), dict) else None]
    for vals in lists:
        if isinstance(vals, list):
            s = summary(v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool))
            if s:
                return s
    v = d.get(key)
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v == v):
        return None
    if key.endswith("per_second"):
        for t in ("seconds", "merge_seconds"):
            times, median = d.get(f"{t}_all"), d.get(t)
            if isinstance(times, list) and isinstance(median, (int, float)) and median > 0:
                s = summary(v * median / x for x in times if isinstance(x, (int, float)) and x > 0)
                if s:
                    return s
    return {"median": float(v), "min": float(v), "max": float(v), "n": 1}


# ---------------------------------------------------------------------------
# latency distributions, whole: a log-linear histogram

#: linear sub-buckets per power of two: a bucket is at most 1/32 (3 %) wide
HIST_SUB_BUCKETS = 32


def log_histogram(samples, unit: str = "us", sub: int = HIST_SUB_BUCKETS) -> dict:
    """Every sample of a latency distribution in HdrHistogram-like buckets:
    each power of two split into ``sub`` equal buckets, so any percentile is
    known within one bucket (``1/sub`` relative) at a few hundred numbers
    whatever the count. ``{"unit", "sub", "n", "lo": [bucket lower edge],
    "count": [samples in it]}``, non-empty buckets only, ascending; samples
    at or below zero count in the first bucket of edge 0."""
    import numpy as np
    x = np.asarray(samples, dtype=float)
    x = x[np.isfinite(x)]
    pos = x[x > 0]
    e = np.floor(np.log2(pos))
    m = np.clip(np.floor((pos / np.exp2(e) - 1) * sub), 0, sub - 1)
    keys, counts = np.unique(e * sub + m, return_counts=True)
    lo = np.exp2(np.floor(keys / sub)) * (1 + (keys % sub) / sub)
    zero = int(len(x) - len(pos))
    return {"unit": unit, "sub": sub, "n": int(len(x)),
            "lo": ([0.0] if zero else []) + [float(v) for v in lo],
            "count": ([zero] if zero else []) + [int(c) for c in counts]}


def merge_histograms(hists) -> dict | None:
    """One :func:`log_histogram` of several of the same unit and ``sub``
    (the repeats of one case): their counts added bucket by bucket."""
    hists = [h for h in hists if isinstance(h, dict) and h.get("n")]
    if not hists:
        return None
    total: dict[float, int] = {}
    for h in hists:
        for lo, c in zip(h["lo"], h["count"]):
            total[lo] = total.get(lo, 0) + c
    edges = sorted(total)
    return {"unit": hists[0]["unit"], "sub": hists[0]["sub"], "n": sum(h["n"] for h in hists),
            "lo": edges, "count": [total[e] for e in edges]}


def histogram_cdf(h: dict) -> tuple[list[float], list[float]]:
    """(upper edge of each bucket, fraction of samples at most that): the
    CDF of a :func:`log_histogram`, exact at the bucket edges."""
    if not h or not h.get("n"):
        return [], []
    sub, seen, xs, fs = h["sub"], 0, [], []
    for lo, c in zip(h["lo"], h["count"]):
        width = 2.0 ** math.floor(math.log2(lo)) / sub if lo > 0 else 0.0
        seen += c
        xs.append(lo + width)
        fs.append(seen / h["n"])
    return xs, fs


#: the percentiles every latency result carries: enough points for a CDF
#: plot (``perf.report.plots``) without keeping every sample in the JSON
CDF_PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9)


def latency_percentiles(lat, unit: str = "us") -> dict[str, float]:
    """``{"p1_us": ..., "p50_us": ..., "p99.9_us": ...}`` of the samples
    ``lat`` (already in ``unit``), plus ``mean_<unit>``; NaN when empty."""
    import numpy as np
    lat = np.asarray(lat, dtype=float)
    if len(lat) == 0:
        return {**{f"p{p:g}_{unit}": float("nan") for p in CDF_PERCENTILES}, f"mean_{unit}": float("nan")}
    vals = np.percentile(lat, CDF_PERCENTILES)
    return {**{f"p{p:g}_{unit}": float(v) for p, v in zip(CDF_PERCENTILES, vals)},
            f"mean_{unit}": float(lat.mean())}


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(h) for h in headers]] + [[fmt_value(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_value(v: object) -> str:
    """A table cell: floats to about three significant digits (thousands
    separated, no decimals from 100 up), ints with separators, else ``str``."""
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters),
    or its repr when the message is empty: a reason that fits a table."""
    text = str(e).strip().splitlines()
    return text[0][:200] if text else repr(e)


@contextlib.contextmanager
def sigterm_exits():
    """Turn SIGTERM into SystemExit for the block (main thread only), so a
    benchmark that is killed still stops the hypervisors it started: their
    sessions' ``finally`` clauses run instead of leaving them behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_(signum, frame):
        raise SystemExit(128 + signum)
    old = signal.signal(signal.SIGTERM, exit_)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _json_default(o: Any):
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def write_json(doc: dict, path: str) -> None:
    """Write atomically: an interrupted write never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def standalone(argv, prog: str, description: str, quick_help: str, run, report,
               options=(), unavailable=None) -> int:
    """The command line of a module run on its own (``python -m perf.peers.ksm``):
    ``--quick``, the module's ``options`` (``(flags, argparse keywords)``),
    ``--json PATH``; ``run(**arguments)`` then ``report(result)``. When
    ``unavailable()`` gives a reason, that is printed and nothing runs."""
    import argparse
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--quick", action="store_true", help=quick_help)
    for flags, kw in options:
        p.add_argument(*flags, **kw)
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    a = vars(p.parse_args(argv))
    path = a.pop("json")
    reason = unavailable() if unavailable else None
    if reason:
        print(f"skipped: {reason}")
        return 0
    result = run(**a)
    print(report(result))
    if path:
        write_json(result, path)
    return 0
