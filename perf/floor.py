"""The floor of a Python CoW fault: the least a hypervisor process could do.

A bare ``selectors`` loop in a child process reads a 9-byte write message
(gfn, one byte) from a pipe, calls the in-process core's ``write`` on a
shared page (a CoW fault: allocate, copy, repoint, rmap delete) and answers
one byte; the parent times each round trip. What ``perf cow`` measures
beyond this is the hypervisor process's own per-message overhead (its
dispatch, metering, protocol checks and the guest's bookkeeping).

The child is a fresh interpreter (``python -m hvshare.perf.floor --serve``), pinned
with the parent as the placement asks (``same`` or ``cross`` core), every
thread of both (:class:`hvshare.perf.placement.Placement`), checked and
recorded. Each round is a fresh share of every page, so every write is a
CoW fault.
"""
from __future__ import annotations

import os
import selectors
import struct
import subprocess
import sys
import time

import numpy as np

from .common import close_and_reap, latency_percentiles, standalone
from .figure import Figures
from .placement import PLACEMENTS, Placement, placement_cpus
from .placement import summary as placement_summary

_MSG = struct.Struct("<qB")


def _serve(rfd: int, wfd: int, n: int, rounds: int, rmap: str) -> None:
    """The child: the loop of a round per share of every page."""
    from hvshare.hvcore import Hypervisor
    with Hypervisor(2 * n + 64, rmap=rmap) as hv:
        a, b = hv.create_domain(n), hv.create_domain(n)
        buf = bytearray(64)
        mv = memoryview(buf)
        sel = selectors.DefaultSelector()
        sel.register(rfd, selectors.EVENT_READ)
        write, domid = hv.write, b.domid
        for _ in range(rounds):
            hv.range_share(a.domid, b.domid, 0, n - 1)
            os.write(wfd, b"r")
            for _ in range(n):
                sel.select(1.0)
                os.readv(rfd, (buf,))
                gfn, = struct.unpack_from("<q", buf, 0)
                write(domid, gfn, 0, mv[8:9])
                os.write(wfd, b"k")
        if hv.audit():
            sys.exit(1)


def round_trips(placement: str = "same", n: int = 20_000, rounds: int = 1, rmap: str = "buckets",
                records: list | None = None) -> list:
    """``rounds`` arrays of ``n`` round trips (int64 ns), the first 10 %
    of each dropped as warm-up; the placement's record is appended to
    ``records`` when given. Raises ValueError for an impossible placement."""
    cpus = placement_cpus(placement)
    if isinstance(cpus, str):
        raise ValueError(cpus)
    pl = Placement()
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    child = None
    try:
        child = subprocess.Popen([sys.executable, "-m", "hvshare.perf.floor", "--serve", str(to_r), str(from_w),
                                  str(n), str(rounds), rmap], pass_fds=(to_r, from_w),
                                 stdin=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        to_r = from_w = -1
        pl.pin("floor server", child.pid, {cpus[1]})
        pl.pin("driver", 0, {cpus[0]})
        msg = bytearray(_MSG.size)
        pack, clock, write, read = _MSG.pack_into, time.perf_counter_ns, os.write, os.read
        out = []
        for _ in range(rounds):
            if read(from_r, 1) != b"r":
                raise RuntimeError("the floor's server did not start")
            lat = [0] * n
            for i in range(n):
                pack(msg, 0, i, 1)
                t0 = clock()
                write(to_w, msg)
                read(from_r, 1)
                lat[i] = clock() - t0
            out.append(np.array(lat[n // 10:], dtype=np.int64))
        if records is not None:
            records.append(pl.check(placement=placement, probe="floor"))
        return out
    finally:
        pl.restore()
        close_and_reap((to_r, to_w, from_r, from_w), child, 30)


def measure(placement: str = "same", n: int = 20_000, rounds: int = 1, rmap: str = "buckets") -> dict:
    """Per round: p50/p99 (us), and the placement's record; or ``{"skipped": reason}``."""
    cpus = placement_cpus(placement)
    if isinstance(cpus, str):
        return {"placement": placement, "skipped": cpus}
    records: list = []
    runs = round_trips(placement, n, rounds, rmap, records)
    return {"placement": placement, "cpus": list(cpus), "rmap": rmap, "placement_record": records[0],
            "runs": [{"n": len(r), **latency_percentiles(r / 1e3)} for r in runs]}


def run(quick: bool = False) -> dict:
    n = 2000 if quick else 20000
    results = [measure(p, n, rounds=3) for p in PLACEMENTS]
    figs = Figures()
    for r in results:
        for p in (50, 99):
            figs.add(f"p{p}", [x[f"p{p}_us"] for x in r.get("runs", ())], "us", placement=r["placement"])
    placements = [r.pop("placement_record") for r in results if "placement_record" in r]
    return {"results": results, "figures": figs.dicts(), "placements": placements}


def report(result: dict) -> str:
    from .common import table
    rows = []
    for r in result["results"]:
        if "skipped" in r:
            rows.append([r["placement"], "-", "-", r["skipped"]])
            continue
        for i, x in enumerate(r["runs"]):
            rows.append([f"{r['placement']} core, round {i}", x["p50_us"], x["p99_us"], f"n={x['n']:,}"])
    return "Floor of a CoW fault: bare selectors loop + core write (us)\n" + table(
        ["", "p50", "p99", "detail"], rows) + f"\nPlacement: {placement_summary(result.get('placements'))}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        rfd, wfd, n, rounds = map(int, argv[1:5])
        _serve(rfd, wfd, n, rounds, argv[5])
        return 0
    return standalone(argv, "python -m hvshare.perf.floor", "Floor of a CoW fault round trip.",
                      "2,000 faults a round instead of 20,000", run, report)


if __name__ == "__main__":
    sys.exit(main())
