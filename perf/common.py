"""Shared helpers of the benchmarks: machine description, medians (and
their spread over repeats), latency percentiles, tables and their cells, one-line reasons, SIGTERM."""
from __future__ import annotations

import contextlib
import json
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


def median_time(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, in seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def spread(vals: Sequence[float]) -> dict:
    """The median of repeats with their spread: ``{"median", "min", "max",
    "n", "all"}`` (a figure is reported with how far its repeats strayed)."""
    vals = list(vals)
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals),
            "all": vals}


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
