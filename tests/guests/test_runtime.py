"""Guests as real processes: reads from the read-only mapping, writes and
CoW faults through the pipe, isolation of a faulting guest, torn-free reads."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import psutil
import pytest

from hvshare.hvcore import images
from hvshare.hvcore.constants import PAGE_SIZE
from hvshare.tools import api


from waiting import wait_until as _wait  # noqa: E402


def _pair(hvs, pages=128, seed=5):
    """Two clones of one image, shared over the pages they have in common."""
    a = hvs.create(pages, "clone", seed=seed)
    b = hvs.create(pages, "clone", seed=seed)
    runs = images.shareable_runs(seed, pages)
    shared = sum(hvs.range_share(a, b, f, l) for f, l in runs)
    return a, b, runs, shared


def test_guest_reads_what_it_wrote(hvs):
    d = hvs.create(64, "zero")
    with hvs.guest(d) as g:
        assert g.read(3) == bytes(PAGE_SIZE)
        assert g.write(3, b"hello, guest", offset=100) is False     # private page: no fault
        page = g.read(3)
        assert page[100:112] == b"hello, guest" and page[:100] == bytes(100)
        assert hvs.read(d, 3) == page                               # the hypervisor agrees
        rng = np.random.default_rng(1)
        gfns = np.array([0, 7, 63, 9])
        pages = rng.integers(0, 256, (4, PAGE_SIZE), dtype=np.uint8)
        assert g.write_pages(gfns, pages) == 0
        assert (g.read_pages(gfns) == pages).all()
        st = g.stats()
        assert st["writes"] == 2 and st["pages_written"] == 5 and st["cow_faults"] == 0


def test_clone_content_is_deterministic_and_stamped(hvs):
    a = hvs.create(96, "clone", seed=9)
    b = hvs.create(96, "clone", seed=9)
    kinds = images.clone_kinds(9, 96)
    with hvs.guest(a) as ga, hvs.guest(b) as gb:
        pa, pb = ga.read_pages(np.arange(96)), gb.read_pages(np.arange(96))
        assert images.valid_pages(pa).all() and images.valid_pages(pb).all()
        common = kinds != images.KIND_PRIVATE
        assert (pa[common] == pb[common]).all()
        assert (pa[kinds == images.KIND_ZERO] == 0).all()
        if (~common).any():
            assert (pa[~common] != pb[~common]).any(axis=1).all()
        assert (ga.checksum(0, 96) == images.checksums(pa)).all()


def test_write_to_shared_page_breaks_sharing_for_writer_only(hvs):
    a, b, runs, shared = _pair(hvs)
    assert shared > 0
    gfn = runs[0][0] + 1
    info = hvs.info()
    assert info["nr_saved_mfns"] == shared
    with hvs.guest(a) as ga, hvs.guest(b) as gb:
        old = ga.read(gfn)
        assert gb.read(gfn) == old
        assert gb.write(gfn, b"mine", offset=8) is True             # CoW fault
        assert gb.read(gfn)[8:12] == b"mine"
        assert ga.read(gfn) == old                                   # the other sharer: unchanged
        assert gb.write(gfn, b"again", offset=8) is False           # private now: no fault
        doms = {d["domid"]: d for d in hvs.list()}
        assert doms[b]["shr_pages"] == shared - 1 and doms[a]["shr_pages"] == shared
        assert doms[b]["cow_faults"] == 1
        assert hvs.info()["nr_saved_mfns"] == shared - 1
        # one batched message, many faults
        gfns = np.array([g for f, l in runs for g in range(f, l + 1) if g != gfn][:32])
        pages = images.random_pages(np.random.default_rng(2), len(gfns))
        assert gb.write_pages(gfns, pages) == len(gfns)
        assert (gb.read_pages(gfns) == pages).all()
        assert (ga.read_pages(gfns) != pages).any()
        assert hvs.info()["cow_faults"] == 1 + len(gfns)


def test_batched_small_writes_fault_once_each_for_the_writer_only(hvs):
    a, b, runs, shared = _pair(hvs)
    gfns = np.array([g for f, l in runs for g in range(f, l + 1)][:24])
    with hvs.guest(a) as ga, hvs.guest(b) as gb:
        before_a = ga.read_pages(gfns)
        offsets = np.arange(len(gfns)) * 100
        data = bytes(range(1, len(gfns) + 1))
        assert gb.write_many(gfns, offsets, np.ones(len(gfns)), data) == len(gfns)
        after = gb.read_pages(gfns)
        assert (after[np.arange(len(gfns)), offsets] == np.frombuffer(data, np.uint8)).all()
        assert (ga.read_pages(gfns) == before_a).all()
        assert gb.write_many(gfns[:2], [0, 0], [1, 1], b"xy") == 0          # private now
        doms = {d["domid"]: d for d in hvs.list()}
        assert doms[b]["shr_pages"] == shared - len(gfns) and doms[a]["shr_pages"] == shared
        st = gb.stats()
        assert st["cow_faults"] == len(gfns) and st["pages_written"] == len(gfns) + 2
        with pytest.raises(api.HVCtlError) as e:                           # outside the domain
            gb.write_many([0, 10_000], [0, 0], [1, 1], b"xy")
        assert e.value.code == 22
        with pytest.raises(api.HVCtlError):                                # crosses the page
            gb.write_many([0], [4095], [2], b"xy")
        hvs.range_share(a, b, int(gfns[0]), int(gfns[-1]))
        r = gb.time_write_many(int(gfns[0]), 4, batch=3, size=2, offset=5)
        assert r["messages"] == 2 and r["pages"] == 4 and r["cow_faults"] >= 1
        assert gb.read(int(gfns[0]))[5:7] == b"\x01\x01"
    assert hvs.audit() == 0 and hvs.domain(b)["state"] == "running"


def test_bad_guest_requests_fail_cleanly(hvs):
    d = hvs.create(16, "zero")
    with hvs.guest(d) as g:
        with pytest.raises(api.HVCtlError, match="outside"):
            g.write(16, b"x")
        with pytest.raises(api.HVCtlError, match="does not fit"):
            g.write(0, b"x" * 10, offset=4090)
        with pytest.raises(api.HVCtlError, match="outside"):
            g.read(99)
        with pytest.raises(api.HVCtlError, match="unknown operation"):
            g.call("format_disk")
        assert g.write(0, b"still fine") is False


def test_mapping_is_read_only_and_raw_write_kills_only_that_guest(hvs):
    a, b, runs, shared = _pair(hvs, pages=64)
    victim = hvs.create(64, "clone", seed=5)
    pid = hvs.domain(victim)["pid"]
    pool = hvs.info()["pool"]
    with open(f"/proc/{pid}/maps") as f:
        maps = [line.split() for line in f if pool.lstrip("/") in line]
    assert maps and all(m[1] == "r--s" for m in maps)
    with hvs.guest(victim) as gv:
        r = gv.write_mapping(3)
        assert r["refused"], r
        gv.raw_write(3)
    assert _wait(lambda: hvs.domain(victim)["state"] == "crashed")
    assert _wait(lambda: hvs.domain(victim)["exit"] == "killed by SIGSEGV"), hvs.domain(victim)
    assert not psutil.pid_exists(pid)                               # reaped by the hypervisor
    dom = hvs.domain(victim)
    assert dom["tot_pages"] == 64                                   # memory kept until destroy
    # the hypervisor and the other guests go on
    with hvs.guest(b) as gb:
        assert gb.write(runs[0][0], b"after the crash") is True
    with pytest.raises(api.HVCtlError, match="no running guest"):
        hvs.guest(victim)
    with pytest.raises(api.HVCtlError, match="crashed"):
        hvs.unpause(victim)
    r = hvs.destroy(victim)
    # (a preemptible teardown may restart if the other guest reports meanwhile)
    assert r["domid"] == victim and r["entries"] == dom["shr_pages"]
    assert victim not in {d["domid"] for d in hvs.list()}


def test_reader_never_sees_a_torn_page(hvs):
    """A guest checks the stamp of every page in a loop while the hypervisor
    shares its pages away, unshares them, and it is written to."""
    pages, seed = 256, 11
    # a's own writer thread rewrites its pages in place and takes CoW faults
    a = hvs.create(pages, "writer", seed=seed, rate=4000, batch=16)
    b = hvs.create(pages, "clone", seed=seed)
    runs = images.shareable_runs(seed, pages)
    result = {}

    def reader():
        with hvs.guest(a) as g:
            result["verify"] = g.verify(0, pages, seconds=2.0)

    t = threading.Thread(target=reader)
    t.start()
    rng = np.random.default_rng(3)
    with api.HypervisorClient(hvs.socket_path) as c, hvs.guest(a) as ga, hvs.guest(b) as gb:
        rounds = 0
        while t.is_alive():
            for f, l in runs:
                c.range_share(b, a, f, l)       # a is the client: its frames are freed
            gfns = rng.choice(pages, 48, replace=False)
            gb.write_pages(gfns[:16], images.random_pages(rng, 16))   # reuses freed frames
            for g in gfns[16:32].tolist():
                try:
                    c.unshare(a, g)
                except api.HVCtlError:
                    pass                        # not shared (private extent)
            ga.write_pages(gfns[32:], images.random_pages(rng, 16))   # in-place writes
            rounds += 1
    t.join()
    v = result["verify"]
    assert rounds >= 3 and v["rounds"] >= 3
    assert v["bad"] == 0, v


def test_writer_workload_reports_faults(hvs):
    base = hvs.create(256, "clone", seed=4)
    w = hvs.create(256, "writer", seed=4, paused=True, rate=400, batch=4)
    assert hvs.range_share(base, w, 0, 255) == 256
    time.sleep(0.3)
    assert hvs.domain(w)["pages_written"] == 0                      # paused: not a single write
    with hvs.guest(w) as gw:
        hvs.unpause(w)
        assert _wait(lambda: hvs.domain(w)["fault_p50_us"] is not None, timeout=5)
        hvs.pause(w)
        st = gw.stats()
    d = hvs.domain(w)
    assert d["state"] == "paused" and d["cow_faults"] > 0 and d["workload"] == "writer"
    assert st["cow_faults"] > 0 and st["fault_p99_us"] >= st["fault_p50_us"] > 0
    assert hvs.info()["cow_faults"] == d["cow_faults"]


def test_guest_dies_with_its_pipe(hvs):
    """A guest whose hypervisor closes its pipe (or dies) exits at once."""
    d = hvs.create(16, "zero")
    pid = hvs.domain(d)["pid"]
    hvs.destroy(d)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE \
        or _wait(lambda: not psutil.pid_exists(pid), 2)
    assert not os.path.exists(os.path.join(os.path.dirname(hvs.socket_path), "hv.d", f"guest-{d}.sock"))


def test_pause_unpause_rings_the_guest_without_harm(hvs):
    """Pause and unpause arrive as pipe messages plus SIGUSR1; whichever guest
    thread the kernel hands the signal to, the guest lives on and obeys."""
    w = hvs.create(64, "writer", seed=2, rate=2000, batch=4)
    pid = hvs.domain(w)["pid"]
    for _ in range(10):
        hvs.pause(w)
        time.sleep(0.02)
        hvs.unpause(w)
        time.sleep(0.02)
    hvs.pause(w)
    with hvs.guest(w) as g:
        # the guest learns of the pause through its pipe and a doorbell:
        # soon after the answer, not before it
        assert _wait(lambda: g.stats()["paused"] is True, timeout=5)
        n = g.stats()["writes"]
        time.sleep(0.2)
        assert g.stats()["writes"] == n                 # paused: no more writes
        hvs.unpause(w)
        assert _wait(lambda: g.stats()["writes"] > n)
    assert hvs.domain(w)["state"] == "running" and psutil.pid_exists(pid)


def test_a_read_larger_than_one_answer_comes_in_pieces_and_a_raw_one_is_refused():
    pages = 20_000                      # 78 MiB: more than one control frame carries
    with api.hvshare_session(frames=pages + 64) as hv:
        d = hv.create(pages, "clone", seed=5)
        with hv.guest(d) as g:
            got = g.read_pages(np.arange(pages))
            sums = g.checksum(0, pages)
            for gfn in (0, 1, 16_383, 16_384, pages - 1):
                assert got[gfn].tobytes() == g.read(gfn)
            assert len(got) == pages and len(sums) == pages
            gfns = np.arange(pages, dtype="<i8")
            with pytest.raises(api.HVCtlError) as e:
                g.request("read_pages", gfns.tobytes(), count=pages)
            assert "count" in str(e.value)
            assert g.read(3) == got[3].tobytes()          # the guest is still there
        assert hv.audit() == 0


def test_a_paused_domains_write_waits_for_unpause_then_lands(hvs):
    import threading
    a = hvs.create(8, "clone", seed=4)
    b = hvs.create(8, "clone", seed=4)
    assert hvs.range_share(a, b, 0, 7) == 8
    hvs.pause(b)
    done = {}
    with hvs.guest(b) as g:
        t = threading.Thread(target=lambda: done.setdefault("cow", g.write(3, b"after unpause")))
        t.start()
        t.join(0.5)
        assert t.is_alive() and not done            # a paused vCPU does not run: no answer yet
        assert hvs.domain(b)["shr_pages"] == 8        # and nothing was written
        hvs.unpause(b)
        t.join(10)
        assert done == {"cow": True}
        assert g.read(3)[:13] == b"after unpause"
    with hvs.guest(a) as ga:
        assert ga.read(3)[:13] != b"after unpause"    # the other sharer keeps its page
    hvs.pause(b)
    with hvs.guest(b) as g:                            # destroyed while a write waits
        t = threading.Thread(target=lambda: done.setdefault("error", _catch(lambda: g.write(4, b"x"))))
        t.start()
        t.join(0.3)
        assert t.is_alive()
        hvs.destroy(b)
        t.join(10)
        assert not t.is_alive() and isinstance(done["error"], api.HVCtlError)


def _catch(fn):
    try:
        return fn()
    except Exception as e:
        return e
