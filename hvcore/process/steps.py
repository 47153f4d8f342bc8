"""Steps: the hypervisor's unit of uninterrupted work, and how it is bounded.

A step is one control request or one guest message, run to completion
while nothing else is served. :class:`StepMeter` times every step (the
longest is ``max_pause_ms`` in ``info``, with a log2 histogram per kind).
:class:`Budget` holds the one check a preemptible step makes between
chunks (is the step budget, :data:`hvshare.hvcore.constants.STEP_BUDGET_SECONDS`,
spent, or does other work wait?) and runs budgeted batches in chunks sized
by :class:`hvshare.hvcore.budget.ChunkCost`; it needs only the loop's selector.
:class:`StepTail` keeps the slowest steps with what they did and what
happened meanwhile (``info``'s ``slowest_steps``), so that a slow step has
a stated cause. See ``docs/design.md``, "Steps".
"""
from __future__ import annotations

import gc
import heapq
import resource
import time
from typing import Callable

from ..constants import STEP_BUDGET_SECONDS
from ..budget import BATCH_OVERRUN, ChunkCost
from .endpoints import ControlConnection

#: Relinquish chunks are sized to take about this long: a fault that
#: arrives mid-step waits at most one chunk before the step yields to it.
#: Not much less, as every chunk has a fixed cost of its own.
TEARDOWN_CHUNK_SECONDS = 0.0002
#: allocations between two collections of the youngest generation (CPython: 700)
GC_YOUNG_THRESHOLD = 20_000
#: young container objects that make the tick collect (:func:`collect_young`)
GC_TICK_YOUNG = 1000
#: the longest a step should take (the goal): steps over it are counted per kind
SLOW_STEP_SECONDS = 0.001
#: steps :class:`StepTail` keeps the details of: the slowest this many
SLOW_STEPS_KEPT = 32
#: fields of a tail entry a step may not know (listed in its ``unknown``)
TAIL_FIELDS = ("cpu_ms", "items", "chunks", "chunk", "chunk_ms", "minflt", "majflt", "preempted",
               "gcs", "gc_full", "gc_ms")


class _GcClock:
    """Collections of the cycle collector so far and the time they took
    (``gc.callbacks``): a step's share is the difference across it."""

    def __init__(self):
        self.count, self.seconds, self.full = 0, 0.0, 0
        self._t0 = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.count += 1
            self.seconds += time.perf_counter() - self._t0
            self.full += info.get("generation", 0) == 2


_gc_clock: _GcClock | None = None


def gc_clock() -> _GcClock:
    """The process's one collection clock (installed on first use)."""
    global _gc_clock
    if _gc_clock is None:
        _gc_clock = _GcClock()
    return _gc_clock


class _Note:
    """What a step says of its work while it runs (:meth:`StepMeter.note`)."""

    __slots__ = ("items", "chunks", "chunk", "chunk_s", "detail")

    def __init__(self):
        self.items = self.chunks = self.chunk = self.chunk_s = self.detail = None


def _plus(a, b):
    return b if a is None else a + b


def _most(a, b):
    return b if a is None or b > a else a


class StepTail:
    """The ``n`` slowest steps by CPU time (a guest step, not CPU-timed:
    by its wall time, an upper bound), each a dict: ``kind``, ``what``,
    ``detail``, ``cpu_ms``, ``wall_ms``, the work (``items`` done,
    ``chunks``, the largest ``chunk`` in items and the longest
    ``chunk_ms``), the page faults (``minflt``, ``majflt``), the times
    another process took the CPU (``preempted``: involuntary context
    switches, where wall time exceeds CPU time) and the cycle
    collections (``gcs``, of which ``gc_full`` of the oldest generation,
    and their ``gc_ms``) during the step, ``seq`` (the step's number) and
    ``unknown``: the fields the step could not know (None).

    A min-heap: a step slower than the ``n``-th slowest (:attr:`floor`)
    replaces it, so keeping the tail costs one comparison per step."""

    def __init__(self, n: int = SLOW_STEPS_KEPT):
        self.n = n
        self._heap: list = []
        self._seq = 0
        #: a step must take longer than this to enter (0 until n are kept)
        self.floor = 0.0

    def add(self, key_s: float, entry: dict) -> None:
        if key_s <= self.floor:
            return
        entry["unknown"] = [f for f in TAIL_FIELDS if entry.get(f) is None]
        self._seq += 1
        item = (key_s, self._seq, entry)
        if len(self._heap) < self.n:
            heapq.heappush(self._heap, item)
        else:
            heapq.heapreplace(self._heap, item)
        if len(self._heap) >= self.n:
            self.floor = self._heap[0][0]

    def entries(self) -> list[dict]:
        """The kept steps, slowest first."""
        return [dict(e) for _, _, e in sorted(self._heap, key=lambda x: (-x[0], x[1]))]


def _folded(name: str, doc: str) -> property:
    """A figure of :class:`StepMeter`, read after the pending logs are folded in."""
    def get(self):
        self.fold()
        return getattr(self, name)
    return property(get, doc=doc)


class StepMeter:
    """Longest uninterrupted step, and how long all steps took (log2 buckets).

    Bucket ``i`` counts steps of ``[2**(i-1), 2**i)`` microseconds (bucket 0:
    under 1 us). Steps are also summed per kind (the control op's name,
    ``guest`` or ``tick``): how long one kind of request holds the CPU is
    what a batch size is chosen by (``info``'s ``pause_by_op``).

    A step's caller may pass its CPU time (``time.thread_time()``) too:
    the longest per kind is ``max_cpu_ms``, what is left of ``max_ms`` once
    other processes' share of the CPU is taken out. Guest steps are not
    CPU-timed (a CPU clock read is a system call, not a vDSO read, and two
    of them would add a tenth to such a step: ``docs/design.md``, "Steps"):
    their ``max_cpu_ms`` is their wall time, an upper bound.

    Guest steps, one per guest message, are only appended to a per-guest
    list on their path (:meth:`log`) and folded into the figures when the
    figures are read (or by :meth:`fold`, which the housekeeping tick calls).

    The slowest steps are kept with their details (:attr:`tail`, a
    :class:`StepTail`). A step timed by :meth:`begin` and :meth:`end` (a
    control request, a job's step, the tick) has them all: its page faults
    (``getrusage``, read at its start and, if it enters the tail, at its
    end) and collections, and what its work told :meth:`note` (items,
    chunks). A guest step enters at fold time with its wall time only: its
    path makes no system call for the tail.
    """

    def __init__(self, tail: int = SLOW_STEPS_KEPT):
        self.buckets = [0] * 48
        self._max_s = 0.0
        self._max_what = ""
        self._max_cpu_s = 0.0
        self._steps = 0
        self._busy_s = 0.0                      # all steps together
        #: kind -> [count, total s, max s, buckets, max CPU s]
        self.by_kind: dict[str, list] = {}
        #: (kind, what) -> the durations of its steps not folded in yet
        self._logs: dict[tuple, list] = {}
        #: the slowest steps, with their details
        self.tail = StepTail(tail)
        self._note: _Note | None = None
        self._gc = gc_clock()

    def record(self, seconds: float, what: str, kind: str | None = None,
               cpu: float | None = None, items: int | None = None, chunk: int | None = None) -> None:
        """One step of ``seconds`` (``cpu``: its CPU seconds, if measured;
        ``items`` done and its ``chunk`` size, if known); ``kind`` defaults
        to the first word of ``what``. It enters the tail without page
        faults and collections: :meth:`begin` and :meth:`end` measure those."""
        if kind is None:
            kind = what.split(" ", 1)[0]
        self._add(kind, what, seconds, seconds if cpu is None else cpu)
        key = seconds if cpu is None else cpu
        if key > self.tail.floor:
            self.tail.add(key, self._entry(kind, what, seconds, cpu, seq=self._steps, items=items,
                                           chunks=None if chunk is None else 1, chunk=chunk))

    @staticmethod
    def _entry(kind: str, what: str, seconds: float, cpu: float | None, **known) -> dict:
        e = {"kind": kind, "what": what, "detail": None, "cpu_ms": None if cpu is None else round(cpu * 1e3, 3),
             "wall_ms": round(seconds * 1e3, 3)}
        e.update((f, None) for f in TAIL_FIELDS if f not in e)
        e.update(known)
        return e

    def begin(self) -> tuple:
        """Start a step timed in full (see the class); its token for :meth:`end`.
        Steps may nest (a job's step answers a client whose next request is
        served in it): each has its own notes."""
        note, self._note = self._note, None
        ru = resource.getrusage(resource.RUSAGE_SELF)
        g = self._gc
        return (time.perf_counter(), time.thread_time(), ru.ru_minflt, ru.ru_majflt, ru.ru_nivcsw,
                g.count, g.seconds, g.full, note)

    def end(self, token: tuple, what: str, kind: str | None = None) -> float:
        """The step begun with ``token`` is over: record it (as :meth:`record`)
        with what it noted; its wall seconds."""
        seconds, cpu = time.perf_counter() - token[0], time.thread_time() - token[1]
        note, self._note = self._note, token[8]
        if kind is None:
            kind = what.split(" ", 1)[0]
        self._add(kind, what, seconds, cpu)
        if cpu > self.tail.floor:
            ru = resource.getrusage(resource.RUSAGE_SELF)
            g = self._gc
            e = self._entry(kind, what, seconds, cpu, seq=self._steps,
                            minflt=ru.ru_minflt - token[2], majflt=ru.ru_majflt - token[3],
                            preempted=ru.ru_nivcsw - token[4], gcs=g.count - token[5],
                            gc_ms=round((g.seconds - token[6]) * 1e3, 3), gc_full=g.full - token[7])
            if note is not None:
                detail = note.detail() if callable(note.detail) else note.detail
                e.update(items=note.items, chunks=note.chunks, chunk=note.chunk, detail=detail,
                         chunk_ms=None if note.chunk_s is None else round(note.chunk_s * 1e3, 3))
            self.tail.add(cpu, e)
        return seconds

    def note(self, items: int | None = None, chunk: int | None = None, chunk_s: float | None = None,
             chunks: int | None = None, detail=None) -> None:
        """What the running step did, for its tail entry: ``items`` done
        (summed over the calls), ``chunks`` (summed; 1 when ``chunk`` is
        given without it), the largest ``chunk`` (items) and the longest
        chunk (``chunk_s``), and a ``detail`` (the last given; a callable
        is called only if the step enters the tail)."""
        n = self._note
        if n is None:
            n = self._note = _Note()
        if items is not None:
            n.items = _plus(n.items, items)
        if chunk is not None:
            n.chunk = _most(n.chunk, chunk)
            if chunks is None:
                chunks = 1
        if chunks is not None:
            n.chunks = _plus(n.chunks, chunks)
        if chunk_s is not None:
            n.chunk_s = _most(n.chunk_s, chunk_s)
        if detail is not None:
            n.detail = detail

    def slowest(self) -> list[dict]:
        """The slowest steps kept (:class:`StepTail`), slowest first."""
        self.fold()
        return self.tail.entries()

    def _add(self, kind: str, what: str, seconds: float, cpu: float) -> None:
        self._steps += 1
        self._busy_s += seconds
        b = int(seconds * 1e6).bit_length()
        if b > 47:
            b = 47
        self.buckets[b] += 1
        if seconds > self._max_s:
            self._max_s, self._max_what = seconds, what
        if cpu > self._max_cpu_s:
            self._max_cpu_s = cpu
        k = self._kind(kind)
        k[0] += 1
        k[1] += seconds
        if seconds > k[2]:
            k[2] = seconds
        k[3][b] += 1
        if cpu > k[4]:
            k[4] = cpu
        if cpu > SLOW_STEP_SECONDS:
            k[5] += 1

    def _kind(self, kind: str) -> list:
        k = self.by_kind.get(kind)
        if k is None:
            k = self.by_kind[kind] = [0, 0.0, 0.0, [0] * len(self.buckets), 0.0, 0]
        return k

    def log(self, kind: str, what: str) -> list:
        """The list a hot path appends each step's seconds to (one append
        per step); its steps count as ``kind`` steps named ``what``."""
        return self._logs.setdefault((kind, what), [])

    def drop_log(self, kind: str, what: str) -> None:
        """Fold a log in and forget it (its steps stay counted)."""
        lg = self._logs.pop((kind, what), None)
        if lg:
            self._fold_one(kind, what, lg)

    def fold(self) -> None:
        """Fold every log's pending steps into the figures."""
        for (kind, what), lg in self._logs.items():
            if lg:
                self._fold_one(kind, what, lg)

    def _fold_one(self, kind: str, what: str, lg: list) -> None:
        import numpy as np
        s = np.array(lg, dtype=np.float64)
        lg.clear()
        us = (s * 1e6).astype(np.int64)
        # int.bit_length of each, as in _add (frexp's exponent: exact below 2**53)
        b = np.frexp(us.astype(np.float64))[1].astype(np.int64)
        np.minimum(b, 47, out=b)
        counts = np.bincount(b, minlength=48)
        total = float(s.sum())
        i = int(s.argmax())
        top = float(s[i])
        self._steps += len(s)
        self._busy_s += total
        k = self._kind(kind)
        k[0] += len(s)
        k[1] += total
        for j in np.flatnonzero(counts):
            self.buckets[j] += int(counts[j])
            k[3][j] += int(counts[j])
        if top > k[2]:
            k[2] = top
        if top > k[4]:
            k[4] = top
        k[5] += int((s > SLOW_STEP_SECONDS).sum())
        if top > self._max_s:
            self._max_s, self._max_what = top, what
        if top > self._max_cpu_s:
            self._max_cpu_s = top
        tail = self.tail
        if top > tail.floor:
            # a guest step's wall time only: its path measured nothing else
            slow = np.flatnonzero(s > tail.floor)
            if len(slow) > tail.n:
                slow = slow[np.argpartition(s[slow], -tail.n)[-tail.n:]]
            for j in slow[np.argsort(s[slow])]:
                tail.add(float(s[j]), self._entry(kind, what, float(s[j]), None, seq=None))

    max_s = _folded("_max_s", "The longest step (wall time).")
    max_what = _folded("_max_what", "What the longest step was.")
    max_cpu_s = _folded("_max_cpu_s", "The longest step in CPU time (guest steps: their wall time).")
    steps = _folded("_steps", "Steps so far.")
    busy_s = _folded("_busy_s", "All steps together (s).")

    def by_op(self) -> dict:
        """Per kind of step: ``count``, ``total_ms``, ``max_ms``,
        ``max_cpu_ms``, ``over_1ms_cpu`` (steps over SLOW_STEP_SECONDS in
        CPU time; guest steps: in wall time) and its own ``histogram``
        (as :meth:`histogram`)."""
        self.fold()
        return {k: {"count": c, "total_ms": round(t * 1e3, 3), "max_ms": round(m * 1e3, 3),
                    "max_cpu_ms": round(mc * 1e3, 3), "over_1ms_cpu": over,
                    "histogram": [{"lt_us": 1 << i, "count": n} for i, n in enumerate(b) if n]}
                for k, (c, t, m, b, mc, over) in self.by_kind.items()}

    def histogram(self) -> list[dict]:
        """Non-empty buckets as ``{"lt_us": upper bound, "count": n}``."""
        self.fold()
        return [{"lt_us": 1 << i, "count": c} for i, c in enumerate(self.buckets) if c]


class Budget:
    """What a step does when its budget is spent or other work waits: the
    check teardown steps, jobs and budgeted batches share, and the batch
    runner. ``preempted`` says the last check gave way to other work (the
    asking client's next requests then wait behind that work)."""

    def __init__(self, sel, meter: StepMeter | None = None):
        self.sel = sel
        #: told the chunks of the running step (:meth:`StepMeter.note`), if given
        self._note = meter.note if meter is not None else _ignore
        self.preempted = False
        #: cost model of a budgeted batch request's chunks, by op (:meth:`bounded`)
        self.chunk_cost: dict[str, ChunkCost] = {}

    def others_ready(self, c: ControlConnection | None) -> bool:
        """Is anything but client ``c``'s connection ready (a guest's fault,
        another request, a new connection, a signal)? A zero-timeout poll:
        where a preemptible step asks whether to give way. (``c`` None:
        anything at all.)"""
        mine = c.sock if c is not None else None
        return any(key.fileobj is not mine for key, _ in self.sel.select(0))

    def other_work(self, c: ControlConnection | None, t0: float):
        """The ``should_yield`` of a preemptible teardown or job step: true when another
        chunk as long as the last one would end past the step's budget, or
        anything but the asking connection is ready (a guest's fault,
        another request, a new connection, a signal).

        Asked after every chunk, so it must be cheap: a clock read and a
        zero-timeout poll of the selector.
        """
        deadline = t0 + STEP_BUDGET_SECONDS
        clock, others_ready, note = time.perf_counter, self.others_ready, self._note
        last = [t0]
        note(chunks=1)

        def should_yield() -> bool:
            now = clock()
            chunk, last[0] = now - last[0], now
            note(chunk_s=chunk)
            # chunks grow up to 4x from one to the next: expect the target
            if now + max(chunk, TEARDOWN_CHUNK_SECONDS) >= deadline:
                return True
            if others_ready(c):
                self.preempted = True
                return True
            note(chunks=1)
            return False
        return should_yield

    def bounded(self, c: ControlConnection, op: str, n: int, budget_us: int | None,
                 work: Callable[[int, int], object]) -> tuple[list, int]:
        """Run ``work(lo, hi)`` over items ``[0, n)`` in order, in chunks,
        within one step: (the chunks' results, items done).

        Without a budget, one chunk of everything. With ``budget_us``, the
        first chunk is sized by the op's cost model (:class:`ChunkCost`)
        to fill the budget, so a step is usually one chunk, one call into
        the core. Another chunk follows only while half the budget is left
        and nothing but this client is ready (a guest's fault, another
        request: they go first, as after a teardown step that yields). The
        answer says how many items were done; the caller sends the rest
        again. The first chunk always runs, so every request progresses.
        """
        if budget_us is None or n == 0:
            out = [work(0, n)]
            self._note(items=n, chunk=n)
            settle_batch()
            return out, n
        clock = time.perf_counter
        budget = budget_us * 1e-6
        deadline = clock() + budget
        cost = self.chunk_cost.get(op)
        if cost is None:
            cost = self.chunk_cost[op] = ChunkCost(cautious=True)
        out, lo = [], 0
        while lo < n:
            now = clock()
            left = deadline - now
            if lo:
                others = self.others_ready(c)
                if others or left < budget / 2:
                    self.preempted = others
                    break
            hi = min(n, lo + cost.items(left, BATCH_OVERRUN * budget))
            out.append(work(lo, hi))
            took = clock() - now
            cost.learn(hi - lo, took)
            self._note(items=hi - lo, chunk=hi - lo, chunk_s=took)
            lo = hi
        settle_batch()
        return out, lo


def _ignore(**note) -> None:
    pass


def quiet_collector() -> None:
    """Keep the cycle collector out of steps: what exists once the
    hypervisor serves (modules, the core, its arrays) lives as long as the
    process, so it is frozen out of every pass, and automatic collection
    is off, so that no pass starts in the middle of a step; the loop's
    tick collects instead (:func:`collect_young`). A full pass over a busy
    hypervisor's objects would otherwise be a step of several ms."""
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, GC_YOUNG_THRESHOLD), gen1, gen2)
    gc.disable()


def collect_young(meter: StepMeter) -> None:
    """The pass automatic collection would make, between steps (the tick):
    the young generations once GC_TICK_YOUNG container objects were made
    since the last, then what survived joins the frozen state (it is
    long-lived: a domain, a connection), so no pass ever walks the old
    generation. A step of its own, ``gc``, in the meter."""
    if gc.isenabled() or gc.get_count()[0] < GC_TICK_YOUNG:
        return
    step = meter.begin()
    gc.collect(1)
    gc.freeze()
    meter.end(step, "gc", "gc")


def settle_batch() -> None:
    """After a batch that made shared frames: what it made (rmap frame
    objects, one per nominated page) lives until unshared, so it joins the
    frozen state out of the cycle collector's passes (O(1)). Left young, a
    dedup pass's frames would trigger collections of the older generations
    in the middle of later steps."""
    gc.freeze()
