"""The sharing event ring, and the CoW writes parked on it.

In Xen a CoW fault that finds no free frame does not fail the guest's
write: the vCPU is paused and a request goes onto the *sharing event ring*,
where a user-space helper (the pager, the toolstack) sees it, frees memory
and resumes the vCPU, which then retries the faulting write. Without a
listener Xen crashes the domain; hvshare always keeps the write, because a
lost write is worse than a paused domain: a domain that nobody helps just
stays paused (``hvctl list`` shows it) until memory comes back or it is
destroyed.

This module holds the two in-hypervisor pieces, with no I/O of their own
(the process does the sockets and the guest pipes):

- :class:`EventRing`: a bounded queue of JSON-able events with sequence
  numbers. Subscribers (``hvctl events``) get the retained backlog when
  they subscribe, then every new event; the ring only keeps the last
  :data:`RING_SIZE`, so a helper that was away loses old events, never the
  hypervisor's memory.
- :class:`Parked`: per domain, the guest writes that wait for a frame, in
  arrival order, with the time they were parked. The guest sends nothing
  else meanwhile (it waits for its answer), but a queue keeps a misbehaving
  guest's extra writes in order instead of refusing them.

:class:`ParkedWrites` holds the hypervisor process's side: parking a
write (``enomem``), retrying after every step that freed frames, resuming
the domain (``resumed``), and cancelling on destroy (``cancelled``).
"""
from __future__ import annotations

import collections
import time

import numpy as np

from ..wire import pipe, schema
from .. import errors
from ..errors import ENOMEM, HVError
from .endpoints import GuestEndpoint

#: bytes an event subscriber may fall behind before it is dropped
EVENTS_MAX_QUEUE = 1 << 20


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


class ParkedWrite:
    """One guest write message waiting for free frames."""

    __slots__ = ("mtype", "seq", "body", "since", "gfn", "pages")

    def __init__(self, mtype: int, seq: int, body, gfn: int, pages: int):
        self.mtype, self.seq, self.body = mtype, seq, body
        self.gfn, self.pages = gfn, pages
        self.since = time.monotonic()


class Parked:
    """A domain's parked writes, and whether its user paused it meanwhile."""

    __slots__ = ("writes", "since", "user_paused")

    def __init__(self):
        self.writes: collections.deque[ParkedWrite] = collections.deque()
        self.since = time.monotonic()
        #: paused by 'hvctl pause' while waiting: stays paused once written
        self.user_paused = False


class ParkedWrites:
    """Guest writes that wait for a free frame, and the event ring they post on."""

    def _park(self, g: GuestEndpoint, mtype: int, seq: int, body) -> None:
        """Keep a write that found no free frame: pause the domain (its
        guest already waits for the answer) and post ``enomem`` on the ring.
        ``body`` may be a view of a read buffer: the kept write owns a copy."""
        body = bytes(body)
        if mtype == pipe.G_WRITE:
            gfn, _, _ = pipe.decode_write(body)            # refuses garbage before keeping it
            pages, needed = 1, 1
        elif mtype == pipe.G_POPULATE:
            gfns = pipe.decode_populate(body)
            gfn, pages = int(gfns[0]), len(gfns)
            needed = len(gfns)
        elif mtype == pipe.G_WRITE_MANY:
            gfns = pipe.decode_write_many(body)[0]
            gfn, pages = int(gfns[0]), len(gfns)
            needed = self._frames_needed(g.domid, gfns)
        else:
            gfns, _ = pipe.decode_write_pages(body)
            gfn, pages = int(gfns[0]), len(gfns)
            needed = self._frames_needed(g.domid, gfns)
        p = self.parked.get(g.domid)
        first = p is None
        if first:
            p = self.parked[g.domid] = Parked()
        p.writes.append(ParkedWrite(mtype, seq, body, int(gfn), pages))
        if not first:
            return
        d = self.hv.domains[g.domid]
        d.state = "paused"
        g.notify(pipe.H_PAUSE)
        self.enomem_waits += 1
        free = self.hv.pool.nfree
        self._parked_free = free if len(self.parked) == 1 else min(self._parked_free, free)
        self._parked_mark = self._sharing_mark()
        self.ring.post("enomem", domid=g.domid, gfn=int(gfn), pages=pages, needed=needed,
                       frames_free=free, frames_total=self.hv.pool.nframes)

    def _frames_needed(self, domid: int, gfns) -> int:
        """Frames a batched write must allocate: one per shared gfn, less
        the frames whose every sharer is in the batch (the last takes it)."""
        from ..p2m import RAM_SHARED
        d = self.hv.domains.get(domid)
        try:
            gfns = np.unique(np.asarray(gfns, dtype=np.int64))
            gfns = gfns[(gfns >= 0) & (gfns < d.npages)]
            shared = gfns[d.p2m.type[gfns] == RAM_SHARED]
            frames, counts = np.unique(d.p2m.mfn[shared], return_counts=True)
            return int(len(shared) - (counts == self.hv.pool.type_count[frames]).sum())
        except (AttributeError, IndexError, ValueError):
            return 0

    def _sharing_mark(self) -> tuple:
        hv = self.hv
        return (hv.pool.nfree, hv.nr_shared_mfns, hv.nr_saved_mfns)

    def _retry_parked(self, changed_only: bool = False) -> None:
        """Give parked writes another go, oldest domain first.

        Called after every step, so it must be cheap when nothing can have
        changed: it retries only when more frames are free than at the last
        failure. The housekeeping tick (``changed_only``) also retries when
        the sharing counters moved, which catches a parked gfn that became
        the last sharer of its frame (unshared elsewhere: no copy needed).
        """
        free = self.hv.pool.nfree
        if changed_only:
            if self._sharing_mark() == self._parked_mark:
                return
        elif free <= self._parked_free:
            self._parked_free = free
            return
        t0, cpu0 = time.perf_counter(), time.thread_time()
        for domid in list(self.parked):
            self._resume_parked(domid)
        self._parked_free = self.hv.pool.nfree
        self._parked_mark = self._sharing_mark()
        self.meter.record(time.perf_counter() - t0, "resume", "resume", time.thread_time() - cpu0)

    def _resume_parked(self, domid: int) -> bool:
        """Apply a domain's parked writes in order; True once none is left.
        The last answer goes after the unpause, so the guest runs on at once."""
        p = self.parked.get(domid)
        if p is None:
            return True
        g = self.guests.get(domid)
        d = self.hv.domains.get(domid)
        if g is None or g.closed or d is None or d.dying:
            self._cancel_parked(domid, "the domain is gone")
            return True
        first = p.writes[0] if p.writes else None
        while p.writes:
            w = p.writes[0]
            status = value = 0
            try:
                value = self._apply_write(g, w.mtype, w.body)
            except HVError as e:
                if e.code == ENOMEM:
                    return False
                status = e.code
            except errors.ProtocolError as e:             # checked when parked: not expected
                self._crash(g, f"protocol violation: {e}")
                return True
            p.writes.popleft()
            if not p.writes:
                del self.parked[domid]
                d.state = "paused" if p.user_paused else "running"
                if not p.user_paused:
                    g.notify(pipe.H_UNPAUSE)
                self.ring.post("resumed", domid=domid, gfn=first.gfn if first else None,
                               waited_ms=round((time.monotonic() - p.since) * 1e3, 3),
                               state=d.state, frames_free=self.hv.pool.nfree)
            g.reply(w.seq, status, value)
        return True

    def _hold_until_unpause(self, g: GuestEndpoint, mtype: int, seq: int, body) -> None:
        """A write from a paused domain's guest: a paused vCPU does not run,
        so the write waits, unanswered, until the domain is unpaused."""
        self.paused_writes.setdefault(g.domid, collections.deque()).append((mtype, seq, bytes(body)))

    def _release_paused_writes(self, domid: int) -> None:
        """The domain runs again: its held writes go, in order, as if they
        arrived now (one may still find no free frame and be parked)."""
        held = self.paused_writes.pop(domid, None)
        g = self.guests.get(domid)
        while held and g is not None and not g.closed:
            self._guest_write(g, *held.popleft())

    def _cancel_parked(self, domid: int, why: str) -> None:
        """The domain of parked writes is destroyed or crashed: its writes
        die with it (nobody waits for them any more)."""
        self.paused_writes.pop(domid, None)
        p = self.parked.pop(domid, None)
        if p is not None:
            self.ring.post("cancelled", domid=domid, writes=len(p.writes), reason=why,
                           waited_ms=round((time.monotonic() - p.since) * 1e3, 3))

    def _set_paused_parked(self, domid: int, paused: bool) -> dict:
        """pause/unpause of a domain that waits for memory: pause makes it
        stay paused once its write is done; unpause retries now and says
        so if there is still no frame."""
        p = self.parked[domid]
        p.user_paused = paused
        if not paused and not self._resume_parked(domid):
            raise HVError(ENOMEM, f"domain {domid} waits for free memory for a copy-on-write "
                                  f"fault; it resumes by itself once frames are freed")
        return {"domid": domid, "state": self.hv.domains[domid].state}

    def _describe_parked(self, domid: int) -> dict:
        p = self.parked.get(domid)
        if p is None:
            return {}
        return {"waiting_for_memory": True, "parked_writes": len(p.writes),
                "waiting_ms": round((time.monotonic() - p.since) * 1e3, 3)}

    def _op_events(self, c, payload, since):
        """Subscribe this connection to the sharing event ring: an answer,
        the retained events after ``since`` (none if not given), then every
        new event as its own frame, until either side closes. Pushing only
        queues bytes, so a slow subscriber never holds the loop; one that
        falls :data:`EVENTS_MAX_QUEUE` bytes behind is dropped."""
        c.reply(schema.ok(subscribed=True, seq=self.ring.seq, parked=sorted(self.parked)))

        def push(ev, c=c) -> bool:
            if c.closed:
                return False
            if len(c.out) > EVENTS_MAX_QUEUE:
                self._drop_client(c)
                return False
            c.reply(ev)
            return not c.closed
        for ev in (self.ring.since(since) if since is not None else ()):
            push(ev)
        self.ring.subscribe(push, lambda c=c: not c.closed)
        return None
