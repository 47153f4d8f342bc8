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
(the server does the sockets and the guest pipes):

- :class:`EventRing`: a bounded queue of JSON-able events with sequence
  numbers. Subscribers (``hvctl events``) get the retained backlog when
  they subscribe, then every new event; the ring only keeps the last
  :data:`RING_SIZE`, so a helper that was away loses old events, never the
  hypervisor's memory.
- :class:`Parked`: per domain, the guest writes that wait for a frame, in
  arrival order, with the time they were parked. The guest sends nothing
  else meanwhile (it waits for its answer), but a queue keeps a misbehaving
  guest's extra writes in order instead of refusing them.
"""
from __future__ import annotations

import collections
import time

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

    __slots__ = ("writes", "since", "hold")

    def __init__(self):
        self.writes: collections.deque[ParkedWrite] = collections.deque()
        self.since = time.monotonic()
        #: paused by 'hvctl pause' while waiting: stays paused once written
        self.hold = False
