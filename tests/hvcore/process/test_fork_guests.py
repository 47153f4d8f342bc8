"""VM fork with real processes: a child guest reads its parent's memory
through read faults, writes privately, is reset, forked again and destroyed;
the parent stays paused while it has forks."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from hvshare.tools.client import HypervisorClient
from hvshare.tools.errors import HVCtlError

PAGES = 64


def _free(hv) -> int:
    return hv.info()["frames_free"]


def _entry(hv, domid: int) -> dict:
    return next(d for d in hv.list() if d["domid"] == domid)


@pytest.fixture
def parent(hvs):
    return hvs.create(PAGES, workload="clone", seed=7)


def test_a_fork_reads_its_parent_without_frames(hvs, parent):
    want = hvs.guest(parent).read_pages(np.arange(PAGES))
    free = _free(hvs)
    f = hvs.fork(parent)
    assert {"domid", "parent", "seconds", "wall_seconds", "pid"} <= set(f)
    assert f["parent"] == parent and f["seconds"] <= f["wall_seconds"]
    child = f["domid"]
    assert _entry(hvs, child)["tot_pages"] == _entry(hvs, child)["shr_pages"] == 0
    got = hvs.guest(child).read_pages(np.arange(PAGES))
    assert (got == want).all()
    assert _free(hvs) == free                       # every read shared the parent's frame
    e = _entry(hvs, child)
    assert e["shr_pages"] == PAGES and e["tot_pages"] == 0 and e["parent"] == parent
    assert _entry(hvs, parent)["forks"] == 1 and _entry(hvs, parent)["state"] == "paused"
    assert hvs.audit() == 0


def test_writes_reach_neither_the_parent_nor_a_sibling(hvs, parent):
    a, b = hvs.fork(parent)["domid"], hvs.fork(parent)["domid"]
    before = hvs.read(parent, 3)
    free = _free(hvs)
    ga, gb = hvs.guest(a), hvs.guest(b)
    assert gb.read(3) == before
    ga.write(3, b"sibling a")
    ga.write(4, b"a again")                         # a gfn it never read: a write fault
    assert _free(hvs) == free - 2
    assert ga.read(3)[:9] == b"sibling a"
    assert gb.read(3) == before and gb.read(4) == hvs.read(parent, 4)
    assert hvs.read(parent, 3) == before
    assert hvs.audit() == 0


def test_the_parent_is_paused_and_not_written_while_it_has_forks(hvs, parent):
    child = hvs.fork(parent)["domid"]
    assert _entry(hvs, parent)["state"] == "paused"
    with pytest.raises(HVCtlError) as e:
        hvs.unpause(parent)
    assert e.value.code_name == "EBUSY"
    with pytest.raises(HVCtlError) as e:
        hvs.destroy(parent)
    assert e.value.code_name == "EBUSY" and "forks" in str(e.value)
    assert _entry(hvs, parent)["state"] == "paused"  # the refusal changed nothing
    before = hvs.read(parent, 0)
    done = threading.Event()

    def parent_write():
        hvs.guest(parent).write(0, b"late")
        done.set()
    t = threading.Thread(target=parent_write)
    t.start()
    try:
        assert not done.wait(0.5)                   # the paused vCPU does not run
        assert hvs.read(parent, 0) == before
        assert hvs.guest(child).read(0) == before
        hvs.destroy(child)                          # the last fork: the parent runs
        assert done.wait(10)
    finally:
        t.join(15)
    assert _entry(hvs, parent)["state"] == "running" and _entry(hvs, parent)["forks"] == 0
    assert hvs.read(parent, 0)[:4] == b"late"
    assert hvs.audit() == 0


def test_a_fork_of_a_fork(hvs, parent):
    child = hvs.fork(parent)["domid"]
    hvs.guest(child).write(5, b"middle")
    grand = hvs.fork(child, name="grandchild")
    assert grand["parent"] == child and grand["name"] == "grandchild"
    g = hvs.guest(grand["domid"])
    assert g.read(5)[:6] == b"middle"
    assert g.read(6) == hvs.read(parent, 6)
    g.write(6, b"grand")
    assert hvs.read(child, 5)[:6] == b"middle" and hvs.read(parent, 6)[:5] != b"grand"
    assert _entry(hvs, child)["state"] == "paused" and _entry(hvs, child)["forks"] == 1
    out = hvs.destroy(parent, forks=True)
    assert out["forks_destroyed"] == [grand["domid"], child]
    assert hvs.list() == [] and hvs.audit() == 0


def test_reset_brings_back_the_parent_and_frees_the_frames(hvs, parent):
    child = hvs.fork(parent)["domid"]
    g = hvs.guest(child)
    g.read_pages(np.arange(8))                      # shared entries: they stay
    free = _free(hvs)
    g.write_pages(np.arange(4, 12), np.full((8, 4096), 0xAB, np.uint8))
    assert _free(hvs) == free - 8
    r = hvs.fork_reset(child)
    assert r["domid"] == child and r["pages_dropped"] == 8
    assert _free(hvs) == free
    # gfns 0-3 stay shared; 4-7 were shared, then written: dropped like 8-11
    assert _entry(hvs, child)["tot_pages"] == 0 and _entry(hvs, child)["shr_pages"] == 4
    assert (g.read_pages(np.arange(PAGES)) == hvs.guest(parent).read_pages(np.arange(PAGES))).all()
    with pytest.raises(HVCtlError) as e:
        hvs.fork_reset(parent)
    assert e.value.code_name == "EINVAL"
    assert hvs.audit() == 0


def test_a_paused_fork_reads_once_it_runs(hvs, parent):
    child = hvs.fork(parent, paused=True)["domid"]
    assert _entry(hvs, child)["state"] == "paused"
    got = {}
    t = threading.Thread(target=lambda: got.update(page=hvs.guest(child).read(2)))
    t.start()
    try:
        t.join(0.5)
        assert t.is_alive()                         # its read fault waits, as a write would
        hvs.unpause(child)
    finally:
        t.join(15)
    assert got["page"] == hvs.read(parent, 2)


def test_dedup_and_teardown_on_forks(hvs, parent):
    a, b = hvs.fork(parent)["domid"], hvs.fork(parent)["domid"]
    same = np.full((4, 4096), 0x11, np.uint8)
    hvs.guest(a).write_pages(np.arange(10, 14), same)
    hvs.guest(b).write_pages(np.arange(10, 14), same)
    free = _free(hvs)
    assert hvs.range_share(a, b, 10, 13) == 4
    assert _free(hvs) == free + 4
    assert (hvs.guest(b).read_pages(np.arange(10, 14)) == same).all()
    assert hvs.audit() == 0
    hvs.destroy(a)
    assert (hvs.guest(b).read_pages(np.arange(10, 14)) == same).all()
    hvs.destroy(b)
    assert _entry(hvs, parent)["state"] == "running"
    assert hvs.audit() == 0


def test_the_fuzz_loop_uses_exactly_the_pages_it_writes(hvs, parent):
    k, m = 6, 10
    f = hvs.fork(parent, workload="fuzz", fuzz_writes=k, fuzz_reads=m)
    child = f["domid"]
    assert _entry(hvs, child)["workload"] == "fuzz"
    free = _free(hvs)
    r = hvs.fuzz_run(child)
    assert r["iteration"] == 1 and r["pages_written"] == k and r["pages_read"] == m
    assert _free(hvs) == free - k
    for i in range(2, 6):
        r = hvs.fork_reset(child, run=True)
        assert r["pages_dropped"] == k and r["iteration"] == i
        assert _free(hvs) == free - k
    e = _entry(hvs, child)
    assert e["tot_pages"] == k
    hvs.fork_reset(child)
    assert _free(hvs) == free
    assert hvs.audit() == 0
    with pytest.raises(HVCtlError) as e:
        hvs.fuzz_run(parent)                        # not a fuzz guest
    assert e.value.code_name == "EINVAL"


def test_destroying_a_fork_during_its_run_answers_the_run(hvs, parent):
    child = hvs.fork(parent, workload="fuzz", paused=True)["domid"]
    got = {}

    def run():
        try:
            hvs.fuzz_run(child)
        except HVCtlError as e:
            got["error"] = e
    with HypervisorClient(hvs.socket_path, timeout=30) as other:
        t = threading.Thread(target=run)
        t.start()
        try:
            t.join(0.5)
            assert t.is_alive()                     # paused: its run waits
            other.destroy(child)
        finally:
            t.join(15)
    assert got["error"].code_name == "ECANCELED"
    assert _entry(hvs, parent)["state"] == "running"
    assert hvs.audit() == 0


def test_a_write_fault_without_memory_waits_for_a_frame(hvs, parent):
    child = hvs.fork(parent)["domid"]
    filler = hvs.create(_free(hvs))
    assert _free(hvs) == 0
    done = threading.Event()

    def write():
        hvs.guest(child).write_pages([2, 3], np.full((2, 4096), 7, np.uint8))
        done.set()
    with hvs.events(since=None, timeout=10) as ev:
        t = threading.Thread(target=write)
        t.start()
        try:
            got = ev.wait_for(lambda e: e["event"] == "enomem")
            assert got["domid"] == child and got["needed"] == 2
            assert not done.is_set() and _entry(hvs, child)["state"] == "paused"
            assert hvs.audit() == 0
            hvs.destroy(filler)
            assert ev.wait_for(lambda e: e["event"] == "resumed")["domid"] == child
            assert done.wait(10)
        finally:
            t.join(15)
    assert (hvs.guest(child).read_pages([2, 3]) == 7).all()
    assert hvs.guest(parent).read(2) != bytes([7]) * 4096
    assert hvs.audit() == 0
