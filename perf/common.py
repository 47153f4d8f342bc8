"""Shared helpers of the benchmarks: machine description, timed repeats,
latency percentiles and whole distributions (log-linear histograms), the
one table renderer and its cells, one-line reasons, SIGTERM. A repeat's
figures are :class:`hvshare.perf.figure.Figure` s."""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import threading
import time
from typing import Any, Callable, Sequence


#: set to "1" by ``--smoke``: every bench runs at the smallest sizes that
#: still run each of its parts end to end (the test suite's check; such a
#: run's figures measure nothing). In the environment, so that the
#: processes a bench starts see it too.
SMOKE_ENV = "HVSHARE_PERF_SMOKE"


def smoke() -> bool:
    """Whether this is a ``--smoke`` run (:data:`SMOKE_ENV`)."""
    return os.environ.get(SMOKE_ENV) == "1"


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


def close_and_reap(fds, child, timeout: float) -> None:
    """Close the pipe ends ``fds`` still open (>= 0) so the child sees EOF,
    then wait for it, killing it if it lingers past ``timeout`` s."""
    import subprocess
    for fd in fds:
        if fd >= 0:
            os.close(fd)
    if child is not None:
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


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
#: plot (``hvshare.perf.report.plots``) without keeping every sample in the JSON
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


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str = "r") -> str:
    """A plain fixed-width text table: cells right-aligned (``align="r"``),
    or the first and last columns left-aligned (``"l"``: long names read
    from the left)."""
    cells = [[str(h) for h in headers]] + [[fmt_value(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    last = len(headers) - 1

    def cell(i, c, w):
        return c.ljust(w) if align == "l" and i in (0, last) else c.rjust(w)
    lines = ["  ".join(cell(i, c, w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in cells]
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
    """The command line of a module run on its own (``python -m hvshare.perf.peers.ksm``):
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
