"""Domain teardown: ``python -m hvshare.perf teardown [--quick] [--json PATH]``.

The seed's case, on a real hypervisor process: one ``zero`` domain whose N
gfns all point at ONE shared frame, a second domain sharing that frame too
(so the frame outlives the teardown and its rmap keeps a few entries), and a
writer guest that keeps taking CoW faults while the heavy domain is
destroyed by the kill controller (:mod:`hvshare.tools.killctl`). For each N, each
rmap policy and each teardown mode:

- **seconds**: the kill controller's wall time, first request to "gone";
- **continuations**: how often the teardown answered "restart";
- **max_pause_ms**: the hypervisor's longest teardown step in wall time,
  with ``max_pause_cpu_ms`` (the same in CPU time: what is left once other
  processes' turns on the CPU are taken out) and ``p99_step_ms`` beside it;
  every thread of the hypervisor has a core to itself
  (:class:`hvshare.perf.placement.Placement`, checked and recorded in
  ``placements``), the writer's guest and this process (controller, writer
  driver) the others, so our own processes never preempt a step -- other users of the machine still may,
  and so may the host of this virtual machine: **steal_ms** is the CPU time
  the host took from the machine during the teardown (/proc/stat). With
  the hypervisor at real-time priority, a step whose wall time is far
  above its CPU time lost that time to the host, not to our processes;
- **fault_p99_us** during the teardown against **idle_fault_p99_us**: the
  writer's pages are shared (pairwise with a twin), so each write is a CoW
  fault; the guest times each round trip itself (``time_writes``, a few
  writes per request at a steady rate), before the teardown (idle) and
  while it runs. A fault is counted in the teardown when it started inside
  the controller's window.

Peer, in the same run: Linux munmap of N pages all merged into ONE KSM page
(:func:`hvshare.perf.peers.ksm.measure_munmap`), the kernel doing the same job.

Figures (:mod:`hvshare.perf.figure`) per case (``rmap``, ``mode``, ``entries``):
``seconds``, ``max_step``, ``max_step_cpu``, ``p99_step``, ``fault_p99``,
``idle_fault_p99``; ``munmap_ksm`` and ``munmap_private`` per N; the
faults' histograms and the last repeat's steps (a trace).

Each case runs ``repeats`` times on one hypervisor (3 in the full run, 1 at
1,000,000 and for ``list`` at 100,000, 1 in ``--quick``); medians are shown,
every repeat's in the figures, and fault percentiles over the faults of all
repeats together, whose whole distribution is kept as ``fault_histogram``
and ``idle_fault_histogram`` (:func:`hvshare.perf.common.log_histogram`).

Goals: :mod:`hvshare.perf.goals` (the seed's: at N = 100,000 ``buckets`` at least
200x faster than ``list``; hvshare's: ``index`` at most Linux's munmap, a
preemptible step at most 1 ms, the writer's fault p99 during a teardown
at most 2x idle). They are judged apart for ``list``: one removal from a
list of N entries scans it, which at N = 10,000 already takes a
millisecond or more, so no chunking can bring its steps under 1 ms.

``list`` at 100,000 takes many minutes: it runs once, preemptible only, and
not in ``--quick`` (N = 10,000 only, ``list`` preemptible only: well under
a minute).
"""
from __future__ import annotations

import os
import statistics
import threading
import time

import numpy as np

from hvshare.hvcore.constants import RMAP_POLICIES, TEARDOWN_MODES

from .common import log_histogram, smoke, table
from .figure import Figures
from .goals import SEED_N
from .placement import Placement, alone_and_rest
from .report.headlines import report_goals

POLICIES = RMAP_POLICIES
MODES = TEARDOWN_MODES
#: share_many pairs per request
BATCH = 50_000
#: the writer: pages shared with its twin, faults per second, writes per request
WRITER_PAGES = 20_000
WRITER_RATE = 2000.0
WRITER_BATCH = 4
IDLE_FAULTS = 1000
#: faults each case gathers during teardowns at least: repeats are added
#: (up to MAX_REPEATS) until the repeats' faults together reach it
MIN_FAULTS = 1000
MAX_REPEATS = 40
#: added repeats stop once a case has run this long (s): a fast teardown
#: gathers few faults per repeat, and each repeat rebuilds its heavy
#: domain (tens of seconds at 1,000,000 entries); the result says how
#: many faults the case gathered (``faults_during``)
PROLONG_SECONDS = 60.0
#: entries and writer pages of a ``--smoke`` run (its one repeat is not
#: prolonged to MIN_FAULTS)
SMOKE_N, SMOKE_WRITER_PAGES = 2000, 1000


def _cases(quick: bool) -> list[tuple[int, str, str]]:
    """(N, rmap, mode) in the order they run: side by side per N."""
    if quick:                       # list monolithic would double the run's time
        return [(SMOKE_N if smoke() else 10_000, r, m) for r in POLICIES for m in MODES if (r, m) != ("list", "monolithic")]
    out = [(n, r, m) for n in (10_000, 100_000) for r in POLICIES for m in MODES
           if not (n == 100_000 and r == "list")]
    out += [(1_000_000, "index", m) for m in MODES]
    out.append((100_000, "list", "preemptible"))          # minutes: last, once
    return out


# ----------------------------------------------------------------------
# the writer


class _Writer(threading.Thread):
    """CoW faults at a steady rate from the guest's own timer: each request
    asks the guest to write ``batch`` shared pages and time every write."""

    def __init__(self, guest, first: int, end: int, rate: float, batch: int):
        super().__init__(daemon=True)
        self.guest, self.gfn, self.end = guest, first, end
        self.interval = batch / rate
        self.batch = batch
        self.stop = threading.Event()
        self.samples: list[tuple[float, np.ndarray]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        due = time.monotonic()
        try:
            while not self.stop.is_set() and self.gfn < self.end:
                k = min(self.batch, self.end - self.gfn)
                t0 = time.monotonic()
                self.samples.append((t0, self.guest.time_writes(self.gfn, k)))
                self.gfn += k
                due += self.interval
                delay = due - time.monotonic()
                if delay > 0:
                    self.stop.wait(delay)
                elif delay < -0.5:
                    due = time.monotonic()           # frozen for long: do not burst
        except BaseException as e:                   # reported by the caller
            self.error = e

    def latencies_us(self, start: float = -np.inf, end: float = np.inf) -> np.ndarray:
        """Faults that started in [start, end], in microseconds."""
        out = []
        for t0, lat in self.samples:
            began = t0 + (np.cumsum(lat) - lat) / 1e9
            out.append(lat[(began >= start) & (began <= end)])
        return np.concatenate(out + [np.empty(0, np.int64)]) / 1e3


def _pct(us: np.ndarray, q: float):
    return round(float(np.percentile(us, q)), 1) if len(us) else None


# ----------------------------------------------------------------------
# one case


def heavy_domain(hv, n: int, also: int = 4) -> tuple[int, int]:
    """The seed's teardown case on a hypervisor client ``hv``: a ``zero``
    domain whose n gfns all point at ONE shared frame, and a small domain
    whose ``also`` gfns share that frame too, so the frame outlives the heavy
    domain. Returns (heavy, other)."""
    d = hv.create(n, "zero")
    other = hv.create(max(also, 1), "zero")
    g = np.arange(n, dtype=np.int64)
    h, codes = hv.nominate_many(d, g)
    assert (codes == 0).all()
    for lo in range(1, n, BATCH):
        hi = min(lo + BATCH, n)
        ok = hv.share_many(d, np.zeros(hi - lo, np.int64), np.full(hi - lo, h[0], np.uint64),
                           d, g[lo:hi], h[lo:hi])
        assert (ok == 0).all()
    og = np.arange(also, dtype=np.int64)
    oh, _ = hv.nominate_many(other, og)
    assert (hv.share_many(d, np.zeros(also, np.int64), np.full(also, h[0], np.uint64), other, og, oh) == 0).all()
    return d, other


def _steal_ms() -> float | None:
    """CPU time the host took from this virtual machine so far (``steal``
    in /proc/stat), in ms; None where the kernel does not say."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) * 1e3 / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def measure(n: int, rmap: str, mode: str, repeats: int = 1, writer_pages: int = WRITER_PAGES,
            idle_faults: int = IDLE_FAULTS) -> dict:
    """Build the case on a fresh hypervisor and tear the heavy domain down
    under the writer's faults, ``repeats`` times (a fresh heavy domain and
    fresh writer pages each time; medians reported); check at the end that
    every frame came back. Every thread of the hypervisor has a core to
    itself, the writer's guest and this process (the kill controller and
    the writer's driver) the others: the placement's record is the
    result's ``placement``."""
    from hvshare.tools import killctl
    from hvshare.tools.api import GuestClient, HypervisorClient, hvshare_session
    frames = n + 3 * writer_pages + 4096
    per = writer_pages                               # writer gfns each repeat may fault
    out: dict = {"rmap": rmap, "mode": mode, "n": n, "repeats": repeats}
    runs = []
    pooled_during: list[np.ndarray] = []
    pooled_idle: list[np.ndarray] = []
    hv_cpus, rest = alone_and_rest()
    with hvshare_session(frames=frames, rmap=rmap, teardown=mode) as hv, Placement() as pl:
        writer = hv.create(writer_pages, "zero")
        twin = hv.create(writer_pages, "zero")
        assert hv.range_share(twin, writer, 0, writer_pages - 1) == writer_pages
        entry = next(x for x in hv.list() if x["domid"] == writer)
        pl.pin("hypervisor", hv.pid, hv_cpus)
        pl.pin("guest", entry["pid"], rest)
        pl.pin("driver", 0, rest)
        out["cpus"] = {"hypervisor": sorted(hv_cpus), "guest and driver": sorted(rest)}
        with GuestClient(entry["guest_socket"], writer, entry["pid"], timeout=None) as g, \
                HypervisorClient(hv.socket_path, timeout=None) as ctl:
            k = 0
            most = repeats if smoke() else MAX_REPEATS
            case_t0 = time.monotonic()
            while k < repeats or (sum(map(len, pooled_during)) < MIN_FAULTS and k < most
                                  and time.monotonic() - case_t0 < PROLONG_SECONDS):
                if k:               # every writer page shared again
                    hv.range_share(twin, writer, 0, writer_pages - 1)
                k += 1
                t0 = time.perf_counter()
                victim, other = heavy_domain(hv, n)
                build = time.perf_counter() - t0
                first = 0
                # the idle case once per asked repeat; added ones only add faults during
                idle = _Writer(g, first, first + (idle_faults if k <= repeats else 0), WRITER_RATE,
                               WRITER_BATCH)
                idle.run()                               # in this thread: nothing else runs
                if idle.error:
                    raise idle.error
                w = _Writer(g, first + idle_faults, first + per, WRITER_RATE, WRITER_BATCH)
                w.start()
                time.sleep(0.05)                         # the writer is under way
                steps: list[float] = []
                ends: list[float] = []         # when each answer arrived, since the first request
                steal0 = _steal_ms()
                t_start = time.monotonic()
                r = killctl.destroy(ctl, victim, progress=lambda a: (
                    steps.append(a["step_ms"]), ends.append((time.monotonic() - t_start) * 1e3)))
                t_end = time.monotonic()
                steal1 = _steal_ms()
                # the last repeat's timeline, for the plot of the freeze: a step
                # started about its own length before its answer arrived
                timeline = {"steps_ms": [round(x, 4) for x in steps],
                            "steps_start_ms": [round(max(e - x, 0.0), 4) for e, x in zip(ends, steps)]}
                w.stop.set()
                w.join()
                if w.error:
                    raise w.error
                assert r["entries"] == n, r
                during, idle_us = w.latencies_us(t_start, t_end), idle.latencies_us()
                pooled_during.append(during)
                pooled_idle.append(idle_us)
                runs.append(dict(seconds=r["seconds"], continuations=r["continuations"],
                                 max_pause_ms=r["max_pause_ms"], max_pause_cpu_ms=r["max_pause_cpu_ms"],
                                 steps=r["steps"],
                                 p99_step_ms=float(np.percentile(steps, 99)), hv_seconds=r["hv_seconds"],
                                 fault_p50_us=_pct(during, 50), fault_p99_us=_pct(during, 99),
                                 faults_during=len(during), idle_fault_p50_us=_pct(idle_us, 50),
                                 idle_fault_p99_us=_pct(idle_us, 99), build_seconds=build,
                                 # a step's wall time beyond its CPU time, where the
                                 # hypervisor runs real-time, is mostly the host's
                                 steal_ms=None if steal0 is None or steal1 is None else steal1 - steal0))
                ctl.destroy(other)
        out["placement"] = pl.check(rmap=rmap, mode=mode, entries=n)
        audit = hv.audit()
        for d in (writer, twin):
            hv.destroy(d)
        info = hv.info()
    out["repeats"] = len(runs)
    out["entries"] = n
    for key in runs[0]:
        vals = [x[key] for x in runs if x[key] is not None]
        out[key] = statistics.median(vals) if vals else None
    # fault latencies: percentiles of all repeats' faults together (more samples)
    during, idle_us = np.concatenate(pooled_during), np.concatenate(pooled_idle)
    out.update(fault_p50_us=_pct(during, 50), fault_p99_us=_pct(during, 99), faults_during=len(during),
               idle_fault_p50_us=_pct(idle_us, 50), idle_fault_p99_us=_pct(idle_us, 99),
               fault_histogram=log_histogram(during), idle_fault_histogram=log_histogram(idle_us))
    out["runs"] = runs
    out["timeline"] = timeline
    out["audit_errors"] = audit
    out["frames_back"] = info["frames_free"] == info["frames_total"] and info["nr_shared_mfns"] == 0
    return out


# ----------------------------------------------------------------------
# runner protocol


def run(quick: bool = False) -> dict:
    from .peers import ksm
    results = []
    for n, rmap, mode in _cases(quick):
        t0 = time.perf_counter()
        repeats = 1 if quick or n >= 1_000_000 or (rmap == "list" and n >= 100_000) else 3
        results.append(measure(n, rmap, mode, repeats=repeats,
                               writer_pages=(SMOKE_WRITER_PAGES if smoke() else 4000) if quick
                               else WRITER_PAGES * repeats,
                               idle_faults=IDLE_FAULTS))
        print(f"  {rmap:8} {mode:12} N={n:>9,}: {results[-1]['seconds']:.3f} s "
              f"({time.perf_counter() - t0:.1f} s with the set-up, {repeats} repeat(s))", flush=True)
    sizes = sorted({r["n"] for r in results})
    peers = {}
    for n in sizes:
        peers[str(n)] = ksm.measure_munmap(n, repeats=1 if quick or n >= 1_000_000 else 3)
        m = peers[str(n)]
        print(f"  Linux munmap N={n:>9,}: " + (m["skipped"] if "skipped" in m else f"{m['seconds']:.4f} s"),
              flush=True)
    figs, hists, traces = Figures(), [], []
    for r in results:
        labels = {"rmap": r["rmap"], "mode": r["mode"], "entries": r["n"]}
        runs = r.pop("runs")
        for key, name, unit in FIGURES:
            figs.add(name, [x[key] for x in runs], unit, **labels)
        hists += [{"name": name, "labels": labels, **r.pop(f"{name}_histogram")} for name in ("fault", "idle_fault")]
        t = r.pop("timeline")
        traces.append({"name": "steps", "labels": labels, "unit": "ms", "x": t["steps_start_ms"], "y": t["steps_ms"]})
    for n, m in peers.items():
        if "skipped" not in m:
            figs.add("munmap_ksm", m.pop("seconds_all"), "s", entries=int(n))
            figs.add("munmap_private", m.pop("baseline_seconds_all"), "s", entries=int(n))
    placements = [r.pop("placement") for r in results]
    return {"figures": figs.dicts(), "histograms": hists, "traces": traces, "results": results,
            "placements": placements, "munmap": peers, "checks": _checks(results), "quick": quick,
            "writer": {"pages_per_repeat": (4000 if quick else WRITER_PAGES), "rate": WRITER_RATE,
                       "batch": WRITER_BATCH, "idle_faults": IDLE_FAULTS}}


#: (key of a repeat, figure, unit) of every repeated measure of a case
FIGURES = (("seconds", "seconds", "s"), ("max_pause_ms", "max_step", "ms"),
           ("max_pause_cpu_ms", "max_step_cpu", "ms"), ("p99_step_ms", "p99_step", "ms"),
           ("fault_p99_us", "fault_p99", "us"), ("idle_fault_p99_us", "idle_fault_p99", "us"))


def _find(results, rmap, mode, n):
    return next((r for r in results if (r["rmap"], r["mode"], r["n"]) == (rmap, mode, n)), None)


def _checks(results) -> list[dict]:
    """What must hold besides the goals (:mod:`hvshare.perf.goals`): the seed's list
    is minutes-class, a monolithic teardown is one step, nothing leaks;
    ``met`` None when it could not be measured."""
    checks = []

    def check(what, met, detail):
        checks.append({"check": what, "met": met, "detail": detail})

    lst = _find(results, "list", "preemptible", SEED_N)
    check(f"list at N={SEED_N:,} is minutes-class (>= 60 s)", None if not lst else lst["seconds"] >= 60,
          f"{lst['seconds']:.1f} s" if lst else "not run (--quick)")
    mono = [r for r in results if r["mode"] == "monolithic"]
    off = [r for r in mono if r["continuations"] or r["max_pause_ms"] < 0.95 * r["hv_seconds"] * 1e3]
    check("monolithic: the longest step is the whole teardown", not off,
          "all met" if not off else "; ".join(f"{r['rmap']} N={r['n']:,}" for r in off))
    leaks = [r for r in results if not r["frames_back"] or r["audit_errors"]]
    check("every frame back and audit 0 after every case", not leaks,
          "all met" if not leaks else "; ".join(f"{r['rmap']} {r['mode']} N={r['n']:,}" for r in leaks))
    return checks


def report(result: dict) -> str:
    rows = []
    for r in sorted(result["results"], key=lambda r: (r["n"], POLICIES.index(r["rmap"]), r["mode"])):
        rows.append([f"{r['n']:,}", r["rmap"], r["mode"], r["seconds"], r["continuations"],
                     r["max_pause_ms"], r["max_pause_cpu_ms"], r["p99_step_ms"], _us(r["fault_p99_us"]),
                     _us(r["idle_fault_p99_us"]), r["faults_during"], r["repeats"]])
    lines = ["Domain teardown: N gfns on one shared frame, a writer faulting meanwhile "
             "(medians of the repeats; faults: all repeats' together)",
             table(["N", "rmap", "mode", "seconds", "restarts", "max step ms", "(cpu ms)", "p99 step ms",
                    "fault p99 us", "idle p99 us", "faults", "rep"], rows), ""]
    rows = []
    for n, m in sorted(result["munmap"].items(), key=lambda kv: int(kv[0])):
        rows.append([f"{int(n):,}", "skipped: " + m["skipped"] if "skipped" in m else m["seconds"],
                     "-" if "skipped" in m else m["baseline_seconds"]])
    lines += ["Linux munmap of N pages merged into one KSM page (private pages beside it)",
              table(["N", "seconds", "private s"], rows), ""]
    lines.append(report_goals("teardown", result))
    lines.append("Checks:")
    for c in result["checks"]:
        verdict = "not measured" if c["met"] is None else ("met" if c["met"] else "NOT MET")
        lines.append(f"  [{verdict}] {c['check']}: {c['detail']}")
    return "\n".join(lines)


def _us(v):
    return "-" if v is None else v
