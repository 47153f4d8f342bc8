"""The guest write path: the one way a guest's write reaches the core.

Every write message of a guest -- a single write (``G_WRITE``), a batch
of small writes (``G_WRITE_MANY``), whole pages (``G_WRITE_PAGES``) and a
fork's read fault (``G_POPULATE``) -- is decoded into a :class:`GuestWrite`
and applied by :class:`WritePath`, which alone decides where a write goes
(applied now, queued behind its domain's earlier writes, held while its
domain is paused), counts what it did, parks it when no frame is free and
answers the guest.

A :class:`GuestWrite` carries a cursor: :meth:`GuestWrite.advance`
applies chunks of its items from the cursor and returns where it stopped.
A chunk is one call into the core, which either applies the whole chunk
or, on ENOMEM, changes nothing; so a write parked for want of frames
resumes at the chunk that failed, and no item is applied twice or lost.

A write is applied a step at a time, as Xen continues a long hypercall:
a step applies chunks sized by the one cost model
(:class:`hvshare.hvcore.budget.ChunkCost`) to fill the one step budget
(:data:`hvshare.hvcore.constants.STEP_BUDGET_SECONDS`), and stops early
when other work is ready (:class:`StepPlan`). A write with items left
*continues*: it waits in its domain's queue (:attr:`WritePath.continued`)
and the loop gives it its next step after serving what was ready
(:meth:`WritePath.next_continued`, :meth:`WritePath.continue_step`). The
guest, which waits for the answer, gets one answer when the last item is
applied; the domain's later writes queue behind it, a pause holds it, a
destroyed or crashed domain drops it.

The fast decoder of :mod:`.guests` hands a lone ``G_WRITE`` to
:meth:`WritePath.single` without building a message object: the common
outcome (applied at once) is counted and answered by the same helpers as
every other write, and anything else becomes a :class:`GuestWrite`.
"""
from __future__ import annotations

import collections
from time import perf_counter as _clock, thread_time as _cpu
from typing import Callable

import numpy as np

from ..budget import BATCH_OVERRUN, ChunkCost
from ..constants import STEP_BUDGET_SECONDS
from ..wire import pipe
from ..errors import ENOMEM, HVError
from .endpoints import GuestEndpoint
from .parking import ParkingLot
from .steps import StepMeter

_G_WRITE, _G_WRITE_MANY, _G_WRITE_PAGES, _G_POPULATE = (
    pipe.G_WRITE, pipe.G_WRITE_MANY, pipe.G_WRITE_PAGES, pipe.G_POPULATE)
#: the guest messages that are writes (a read fault fills holes: it goes the same way)
WRITE_MESSAGES = frozenset((_G_WRITE, _G_WRITE_MANY, _G_WRITE_PAGES, _G_POPULATE))


class GuestWrite:
    """One decoded guest write message and its cursor: items ``[0, done)``
    are applied and took ``faults`` CoW faults (a populate: holes filled).

    ``gfns`` is an int for a single write, else an array; ``data`` the
    bytes of a single write or of a batch of small writes, or the pages of
    a whole-page write. A batch's arrays are views of its message's body,
    which nothing else reuses; a single write's bytes may be a view of the
    guest table's read buffer until :meth:`keep` copies them (a write that
    waits outlives the read).
    """

    __slots__ = ("mtype", "seq", "gfns", "offsets", "lengths", "data", "items", "done",
                 "faults", "_starts")

    def __init__(self, mtype: int, seq: int, gfns, offsets=None, lengths=None, data=None):
        self.mtype, self.seq, self.gfns = mtype, seq, gfns
        self.offsets, self.lengths, self.data = offsets, lengths, data
        self.items = 1 if mtype == _G_WRITE else len(gfns)
        self.done = self.faults = 0
        self._starts = None

    @classmethod
    def decode(cls, mtype: int, seq: int, body) -> "GuestWrite":
        """The write message ``mtype`` with ``body`` (ProtocolError if malformed)."""
        if mtype == _G_WRITE:
            gfn, offset, data = pipe.decode_write(body)
            return cls(mtype, seq, gfn, offset, None, data)
        if mtype == _G_WRITE_MANY:
            return cls(mtype, seq, *pipe.decode_write_many(body))
        if mtype == _G_WRITE_PAGES:
            gfns, pages = pipe.decode_write_pages(body)
            return cls(mtype, seq, gfns, None, None, pages)
        return cls(mtype, seq, pipe.decode_populate(body))

    @property
    def batched(self) -> bool:
        """A message of many writes (counted apart: ``pages_written``)."""
        return self.mtype == _G_WRITE_MANY or self.mtype == _G_WRITE_PAGES

    def keep(self) -> "GuestWrite":
        """Own a copy of a single write's bytes (see the class)."""
        if self.mtype == _G_WRITE and type(self.data) is not bytes:
            self.data = bytes(self.data)
        return self

    def rest(self) -> np.ndarray:
        """The gfns not applied yet."""
        if self.mtype == _G_WRITE:
            return np.array([self.gfns], dtype=np.int64)
        return np.asarray(self.gfns[self.done:], dtype=np.int64)

    def advance(self, hv, domid: int, chunk: int | None = None,
                stop: Callable[[], bool] | None = None) -> int:
        """Apply chunks of ``chunk`` items (None: all that is left) from the
        cursor until every item is done or ``stop()`` says to stop after a
        chunk; the cursor. An HVError stops it at the chunk that failed
        (ENOMEM: a chunk that changed nothing; it is applied again next)."""
        n = self.items
        while self.done < n:
            lo = self.done
            hi = n if chunk is None else min(n, lo + chunk)
            self.faults += self._apply(hv, domid, lo, hi)
            self.done = hi
            if stop is not None and hi < n and stop():
                break
        return self.done

    def _apply(self, hv, domid: int, lo: int, hi: int) -> int:
        """Items ``[lo, hi)``, one call into the core; their CoW faults."""
        mtype = self.mtype
        if mtype == _G_WRITE:
            return 1 if hv.write(domid, self.gfns, self.offsets, self.data) else 0
        if mtype == _G_POPULATE:
            return hv.fork_populate(domid, self.gfns[lo:hi])
        if mtype == _G_WRITE_PAGES:
            return int(hv.write_pages(domid, self.gfns[lo:hi], self.data[lo:hi]))
        data = self.data
        if lo or hi < self.items:
            if self._starts is None:
                self._starts = np.concatenate(([0], np.cumsum(self.lengths, dtype=np.int64)))
            data = data[self._starts[lo]:self._starts[hi]]
        return int(hv.write_many(domid, self.gfns[lo:hi], self.offsets[lo:hi], self.lengths[lo:hi], data))


def _after_one() -> bool:
    return True


class StepPlan:
    """How much of a write one step applies: chunks, each sized by the
    write kind's :class:`ChunkCost` to fill what is left of the step
    budget, until the write is done, less than half the budget is left,
    or ``others_ready()`` says other work waits (a guest's fault, a
    request). The first chunk always runs, so every step makes progress.

    The model learns each chunk's CPU time: a chunk's wall time also holds
    whatever other processes ran meanwhile, and one such outlier would
    shrink the next chunks to a few items, each paying the fixed cost of
    a call into the core.
    """

    def __init__(self, others_ready: Callable[[], bool], budget_s: float = STEP_BUDGET_SECONDS):
        self.others_ready, self.budget_s = others_ready, budget_s
        #: the cost model of each write kind's chunks
        self.cost: dict[int, ChunkCost] = {}

    def run(self, w: GuestWrite, hv, domid: int) -> None:
        """One step of ``w`` from its cursor (HVError as :meth:`GuestWrite.advance`)."""
        budget, clock = self.budget_s, _clock
        cost = self.cost.get(w.mtype)
        if cost is None:
            cost = self.cost[w.mtype] = ChunkCost()
        deadline = clock() + budget
        first = True
        while w.done < w.items:
            left = deadline - clock()
            if not first and (left < budget / 2 or self.others_ready()):
                return
            first = False
            lo, cpu0 = w.done, _cpu()
            w.advance(hv, domid, cost.items(left, BATCH_OVERRUN * budget), _after_one)
            cost.learn(w.done - lo, _cpu() - cpu0)


class Continued:
    """A domain's writes that continue across steps, in arrival order:
    the first is in progress (its cursor says how far), the rest wait
    behind it. ``guest`` is the domain's guest."""

    __slots__ = ("guest", "writes")

    def __init__(self, guest: GuestEndpoint, writes):
        self.guest, self.writes = guest, collections.deque(writes)


class WritePath:
    """Where a guest's write goes, and the bookkeeping every write shares:
    steps, continuation, counters, ENOMEM parking, resumption and the
    guest's answer.

    Depends on the core (``hv``), the parking lot (parked and held writes,
    the event ring), the step meter (a retry of parked writes is a step of
    its own, ``resume``) and the :class:`StepPlan` that cuts a write into
    steps.
    """

    def __init__(self, hv, lot: ParkingLot, meter: StepMeter, plan: StepPlan):
        self.hv, self.lot, self.meter, self.plan = hv, lot, meter, plan
        #: CoW faults the guests' writes took (``info``'s ``cow_faults``)
        self.cow_faults = 0
        #: domid -> its writes continued across steps, oldest domain first
        #: (the loop tests it every turn: a plain dict)
        self.continued: dict[int, Continued] = {}
        # what a single write looks at, bound once (the fault path)
        self._parked, self._domains, self._write = lot.parked, hv.domains, hv.write

    # -- entries -----------------------------------------------------------
    def single(self, g: GuestEndpoint, seq: int, gfn: int, offset: int, data) -> None:
        """A lone ``G_WRITE`` from the fast decoder (it fits in its page).
        Applied at once when its domain runs and has no earlier write
        waiting; else, and on any error, the general way (:meth:`submit`,
        :meth:`_failed`)."""
        domid = g.domid
        if domid in self._parked or domid in self.continued or self._domains[domid].state == "paused":
            self.submit(g, GuestWrite(_G_WRITE, seq, gfn, offset, None, data))
            return
        try:
            faults = 1 if self._write(domid, gfn, offset, data) else 0
        except HVError as e:
            self._failed(g, GuestWrite(_G_WRITE, seq, gfn, offset, None, data), e)
            return
        self._count(g, 1, faults, False)
        g.reply(seq, 0, faults)

    def message(self, g: GuestEndpoint, mtype: int, seq: int, body) -> None:
        """A write message from the general decoder (ProtocolError if malformed)."""
        self.submit(g, GuestWrite.decode(mtype, seq, body))

    def submit(self, g: GuestEndpoint, w: GuestWrite) -> None:
        """Route a write: behind its domain's parked or continued writes (in
        order), held while its domain is paused (a paused vCPU does not
        run), else its first step now."""
        domid = g.domid
        if domid in self.lot.parked:
            self.lot.park(g, w)
        elif domid in self.continued:
            self.continued[domid].writes.append(w.keep())
        elif self.hv.domains[domid].state == "paused":
            self.lot.hold(g, w)
        else:
            self.run(g, w)

    def run(self, g: GuestEndpoint, w: GuestWrite) -> None:
        """One step of ``w`` from its cursor: answered once done, parked on
        ENOMEM, else continued by the loop."""
        try:
            self.plan.run(w, self.hv, g.domid)
        except HVError as e:
            self._failed(g, w, e)
            return
        if w.done < w.items:
            self.continued[g.domid] = Continued(g, (w.keep(),))
        else:
            self._finish(g, w, 0)

    # -- continuations (the loop's turn) ---------------------------------------
    def next_continued(self) -> GuestEndpoint | None:
        """The guest whose continued write gets the next step, oldest domain
        first (it goes to the back); None if none can run. A domain that is
        gone drops its writes; one that is paused holds them until it runs
        (:meth:`release_held`)."""
        cont = self.continued
        while cont:
            domid = next(iter(cont))
            c = cont.pop(domid)
            g, d = c.guest, self.hv.domains.get(domid)
            if g.closed or d is None or d.dying:
                continue
            if d.state == "paused":
                for w in c.writes:
                    self.lot.hold(g, w)
                continue
            cont[domid] = c
            return g
        return None

    def continue_step(self, g: GuestEndpoint) -> None:
        """One step of ``g``'s domain's first continued write; the others
        wait behind it. Answered once done; parked, with everything behind
        it, if no frame is free."""
        c = self.continued.get(g.domid)
        if c is None:
            return
        w = c.writes[0]
        status = 0
        try:
            self.plan.run(w, self.hv, g.domid)
        except HVError as e:
            if e.code == ENOMEM:
                del self.continued[g.domid]
                for x in c.writes:
                    self.lot.park(g, x)
                return
            status = e.code
        if status or w.done == w.items:
            c.writes.popleft()
            if not c.writes:
                del self.continued[g.domid]
            self._finish(g, w, status)

    def _continue(self, g: GuestEndpoint, writes) -> None:
        """Writes of ``g``'s domain, in order, to be stepped by the loop."""
        if writes:
            self.continued[g.domid] = Continued(g, writes)

    # -- the one bookkeeping -----------------------------------------------
    def _failed(self, g: GuestEndpoint, w: GuestWrite, e: HVError) -> None:
        """A write the core refused: parked if no frame was free (the guest
        waits for its answer), else answered with the error."""
        if e.code == ENOMEM:
            self.lot.park(g, w)
        else:
            self._finish(g, w, e.code)

    def _finish(self, g: GuestEndpoint, w: GuestWrite, status: int) -> None:
        if w.mtype == _G_POPULATE:
            g.read_faults += w.faults           # a read fault: not a write, not a CoW fault
        elif w.done:
            self._count(g, w.done, w.faults, w.batched)
        g.reply(w.seq, status, w.faults)

    def _count(self, g: GuestEndpoint, pages: int, faults: int, batched: bool) -> None:
        g.writes += 1
        if batched:
            g.batch_writes += 1
            g.batch_pages += pages
        if faults:
            g.cow_faults += faults
            self.cow_faults += faults

    # -- parked and held writes ----------------------------------------------
    def retry(self, changed_only: bool = False) -> None:
        """Give parked writes another go, oldest domain first, when the lot
        says frames may have come back (:meth:`ParkingLot.worth_retry`)."""
        lot = self.lot
        if not lot.worth_retry(changed_only):
            return
        t0, cpu0 = _clock(), _cpu()
        for domid in list(lot.parked):
            self.resume(domid)
        lot.tried()
        self.meter.record(_clock() - t0, "resume", "resume", _cpu() - cpu0)

    def resume(self, domid: int) -> bool:
        """One step of a domain's first parked write; False if it still
        finds no frame. Once it goes on, the domain runs again (the answer
        goes after the unpause, so the guest runs on at once) and what is
        left continues in the loop's next turns."""
        lot = self.lot
        p = lot.parked.get(domid)
        if p is None:
            return True
        g, d = p.guest, self.hv.domains.get(domid)
        if g.closed or d is None or d.dying:
            lot.cancel(domid, "the domain is gone")
            return True
        w = p.writes[0]
        status = 0
        try:
            self.plan.run(w, self.hv, domid)
        except HVError as e:
            if e.code == ENOMEM:
                return False
            status = e.code
        lot.unpark(domid)
        if status or w.done == w.items:
            p.writes.popleft()
            self._finish(g, w, status)
        self._continue(g, p.writes)
        return True

    def release_held(self, domid: int) -> None:
        """The domain runs again: its held writes continue, in order, from
        the loop's next turn (one may still find no free frame and be parked)."""
        g, held = self.lot.take_held(domid)
        if held and not g.closed:
            self._continue(g, held)

    def pause_parked(self, domid: int, paused: bool) -> dict:
        """pause/unpause of a domain that waits for memory, two pauses as
        Xen's controller pause and its ENOMEM vCPU pause: pause makes it
        stay paused once its write is done; unpause lifts that pause (and
        retries now); an unpause with no user pause to lift that finds no
        frame either is refused (ENOMEM) and changes nothing."""
        p = self.lot.parked[domid]
        lifted, p.user_paused = p.user_paused and not paused, paused
        if not paused and not self.resume(domid) and not lifted:
            raise HVError(ENOMEM, f"domain {domid} waits for free memory for a copy-on-write "
                                  f"fault; it resumes by itself once frames are freed")
        return {"domid": domid, "state": self.hv.domains[domid].state,
                "waiting_for_memory": domid in self.lot.parked}
