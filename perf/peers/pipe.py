"""The raw pipe round trip of two Python processes: hvshare's cost floor.

An hvshare guest asks the hypervisor process for a copy-on-write break (or
any other service) with a small message over a pipe and waits for the
answer, so no request can be cheaper than one message there and back
between two Python processes.  This module measures exactly that floor,
with nothing else in the loop, so hvshare's benchmarks can report their
latencies as multiples of it.

Design:

* The echo child is a fresh interpreter (``subprocess`` with ``pass_fds``),
  not a fork: nothing of the parent (threads, numpy's pools, pytest) comes
  along, and the child's loop is a few lines of plain ``os.read``/
  ``os.write``.  It reads exactly ``size`` bytes, writes them back, and
  exits on EOF.
* Placement matters more than anything else: on one core a round trip is
  two context switches; across cores it is two cross-CPU wake-ups, which
  can cost tens of microseconds when the other core sleeps in an idle
  state.  ``same`` pins both processes to one core and ``cross`` to two
  different cores, with ``os.sched_setaffinity``; the parent's original
  affinity is put back afterwards.
* Each round trip is timed alone with ``time.perf_counter_ns``; a warm-up
  (10 %) is dropped; the result is p50/p99/mean in microseconds.
* The child is always reaped: its pipe ends are closed (EOF), then it is
  waited for, killed if it lingers.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np

from hvshare.hvcore.constants import PAGE_SIZE   # also the size of a request carrying one page

from ..common import close_and_reap, latency_percentiles, log_histogram, standalone
from ..placement import PLACEMENTS, Placement, placement_cpus
from ..placement import summary as placement_summary
from ..figure import Figures

REQUEST_SIZE = 32        # a small hvshare request (op, domain, gfn, handle...)

_ECHO = """
import os, sys
r, w, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
os.write(w, b"r")                    # ready: imports done, loop starts
while True:
    buf = os.read(r, size)
    if not buf:
        break
    while len(buf) < size:
        more = os.read(r, size - len(buf))
        if not more:
            sys.exit(0)
        buf += more
    os.write(w, buf)
"""


def _read_exact(fd: int, n: int) -> bytes:
    buf = os.read(fd, n)
    while len(buf) < n:
        more = os.read(fd, n - len(buf))
        if not more:
            raise EOFError("echo child closed the pipe")
        buf += more
    return buf


def round_trips(size: int = REQUEST_SIZE, placement: str = "same", n: int = 20_000,
                warmup: int | None = None, records: list | None = None) -> np.ndarray:
    """Time ``n`` round trips of ``size``-byte messages: int64 ns each;
    the placement's record is appended to ``records`` when given.

    Raises ``ValueError`` for an impossible placement (see :func:`measure`
    for the non-raising form).
    """
    cpus = placement_cpus(placement)
    if isinstance(cpus, str):
        raise ValueError(cpus)
    if not 1 <= size <= 65536:
        raise ValueError("size must be 1..65536 bytes (one pipe buffer)")
    warmup = max(100, n // 10) if warmup is None else warmup
    parent_cpu, child_cpu = cpus
    pl = Placement()
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    child = None
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", _ECHO, str(to_child_r), str(from_child_w), str(size)],
            pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, close_fds=True)
        os.close(to_child_r)
        os.close(from_child_w)
        to_child_r = from_child_w = -1
        pl.pin("echo", child.pid, {child_cpu})
        pl.pin("driver", 0, {parent_cpu})
        if _read_exact(from_child_r, 1) != b"r":
            raise RuntimeError("echo child did not start")
        msg = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
        clock, write, read = time.perf_counter_ns, os.write, os.read
        lat = [0] * n
        for i in range(warmup + n):
            t0 = clock()
            write(to_child_w, msg)
            got = read(from_child_r, size)
            if len(got) < size:
                got += _read_exact(from_child_r, size - len(got))
            t1 = clock()
            if i >= warmup:
                lat[i - warmup] = t1 - t0
        if got != msg:
            raise RuntimeError("echo child returned different bytes")
        if records is not None:
            records.append(pl.check(placement=placement, probe="pipe", size=size))
        return np.array(lat, dtype=np.int64)
    finally:
        pl.restore()
        close_and_reap((to_child_r, to_child_w, from_child_r, from_child_w), child, 5)


def measure(size: int = REQUEST_SIZE, placement: str = "same", n: int = 20_000) -> dict:
    """Round-trip statistics: ``{"size", "placement", "n", "cpus",
    "p50_us", "p99_us", "mean_us", the other ``CDF_PERCENTILES``, "histogram", "placement_record"}``,
    or ``{"size", "placement", "skipped": reason}`` where the placement is impossible."""
    cpus = placement_cpus(placement)
    if isinstance(cpus, str):
        return {"size": size, "placement": placement, "skipped": cpus}
    records: list = []
    lat = round_trips(size, placement, n, records=records) / 1e3
    return {"size": size, "placement": placement, "n": n, "cpus": list(cpus), **latency_percentiles(lat),
            "histogram": log_histogram(lat), "placement_record": records[0]}


def run(quick: bool = False) -> dict:
    """Every (size, placement) pair as a ``perf`` benchmark result."""
    n = 2_000 if quick else 20_000
    results = [measure(size, placement, n) for size in (REQUEST_SIZE, PAGE_SIZE) for placement in PLACEMENTS]
    figs = Figures()
    for r in results:
        if "skipped" not in r:
            for p in (50, 99):
                figs.add(f"round_trip_p{p}", [r[f"p{p}_us"]], "us", size=r["size"], placement=r["placement"])
    hists = [{"name": "round_trip", "labels": {"size": r["size"], "placement": r["placement"]},
              **r.pop("histogram")} for r in results if "histogram" in r]
    placements = [r.pop("placement_record") for r in results if "placement_record" in r]
    return {"results": results, "figures": figs.dicts(), "histograms": hists, "placements": placements}


def report(result: dict) -> str:
    from ..common import table
    rows = []
    for r in result["results"]:
        if "skipped" in r:
            rows.append([r["size"], r["placement"], "-", "-", "-", r["skipped"]])
        else:
            rows.append([r["size"], r["placement"], f"{r['p50_us']:.2f}", f"{r['p99_us']:.2f}",
                         f"{r['mean_us']:.2f}", f"cpus {r['cpus'][0]}/{r['cpus'][1]}, n={r['n']:,}"])
    return "Pipe round trip, two Python processes (us)\n" + table(
        ["bytes", "placement", "p50", "p99", "mean", "detail"], rows) \
        + f"\nPlacement: {placement_summary(result.get('placements'))}"


def main(argv: list[str] | None = None) -> int:
    return standalone(argv, "python -m hvshare.perf.peers.pipe", "Raw pipe round trip of two Python processes.",
                      "2,000 round trips instead of 20,000", run, report)


if __name__ == "__main__":
    sys.exit(main())
