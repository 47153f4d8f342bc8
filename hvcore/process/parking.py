"""The sharing event ring, and the CoW writes parked on it.

In Xen a CoW fault that finds no free frame does not fail the guest's
write: the vCPU is paused and a request goes onto the *sharing event ring*,
where a user-space helper (the pager, the toolstack) sees it, frees memory
and resumes the vCPU, which then retries the faulting write. Without a
listener Xen crashes the domain; hvshare always keeps the write, because a
lost write is worse than a paused domain: a domain that nobody helps just
stays paused (``hvctl list`` shows it) until memory comes back or it is
destroyed.

This module holds the in-hypervisor pieces:

- :class:`EventRing`: a bounded queue of JSON-able events with sequence
  numbers. Subscribers (``hvctl events``) get the retained backlog when
  they subscribe, then every new event; the ring only keeps the last
  :data:`RING_SIZE`, so a helper that was away loses old events, never the
  hypervisor's memory.
- :class:`Parked`: per domain, the guest writes that wait for a frame, in
  arrival order, with the time they were parked. The guest sends nothing
  else meanwhile (it waits for its answer), but a queue keeps a misbehaving
  guest's extra writes in order instead of refusing them.
- :class:`ParkingLot`: the parked writes of every domain and the writes
  held while a domain is paused. Parking pauses the domain, tells its
  guest (``H_PAUSE`` on its pipe) and posts ``enomem``; unparking resumes
  it (``H_UNPAUSE``, ``resumed``); a destroy cancels (``cancelled``). It
  decides when a retry is worth it; the retry itself, which applies the
  writes, is the write path's (:mod:`.writes`).

Pushing an event only queues bytes on the subscribers' connections
(``hvctl events``, served by the op table), so a slow subscriber never
holds the loop.
"""
from __future__ import annotations

import collections
import time

import numpy as np

from ..wire import pipe
from .endpoints import GuestEndpoint

#: events the ring keeps for late subscribers
RING_SIZE = 1024


class EventRing:
    """Bounded, sequence-numbered event queue with push subscribers."""

    def __init__(self, size: int = RING_SIZE):
        self.events: collections.deque = collections.deque(maxlen=size)
        self.seq = 0
        self.posted = 0
        #: (push(event) -> False to be dropped, alive() -> bool) pairs
        self.subscribers: list = []

    def post(self, event: str, **fields) -> dict:
        """Append an event and hand it to every subscriber."""
        self.seq += 1
        self.posted += 1
        ev = {"event": event, "seq": self.seq, "time": round(time.time(), 6), **fields}
        self.events.append(ev)
        self.subscribers = [(push, alive) for push, alive in self.subscribers if alive() and push(ev)]
        return ev

    def since(self, seq: int) -> list[dict]:
        """Retained events with a sequence number above ``seq``."""
        return [e for e in self.events if e["seq"] > seq]

    def subscribe(self, push, alive) -> None:
        self.subscribers.append((push, alive))

    def live(self) -> int:
        """Subscribers still connected (the gone ones are forgotten)."""
        self.subscribers = [s for s in self.subscribers if s[1]()]
        return len(self.subscribers)


class Parked:
    """A domain's parked writes, its guest, and whether its user paused it meanwhile."""

    __slots__ = ("guest", "writes", "since", "gfn", "user_paused")

    def __init__(self, guest: GuestEndpoint, gfn: int):
        self.guest = guest
        self.writes: collections.deque = collections.deque()
        self.since = time.monotonic()
        #: the first gfn that found no frame (the ``resumed`` event names it)
        self.gfn = gfn
        #: paused by 'hvctl pause' while waiting: stays paused once written
        self.user_paused = False


class ParkingLot:
    """Guest writes that wait for a free frame or for their domain's
    unpause, and the event ring the waits are posted on.

    Depends on the core (``hv``: domain states, pool counters) and the
    ring. The writes are :class:`.writes.GuestWrite` objects, kept as
    they stopped (their cursor says what is left).
    """

    def __init__(self, hv, ring: EventRing):
        self.hv, self.ring = hv, ring
        #: domid -> its parked writes
        self.parked: dict[int, Parked] = {}
        #: domid -> (guest, writes held while the domain is paused)
        self.held: dict[int, tuple] = {}
        #: domains that had to wait for memory (``info``'s ``enomem_waits``)
        self.enomem_waits = 0
        self._free = 0          # fewest free frames seen since a retry failed
        self._mark: tuple = ()  # (free, shared, saved) when the last retry failed

    def park(self, g: GuestEndpoint, w) -> None:
        """Keep a write that found no free frame (or queues behind one):
        the first pauses the domain (its guest already waits for the
        answer) and posts ``enomem``, naming what is left of the write."""
        w.keep()
        p = self.parked.get(g.domid)
        if p is not None:
            p.writes.append(w)
            return
        rest = w.rest()
        gfn = int(rest[0])
        p = self.parked[g.domid] = Parked(g, gfn)
        p.writes.append(w)
        d = self.hv.domains[g.domid]
        d.state = "paused"
        g.notify(pipe.H_PAUSE)
        self.enomem_waits += 1
        free = self.hv.pool.nfree
        self._free = free if len(self.parked) == 1 else min(self._free, free)
        self._mark = self._sharing_mark()
        if w.mtype == pipe.G_WRITE:
            needed = 1
        elif w.mtype == pipe.G_POPULATE:
            needed = len(rest)
        else:
            needed = self._frames_needed(d, rest)
        self.ring.post("enomem", domid=g.domid, gfn=gfn, pages=len(rest), needed=needed,
                       frames_free=free, frames_total=self.hv.pool.nframes)

    def _frames_needed(self, d, gfns) -> int:
        """Frames a batched write must allocate: one per shared gfn, less
        the frames whose every sharer is in the batch (the last takes it),
        and in a fork one per hole it fills."""
        from ..p2m import HOLE, RAM_SHARED
        try:
            gfns = np.unique(np.asarray(gfns, dtype=np.int64))
            gfns = gfns[(gfns >= 0) & (gfns < d.npages)]
            shared = gfns[d.p2m.type[gfns] == RAM_SHARED]
            frames, counts = np.unique(d.p2m.mfn[shared], return_counts=True)
            holes = int(np.count_nonzero(d.p2m.type[gfns] == HOLE)) if d.parent is not None else 0
            return int(len(shared) - (counts == self.hv.pool.type_count[frames]).sum()) + holes
        except (AttributeError, IndexError, ValueError):
            return 0

    def _sharing_mark(self) -> tuple:
        hv = self.hv
        return (hv.pool.nfree, hv.nr_shared_mfns, hv.nr_saved_mfns)

    def worth_retry(self, changed_only: bool = False) -> bool:
        """Whether parked writes may find frames now. Asked after every
        step, so cheap when nothing can have changed: true only when more
        frames are free than at the last failure. The housekeeping tick
        (``changed_only``) also retries when the sharing counters moved,
        which catches a parked gfn that became the last sharer of its
        frame (unshared elsewhere: no copy needed)."""
        if changed_only:
            return self._sharing_mark() != self._mark
        free = self.hv.pool.nfree
        if free <= self._free:
            self._free = free
            return False
        return True

    def tried(self) -> None:
        """A retry is over: what it left is the new mark."""
        self._free = self.hv.pool.nfree
        self._mark = self._sharing_mark()

    def unpark(self, domid: int) -> None:
        """The domain's last parked write is done: it runs again (unless its
        user paused it meanwhile) and the ring says ``resumed``."""
        p = self.parked.pop(domid)
        d = self.hv.domains[domid]
        d.state = "paused" if p.user_paused else "running"
        if not p.user_paused:
            p.guest.notify(pipe.H_UNPAUSE)
        self.ring.post("resumed", domid=domid, gfn=p.gfn,
                       waited_ms=round((time.monotonic() - p.since) * 1e3, 3),
                       state=d.state, frames_free=self.hv.pool.nfree)

    def hold(self, g: GuestEndpoint, w) -> None:
        """A write from a paused domain's guest: a paused vCPU does not run,
        so the write waits, unanswered, until the domain is unpaused."""
        self.held.setdefault(g.domid, (g, collections.deque()))[1].append(w.keep())

    def take_held(self, domid: int) -> tuple:
        """(guest, held writes) of a domain that runs again ((None, ()) if none)."""
        return self.held.pop(domid, (None, ()))

    def cancel(self, domid: int, why: str) -> None:
        """The domain of parked writes is destroyed or crashed: its writes
        die with it (nobody waits for them any more)."""
        self.held.pop(domid, None)
        p = self.parked.pop(domid, None)
        if p is not None:
            self.ring.post("cancelled", domid=domid, writes=len(p.writes), reason=why,
                           waited_ms=round((time.monotonic() - p.since) * 1e3, 3))

    def describe(self, domid: int) -> dict:
        """What ``list`` says of a domain that waits for memory ({} if it does not)."""
        p = self.parked.get(domid)
        if p is None:
            return {}
        return {"waiting_for_memory": True, "parked_writes": len(p.writes),
                "waiting_ms": round((time.monotonic() - p.since) * 1e3, 3)}
