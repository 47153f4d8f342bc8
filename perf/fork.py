"""VM fork: ``python -m hvshare.perf fork [--quick] [--json PATH]``.

A parent domain of N pages (``zero``: one frame per page, as a guest's
touched RAM) on a fresh hypervisor per N (its pool prefaulted, as
``hvshare.perf.scale``'s: ``hvctl start --prefault``; rmap ``index``), forked by
the client API (``fork``, ``fork_reset``). Per N, medians of repeats with
their spread (min..max) and n:

- **fork**: ``fork(parent)`` from the request until its answer (the
  child's guest runs), against Linux ``fork()`` of a process holding N
  touched anonymous pages until the child runs
  (:mod:`hvshare.perf.peers.linux_fork`); each fork is destroyed untimed,
  and each waits, untimed, for the hypervisor's stock of warm guests to be
  full (forks no faster than the stock refills; how each fork's guest was
  started is in the result, ``guests``);
- **reset**: ``fork_reset`` of a fork whose guest dirtied K = 64 pages
  first, against destroying such a fork and making a new one (the kill
  controller's destroy, then ``fork``);
- **loop**: iterations per second of a fuzzing loop (K = 1, 64, 1,024):
  a fork is made, then each iteration its guest writes K random pages
  (one batched message) and the fork is reset; the fork is part of the
  timed run. Against the Linux loop of fork, K page writes in the child,
  exit and wait (the parent holding the same N touched pages);
- **frames**: the pool's frames a fork takes once it wrote K pages and
  read M other pages: exactly K (checked); a fork that did nothing takes
  none.

Beside each, the longest hypervisor step in the phase (wall time), from
``info``'s step meters before and after it (:func:`hvshare.perf.scale.step_window`:
the cumulative histograms' difference; the ``info`` steps themselves left
out); destroys report their own longest teardown step.

Goals: :mod:`hvshare.perf.goals` (the fork against Linux's at 1,048,576 pages;
fork_reset, the loop at K = 64 and the frames at the largest N measured;
the longest step at every N). Checks, in ``checks``: every frames check
exact, every reset dropped what was written, audit 0.

The Linux peers run before each N's hypervisor starts, so neither shares
the machine with the other.

Placement (:class:`hvshare.perf.placement.Placement`): every thread of the
hypervisor and of every process it started on one core, this process (the
client) on the others. A guest started later inherits that mask, so the
forks' guests run beside the hypervisor, as a fork's child does beside its
parent, and a fork's writes take same-core faults. At the end of each N
one more fork is made and every thread of the hypervisor, the processes
below it, the parent's guest and that fork's guest is checked
(``placements``).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time


from hvshare.hvcore.constants import PAGE_SIZE

from .common import sigterm_exits, smoke, table
from .figure import Figures, text_of
from .placement import Placement, alone_and_rest
from .report.headlines import report_goals
from .scale import _signals_held, step_window

FULL_SIZES = (16_384, 262_144, 1_048_576)
QUICK_SIZES = (4096, 16_384)
#: sizes of a ``--smoke`` run
SMOKE_SIZES = (4096,)
#: pages a fork dirties before each reset (and before each destroy it is compared with)
RESET_DIRTY = 64
LOOP_KS = (1, 64, 1024)
#: pages the frames check's fork reads besides the K it writes
FRAMES_READS = 256
RMAP = "index"
#: frames beyond twice the parent's pages (a parent plus forks)
FRAME_MARGIN = 65_536
#: how long a timed fork waits for the hypervisor's stock of warm guests
WARM_WAIT_SECONDS = 30.0


def _say(msg: str) -> None:
    print(f"  fork: {msg}", file=sys.stderr, flush=True)


def repeats_for(quick: bool) -> dict:
    """Repeats per measure, and the loop's iterations per repeat."""
    if quick and smoke():
        return {"fork": 2, "reset": 2, "loop": 1, "loop_iterations": 2, "peer_fork": 2,
                "peer_loop_iterations": 2}
    if quick:
        return {"fork": 5, "reset": 5, "loop": 3, "loop_iterations": 10, "peer_fork": 5,
                "peer_loop_iterations": 10}
    return {"fork": 10, "reset": 10, "loop": 3, "loop_iterations": 50, "peer_fork": 10,
            "peer_loop_iterations": 20}


def frames_for(n: int) -> int:
    return 2 * n + FRAME_MARGIN


def shm_problem(frames: int) -> str | None:
    """Why a pool of ``frames`` cannot be backed now (/dev/shm too small), or None."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    need = frames * PAGE_SIZE
    if need > free:
        return f"a pool of {frames:,} frames needs {need / 2**30:.1f} GiB of /dev/shm, {free / 2**30:.1f} GiB free"
    return None


# ----------------------------------------------------------------------
# one hypervisor: the four phases


@contextlib.contextmanager
def _hypervisor(frames: int):
    from hvshare.tools.client import HypervisorClient
    from hvshare.tools.session import HVSession
    hv = None
    try:
        with _signals_held():
            hv = HVSession(frames=frames, rmap=RMAP, timeout=None, prefault=True)
        yield hv
    finally:
        # A request cut short (Ctrl-C) leaves its answer unread on the
        # session's connection: stop the hypervisor over a fresh one.
        if hv is not None:
            HypervisorClient.close(hv)
            hv.close()


class _Phase:
    """Longest hypervisor step of each timed part of a phase."""

    def __init__(self, hv):
        self.hv = hv
        self.steps_ms: list[float] = []

    @contextlib.contextmanager
    def window(self):
        i0 = self.hv.info()
        yield
        self.steps_ms.append(step_window(i0, self.hv.info())["max_ms"])


def _fuzz_fork(hv, parent: int, writes: int, reads: int = 0) -> int:
    """A fork whose ``fuzz`` guest writes ``writes`` and reads ``reads``
    distinct random pages each time it is run."""
    return hv.fork(parent, workload="fuzz", fuzz_writes=writes, fuzz_reads=reads)["domid"]


def warm_stock(hv, timeout: float = WARM_WAIT_SECONDS) -> dict:
    """Wait until the hypervisor's stock of warm guests is full and warm
    (a fork then gets a started guest, as one does when forks come no
    faster than the stock refills); the stock as ``info`` shows it."""
    end = time.monotonic() + timeout
    while True:
        w = hv.info().get("warm_guests", {})
        if w.get("warm", 0) >= w.get("size", 0) or time.monotonic() > end:
            return w
        time.sleep(0.02)


def _taken(before: dict, after: dict) -> dict:
    """How the guests of a phase were started: warm, still starting, cold."""
    return {k: after.get(k, 0) - before.get(k, 0) for k in ("taken_warm", "taken_starting", "cold")}


def measure_fork(hv, parent: int, repeats: int, figs: Figures, n: int) -> dict:
    ph = _Phase(hv)
    secs, answered, destroy_ms = [], [], []
    w0 = warm_stock(hv)
    for _ in range(repeats):
        warm_stock(hv)
        with ph.window():
            t0 = time.perf_counter()
            a = hv.fork(parent)
            secs.append(time.perf_counter() - t0)
        answered.append(a["seconds"])
        destroy_ms.append(hv.destroy(a["domid"])["max_pause_ms"])
    figs.add("fork_seconds", secs, "s", pages=n)
    figs.add("max_step", ph.steps_ms, "ms", pages=n, phase="fork")
    figs.add("max_step", destroy_ms, "ms", pages=n, phase="destroy a fork")
    return {"hv_seconds": statistics.median(answered), "guests": _taken(w0, hv.info().get("warm_guests", {}))}


def measure_reset(hv, parent: int, repeats: int, figs: Figures, n: int) -> dict:
    """fork_reset after K dirty pages, against destroy + a new fork."""
    ph_reset, ph_redo = _Phase(hv), _Phase(hv)
    reset_s, redo_s, dropped, written, destroy_ms = [], [], [], [], []
    child = _fuzz_fork(hv, parent, RESET_DIRTY)
    try:
        for _ in range(repeats):
            written.append(hv.fuzz_run(child)["pages_written"])
            with ph_reset.window():
                t0 = time.perf_counter()
                r = hv.fork_reset(child)
                reset_s.append(time.perf_counter() - t0)
            dropped.append(r["pages_dropped"])
        for _ in range(repeats):
            hv.fuzz_run(child)
            with ph_redo.window():
                t0 = time.perf_counter()
                d = hv.destroy(child)
                child = None
                child = _fuzz_fork(hv, parent, RESET_DIRTY)
                redo_s.append(time.perf_counter() - t0)
            destroy_ms.append(d["max_pause_ms"])
    finally:
        if child is not None:
            hv.destroy(child)
    figs.add("reset_seconds", reset_s, "s", pages=n, k=RESET_DIRTY)
    figs.add("destroy_fork_seconds", redo_s, "s", pages=n, k=RESET_DIRTY)
    figs.add("max_step", ph_reset.steps_ms, "ms", pages=n, phase="fork_reset")
    figs.add("max_step", [max(a, b) for a, b in zip(ph_redo.steps_ms, destroy_ms)], "ms", pages=n,
             phase="destroy + fork")
    return {"k": RESET_DIRTY, "pages_dropped": dropped, "pages_written": written,
            "dropped_all": all(x == RESET_DIRTY for x in dropped)}


def measure_loop(hv, parent: int, k: int, repeats: int, iterations: int, figs: Figures, n: int) -> dict:
    """A fork, then ``iterations`` times: its fuzz guest writes K random
    pages and the fork is reset (``fork_reset --run``: reset, then one run)."""
    ph = _Phase(hv)
    rates, fork_s = [], []
    for _ in range(repeats):
        child = None
        try:
            with ph.window():
                t0 = time.perf_counter()
                child = _fuzz_fork(hv, parent, k)
                fork_s.append(time.perf_counter() - t0)
                for _ in range(iterations):
                    hv.fork_reset(child, run=True)
                rates.append(iterations / (time.perf_counter() - t0))
        finally:
            if child is not None:
                hv.destroy(child)
    figs.add("loop_rate", rates, "iterations/s", pages=n, k=k)
    figs.add("max_step", ph.steps_ms, "ms", pages=n, phase=f"loop K={k}")
    return {"k": k, "iterations": iterations, "fork_seconds": statistics.median(fork_s)}


def measure_frames(hv, parent: int, k: int, m: int) -> dict:
    """Frames a fork takes: none at first, K once it wrote K pages and read M others."""
    ph = _Phase(hv)
    with ph.window():
        free0 = hv.info()["frames_free"]
        child = _fuzz_fork(hv, parent, k, m)
        try:
            free1 = hv.info()["frames_free"]
            ran = hv.fuzz_run(child)
            free2 = hv.info()["frames_free"]
        finally:
            d = hv.destroy(child)
    used = free0 - free2
    return {"k": k, "m": m, "frames_used": used, "frames_at_fork": free0 - free1,
            "pages_written": ran["pages_written"], "pages_read": ran["pages_read"],
            "frames_back": hv.info()["frames_free"] == free0,
            "ok": used == k and free0 == free1 and ran["pages_written"] == k and ran["pages_read"] == m,
            "max_step_ms": max(ph.steps_ms[0], d["max_pause_ms"])}


def one_size(n: int, reps: dict, figs: Figures) -> dict:
    """Every phase on a fresh hypervisor holding a parent of ``n`` pages."""
    frames = frames_for(n)
    out: dict = {"pages": n, "frames": frames, "rmap": RMAP}
    hv_cpus, rest = alone_and_rest()
    with _hypervisor(frames) as hv, Placement() as pl:
        pl.pin("hypervisor", hv.pid, hv_cpus, tree=True)     # and what it started: its guests' source
        pl.pin("driver", 0, rest)
        t0 = time.perf_counter()
        parent = hv.create(n, "zero")
        out["parent_create_seconds"] = time.perf_counter() - t0
        pl.watch("parent's guest", hv.domain(parent)["pid"], hv_cpus)
        _say(f"N={n:,}: fork x {reps['fork']}")
        out["fork"] = measure_fork(hv, parent, reps["fork"], figs, n)
        _say(f"N={n:,}: fork_reset and destroy + fork at K={RESET_DIRTY} x {reps['reset']}")
        out["reset"] = measure_reset(hv, parent, reps["reset"], figs, n)
        out["loop"] = {}
        for k in LOOP_KS:
            _say(f"N={n:,}: fuzzing loop K={k:,}: {reps['loop']} x {reps['loop_iterations']} iterations")
            out["loop"][str(k)] = measure_loop(hv, parent, k, reps["loop"], reps["loop_iterations"], figs, n)
        out["frames"] = {str(k): measure_frames(hv, parent, k, FRAMES_READS) for k in LOOP_KS}
        child = hv.fork(parent)["domid"]
        try:
            pl.watch("a fork's guest", hv.domain(child)["pid"], hv_cpus)
            out["placement"] = pl.check(pages=n)
        finally:
            hv.destroy(child)
        out["audit_errors"] = hv.audit()
    for k, f in out["frames"].items():
        figs.add("frames_used", [f["frames_used"]], "frames", pages=n, k=int(k))
        figs.add("pages_written", [f["pages_written"]], "pages", pages=n, k=int(k))
        figs.add("max_step", [f["max_step_ms"]], "ms", pages=n, phase=f"frames K={k}")
    return out


# ----------------------------------------------------------------------
# runner protocol


def run(quick: bool = False) -> dict:
    with sigterm_exits():             # a killed run still stops its hypervisor
        return _run(quick)


def _run(quick: bool) -> dict:
    from .peers import linux_fork
    t_all = time.perf_counter()
    reps = repeats_for(quick)
    sizes = (SMOKE_SIZES if smoke() else QUICK_SIZES) if quick else FULL_SIZES
    results, peers, skipped, figs = [], {}, {}, Figures()
    for n in sizes:
        _say(f"N={n:,}: Linux fork and fork loops")
        p = linux_fork.measure(n, fork_repeats=reps["peer_fork"], loop_ks=LOOP_KS,
                               loop_iterations=reps["peer_loop_iterations"], loop_repeats=reps["loop"])
        figs.add("linux_fork_seconds", p.pop("fork_seconds").values, "s", pages=n)
        for k, f in p.pop("loop_rate").items():
            figs.add("linux_loop_rate", f.values, "iterations/s", pages=n, k=k)
        p.pop("helper_alone_seconds")
        peers[str(n)] = p
        why = shm_problem(frames_for(n))
        if why:
            _say(f"N={n:,} skipped: {why}")
            skipped[str(n)] = why
            continue
        t0 = time.perf_counter()
        results.append(one_size(n, reps, figs))
        _say(f"N={n:,}: done in {time.perf_counter() - t0:.0f} s")
    out = {"figures": figs.dicts(), "results": results, "peers": peers, "checks": _checks(results),
           "placements": [r.pop("placement") for r in results],
           "sizes": list(sizes), "repeats": reps, "reset_dirty": RESET_DIRTY, "loop_ks": list(LOOP_KS),
           "frames_reads": FRAMES_READS, "seconds": round(time.perf_counter() - t_all, 1)}
    if skipped:
        out["skipped_sizes"] = skipped
    return out


def _checks(results: list[dict]) -> list[dict]:
    """What must hold besides the goals (:mod:`hvshare.perf.goals`): every frames
    check exact, every reset dropped what was written, audit 0."""
    frames = [(r["pages"], f) for r in results for f in r["frames"].values()]
    bad = [(n, f) for n, f in frames if not f["ok"]]
    return [
        {"check": "frames used by a fork that wrote K and read M pages == K at every N and K",
         "met": None if not frames else not bad,
         "detail": "; ".join(f"N={n:,} K={f['k']:,}: {f['frames_used']:,} frames ({f['frames_at_fork']:,} "
                             f"at the fork)" for n, f in bad) or "all exact"},
        {"check": f"fork_reset dropped the {RESET_DIRTY} dirty pages every time",
         "met": None if not results else all(r["reset"]["dropped_all"] for r in results), "detail": ""},
        {"check": "audit 0 after every N", "met": None if not results else not any(r["audit_errors"] for r in results),
         "detail": ", ".join(f"N={r['pages']:,}: {r['audit_errors']}" for r in results)}]


def report(result: dict) -> str:
    rows = []
    for n in result["sizes"]:
        for name, what, peer in (("fork_seconds", "fork, until the child runs", "linux_fork_seconds"),
                                 ("reset_seconds", f"fork_reset after {RESET_DIRTY} dirty pages", None),
                                 ("destroy_fork_seconds", "  destroy + new fork instead", None)):
            rows.append([f"{n:,}", what, text_of(result, name, pages=n),
                         text_of(result, peer, pages=n) if peer else "-"])
        for k in result["loop_ks"]:
            rows.append([f"{n:,}", f"fork + {k:,} writes + reset", text_of(result, "loop_rate", pages=n, k=k),
                         text_of(result, "linux_loop_rate", pages=n, k=k)])
        for k in result["loop_ks"]:
            rows.append([f"{n:,}", f"frames used: {k:,} written, {FRAMES_READS} read",
                         text_of(result, "frames_used", pages=n, k=k), "-"])
        rows.append([f"{n:,}", "longest hypervisor step, any phase", text_of(result, "max_step", pages=n), "-"])
    lines = ["VM fork against Linux fork() of a process holding the same N touched pages "
             "(medians [min–max] of the repeats)", table(["N", "measure", "hvshare", "Linux"], rows, "l")]
    for n, why in result.get("skipped_sizes", {}).items():
        lines.append(f"N={int(n):,} skipped: {why}")
    lines += ["", report_goals("fork", result), "Checks:"]
    for c in result["checks"]:
        verdict = "not measured" if c["met"] is None else ("met" if c["met"] else "NOT MET")
        lines.append(f"  [{verdict}] {c['check']}" + (f": {c['detail']}" if c["detail"] else ""))
    return "\n".join(lines)
