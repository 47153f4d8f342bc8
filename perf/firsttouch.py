"""The floor of a create's steps: the kernel's first touch of a page.

A create writes every frame of its domain. In a new pool segment the first
write to a page makes the kernel allocate it; that cost is the kernel's,
and no chunking of the create removes it. This probe does only that: it
writes chunks of pages (the create's chunk size, 16 to 256 pages) into

- a fresh POSIX shared-memory segment, as the pool is;
- the same segment again (pages the kernel already backs: a
  ``--prefault`` pool);
- fresh anonymous memory (a numpy array, as a plain fill writes);

with one numpy assignment per chunk, and reports per chunk the CPU time of
the thread (median, p99.9, max, and how many chunks took over 1 ms) and
the cost per page. Side by side in one run, ``--repeats`` times.

    python -m hvshare.perf.firsttouch [--quick] [--pages N] [--chunk K]
"""
from __future__ import annotations

import mmap
import sys
import time

import numpy as np

from hvshare.hvcore.constants import PAGE_SIZE

from .common import standalone, table
from .figure import Figures


def _chunks(buf, pages: int, chunk: int) -> np.ndarray:
    a = np.frombuffer(buf, np.uint8, count=pages * PAGE_SIZE).reshape(pages, PAGE_SIZE)
    out = np.empty(-(-pages // chunk))
    clock = time.thread_time
    for i, lo in enumerate(range(0, pages, chunk)):
        t = clock()
        a[lo:lo + chunk] = 0x5A
        out[i] = clock() - t
    del a
    return out


def _row(kind: str, per_chunk: np.ndarray, pages: int, chunk: int) -> dict:
    ms = per_chunk * 1e3
    return {"memory": kind, "chunk_pages": chunk, "us_per_page": float(per_chunk.sum() * 1e6 / pages),
            "chunk_median_ms": float(np.median(ms)), "chunk_p999_ms": float(np.percentile(ms, 99.9)),
            "chunk_max_ms": float(ms.max()), "chunks_over_1ms": int((ms > 1).sum()),
            "chunks": len(ms)}


def run(quick: bool = False, pages: int | None = None, chunk: int = 16, repeats: int | None = None) -> dict:
    import posix_ipc
    from hvshare.hvcore import shm
    pages = pages or (65_536 if quick else 500_000)
    repeats = repeats or (1 if quick else 3)
    rows = []
    for r in range(repeats):
        name = f"/{shm.PREFIX}probe-{time.monotonic_ns()}"
        seg = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=pages * PAGE_SIZE)
        try:
            mm = mmap.mmap(seg.fd, pages * PAGE_SIZE)
            rows.append(dict(_row("shm, first touch", _chunks(mm, pages, chunk), pages, chunk), repeat=r))
            rows.append(dict(_row("shm, backed", _chunks(mm, pages, chunk), pages, chunk), repeat=r))
            mm.close()
        finally:
            seg.close_fd()
            seg.unlink()
        anon = mmap.mmap(-1, pages * PAGE_SIZE)
        rows.append(dict(_row("anonymous, first touch", _chunks(anon, pages, chunk), pages, chunk), repeat=r))
        anon.close()
    figs = Figures()
    for kind in dict.fromkeys(r["memory"] for r in rows):
        mine = [r for r in rows if r["memory"] == kind]
        figs.add("us_per_page", [r["us_per_page"] for r in mine], "us", memory=kind, chunk=chunk)
        figs.add("chunk_max", [r["chunk_max_ms"] for r in mine], "ms", memory=kind, chunk=chunk)
    return {"figures": figs.dicts(), "pages": pages, "chunk": chunk, "repeats": repeats, "rows": rows}


def report(result: dict) -> str:
    head = (f"first touch: {result['pages']:,} pages written {result['chunk']} at a time, "
            f"thread CPU time per chunk ({result['repeats']} repeats)")
    rows = [(r["memory"], r["repeat"], f"{r['us_per_page']:.2f}", f"{r['chunk_median_ms']:.3f}",
             f"{r['chunk_p999_ms']:.3f}", f"{r['chunk_max_ms']:.2f}", r["chunks_over_1ms"])
            for r in result["rows"]]
    return head + "\n" + table(["memory", "repeat", "us/page", "median ms", "p99.9 ms", "max ms",
                                "chunks > 1 ms"], rows)


def main(argv=None) -> int:
    opts = [(("--pages",), {"type": int, "help": "pages written (default 500,000)"}),
            (("--chunk",), {"type": int, "default": 16, "help": "pages per chunk (default 16)"}),
            (("--repeats",), {"type": int, "help": "repeats (default 3, 1 with --quick)"})]
    return standalone(argv, "python -m hvshare.perf.firsttouch", __doc__.split("\n\n")[0],
                      "65,536 pages, one repeat", run, report, opts)


if __name__ == "__main__":
    sys.exit(main())
