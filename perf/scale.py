"""Scale: ``python -m hvshare.perf scale [--quick] [--json PATH]``.

Two clone domains of N pages each (``workload clone``, one seed: they share
the image's content) on a fresh hypervisor per rmap policy and N (its pool
prefaulted, as a real host's RAM is backed: ``hvctl start --prefault``),
through the life of a pair of guests:

- **create**: each domain's ``create`` request, first to answer (the
  answer comes when the domain is built);
- **dedup**: one full pass of the dedup scanner over both
  (:class:`hvshare.tools.dedup.Scanner` over :class:`hvshare.tools.dedup.SocketBackend`,
  as ``hvctl dedup`` runs it); pages/s is pages merged
  (``pages_shared + pages_sharing``) per second;
- **cow**: a CoW burst: the second domain's guest writes one byte to each
  of its pages, 1,024 writes per message (``time_write_many``); every
  shared one takes a CoW fault; pages/s is faults per second;
- **destroy**: the kill controller (:func:`hvshare.tools.killctl.destroy`) tears
  the first domain down, preemptibly; its shared entries are those the
  scanner merged (the second domain's writes left them on frames of their
  own).

Per operation: seconds, pages per second, the longest hypervisor step in
wall time and in CPU time, and the step histogram; per life, the
hypervisor's slowest steps with what they did and met (``info``'s
``slowest_steps``: items, chunks, page faults, collections), so that a
long step has a stated cause. Steps are read from the
hypervisor's ``info`` (``pause_by_op``) before and after the operation:
histograms are cumulative, so the window's is the difference, and a kind's
``max_ms`` is the window's when it grew in the window (else only the
histogram's bound is known). Steps of the ``info`` requests themselves are
left out. CPU time per step comes from ``max_cpu_ms`` per kind where the
hypervisor reports it; where it does not, the wall time stands in and the
result says so (``cpu_from``). The destroy's own answer carries its longest
step in both. Every thread of the hypervisor has a core to itself, the
guests and this process (scanner, kill controller) the others
(:class:`hvshare.perf.placement.Placement`: checked after the CoW burst,
one record per life in ``placements``).

Peers, on the same bytes (:func:`hvshare.perf.peers.contents.hv_clone_pages`), run
while no hypervisor is up:

- **numpy fill**, the floor of a create: (a) generating one domain's clone
  bytes with :func:`hvshare.hvcore.images.clone_content` into a fresh array, (b) a
  plain copy of those bytes into fresh memory;
- **Linux KSM** merging two regions of N pages holding the two domains'
  bytes (``MADV_MERGEABLE``, ksmd at full speed until the counters stop),
  then ``munmap`` of the first region while the second still maps the KSM
  pages (:func:`hvshare.perf.peers.ksm.measure_merge_regions`).

Figures (:mod:`hvshare.perf.figure`): per rmap, N and operation ``seconds``,
``rate`` (pages/s), ``max_step`` and ``max_step_cpu``; per N the peers'
``fill_generate_seconds``, ``fill_copy_seconds``, ``ksm_merge_seconds``,
``ksm_merge_rate``, ``ksm_munmap_seconds``, ``ksm_munmap_rest_seconds``.
Goals: :mod:`hvshare.perf.goals`.

Sizes: N = 250,000 and 1,000,000 (65,536 with ``--quick``; the environment
variable ``HVSHARE_SCALE_PAGES``, comma-separated, overrides both).
Repeats: 3 (1 at 1,000,000: n=1 is said); the cheap peers 3 everywhere.
Medians are reported with the spread (min..max) of the repeats.
"""
from __future__ import annotations

import contextlib
import os
import signal
import statistics
import sys
import threading
import time

import numpy as np


from hvshare.tools.cli.counters import SLOWEST_SHOWN, step_line

from .common import sigterm_exits, smoke, table
from .figure import Figures, text_of
from .placement import Placement, alone_and_rest
from .report.headlines import report_goals

POLICIES = ("buckets", "index")
OPS = ("create", "dedup", "cow", "destroy")
SEED = 1
FULL_SIZES = (250_000, 1_000_000)
QUICK_SIZES = (65_536,)
#: sizes of a ``--smoke`` run
SMOKE_SIZES = (4096,)
#: frames beyond the two domains' pages
MARGIN = 8192
#: writes per message of the CoW burst
COW_BATCH = 1024
#: step kinds that are the measurement itself, not the operation
IGNORED_KINDS = ("info",)


def _say(msg: str) -> None:
    print(f"  scale: {msg}", file=sys.stderr, flush=True)


def sizes_for(quick: bool) -> tuple[int, ...]:
    env = os.environ.get("HVSHARE_SCALE_PAGES", "").strip()
    if env:
        return tuple(int(x) for x in env.split(",") if x.strip())
    if quick and smoke():
        return SMOKE_SIZES
    return QUICK_SIZES if quick else FULL_SIZES


def repeats_for(n: int, quick: bool) -> int:
    return 1 if n >= 1_000_000 else 3


# ----------------------------------------------------------------------
# the hypervisor's steps between two info snapshots


def _hist(entry: dict | None) -> dict[int, int]:
    return {h["lt_us"]: h["count"] for h in (entry or {}).get("histogram", [])}


def step_window(before: dict, after: dict, ignore=IGNORED_KINDS) -> dict:
    """The steps the hypervisor took between two ``info`` snapshots.

    ``steps``; ``histogram`` (``[{lt_us, count}]``, the difference of the
    cumulative ones); ``max_ms``, the longest step (exact when
    ``max_exact``: the kind that took it reported a new maximum in the
    window; else the upper bound of its histogram bucket); ``max_cpu_ms``
    likewise from the kinds' ``max_cpu_ms``, None where the hypervisor
    reports no CPU time per kind; ``by_op`` per kind of step."""
    b_ops, a_ops = before.get("pause_by_op", {}), after.get("pause_by_op", {})
    total: dict[int, int] = {}
    by_op: dict = {}
    exact, exact_cpu, cpu_known = 0.0, None, True
    for kind, a in a_ops.items():
        if kind in ignore:
            continue
        b = b_ops.get(kind, {})
        h0, h1 = _hist(b), _hist(a)
        d = {k: v - h0.get(k, 0) for k, v in h1.items() if v - h0.get(k, 0) > 0}
        n = a.get("count", 0) - b.get("count", 0)
        if not d and n <= 0:
            continue
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
        grew = a.get("max_ms", 0.0) > b.get("max_ms", 0.0)
        entry = {"count": n, "total_ms": round(a.get("total_ms", 0.0) - b.get("total_ms", 0.0), 3),
                 "max_ms": a["max_ms"] if grew else None,
                 "max_lt_ms": max(d) / 1e3 if d else 0.0,
                 "histogram": [{"lt_us": k, "count": v} for k, v in sorted(d.items())]}
        if "max_cpu_ms" in a:
            cgrew = a["max_cpu_ms"] > b.get("max_cpu_ms", 0.0)
            entry["max_cpu_ms"] = a["max_cpu_ms"] if cgrew else None
            if cgrew:
                exact_cpu = max(exact_cpu or 0.0, a["max_cpu_ms"])
        else:
            cpu_known = False
        if grew:
            exact = max(exact, a["max_ms"])
        by_op[kind] = entry
    top = max(total) / 1e3 if total else 0.0
    max_exact = exact >= top / 2
    return {"steps": sum(total.values()),
            "histogram": [{"lt_us": k, "count": v} for k, v in sorted(total.items())],
            "max_ms": exact if max_exact else top, "max_exact": max_exact,
            "max_cpu_ms": exact_cpu if cpu_known and by_op else None,
            "by_op": by_op}


# ----------------------------------------------------------------------
# one hypervisor: create, dedup, cow, destroy


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait until the block is over, then take effect:
    a hypervisor being started is not left running (its starter would be
    interrupted before it could say which process to stop). Python-level
    handlers, not a signal mask: the hypervisor must not inherit one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if got:
            signal.raise_signal(got[0])


def one_life(n: int, rmap: str) -> dict:
    """The four operations on two clone domains of ``n`` pages, on a fresh
    hypervisor (pool of 2n + MARGIN frames); per operation its figures."""
    from hvshare.tools import killctl
    from hvshare.tools.client import HypervisorClient
    from hvshare.tools.dedup import Scanner, SocketBackend
    from hvshare.tools.session import HVSession
    out: dict = {}
    hv = None
    hv_cpus, rest = alone_and_rest()
    pl = Placement()
    try:
        with _signals_held():
            hv = HVSession(frames=2 * n + MARGIN, rmap=rmap, timeout=None, prefault=True)
        pl.pin("hypervisor", hv.pid, hv_cpus)
        pl.pin("driver", 0, rest)
        i0 = hv.info()
        secs = []
        for _ in range(2):
            t0 = time.perf_counter()
            hv.create(n, "clone", seed=SEED)
            secs.append(time.perf_counter() - t0)
        a, b = [d["domid"] for d in sorted(hv.list(), key=lambda d: d["domid"])][:2]
        for d in (a, b):
            pl.pin("guest", hv.domain(d)["pid"], rest)
        i1 = hv.info()
        out["create"] = dict(seconds=statistics.median(secs), pages=n,
                             pages_per_second=n / statistics.median(secs), window=step_window(i0, i1))
        t0 = time.perf_counter()
        with Scanner(SocketBackend(hv)) as sc:
            r = sc.scan_pass()
        dt = time.perf_counter() - t0
        i2 = hv.info()
        merged = r.counters.get("pages_shared", 0) + r.counters.get("pages_sharing", 0)
        out["dedup"] = dict(seconds=dt, pages=merged, scanned=r.scanned, nr_saved_mfns=r.nr_saved_mfns,
                            pages_per_second=merged / dt, window=step_window(i1, i2))
        with hv.guest(b) as g:
            t0 = time.perf_counter()
            w = g.time_write_many(0, n, COW_BATCH)
            dt = time.perf_counter() - t0
        i3 = hv.info()
        out["cow"] = dict(seconds=dt, guest_seconds=w["seconds"], pages=w["cow_faults"], written=n,
                          pages_per_second=w["cow_faults"] / dt, window=step_window(i2, i3))
        placed = pl.check(rmap=rmap, pages=n)
        with HypervisorClient(hv.socket_path, timeout=None) as c:
            d = killctl.destroy(c, a)
        i4 = hv.info()
        out["destroy"] = dict(seconds=d["seconds"], pages=n, entries=d["entries"], steps=d["steps"],
                              continuations=d["continuations"], pages_per_second=n / d["seconds"],
                              entries_per_second=d["entries"] / d["seconds"],
                              max_pause_ms=d["max_pause_ms"], max_pause_cpu_ms=d.get("max_pause_cpu_ms"),
                              window=step_window(i3, i4))
        out["audit_errors"] = hv.audit()
        out["slowest_steps"] = i4.get("slowest_steps", [])
    finally:
        pl.restore()
        # A request cut short (Ctrl-C) leaves its answer unread on the
        # session's connection: stop the hypervisor over a fresh one.
        if hv is not None:
            HypervisorClient.close(hv)
            hv.close()
    for op, o in out.items():
        if op in ("audit_errors", "slowest_steps"):
            continue
        w = o["window"]
        if op == "destroy":
            o["max_step_ms"] = o["max_pause_ms"]
            cpu = o["max_pause_cpu_ms"]
        else:
            o["max_step_ms"] = w["max_ms"]
            cpu = w["max_cpu_ms"]
        o["cpu_from"] = "cpu" if cpu is not None else "wall"
        o["max_step_cpu_ms"] = cpu if cpu is not None else o["max_step_ms"]
    out["placement"] = placed
    return out


#: (key of an operation's repeat, figure, unit)
FIGURES = (("seconds", "seconds", "s"), ("pages_per_second", "rate", "pages/s"),
           ("max_step_ms", "max_step", "ms"), ("max_step_cpu_ms", "max_step_cpu", "ms"))


def _aggregate(runs: list[dict], figs: Figures, labels: dict) -> dict:
    """Every repeat's figures per operation, and what is not a figure: the
    steps (median count, the histogram summed over the repeats, the last
    repeat's kinds) and whether CPU time was known."""
    ops = {}
    for op in OPS:
        rs = [r[op] for r in runs]
        for key, name, unit in FIGURES:
            figs.add(name, [r[key] for r in rs], unit, **labels, op=op)
        hist: dict[int, int] = {}
        for r in rs:
            for h in r["window"]["histogram"]:
                hist[h["lt_us"]] = hist.get(h["lt_us"], 0) + h["count"]
        o = dict(cpu_from="cpu" if all(r["cpu_from"] == "cpu" for r in rs) else "wall",
                 steps=statistics.median([r["window"]["steps"] for r in rs]),
                 histogram_all_repeats=[{"lt_us": k, "count": v} for k, v in sorted(hist.items())],
                 by_op={k: {"count": v["count"], "max_ms": v["max_ms"], "max_lt_ms": v["max_lt_ms"]}
                        for k, v in rs[-1]["window"]["by_op"].items()})
        if op == "destroy":
            o["entries"] = statistics.median([r["entries"] for r in rs])
            o["continuations"] = statistics.median([r["continuations"] for r in rs])
        ops[op] = o
    return ops


# ----------------------------------------------------------------------
# peers


def measure_fill(n: int, repeats: int, figs: Figures) -> None:
    """numpy floors of a create of ``n`` clone pages: generating the bytes
    into a fresh array, and copying generated bytes into fresh memory."""
    from .peers.contents import hv_clone_pages
    gen, copy = [], []
    src = None
    for _ in range(repeats):
        src = None
        t0 = time.perf_counter()
        src = hv_clone_pages(n, SEED, 1)
        gen.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dst = np.empty_like(src)
        np.copyto(dst, src)
        copy.append(time.perf_counter() - t0)
        del dst
    del src
    figs.add("fill_generate_seconds", gen, "s", pages=n)
    figs.add("fill_copy_seconds", copy, "s", pages=n)


def measure_ksm(n: int, repeats: int) -> dict:
    from .peers import ksm
    from .peers.contents import hv_clone_pages
    return ksm.measure_merge_regions([n, n], lambda i, a: hv_clone_pages(len(a), SEED, i + 1, out=a),
                                     repeats=repeats, content="hvshare clone", seed=SEED, progress=_say)


# ----------------------------------------------------------------------
# runner protocol


def run(quick: bool = False) -> dict:
    with sigterm_exits():             # a killed run still stops its hypervisor
        return _run(quick)


def _run(quick: bool) -> dict:
    t_all = time.perf_counter()
    results, peers, figs, placements = [], {}, Figures(), []
    for n in sizes_for(quick):
        reps = repeats_for(n, quick)
        peer_reps = 3
        _say(f"N={n:,}: numpy fill floors ({peer_reps} repeats)")
        measure_fill(n, peer_reps, figs)
        _say(f"N={n:,}: Linux KSM merge of 2 x {n:,} pages ({peer_reps if n < 1_000_000 else 1} repeat(s))")
        k = measure_ksm(n, peer_reps if n < 1_000_000 else 1)
        if "skipped" in k:
            _say(f"KSM skipped: {k['skipped']}")
        else:
            for key, name, unit in (("merge_seconds", "ksm_merge_seconds", "s"),
                                    ("pages_per_second", "ksm_merge_rate", "pages/s"),
                                    ("munmap_seconds", "ksm_munmap_seconds", "s"),
                                    ("munmap_rest_seconds", "ksm_munmap_rest_seconds", "s")):
                figs.add(name, k.pop(f"{key}_all"), unit, pages=n)
                del k[key]
        peers[str(n)] = {"ksm": k, "fill_repeats": peer_reps}
        for rmap in POLICIES:
            runs = []
            for i in range(reps):
                t0 = time.perf_counter()
                runs.append(one_life(n, rmap))
                o = runs[-1]
                placements.append(o.pop("placement"))
                _say(f"N={n:,} {rmap} {i + 1}/{reps}: " + ", ".join(
                    f"{op} {o[op]['seconds']:.2f} s (step {o[op]['max_step_ms']:.3g} ms)" for op in OPS)
                    + f"  [{time.perf_counter() - t0:.0f} s]")
            ops = _aggregate(runs, figs, {"rmap": rmap, "pages": n})
            results.append({"rmap": rmap, "pages": n, "repeats": reps, "ops": ops,
                            "audit_errors": max(r["audit_errors"] for r in runs),
                            "slowest_steps": [r["slowest_steps"] for r in runs]})
    cpu_from = "cpu" if results and all(r["ops"][op]["cpu_from"] == "cpu" for r in results for op in OPS) \
        else "wall"
    out = {"figures": figs.dicts(), "results": results, "placements": placements, "peers": peers,
           "sizes": list(sizes_for(quick)),
           "seed": SEED, "cow_batch": COW_BATCH, "cpu_from": cpu_from,
           "seconds": round(time.perf_counter() - t_all, 1)}
    if cpu_from == "wall":
        out["cpu_note"] = ("the hypervisor reports no CPU time per step kind for some operations: "
                           "their CPU column is the wall time")
    skipped = next((p["ksm"]["skipped"] for p in peers.values() if "skipped" in p["ksm"]), None)
    if skipped:
        out["ksm_skipped"] = skipped
    return out


def _key(e: dict) -> float:
    """A kept step's place in the tail: its CPU time, else its wall time."""
    return e["cpu_ms"] if e.get("cpu_ms") is not None else e["wall_ms"]


def report(result: dict) -> str:
    rows = []
    for r in result["results"]:
        for op in OPS:
            lab = {"rmap": r["rmap"], "pages": r["pages"], "op": op}
            rows.append([f"{r['pages']:,}", r["rmap"], op, text_of(result, "seconds", **lab),
                         text_of(result, "rate", **lab), text_of(result, "max_step", **lab),
                         text_of(result, "max_step_cpu", **lab) + ("" if r["ops"][op]["cpu_from"] == "cpu"
                                                                   else " (wall)"), int(r["ops"][op]["steps"])])
    lines = ["Scale: two clone domains of N pages each: create, one dedup pass, a CoW burst, destroy "
             "(medians [min–max] of the repeats)",
             table(["N", "rmap", "op", "seconds", "pages/s", "longest step", "its CPU time", "steps"], rows)]
    if result.get("cpu_note"):
        lines.append(f"note: {result['cpu_note']}")
    lines += ["(pages/s: create pages of one domain, dedup pages merged, cow faults, destroy pages "
              "of the destroyed domain)", ""]
    for r in result["results"]:
        worst = max(r.get("slowest_steps") or [[]], key=lambda s: _key(s[0]) if s else 0.0)
        if worst:
            lines.append(f"Slowest hypervisor steps, N={r['pages']:,} {r['rmap']} (the repeat with the "
                         f"slowest; result: slowest_steps, every repeat)")
            lines += ["  " + step_line(e) for e in worst[:SLOWEST_SHOWN]]
    lines.append("")
    rows = []
    for n in result["sizes"]:
        for name, what in (("fill_generate_seconds", "numpy: generate clone bytes"),
                           ("fill_copy_seconds", "numpy: copy into fresh memory"),
                           ("ksm_merge_seconds", f"Linux KSM merge of 2 x {n:,} pages"),
                           ("ksm_merge_rate", "Linux KSM merge rate"),
                           ("ksm_munmap_seconds", "munmap of the KSM-merged region")):
            rows.append([f"{n:,}", what, text_of(result, name, pages=n)])
    lines += ["Peers on the same bytes", table(["N", "peer", "figure"], rows, "l"), "",
              report_goals("scale", result)]
    return "\n".join(lines)
