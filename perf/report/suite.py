"""The whole benchmark suite in one run: ``python -m perf all``.

Runs every benchmark of :data:`SUITE` in this process, one after the other,
and gathers their results in one JSON document::

    {"machine": {...}, "quick": bool, "started": "...", "wall_seconds": s,
     "budget_seconds": s, "over_budget": bool, "skipped": {name: reason},
     "benches": {name: result}, "headlines": [headline, ...]}

A benchmark that is missing or raises is skipped with a one-line reason
(kept in its result as ``skipped``, with the traceback under ``error``) so
that one broken benchmark cannot cost the numbers of the others.  This
module also holds what running one benchmark needs (:func:`load_bench`,
:func:`stamp`, used by ``python -m perf <bench>``) and
the live :class:`Progress` line; the headline figures are
:mod:`perf.report.headlines`' and the plots :mod:`perf.report.plots`'.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import json
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterable

from ..common import machine_info, one_line, write_json
from .headlines import dig, headline_table, headlines, markdown

#: benchmarks of ``python -m perf all``, in running order (ksm and pipe are
#: measured inside cow, teardown and dedup, side by side with hvshare)
SUITE = ("rmap", "cow", "teardown", "dedup", "density", "real", "scale", "fork")
#: benchmarks whose module is not ``perf.<name>``: the peers
BENCH_MODULES = {"ksm": "perf.peers.ksm", "pipe": "perf.peers.pipe"}
#: wall-time budgets of the suite on a 2-core machine
BUDGET_SECONDS = {True: 180.0, False: 1800.0}


# ---------------------------------------------------------------------------
# running

def stamp(result: dict, name: str, quick: bool, seconds: float) -> dict:
    """What every result records besides its numbers: which bench, the
    settings, the repeats and the machine it ran on."""
    result.setdefault("bench", name)
    result.setdefault("quick", quick)
    result.setdefault("repeats", _repeats(result))
    result["machine"] = machine_info()
    result["wall_seconds"] = round(seconds, 3)
    return result


def _repeats(result: dict) -> Any:
    for path in (("repeats",), ("config", "repeats"), ("settings", "repeats")):
        v = dig(result, *path)
        if v is not None:
            return v
    return None


def bench_module(name: str) -> str:
    """The module that holds benchmark ``name``: ``perf.<name>``, or a
    peer's module (:data:`BENCH_MODULES`)."""
    return BENCH_MODULES.get(name, f"perf.{name}")


def bench_file(name: str) -> str:
    """Benchmark ``name``'s source file, as messages name it (``perf/rmap.py``)."""
    return bench_module(name).replace(".", "/") + ".py"


def load_bench(name: str):
    """The module of benchmark ``name`` (:func:`bench_module`), or a
    one-line reason why there is none."""
    module, path = bench_module(name), bench_file(name)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name in (module, "perf"):
            return f"no benchmark {path}"
        return f"{path} does not import: {e}"
    except Exception as e:  # a syntax error or a failing import-time statement
        return f"{path} does not import: {type(e).__name__}: {e}"
    if not callable(getattr(mod, "run", None)):
        return f"{path} has no run(quick)"
    return mod


class Progress:
    """One line per benchmark with its elapsed time; on a terminal also a
    live line (bar of benchmarks done, spinner, seconds) redrawn while a
    benchmark runs, so a long bench does not look hung."""

    SPIN = "|/-\\"

    def __init__(self, total: int, stream=None, live: bool | None = None):
        self.total = total
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.t_suite = time.monotonic()

    def start(self, i: int, name: str) -> None:
        self.i, self.name, self.t0 = i, name, time.monotonic()
        if self.live:
            self._stop.clear()
            self._thread = threading.Thread(target=self._redraw, daemon=True)
            self._thread.start()

    def _line(self, tick: int) -> str:
        width = 20
        done = round(width * (self.i - 1) / max(self.total, 1))
        bar = "#" * done + self.SPIN[tick % 4] + "." * (width - done - 1)
        return (f"[{self.i}/{self.total}] {self.name:<10} {time.monotonic() - self.t0:7.1f} s  "
                f"[{bar}]  suite {time.monotonic() - self.t_suite:6.1f} s")

    def _redraw(self) -> None:
        tick = 0
        while not self._stop.wait(0.25):
            self.stream.write("\r" + self._line(tick) + "\x1b[K")
            self.stream.flush()
            tick += 1

    def done(self, status: str) -> float:
        seconds = time.monotonic() - self.t0
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.stream.write("\r\x1b[K")
        self.stream.write(f"[{self.i}/{self.total}] {self.name:<10} {seconds:7.1f} s  {status}\n")
        self.stream.flush()
        return seconds


def run_suite(names: Iterable[str] = SUITE, quick: bool = False, *,
              progress: Progress | None = None,
              echo: Callable[[str], None] | None = print) -> dict:
    """Run each benchmark; a missing or failing one is recorded as skipped.

    ``echo`` receives each benchmark's report (None: no reports). A Ctrl-C
    stops the suite after recording what was done (``interrupted``)."""
    names = list(names)
    progress = progress or Progress(len(names))
    t_suite = time.perf_counter()
    out: dict = {"machine": machine_info(), "quick": quick,
                 "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                 "benches": {}, "skipped": {}}
    for i, name in enumerate(names, 1):
        progress.start(i, name)
        t0 = time.perf_counter()
        mod = load_bench(name)
        text = ""
        if isinstance(mod, str):
            result = {"skipped": mod}
        else:
            captured = io.StringIO()
            try:
                # On a terminal the bench's own prints would break the live line.
                with (contextlib.redirect_stdout(captured) if progress.live else contextlib.nullcontext()):
                    result = mod.run(quick=quick)
                if not isinstance(result, dict):
                    raise TypeError(f"run() returned {type(result).__name__}, not a dict")
            except KeyboardInterrupt:
                result = {"skipped": "interrupted (Ctrl-C)"}
                out["interrupted"] = True
            except Exception as e:
                result = {"skipped": f"raised {type(e).__name__}: {one_line(e)}",
                          "error": traceback.format_exc()}
            text = captured.getvalue()
        stamp(result, name, quick, time.perf_counter() - t0)
        if "skipped" in result and "results" not in result:
            out["skipped"][name] = result["skipped"]
            status = f"SKIPPED: {result['skipped']}"
        elif "skipped" in result:
            status = f"ok (part skipped: {result['skipped']})"
        else:
            status = "ok"
        progress.done(status)
        out["benches"][name] = result
        if echo is not None:
            if text.strip():
                echo(text.rstrip())
            if "results" in result and hasattr(mod, "report"):
                try:
                    echo(mod.report(result) + "\n")
                except Exception as e:
                    echo(f"({name}: report() raised {type(e).__name__}: {one_line(e)})\n")
        if out.get("interrupted"):
            break
    out["wall_seconds"] = round(time.perf_counter() - t_suite, 3)
    out["budget_seconds"] = BUDGET_SECONDS[bool(quick)]
    out["over_budget"] = out["wall_seconds"] > out["budget_seconds"]
    out["headlines"] = headlines(out)
    return out


# ---------------------------------------------------------------------------
# JSON and command line



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m perf all",
        description="Run the whole benchmark suite (" + ", ".join(SUITE) + ") with one JSON, "
                    "headline figures, optional plots and the README table.")
    p.add_argument("--quick", action="store_true",
                   help=f"small sizes and few repeats (budget {BUDGET_SECONDS[True]:.0f} s; "
                        f"full run {BUDGET_SECONDS[False]:.0f} s)")
    p.add_argument("--json", metavar="PATH", help="write the combined result to PATH")
    p.add_argument("--plots", metavar="DIR", help="write one PNG per plot into DIR (needs matplotlib)")
    p.add_argument("--markdown", action="store_true", help="print the README Performance table")
    p.add_argument("--from", dest="from_json", metavar="PATH",
                   help="do not run: read a JSON written by 'all --json' or by one bench's --json")
    p.add_argument("--only", metavar="NAMES", help="comma-separated benches to run (default: all)")
    p.add_argument("--skip", metavar="NAMES", default="", help="comma-separated benches not to run")
    p.add_argument("--quiet", action="store_true", help="no per-bench reports, only progress and headlines")
    a = p.parse_args(argv)

    if a.from_json:
        with open(a.from_json) as f:
            doc = json.load(f)
        # from the benches' results, by this version's rules
        doc["headlines"] = headlines(doc)
    else:
        names = [n.strip() for n in a.only.split(",") if n.strip()] if a.only else list(SUITE)
        names = [n for n in names if n not in {s.strip() for s in a.skip.split(",")}]
        doc = run_suite(names, a.quick, echo=None if a.quiet else print)
        print(f"suite: {len(doc['benches'])} bench(es) in {doc['wall_seconds']:.1f} s"
              + (f" (over the {doc['budget_seconds']:.0f} s budget)" if doc["over_budget"] else "")
              + ("".join(f"\n  skipped {k}: {v}" for k, v in doc["skipped"].items())))
    if a.json:
        write_json(doc, a.json)
        print(f"wrote {a.json}")
    if a.markdown:
        print(markdown(doc))
    else:
        print("\nHeadlines" + (" (quick run)" if doc.get("quick") else ""))
        print(headline_table(doc))
    if a.plots:
        from . import plots
        try:
            written = plots.write_all(doc, a.plots)
        except plots.MatplotlibMissing as e:
            print(f"plots: {e}", file=sys.stderr)
            return 1 if a.from_json else 0
        print(plots.report(written))
    return 130 if doc.get("interrupted") else 0
