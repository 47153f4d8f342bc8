"""Reverse-map policies against sharing degree: ``python -m hvshare.perf rmap``.

For each policy and degree D, one frame's rmap is built with D entries from
four domains, then three per-entry costs are timed at that degree:
- lookup: ``contains`` of k random existing entries;
- delete: ``remove`` of k random existing entries (re-added untimed);
- add: k further entries (degree D .. D+k-1).
k = min(D, sample), so the list policy (O(D) per operation, the point of the
benchmark) stays feasible at 262,144. Every repeat uses a fresh build and
times its k operations in chunks; each repeat's cost is the median of its
chunks (a chunk spoilt by a noisy spell drops out), and the figure
(:mod:`hvshare.perf.figure`: ``add``, ``lookup``, ``delete`` in ns per policy and
degree) is every repeat's. Small degrees get more repeats (a few thousand
operations each).
Every round of repeats visits every degree and the policies take turns
within each repeat: side by side, as the machine's noise demands.
Memory: tracemalloc (it sees numpy's buffers too) around one build, per entry.

Goals (:mod:`hvshare.perf.goals`): the 256-bucket table at least 200x better than
the list at degree 262,144 (the seed's claim: ~256x); the index flat
(delete at the top degree within 2x of at 16) with at most 32 bytes per
entry (``bytes_per_entry``) at 262,144 (hvshare's). Both policies keep their nodes as
C-like structs in one flat arena (``hvcore/rmap/arena.py``), so a visit
costs about the same whether the chain runs through memory in allocation
order (a list built in one go) or jumps ~256 nodes at a time (a bucket):
``visit_ns`` times the arena's walk over both kinds of chain directly. What
is left of the difference is the hardware's, as it would be for C structs:
a strided walk misses the caches more, which shows when other processes
compete for them.

``batches`` times the index's batch forms at the sizes the dedup scanner
and the CoW paths use (64..4096 entries; one frame, or one entry per
frame), median per call.
"""
from __future__ import annotations

import gc
import math
import random
import statistics
import time
import tracemalloc

import numpy as np

from hvshare.hvcore.constants import RMAP_POLICIES
from hvshare.hvcore.rmap import make_rmap
from hvshare.hvcore.rmap.arena import NodeArena

from .common import table
from .figure import Figures, text_of
from .report.headlines import report_goals

POLICIES = RMAP_POLICIES
NDOM = 4                     # domains the entries come from
NFRAMES = 4                  # the rmap under test is frame 0


def _config(quick: bool) -> dict:
    if quick:
        return {"degrees": (16, 256, 4096, 65536), "sample": 300, "repeats": 3, "min_ops": 3000}
    return {"degrees": (16, 256, 4096, 65536, 262144), "sample": 500, "repeats": 5, "min_ops": 6000}


def _layout(degree: int, extra: int):
    """Entry i is (i % NDOM, i // NDOM); the next ``extra`` pairs are for the adds."""
    i = np.arange(degree + extra, dtype=np.int64)
    return i % NDOM, i // NDOM, (degree + extra) // NDOM + 1


def _build(policy: str, degree: int, doms: np.ndarray, gfns: np.ndarray, npages: int):
    r = make_rmap(policy, NFRAMES)
    for d in range(NDOM):
        r.domain_created(d, npages)
    r.add_many(np.zeros(degree, np.int64), doms[:degree], gfns[:degree])
    return r


def _timed(fn) -> float:
    """Seconds taken by ``fn()`` with the cyclic GC held off (as timeit does)."""
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    finally:
        gc.enable()


def _one_repeat(policy: str, degree: int, k: int, rng: random.Random) -> tuple[list, list, list]:
    """Per-op seconds of each timed chunk: (adds, lookups, deletes)."""
    doms, gfns, npages = _layout(degree, k)
    r = _build(policy, degree, doms, gfns, npages)
    # Warm-up on another frame: leaves the free slack a running pool has, so
    # the timed adds are not one exact-fit arena regrowth (reported apart).
    w = slice(degree, degree + k)
    r.add_many(np.ones(k, np.int64), doms[w], gfns[w])
    r.remove_many(np.ones(k, np.int64), doms[w], gfns[w])
    r.release(1)

    doms, gfns = doms.tolist(), gfns.tolist()
    existing = list(zip(doms[:degree], gfns[:degree]))
    fresh = list(zip(doms[w], gfns[w]))
    contains, remove, add = r.contains, r.remove, r.add
    probe = rng.sample(existing, k)
    victims = rng.sample(existing, k)
    chunk = max(16, k // 10)

    def timed_chunks(op, pairs):
        # Per-op seconds of each chunk: a short noisy spell spoils a chunk,
        # not the whole repeat, and the median drops it.
        out = []
        for i in range(0, len(pairs), chunk):
            part = pairs[i:i + chunk]

            def body():
                for d, g in part:
                    op(0, d, g)
            out.append(_timed(body) / len(part))
        return out

    t_lookup = timed_chunks(contains, probe)
    t_delete = timed_chunks(remove, victims)
    for d, g in victims:           # back to degree D, untimed
        add(0, d, g)
    t_add = timed_chunks(add, fresh)
    return t_add, t_lookup, t_delete


def _regrow_ms(degree: int, repeats: int = 3) -> float:
    """The index's one add that finds its arena full (built to fit exactly):
    the arena is copied to 1.5x, O(degree) once, O(1) amortised."""
    doms, gfns, npages = _layout(degree, 1)
    times = []
    for _ in range(repeats):
        r = _build("index", degree, doms, gfns, npages)
        times.append(_timed(lambda: r.add(0, int(doms[degree]), int(gfns[degree]))))
    return statistics.median(times) * 1e3


def _visit_ns(nodes: int, repeats: int) -> dict:
    """ns per node visited by the arena's walk (``NodeArena.find`` of an
    absent pair: the whole chain), over one chain linking the slots in
    allocation order and over one jumping 256 slots at a time (bucket by
    bucket, the way a 256-bucket table's chains lie). Best of ``repeats``."""
    a = NodeArena()
    for i in range(nodes):
        a.push(-1, i % NDOM, i // NDOM)
    stride = 256
    seq = list(range(nodes))
    strided = [b + j for b in range(stride) for j in range(0, nodes - b, stride)]
    out = {}
    for name, order in (("sequential", seq), ("strided_256", strided)):
        # The two chains share the arena: link each, then time it.
        for x, y in zip(order, order[1:]):
            a.nxt[x] = y
        a.nxt[order[-1]] = -1
        head = order[0]
        times = [_timed(lambda: a.find(head, NDOM, -1)) for _ in range(repeats)]
        out[name] = round(min(times) / nodes * 1e9, 1)
    return out


def _batch_us(k: int, shape: str, repeats: int) -> tuple[float, float]:
    """Median us of one index ``add_many`` and one ``remove_many`` of ``k``
    entries of one domain: into one frame, or one per frame."""
    nframes = 1 << 16
    r = make_rmap("index", nframes)
    r.domain_created(1, 1 << 20)
    r.add_many(np.zeros(1000, np.int64), np.ones(1000, np.int64), np.arange(1000))
    rng = np.random.default_rng(k)
    d = np.ones(k, np.int64)
    adds, removes = [], []
    for _ in range(repeats):
        g = 1000 + rng.choice((1 << 20) - 1000, k, replace=False)
        m = np.full(k, 7) if shape == "one frame" else 8 + rng.choice(nframes - 8, k, replace=False)
        adds.append(_timed(lambda: r.add_many(m, d, g)))
        removes.append(_timed(lambda: r.remove_many(m, d, g)))
    return statistics.median(adds) * 1e6, statistics.median(removes) * 1e6


def _batches(quick: bool) -> list[dict]:
    rows = []
    for k in (64, 512, 4096):
        for shape in ("one frame", "one per frame"):
            add_us, remove_us = _batch_us(k, shape, (60 if quick else 200) if k < 4096 else 30)
            rows.append({"k": k, "shape": shape, "add_us": round(add_us, 1),
                         "remove_us": round(remove_us, 1),
                         "add_ns_per_entry": round(add_us * 1e3 / k, 1),
                         "remove_ns_per_entry": round(remove_us * 1e3 / k, 1)})
    return rows


def _bytes_per_entry(policy: str, degree: int) -> float:
    doms, gfns, npages = _layout(degree, 0)  # the inputs are not the rmap's
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        r = _build(policy, degree, doms, gfns, npages)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert r.count(0) == degree
    return used / degree


def run(quick: bool) -> dict:
    cfg = _config(quick)
    rng = random.Random(2012)
    rounds = cfg["repeats"]
    plan = {}  # degree -> (k, repeats per round)
    for degree in cfg["degrees"]:
        k = min(degree, cfg["sample"])
        # Cheap degrees get extra repeats so each median spans min_ops operations.
        plan[degree] = (k, 1 if degree > 4096 else max(1, math.ceil(cfg["min_ops"] / k / rounds)))
    # Side by side: every round visits every degree, and the policies take
    # turns within each repeat, so a noisy spell on the machine hits all
    # degrees and policies alike instead of skewing one row of the table.
    runs = {(p, d): [] for p in POLICIES for d in cfg["degrees"]}
    for _ in range(rounds):
        for degree, (k, per_round) in plan.items():
            for _ in range(per_round):
                for policy in POLICIES:
                    runs[policy, degree].append(_one_repeat(policy, degree, k, rng))
    figs = Figures()
    for policy in POLICIES:
        for degree in cfg["degrees"]:
            samples = runs[policy, degree]
            labels = {"policy": policy, "degree": degree}
            # each repeat's own median per operation: chunks spoilt by a noisy spell drop out
            for i, op in enumerate(("add", "lookup", "delete")):
                figs.add(op, [statistics.median(rep[i]) * 1e9 for rep in samples], "ns", **labels)
            figs.add("bytes_per_entry", [_bytes_per_entry(policy, degree)], "B", **labels)
    top = cfg["degrees"][-1]
    visit = _visit_ns(top, 5)
    return {"figures": figs.dicts(), "index_arena_regrow_ms": round(_regrow_ms(top), 3), "visit_ns": visit,
            "batches": _batches(quick), "config": {**cfg, "domains": NDOM}}


def report(result) -> str:
    degrees = result["config"]["degrees"]
    rows = [(p, d, *(text_of(result, op, policy=p, degree=d) for op in ("add", "lookup", "delete", "bytes_per_entry")))
            for p in POLICIES for d in degrees]
    lines = [
        "rmap: per-entry cost (ns: median of the repeats' medians [min–max]) and memory at each sharing degree",
        table(["policy", "degree", "add", "lookup", "delete", "bytes/entry"], rows),
        "", f"index arena regrowth at degree {degrees[-1]:,}: {result['index_arena_regrow_ms']} ms (once, O(D))",
        report_goals("rmap", result)]
    if "visit_ns" in result:
        v = result["visit_ns"]
        lines.append(f"arena walk, ns per node visited: sequential chain {v['sequential']},"
                     f" 256-strided chain {v['strided_256']}")
    if result.get("batches"):
        lines += ["", "index batch forms (us per call, median; one domain)",
                  table(["entries", "frames", "add_many us", "remove_many us", "add ns/entry",
                         "remove ns/entry"],
                        [(b["k"], b["shape"], b["add_us"], b["remove_us"], b["add_ns_per_entry"],
                          b["remove_ns_per_entry"]) for b in result["batches"]])]
    if "wall_seconds" in result:
        lines.append(f"wall time {result['wall_seconds']:.1f} s")
    return "\n".join(lines)
