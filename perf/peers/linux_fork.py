"""Linux fork() of a process holding N touched anonymous pages: the peer
of hvshare's VM fork (``python -m hvshare.perf fork``).

What is measured is the kernel's work, not Python's set-up:

* A small helper (a fresh interpreter, as :mod:`hvshare.perf.peers.pipe` starts
  its echo child: nothing of the caller comes along, numpy single-threaded)
  maps ``pages`` anonymous pages with ``MADV_NOHUGEPAGE`` (one frame and
  one page-table entry per 4 KiB page, as hvshare's p2m has) and writes
  one byte to each with a numpy strided write. Its resident size is read
  back (``/proc/self/statm``) so the result says how many pages it held;
  the interpreter's own resident pages (``helper_pages``) come along in
  every fork, so the fork of the helper alone, before the mapping, is
  measured too (``helper_alone_seconds``): the floor under every N.
* **fork latency**: from just before ``os.fork()`` until the parent reads
  the byte the child writes to a pipe as its first act: the child runs.
  The child then exits; reaping it is outside the timed window.
* **fork loop**: iterations per second of fork, ``k`` page writes in the
  child (one numpy strided write: ``k`` CoW faults), ``os._exit``, and
  ``waitpid`` in the parent, which holds the same ``pages`` touched pages.

The helper prints one JSON document and exits; its repeats give medians
as :class:`hvshare.perf.figure.Figure` s (every repeat, median, spread).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from ..common import standalone, table
from ..figure import Figure, select, text_of

_HELPER = r"""
import gc, json, mmap, os, sys, time
import numpy as np
pages, fork_repeats, loop_iterations, loop_repeats = (int(x) for x in sys.argv[1:5])
ks = [int(x) for x in sys.argv[5].split(",") if x]
PAGE = mmap.PAGESIZE
clock = time.perf_counter_ns
r, w = os.pipe()

def fork_latency(repeats):
    out = []
    for _ in range(repeats + 1):                # the first is a warm-up
        t0 = clock()
        pid = os.fork()
        if pid == 0:
            os.write(w, b"x")
            os._exit(0)
        os.read(r, 1)
        t1 = clock()
        os.waitpid(pid, 0)
        out.append(t1 - t0)
    return out[1:]

statm = lambda: int(open("/proc/self/statm").read().split()[1])
gc.collect()
gc.freeze()                                     # the children write no object headers for the collector
base = statm()
empty_ns = fork_latency(fork_repeats)           # the helper's own memory alone
buf = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf.madvise(mmap.MADV_NOHUGEPAGE)
a = np.frombuffer(buf, dtype=np.uint8)
a[::PAGE] = 1                                   # every page touched: a frame of its own
resident = statm() - base
fork_ns = fork_latency(fork_repeats)
loops = {}
for k in ks:
    # the same k pages each time, spread over the whole region
    idx = np.linspace(0, pages - 1, k).astype(np.int64) * PAGE
    rates = []
    for rep in range(loop_repeats):
        t0 = clock()
        for _ in range(loop_iterations):
            pid = os.fork()
            if pid == 0:
                a[idx] = 2                      # k CoW faults
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            if status:
                sys.exit(f"a child of the fork loop exited with status {status}")
        rates.append(loop_iterations * 1e9 / (clock() - t0))
    loops[str(k)] = rates
print(json.dumps({"resident_pages": resident, "helper_pages": base, "fork_ns": fork_ns,
                  "empty_fork_ns": empty_ns, "loops": loops}))
"""

#: the helper's numpy must not start threads: os.fork() copies only the caller's
_SINGLE_THREADED = {v: "1" for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def measure(pages: int, fork_repeats: int = 10, loop_ks=(1, 64, 1024), loop_iterations: int = 20,
            loop_repeats: int = 3, timeout: float | None = None) -> dict:
    """Fork latency and fork-loop rates of a process holding ``pages``
    touched anonymous pages (see the module's docstring)::

        {"pages", "resident_pages", "helper_pages", "loop_iterations",
         "fork_seconds": Figure, "helper_alone_seconds": Figure, "loop_rate": {k: Figure}}

    Raises RuntimeError with the helper's reason if it fails."""
    ks = [int(k) for k in loop_ks]
    if pages < 1 or any(not 1 <= k <= pages for k in ks):
        raise ValueError(f"need 1 <= k <= pages, got pages={pages}, k={ks}")
    p = subprocess.run([sys.executable, "-c", _HELPER, str(pages), str(fork_repeats), str(loop_iterations),
                        str(loop_repeats), ",".join(map(str, ks))],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout,
                       env={**os.environ, **_SINGLE_THREADED})
    if p.returncode != 0:
        lines = p.stderr.strip().splitlines()
        raise RuntimeError(f"the Linux fork helper failed: {lines[-1] if lines else f'status {p.returncode}'}")
    raw = json.loads(p.stdout)
    return {"pages": pages, "resident_pages": raw["resident_pages"], "helper_pages": raw["helper_pages"],
            "loop_iterations": loop_iterations,
            "fork_seconds": Figure.of("fork_seconds", [ns / 1e9 for ns in raw["fork_ns"]], "s", pages=pages),
            "helper_alone_seconds": Figure.of("helper_alone_seconds", [ns / 1e9 for ns in raw["empty_fork_ns"]],
                                              "s", pages=pages),
            "loop_rate": {int(k): Figure.of("loop_rate", rates, "iterations/s", pages=pages, k=int(k))
                          for k, rates in raw["loops"].items()}}


def run(quick: bool = False) -> dict:
    sizes = (4096, 16_384) if quick else (16_384, 262_144, 1_048_576)
    results, figs = [], []
    for n in sizes:
        r = measure(n, fork_repeats=5 if quick else 10, loop_iterations=10 if quick else 20)
        figs += [r.pop("fork_seconds"), r.pop("helper_alone_seconds"), *r.pop("loop_rate").values()]
        results.append(r)
    return {"figures": [f.to_dict() for f in figs], "results": results}


def report(result: dict) -> str:
    rows = []
    for r in result["results"]:
        n = r["pages"]
        rows.append([f"{n:,}", f"{r['resident_pages']:,}", "fork until the child runs",
                     text_of(result, "fork_seconds", pages=n)])
        for f in select(result, "loop_rate", pages=n):
            rows.append([f"{n:,}", "", f"fork + {f.labels['k']:,} writes + exit + wait", f.text()])
    return "Linux fork() of a process holding N touched anonymous pages (medians [min–max])\n" + table(
        ["N", "resident", "what", "figure"], rows, "l")


def main(argv: list[str] | None = None) -> int:
    return standalone(argv, "python -m hvshare.perf.peers.linux_fork",
                      "Linux fork() latency and fork loops of a process holding N touched pages.",
                      "4,096 and 16,384 pages, fewer repeats", run, report)


if __name__ == "__main__":
    sys.exit(main())
