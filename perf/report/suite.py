"""The whole benchmark suite in one run: ``python -m hvshare.perf all``.

Runs every benchmark of :data:`hvshare.perf.registry.SUITE` in this process, one
after the other, and gathers their results in one JSON document, the
result contract (docs/schema/perf/result.schema.json)::

    {"schema": 1, "machine": {...}, "quick": bool, "started": "...", "wall_seconds": s,
     "budget_seconds": s, "over_budget": bool, "skipped": {name: reason},
     "benches": {name: result}, "headlines": [headline, ...]}

A benchmark that fails to import or raises is skipped with a one-line
reason (kept in its result as ``skipped``, with the traceback under
``error``) so that one broken benchmark cannot cost the numbers of the
others. This module also stamps one bench's result (:func:`stamp`, used
by ``python -m hvshare.perf <bench>``) and draws the live :class:`Progress` line.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import sys
import threading
import time
import traceback
from typing import Callable, Iterable

from ..common import SMOKE_ENV, machine_info, one_line, write_json
from ..load import LoadMeter
from ..registry import BENCHES, SUITE
from .conditions import conditions_table
from .headlines import benches_of, headline_table, headlines, markdown

#: the version of the result contract a run is written in
SCHEMA_VERSION = 1

#: wall-time budgets of the suite on a 2-core machine
BUDGET_SECONDS = {True: 180.0, False: 1800.0}


# ---------------------------------------------------------------------------
# running

def stamp(result: dict, name: str, quick: bool, seconds: float, meter: LoadMeter | None = None) -> dict:
    """What every result records besides its figures: which bench, the
    setting, the machine it ran on, its wall time and, from the ``meter``
    started before it ran, the machine's load (:mod:`hvshare.perf.load`)."""
    if meter is not None:
        result["load"] = meter.record()
    result["bench"] = name
    result["quick"] = quick
    result.setdefault("figures", [])
    result["machine"] = machine_info()
    result["wall_seconds"] = round(seconds, 3)
    return result


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
    out: dict = {"schema": SCHEMA_VERSION, "machine": machine_info(), "quick": quick,
                 "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                 "benches": {}, "skipped": {}}
    for i, name in enumerate(names, 1):
        progress.start(i, name)
        meter = LoadMeter()
        t0 = time.perf_counter()
        mod = BENCHES[name].load() if name in BENCHES else f"no benchmark named {name!r}"
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
        stamp(result, name, quick, time.perf_counter() - t0, meter)
        if "skipped" in result and not result["figures"]:
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
            if result["figures"] and not isinstance(mod, str):
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
# command line

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hvshare.perf all",
        description="Run the whole benchmark suite (" + ", ".join(SUITE) + ") with one JSON, "
                    "headline figures, optional plots and the README table.")
    p.add_argument("--quick", action="store_true",
                   help=f"small sizes and few repeats (budget {BUDGET_SECONDS[True]:.0f} s; "
                        f"full run {BUDGET_SECONDS[False]:.0f} s)")
    p.add_argument("--smoke", action="store_true",
                   help="with --quick: every bench at the smallest sizes that still run each of its "
                        "parts (a check that everything runs; its figures measure nothing)")
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
        doc["headlines"] = headlines(doc)       # by this version's goals
    else:
        names = [n.strip() for n in a.only.split(",") if n.strip()] if a.only else list(SUITE)
        names = [n for n in names if n not in {s.strip() for s in a.skip.split(",")}]
        if a.smoke:
            if not a.quick:
                p.error("--smoke goes with --quick")
            os.environ[SMOKE_ENV] = "1"
        doc = run_suite(names, a.quick, echo=None if a.quiet else print)
        doc["smoke"] = a.smoke
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
        print("\nConditions (perf/load.py, perf/placement.py)")
        print(conditions_table(benches_of(doc)))
    if a.plots:
        from . import plots
        try:
            written = plots.write_all(doc, a.plots)
        except plots.MatplotlibMissing as e:
            print(f"plots: {e}", file=sys.stderr)
            return 1 if a.from_json else 0
        print(plots.report(written))
    return 130 if doc.get("interrupted") else 0
