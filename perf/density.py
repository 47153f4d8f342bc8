"""Guest density: how many clone guests fit in a pool, with and without dedup.

``python -m hvshare.perf density [--quick] [--json PATH]``

A fresh hypervisor process with a pool of ``frames`` frames; ``clone``
guests of ``pages`` pages each, all booted from one image (the ``clone``
workload: image, zero and private extents), are created one after another
until a create fails for lack of frames (ENOMEM). Twice:

- **without** the scanner: every guest keeps a private frame per page;
- **with** the scanner: one pass of :class:`hvshare.tools.dedup.Scanner` over
  :class:`hvshare.tools.dedup.SocketBackend` after each boot (``hvctl dedup``), so
  the image and zero pages of a new guest join the frames already shared
  and only its private pages stay its own.

A create needs all of the new guest's frames at once (its memory is filled
before anything can be shared), so the last guest needs ``pages`` free
frames: the content predicts the count (``predicted``), which the run must
reach. The result is the two counts and their ratio, with the frames saved
and the time the scans took.
"""
from __future__ import annotations

import time

from hvshare.hvcore.errors import ENOMEM

from .common import sigterm_exits, table
from .figure import Figures
from .report.headlines import report_goals


def _predicted(frames: int, pages: int, seed: int, scan: bool) -> int:
    """Guests that fit by the content alone."""
    from hvshare.hvcore import images
    if not scan:
        return frames // pages
    kinds = images.clone_kinds(seed, pages)
    private = int((kinds == images.KIND_PRIVATE).sum())
    shared = int((kinds == images.KIND_IMAGE).sum()) + int((kinds == images.KIND_ZERO).any())
    k = 0
    while frames - (k * private + (shared if k else 0)) >= pages:
        k += 1
    return k


def fill(frames: int, pages: int, seed: int, scan: bool, limit: int) -> dict:
    """Create clone guests until ENOMEM (or ``limit`` guests); scan after
    each boot if ``scan``."""
    from hvshare.tools import api
    from hvshare.tools.dedup import Scanner, SocketBackend
    t0 = time.perf_counter()
    scan_s = 0.0
    with api.hvshare_session(frames=frames) as hv:
        sc = Scanner(SocketBackend(hv)) if scan else None
        guests = 0
        refused = None
        try:
            while guests < limit:
                try:
                    hv.create(pages, "clone", seed=seed)
                except api.HVCtlError as e:
                    if e.code != ENOMEM:
                        raise
                    refused = str(e)
                    break
                guests += 1
                if sc is not None:
                    t1 = time.perf_counter()
                    sc.scan_pass()
                    scan_s += time.perf_counter() - t1
        finally:
            if sc is not None:
                sc.close()
        info = hv.info()
        audit = hv.audit()
    return {"guests": guests, "refused": refused, "nr_saved_mfns": info["nr_saved_mfns"],
            "frames_free": info["frames_free"], "scan_seconds": round(scan_s, 3),
            "seconds": round(time.perf_counter() - t0, 3), "audit_errors": audit,
            "predicted": _predicted(frames, pages, seed, scan)}


def run(quick: bool = False) -> dict:
    with sigterm_exits():             # a killed run still stops its hypervisors
        return _run(quick)


def _run(quick: bool) -> dict:
    frames, pages = (4096, 1024) if quick else (16384, 2048)
    seed = 1
    without = fill(frames, pages, seed, scan=False, limit=frames // pages + 1)
    with_ = fill(frames, pages, seed, scan=True, limit=10 * frames // pages)
    figs = Figures()
    for key, r in (("without", without), ("with", with_)):
        figs.add("guests", [r["guests"]], "guests", dedup=key)
        figs.add("predicted_guests", [r["predicted"]], "guests", dedup=key)
    return {"figures": figs.dicts(), "results": {"without": without, "with": with_},
            "frames": frames, "pages": pages, "seed": seed}


def report(result: dict) -> str:
    r = result["results"]
    rows = [[name, x["guests"], x["predicted"], x["nr_saved_mfns"], x["frames_free"], x["scan_seconds"],
             x["seconds"]]
            for name, x in (("without dedup", r["without"]), ("dedup after each boot", r["with"]))]
    return "\n".join([
        f"Clone guests of {result['pages']:,} pages in a pool of {result['frames']:,} frames "
        f"(image {result['seed']}), created until the pool is full",
        table(["", "guests", "predicted", "frames saved", "frames free", "scan s", "total s"], rows),
        "", report_goals("density", result)])
