"""The one guest write path (:mod:`hvshare.hvcore.process.writes`), on a real core.

Messages are encoded with the guest pipe's codec, sent through a real
pipe and read by the hypervisor's pipe reader, then handed to the write
path as the guest table hands them; the guest's side is a recorder of its
answers and notices. Single, batched and whole-page writes go the same way:
counted once, parked when no frame is free, resumed from where they
stopped -- a batch split in chunks with ENOMEM between them applies every
item once, in order.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from hvshare.hvcore import errors
from hvshare.hvcore.constants import PAGE_SIZE
from hvshare.hvcore.core import Hypervisor
from hvshare.hvcore.wire import pipe
from hvshare.hvcore.process.parking import EventRing, ParkingLot
from hvshare.hvcore.process.steps import StepMeter
from hvshare.hvcore.process.writes import GuestWrite, WritePath

PAGES = 16


class Guest:
    """What the write path sees of a guest: counters, answers, notices."""

    def __init__(self, domid: int):
        self.domid = domid
        self.closed = False
        self.writes = self.cow_faults = self.batch_writes = self.batch_pages = self.read_faults = 0
        self.replies: list[tuple] = []
        self.notices: list[int] = []

    def reply(self, seq, status, value):
        self.replies.append((seq, status, value))

    def notify(self, mtype):
        self.notices.append(mtype)


class Spy:
    """The core, with every batched call into it recorded: (gfns, refused)."""

    def __init__(self, hv):
        self._hv, self.calls = hv, []

    def __getattr__(self, name):
        return getattr(self._hv, name)

    def _spied(self, name, domid, gfns, *args):
        try:
            out = getattr(self._hv, name)(domid, gfns, *args)
        except Exception:
            self.calls.append((list(map(int, gfns)), True))
            raise
        self.calls.append((list(map(int, gfns)), False))
        return out

    def write_pages(self, domid, gfns, pages):
        return self._spied("write_pages", domid, gfns, pages)

    def write_many(self, domid, gfns, offsets, lengths, data):
        return self._spied("write_many", domid, gfns, offsets, lengths, data)

    def applied(self) -> list[int]:
        """The gfns of the calls that went through, in order."""
        return [g for gfns, refused in self.calls if not refused for g in gfns]


@pytest.fixture
def world():
    """A core whose every frame is taken: domains a and b share all their
    pages, fillers of 2 and 6 pages and one more hold the rest. Yields
    (core, write path, lot, ring, b's guest, free(filler))."""
    hv = Hypervisor(3 * PAGES)
    try:
        a = hv.create_domain(PAGES).domid
        b = hv.create_domain(PAGES).domid
        assert hv.range_share(a, b, 0, PAGES - 1) == PAGES
        small = hv.create_domain(2).domid
        mid = hv.create_domain(6).domid
        hv.create_domain(hv.pool.nfree)
        assert hv.pool.nfree == 0
        spy = Spy(hv)
        ring = EventRing()
        lot = ParkingLot(spy, ring)
        writes = WritePath(spy, lot, StepMeter(), chunk=2)
        g = Guest(b)

        def free(filler):
            hv.destroy_domain({"small": small, "mid": mid}[filler])
        yield hv, spy, writes, lot, ring, g, free
        assert hv.audit_report() == []
    finally:
        hv.close()


def _through_pipe(mtype: int, seq: int, *parts) -> tuple[int, int, bytes]:
    """One message as the hypervisor's reader gets it from a guest's pipe."""
    r, w = os.pipe()
    try:
        os.writev(w, pipe.pipe_message(mtype, seq, *parts))
        reader = pipe.pipe_reader(r, to_hv=True)
        msgs, _ = reader.pump(limit=1)
        (got_type, got_seq, _), body = msgs[0]
        return got_type, got_seq, body
    finally:
        os.close(r)
        os.close(w)


def test_a_batch_split_in_chunks_with_enomem_between_them_applies_every_item_once(world):
    hv, spy, writes, lot, ring, g, free = world
    gfns = np.array([3, 1, 4, 5, 9, 2, 6, 8])
    pages = np.arange(len(gfns), dtype=np.uint8)[:, None].repeat(PAGE_SIZE, 1) + 1
    writes.message(g, *_through_pipe(pipe.G_WRITE_PAGES, 7, *pipe.encode_write_pages(gfns, pages)))
    assert g.replies == [] and spy.applied() == []             # no frame: parked, nothing applied
    assert hv.domains[g.domid].state == "paused" and g.notices == [pipe.H_PAUSE]
    assert [e["event"] for e in ring.events] == ["enomem"]
    assert ring.events[-1]["gfn"] == 3 and ring.events[-1]["pages"] == 8 and ring.events[-1]["needed"] == 8

    free("small")                                              # two frames: one chunk
    writes.retry()
    assert spy.applied() == [3, 1] and g.replies == []         # stopped after the chunk, still parked
    assert lot.parked[g.domid].writes[0].done == 2
    writes.retry()                                             # no frame freed since: not even tried
    assert spy.applied() == [3, 1] and len(spy.calls) == 3

    free("mid")                                                # six more: the rest
    writes.retry()
    assert spy.applied() == list(gfns)                         # each once, in order
    assert g.replies == [(7, 0, 8)] and g.notices == [pipe.H_PAUSE, pipe.H_UNPAUSE]
    assert (g.writes, g.batch_writes, g.batch_pages, g.cow_faults) == (1, 1, 8, 8)
    assert writes.cow_faults == 8 and lot.parked == {} and hv.pool.nfree == 0
    assert hv.domains[g.domid].state == "running"
    assert [e["event"] for e in ring.events] == ["enomem", "resumed"]
    for i, gfn in enumerate(gfns):
        assert hv.read(g.domid, int(gfn)) == bytes([i + 1]) * PAGE_SIZE


def test_small_writes_in_chunks_keep_their_order_across_a_park(world):
    hv, spy, writes, lot, ring, g, free = world
    # gfn 5 written in the first chunk and again in the last: the later wins
    gfns, offsets, lengths = [5, 6, 7, 5], [0, 0, 0, 0], [3, 1, 1, 2]
    writes.message(g, *_through_pipe(pipe.G_WRITE_MANY, 9,
                                     *pipe.encode_write_many(gfns, offsets, lengths, b"abcdeXY")))
    assert spy.applied() == []
    free("small")
    writes.retry()
    assert spy.applied() == [5, 6] and g.replies == []
    assert ring.events[-1]["event"] == "enomem"
    free("mid")
    writes.retry()
    assert spy.applied() == gfns and g.replies == [(9, 0, 3)]  # three shared gfns, three faults
    assert (g.writes, g.batch_writes, g.batch_pages, g.cow_faults) == (1, 1, 4, 3)
    assert hv.read(g.domid, 5)[:3] == b"XYc" and hv.read(g.domid, 6)[:1] == b"d"


def test_a_single_write_and_the_writes_behind_it_wait_in_order(world):
    hv, spy, writes, lot, ring, g, free = world
    buf = bytearray(b"first")                                  # the guest table's read buffer
    writes.single(g, 1, 10, 100, memoryview(buf))              # the fast decoder's entry
    assert g.replies == [] and list(lot.parked) == [g.domid]
    buf[:] = b"FIRST"                                          # reused by the next read
    writes.message(g, *_through_pipe(pipe.G_WRITE, 2, pipe.WRITE.pack(10, 0), b"again"))
    assert len(lot.parked[g.domid].writes) == 2 and g.replies == []     # queued behind it
    free("small")
    writes.retry()
    assert g.replies == [(1, 0, 1), (2, 0, 0)]                 # a fault, then a plain write
    assert (g.writes, g.cow_faults, g.batch_writes) == (2, 1, 0)
    page = hv.read(g.domid, 10)
    assert page[100:105] == b"first" and page[:5] == b"again"
    assert ring.events[-1]["event"] == "resumed" and ring.events[-1]["gfn"] == 10


def test_a_paused_domains_write_is_held_then_applied_when_it_runs(world):
    hv, spy, writes, lot, ring, g, free = world
    free("small")
    hv.domains[g.domid].state = "paused"
    writes.single(g, 4, 0, 0, b"held")
    assert g.replies == [] and g.domid in lot.held and lot.parked == {}
    hv.domains[g.domid].state = "running"
    writes.release_held(g.domid)
    assert g.replies == [(4, 0, 1)] and hv.read(g.domid, 0)[:4] == b"held"
    assert g.domid not in lot.held


def test_a_refused_write_is_answered_with_its_error_and_not_counted(world):
    hv, spy, writes, lot, ring, g, free = world
    writes.single(g, 3, PAGES + 1, 0, b"x")                    # outside the domain
    assert g.replies[-1][0] == 3 and g.replies[-1][1] != 0 and g.writes == 0
    with pytest.raises(errors.ProtocolError):
        writes.message(g, pipe.G_WRITE_PAGES, 5, b"\x01")     # malformed: the guest crashes
    assert lot.parked == {}


def test_a_cursor_stops_where_asked_and_continues(world):
    hv, spy, writes, lot, ring, g, free = world
    free("mid")
    gfns = np.arange(6)
    w = GuestWrite(pipe.G_WRITE_PAGES, 1, gfns, None, None, np.zeros((6, PAGE_SIZE), np.uint8))
    assert w.advance(spy, g.domid, 2, stop=lambda: True) == 2          # one chunk, then stop
    assert w.advance(spy, g.domid, 2, stop=lambda: False) == 6         # the rest
    assert w.faults == 6 and spy.applied() == list(gfns)
