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
from hypothesis import HealthCheck, given, settings, strategies as st

from hvshare.hvcore import errors
from hvshare.hvcore.budget import BATCH_OVERRUN, ChunkCost
from hvshare.hvcore.constants import PAGE_SIZE, STEP_BUDGET_SECONDS
from hvshare.hvcore.core import Hypervisor
from hvshare.hvcore.wire import pipe
from hvshare.hvcore.process.parking import EventRing, ParkingLot
from hvshare.hvcore.process.steps import StepMeter
from hvshare.hvcore.process.writes import GuestWrite, StepPlan, WritePath

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


class EveryChunk:
    """A step plan whose steps are one chunk of ``k`` items each."""

    def __init__(self, k: int):
        self.k = k

    def run(self, w, hv, domid):
        w.advance(hv, domid, self.k, lambda: True)


def loop_turns(writes, most: int = 1000) -> int:
    """The loop's turns for continued writes until none is left (or ``most``); how many ran."""
    for n in range(most):
        g = writes.next_continued()
        if g is None:
            return n
        writes.continue_step(g)
    return most


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
        writes = WritePath(spy, lot, StepMeter(), EveryChunk(2))
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
    pipe.set_pipe_size(r)                   # a batch of pages fits in it
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
    assert spy.applied() == [3, 1] and g.replies == []         # its step: one chunk, then it runs on
    assert hv.domains[g.domid].state == "running" and list(writes.continued) == [g.domid]
    assert loop_turns(writes) == 1                             # the next chunk finds no frame
    assert spy.applied() == [3, 1] and g.replies == [] and list(lot.parked) == [g.domid]
    assert lot.parked[g.domid].writes[0].done == 2 and ring.events[-1]["gfn"] == 4
    writes.retry()                                             # no frame freed since: not even tried
    assert spy.applied() == [3, 1] and len(spy.calls) == 3

    free("mid")                                                # six more: the rest
    writes.retry()
    assert loop_turns(writes) == 2
    assert spy.applied() == list(gfns)                         # each once, in order
    assert g.replies == [(7, 0, 8)]                            # one answer
    assert g.notices == [pipe.H_PAUSE, pipe.H_UNPAUSE] * 2
    assert (g.writes, g.batch_writes, g.batch_pages, g.cow_faults) == (1, 1, 8, 8)
    assert writes.cow_faults == 8 and lot.parked == {} and writes.continued == {} and hv.pool.nfree == 0
    assert hv.domains[g.domid].state == "running"
    assert [e["event"] for e in ring.events] == ["enomem", "resumed"] * 2
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
    loop_turns(writes)
    assert spy.applied() == [5, 6] and g.replies == []
    assert ring.events[-1]["event"] == "enomem"
    free("mid")
    writes.retry()
    loop_turns(writes)
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
    assert g.replies == [(1, 0, 1)]                            # the fault; the next write follows
    assert loop_turns(writes) == 1
    assert g.replies == [(1, 0, 1), (2, 0, 0)]                 # a plain write now
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
    assert g.domid not in lot.held
    assert loop_turns(writes) == 1                             # the loop's next turn
    assert g.replies == [(4, 0, 1)] and hv.read(g.domid, 0)[:4] == b"held"


def test_a_batch_continues_a_chunk_per_step_and_the_writes_behind_it_wait(world):
    hv, spy, writes, lot, ring, g, free = world
    free("mid")                                                # six frames: no ENOMEM
    gfns, offsets, lengths = [0, 1, 2, 3, 4], [0] * 5, [1] * 5
    writes.message(g, *_through_pipe(pipe.G_WRITE_MANY, 1,
                                     *pipe.encode_write_many(gfns, offsets, lengths, b"abcde")))
    assert spy.applied() == [0, 1] and g.replies == [] and list(writes.continued) == [g.domid]
    writes.single(g, 2, 0, 0, memoryview(bytearray(b"Z")))     # behind the batch, not before
    writes.message(g, *_through_pipe(pipe.G_WRITE_PAGES, 3,
                                     *pipe.encode_write_pages([5], np.full((1, PAGE_SIZE), 7, np.uint8))))
    assert g.replies == [] and spy.applied() == [0, 1]
    assert loop_turns(writes) == 4                             # two chunks, the single write, the page
    assert spy.applied() == [0, 1, 2, 3, 4, 5]
    assert g.replies == [(1, 0, 5), (2, 0, 0), (3, 0, 1)]      # one answer each, in order
    assert hv.read(g.domid, 0)[:1] == b"Z" and hv.read(g.domid, 5) == bytes([7]) * PAGE_SIZE
    assert (g.writes, g.batch_writes, g.batch_pages, g.cow_faults) == (3, 2, 6, 6)


def test_a_continued_batch_is_held_while_its_domain_is_paused_and_dropped_when_it_is_gone(world):
    hv, spy, writes, lot, ring, g, free = world
    free("mid")
    writes.message(g, *_through_pipe(pipe.G_WRITE_MANY, 1,
                                     *pipe.encode_write_many([0, 1, 2, 3], [0] * 4, [1] * 4, b"abcd")))
    hv.domains[g.domid].state = "paused"                       # hvctl pause between two steps
    assert loop_turns(writes) == 0 and spy.applied() == [0, 1]
    assert writes.continued == {} and len(lot.held[g.domid][1]) == 1
    hv.domains[g.domid].state = "running"
    writes.release_held(g.domid)
    assert loop_turns(writes) == 1 and g.replies == [(1, 0, 4)] and spy.applied() == [0, 1, 2, 3]

    writes.message(g, *_through_pipe(pipe.G_WRITE_MANY, 2,
                                     *pipe.encode_write_many([4, 5, 6], [0] * 3, [1] * 3, b"xyz")))
    g.closed = True                                            # the domain is destroyed meanwhile
    assert loop_turns(writes) == 0 and writes.continued == {}
    assert spy.applied() == [0, 1, 2, 3, 4, 5] and g.replies == [(1, 0, 4)]


def test_the_step_plan_fills_the_budget_and_gives_way_to_other_work(world):
    hv, spy, writes, lot, ring, g, free = world
    free("mid")
    w = GuestWrite(pipe.G_WRITE_MANY, 1, np.arange(6), np.zeros(6, np.uint32), np.ones(6, np.uint32),
                   np.ones(6, np.uint8))
    StepPlan(lambda: False, budget_s=60.0).run(w, spy, g.domid)       # nothing else waits: all of it
    assert w.done == 6 and len(spy.calls) == 1
    k = 40                                                     # private now, written again and again
    w = GuestWrite(pipe.G_WRITE_MANY, 2, np.arange(k) % 6, np.zeros(k, np.uint32),
                   np.ones(k, np.uint32), np.ones(k, np.uint8))
    plan = StepPlan(lambda: True)                               # others wait, the default budget
    cost = plan.cost[pipe.G_WRITE_MANY] = ChunkCost()
    for _ in range(50):
        cost.learn(64, 64e-4)                                   # an item takes 0.1 ms now
    plan.run(w, spy, g.domid)                                   # one chunk, of the model's size
    assert w.done == cost.items(STEP_BUDGET_SECONDS, BATCH_OVERRUN * STEP_BUDGET_SECONDS) < k
    assert len(spy.calls) == 2
    plan.run(w, spy, g.domid)
    assert len(spy.calls) == 3


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


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_batch_split_at_every_chunk_boundary_with_enomem_and_pauses_between_matches_the_model(data):
    """Against a plain model (gfn -> bytes, writes applied in order): a
    batch and a single write behind it, stepped a chunk at a time while
    frames are freed one or two at a time (ENOMEM between chunks) and the
    domain is paused and unpaused between steps. Every gfn is applied once,
    in order; one answer each, in order; the pages are the model's; audit 0."""
    mtype = data.draw(st.sampled_from([pipe.G_WRITE_MANY, pipe.G_WRITE_PAGES]), label="kind")
    gfns = data.draw(st.lists(st.integers(0, PAGES - 1), min_size=1, max_size=24), label="gfns")
    k = data.draw(st.integers(1, 8), label="chunk")
    single = data.draw(st.integers(0, PAGES - 1), label="single gfn")
    hv = Hypervisor(2 * PAGES)
    try:
        a = hv.create_domain(PAGES).domid
        b = hv.create_domain(PAGES).domid
        hv.range_share(a, b, 0, PAGES - 1)
        fillers = [hv.create_domain(1).domid for _ in range(hv.pool.nfree)]   # one frame each
        spy = Spy(hv)
        lot = ParkingLot(spy, EventRing())
        writes = WritePath(spy, lot, StepMeter(), EveryChunk(k))
        g = Guest(b)
        model = {gfn: bytearray(PAGE_SIZE) for gfn in range(PAGES)}
        n = len(gfns)
        if mtype == pipe.G_WRITE_PAGES:
            pages = (np.arange(n, dtype=np.uint8)[:, None] + 1).repeat(PAGE_SIZE, 1)
            parts = pipe.encode_write_pages(gfns, pages)
            for gfn, page in zip(gfns, pages):
                model[gfn][:] = page.tobytes()
        else:
            lengths = data.draw(st.lists(st.integers(1, 3), min_size=n, max_size=n), label="lengths")
            offsets = [(17 * i) % (PAGE_SIZE - 3) for i in range(n)]
            body = bytes((i % 250) + 1 for i in range(sum(lengths)))
            parts = pipe.encode_write_many(gfns, offsets, lengths, body)
            at = 0
            for gfn, off, ln in zip(gfns, offsets, lengths):
                model[gfn][off:off + ln] = body[at:at + ln]
                at += ln
        model[single][:2] = b"!?"
        writes.message(g, *_through_pipe(mtype, 1, *parts))
        writes.single(g, 2, single, 0, memoryview(bytearray(b"!?")))
        d = hv.domains[b]
        for turn in range(1000):
            if len(g.replies) == 2:
                break
            if lot.parked:
                for _ in range(data.draw(st.integers(1, 2), label="frames freed")):
                    if fillers:
                        hv.destroy_domain(fillers.pop())
                writes.retry()
            elif d.state == "running" and data.draw(st.integers(0, 3), label="pause") == 0:
                d.state = "paused"                              # as hvctl pause does
            elif d.state == "paused":
                d.state = "running"                             # as hvctl unpause does
                writes.release_held(b)
                loop_turns(writes, most=1)
            else:
                loop_turns(writes, most=1)
        assert spy.applied() == gfns                            # every gfn once, in order
        shared = set(gfns)
        assert g.replies == [(1, 0, len(shared)), (2, 0, int(single not in shared))]
        assert (g.writes, g.batch_writes, g.batch_pages) == (2, 1, n)
        assert g.cow_faults == len(shared | {single})
        assert lot.parked == {} and lot.held == {} and writes.continued == {}
        for gfn in range(PAGES):
            assert hv.read(b, gfn) == bytes(model[gfn]), gfn
        assert hv.audit_report() == []
    finally:
        hv.close()
