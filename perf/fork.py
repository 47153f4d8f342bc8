"""VM fork: ``python -m perf fork [--quick] [--json PATH]``.

A parent domain of N pages (``zero``: one frame per page, as a guest's
touched RAM) on a fresh hypervisor per N (its pool prefaulted, as
``perf.scale``'s: ``hvctl start --prefault``; rmap ``index``), forked by
the client API (``fork``, ``fork_reset``). Per N, medians of repeats with
their spread (min..max) and n:

- **fork**: ``fork(parent)`` from the request until its answer (the
  child's guest runs), against Linux ``fork()`` of a process holding N
  touched anonymous pages until the child runs
  (:mod:`perf.peers.linux_fork`); each fork is destroyed untimed;
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
``info``'s step meters before and after it (:func:`perf.scale.step_window`:
the cumulative histograms' difference; the ``info`` steps themselves left
out); destroys report their own longest teardown step.

Goals (checked, in ``goals``): fork(1,048,576) / Linux fork <= 1x;
fork_reset / (destroy + new fork) at K = 64 <= 0.5x; loop at K = 64 /
Linux loop >= 1x; frames == K; the longest step <= 1 ms at every N. The
fork and loop ratios are judged at 1,048,576 pages and the largest N
measured respectively; ``--quick`` (N = 4,096 and 16,384, fewer repeats)
shows its ratios without judging the fork goal.

The Linux peers run before each N's hypervisor starts, so neither shares
the machine with the other.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time


from hvcore.constants import PAGE_SIZE

from .common import sigterm_exits, summary, table
from .scale import _signals_held, step_window

FULL_SIZES = (16_384, 262_144, 1_048_576)
QUICK_SIZES = (4096, 16_384)
#: the size the fork goal is stated for
GOAL_PAGES = 1_048_576
#: pages a fork dirties before each reset (and before each destroy it is compared with)
RESET_DIRTY = 64
LOOP_KS = (1, 64, 1024)
#: pages the frames check's fork reads besides the K it writes
FRAMES_READS = 256
RMAP = "index"
#: frames beyond twice the parent's pages (a parent plus forks)
FRAME_MARGIN = 65_536


def _say(msg: str) -> None:
    print(f"  fork: {msg}", file=sys.stderr, flush=True)


def repeats_for(quick: bool) -> dict:
    """Repeats per measure, and the loop's iterations per repeat."""
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
    from tools.client import HypervisorClient
    from tools.session import HVSession
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


def measure_fork(hv, parent: int, repeats: int) -> dict:
    ph = _Phase(hv)
    secs, answered, destroy_ms = [], [], []
    for _ in range(repeats):
        with ph.window():
            t0 = time.perf_counter()
            a = hv.fork(parent)
            secs.append(time.perf_counter() - t0)
        answered.append(a["seconds"])
        destroy_ms.append(hv.destroy(a["domid"])["max_pause_ms"])
    return {"seconds": statistics.median(secs), "seconds_stats": summary(secs),
            "hv_seconds": statistics.median(answered), "max_step_ms": max(ph.steps_ms),
            "max_step_ms_stats": summary(ph.steps_ms), "destroy_max_step_ms": max(destroy_ms)}


def measure_reset(hv, parent: int, repeats: int) -> dict:
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
    return {"k": RESET_DIRTY,
            "reset": {"seconds": statistics.median(reset_s), "seconds_stats": summary(reset_s),
                      "pages_dropped": dropped, "pages_written": written, "max_step_ms": max(ph_reset.steps_ms),
                      "max_step_ms_stats": summary(ph_reset.steps_ms)},
            "destroy_and_fork": {"seconds": statistics.median(redo_s), "seconds_stats": summary(redo_s),
                                 "max_step_ms": max(max(ph_redo.steps_ms), max(destroy_ms)),
                                 "max_step_ms_stats": summary(ph_redo.steps_ms),
                                 "destroy_max_step_ms": max(destroy_ms)},
            "dropped_all": all(x == RESET_DIRTY for x in dropped)}


def measure_loop(hv, parent: int, k: int, repeats: int, iterations: int) -> dict:
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
    return {"k": k, "iterations": iterations, "iterations_per_second": statistics.median(rates),
            "iterations_per_second_stats": summary(rates), "fork_seconds": statistics.median(fork_s),
            "max_step_ms": max(ph.steps_ms), "max_step_ms_stats": summary(ph.steps_ms)}


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


def one_size(n: int, reps: dict) -> dict:
    """Every phase on a fresh hypervisor holding a parent of ``n`` pages."""
    frames = frames_for(n)
    out: dict = {"pages": n, "frames": frames, "rmap": RMAP}
    with _hypervisor(frames) as hv:
        t0 = time.perf_counter()
        parent = hv.create(n, "zero")
        out["parent_create_seconds"] = time.perf_counter() - t0
        _say(f"N={n:,}: fork x {reps['fork']}")
        out["fork"] = measure_fork(hv, parent, reps["fork"])
        _say(f"N={n:,}: fork_reset and destroy + fork at K={RESET_DIRTY} x {reps['reset']}")
        out["reset"] = measure_reset(hv, parent, reps["reset"])
        out["loop"] = {}
        for k in LOOP_KS:
            _say(f"N={n:,}: fuzzing loop K={k:,}: {reps['loop']} x {reps['loop_iterations']} iterations")
            out["loop"][str(k)] = measure_loop(hv, parent, k, reps["loop"], reps["loop_iterations"])
        out["frames"] = {str(k): measure_frames(hv, parent, k, FRAMES_READS) for k in LOOP_KS}
        out["audit_errors"] = hv.audit()
    out["max_step_ms"] = max([out["fork"]["max_step_ms"], out["fork"]["destroy_max_step_ms"],
                              out["reset"]["reset"]["max_step_ms"], out["reset"]["destroy_and_fork"]["max_step_ms"]]
                             + [x["max_step_ms"] for x in out["loop"].values()]
                             + [x["max_step_ms"] for x in out["frames"].values()])
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
    sizes = QUICK_SIZES if quick else FULL_SIZES
    results, peers, skipped = [], {}, {}
    for n in sizes:
        _say(f"N={n:,}: Linux fork and fork loops")
        peers[str(n)] = linux_fork.measure(n, fork_repeats=reps["peer_fork"], loop_ks=LOOP_KS,
                                           loop_iterations=reps["peer_loop_iterations"], loop_repeats=reps["loop"])
        why = shm_problem(frames_for(n))
        if why:
            _say(f"N={n:,} skipped: {why}")
            skipped[str(n)] = why
            continue
        t0 = time.perf_counter()
        results.append(one_size(n, reps))
        _say(f"N={n:,}: done in {time.perf_counter() - t0:.0f} s")
    ratios = _ratios(results, peers)
    out = {"results": results, "peers": peers, "ratios": ratios, "goals": _goals(results, ratios, quick),
           "sizes": list(sizes), "repeats": reps, "reset_dirty": RESET_DIRTY, "loop_ks": list(LOOP_KS),
           "frames_reads": FRAMES_READS, "seconds": round(time.perf_counter() - t_all, 1)}
    if skipped:
        out["skipped_sizes"] = skipped
    return out


def _ratios(results: list[dict], peers: dict) -> dict:
    out = {}
    for r in results:
        n = r["pages"]
        p = peers[str(n)]
        out[f"fork_over_linux_{n}"] = r["fork"]["seconds"] / p["fork"]["seconds"]
        out[f"reset_over_destroy_fork_{n}"] = (r["reset"]["reset"]["seconds"]
                                               / r["reset"]["destroy_and_fork"]["seconds"])
        for k in LOOP_KS:
            out[f"loop_over_linux_k{k}_{n}"] = (r["loop"][str(k)]["iterations_per_second"]
                                                / p["loop"][str(k)]["iterations_per_second"])
    return out


def _goals(results: list[dict], ratios: dict, quick: bool) -> list[dict]:
    """Every goal with its verdict (``met`` None: not measured in this run)."""
    goals = []

    def goal(what, met, detail, ratio=None):
        goals.append({"goal": what, "met": met, "detail": detail, "ratio": ratio})

    top = max((r["pages"] for r in results), default=None)
    q = ratios.get(f"fork_over_linux_{GOAL_PAGES}")
    goal(f"fork of {GOAL_PAGES:,} pages <= 1x Linux fork", None if q is None else q <= 1,
         f"{q:.3g}x" if q is not None else "not run" + (" (--quick)" if quick else ""), q)
    q = ratios.get(f"reset_over_destroy_fork_{top}")
    goal(f"fork_reset <= 0.5x destroy + new fork at K={RESET_DIRTY}", None if q is None else q <= 0.5,
         f"{q:.3g}x at N={top:,}" if q is not None else "not run", q)
    q = ratios.get(f"loop_over_linux_k64_{top}")
    goal("fork + 64 writes + reset iterations/s >= 1x the Linux loop", None if q is None else q >= 1,
         f"{q:.3g}x at N={top:,}" if q is not None else "not run", q)
    frames = [(r["pages"], f) for r in results for f in r["frames"].values()]
    bad = [(n, f) for n, f in frames if not f["ok"]]
    goal("frames used by a fork that wrote K and read M pages == K", None if not frames else not bad,
         "all exact (" + ", ".join(f"K={f['k']:,}: {f['frames_used']:,}" for n, f in frames if n == top) + ")"
         if frames and not bad else "; ".join(f"N={n:,} K={f['k']:,}: {f['frames_used']:,} frames "
                                              f"({f['frames_at_fork']:,} at the fork)" for n, f in bad)
         or "not run")
    slow = [r for r in results if r["max_step_ms"] > 1.0]
    goal("longest hypervisor step <= 1 ms at every N", None if not results else not slow,
         ", ".join(f"N={r['pages']:,}: {r['max_step_ms']:.3g} ms" for r in results) or "not run")
    goal("audit 0 after every N", None if not results else not any(r["audit_errors"] for r in results),
         ", ".join(f"N={r['pages']:,}: {r['audit_errors']}" for r in results) or "not run")
    return goals


def _range(s: dict, scale: float = 1.0, fmt: str = "{:.3g}") -> str:
    if s["n"] < 2:
        return "n=1"
    return f"{fmt.format(s['min'] * scale)}..{fmt.format(s['max'] * scale)}"


def report(result: dict) -> str:
    rows = []
    for r in result["results"]:
        n = r["pages"]
        p = result["peers"][str(n)]
        f, pf = r["fork"], p["fork"]
        rows.append([f"{n:,}", "fork, until the child runs (ms)", f["seconds"] * 1e3,
                     _range(f["seconds_stats"], 1e3), f["seconds_stats"]["n"], pf["seconds"] * 1e3,
                     _range(pf["seconds_stats"], 1e3), f["max_step_ms"]])
        rs, rd = r["reset"]["reset"], r["reset"]["destroy_and_fork"]
        rows.append([f"{n:,}", f"fork_reset after {r['reset']['k']} dirty pages (ms)", rs["seconds"] * 1e3,
                     _range(rs["seconds_stats"], 1e3), rs["seconds_stats"]["n"], "-", "-", rs["max_step_ms"]])
        rows.append([f"{n:,}", "  destroy + new fork instead (ms)", rd["seconds"] * 1e3,
                     _range(rd["seconds_stats"], 1e3), rd["seconds_stats"]["n"], "-", "-", rd["max_step_ms"]])
        for k, lo in r["loop"].items():
            s, ps = lo["iterations_per_second_stats"], p["loop"][k]["iterations_per_second_stats"]
            rows.append([f"{n:,}", f"fork + {int(k):,} writes + reset (/s)", s["median"],
                         _range(s, fmt="{:,.0f}"), s["n"], ps["median"], _range(ps, fmt="{:,.0f}"),
                         lo["max_step_ms"]])
        for k, fr in r["frames"].items():
            rows.append([f"{n:,}", f"frames used: {int(k):,} written, {fr['m']:,} read", fr["frames_used"],
                         "exact" if fr["ok"] else "NOT EXACT", 1, "-", "-", fr["max_step_ms"]])
    lines = ["VM fork against Linux fork() of a process holding the same N touched pages "
             "(medians; spread min..max of n repeats)",
             table(["N", "measure", "hvshare", "spread", "n", "Linux", "spread", "longest step ms"], rows)]
    for n, why in result.get("skipped_sizes", {}).items():
        lines.append(f"N={int(n):,} skipped: {why}")
    lines.append("")
    lines.append("Ratios: " + (", ".join(f"{k} {v:.3g}" for k, v in result["ratios"].items()) or "none"))
    lines.append("Goals:")
    for g in result["goals"]:
        verdict = "not measured" if g["met"] is None else ("met" if g["met"] else "NOT MET")
        lines.append(f"  [{verdict}] {g['goal']}: {g['detail']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .common import standalone
    return standalone(argv, "python -m perf.fork", "VM fork, fork_reset and fuzzing loops against Linux fork().",
                      "4,096 and 16,384 pages, fewer repeats", run, report)


if __name__ == "__main__":
    sys.exit(main())
