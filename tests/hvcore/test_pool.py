"""The frame pool and the p2m segments: real POSIX shared memory."""
from __future__ import annotations

import multiprocessing as mp
import os
import stat

import numpy as np
import pytest

from hvcore import Hypervisor, HVError, shm
from hvcore.errors import ENOMEM
from hvcore.p2m import P2MView
from hvcore.pool import OWNER_FREE, FramePool


def test_segment_is_private_and_unlinked_on_close():
    pool = FramePool(8)
    path = "/dev/shm" + pool.name
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == 8 * 4096
    assert len(pool.name) > 30                    # pid plus a random token
    pool.close()
    assert not os.path.exists(path)
    pool.close()                                  # idempotent


def test_segment_unlinked_when_owner_forgets_to_close():
    pool = FramePool(4)
    path = "/dev/shm" + pool.name
    del pool
    assert not os.path.exists(path)


def test_alloc_free_single_and_batch():
    pool = FramePool(16)
    try:
        a = pool.alloc(owner=1)
        many = pool.alloc_many(10, owner=2)
        assert len(set(many.tolist()) | {a}) == 11 and pool.nfree == 5
        assert (pool.owner[many] == 2).all()
        with pytest.raises(HVError) as e:
            pool.alloc_many(6, owner=3)           # all or nothing
        assert e.value.code == ENOMEM and pool.nfree == 5
        pool.free_many(many)
        pool.free(a)
        assert pool.nfree == 16 and (pool.owner == OWNER_FREE).all()
        with pytest.raises(AssertionError):
            pool.free(a)                          # double free is caught
    finally:
        pool.close()


def _try_write(name, q):
    mm, _ = shm.attach_readonly(name)
    view = np.frombuffer(mm, dtype=np.uint8)
    try:
        view[0] = 1
        q.put("wrote")
    except ValueError as e:                       # numpy refuses a read-only buffer
        q.put(f"refused: {e}")


def test_guest_mapping_is_read_only():
    with Hypervisor(8) as hv:
        hv.create_domain(2)
        q = mp.get_context("spawn").Queue()
        p = mp.get_context("spawn").Process(target=_try_write, args=(hv.pool.name, q))
        p.start()
        p.join(30)
        assert q.get(timeout=5).startswith("refused")


def _reader(pool_name, p2m_name, rounds, q):
    mm, _ = shm.attach_readonly(pool_name)
    data = np.frombuffer(mm, dtype=np.uint8).reshape(-1, 4096)
    view = P2MView(p2m_name)
    torn = 0
    for _ in range(rounds):
        page = np.frombuffer(view.read_page(data, 0), dtype=np.uint8)
        if not (page == page[0]).all():
            torn += 1
    q.put(torn)


def test_seqlock_reader_never_sees_a_torn_page():
    """A reader in another process copies gfn 0 while the hypervisor keeps
    rewriting it in two halves; every page it returns is uniform."""
    with Hypervisor(64) as hv:
        d = hv.create_domain(1)
        other = hv.create_domain(1)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_reader, args=(hv.pool.name, d.p2m.name, 3000, q))
        p.start()
        v = 0
        while p.is_alive():
            v = (v + 1) % 251
            with d.p2m.changing():
                m = int(d.p2m.mfn[0])
                hv.pool.data[m, :2048] = v
                hv.pool.data[m, 2048:] = v
            # and move the page between private and shared frames
            h = hv.nominate(d.domid, 0)
            ho = hv.nominate(other.domid, 0)
            if v % 2:
                hv.share(d.domid, 0, h, other.domid, 0, ho)
            hv.unshare(d.domid, 0)
            if other.p2m.type[0] == 2:
                hv.unshare(other.domid, 0)
        p.join(10)
        assert q.get(timeout=5) == 0
        assert hv.audit() == 0


def test_unlink_stale_removes_only_dead_owners():
    live = FramePool(2)
    fake = "/hvshare-999999999-deadbeefdeadbeef-pool"
    mm = shm.create(fake, 4096)
    mm.close()
    try:
        removed = shm.unlink_stale()
        assert fake in removed and live.name not in removed
        assert live.name in shm.list_segments()
    finally:
        shm.unlink(fake)
        live.close()
