"""The frame pool and the p2m segments: real POSIX shared memory."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from hvshare.hvcore import Hypervisor, HVError, shm
from hvshare.hvcore.errors import ENOMEM
from hvshare.hvcore.p2m import P2MView
from hvshare.hvcore.constants import OWNER_FREE
from hvshare.hvcore.pool import FramePool


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
        pool.free_many(np.array([a]))
        assert pool.nfree == 16 and (pool.owner == OWNER_FREE).all()
        with pytest.raises(AssertionError):
            pool.free_many(np.array([a]))         # double free is caught
    finally:
        pool.close()


def _run(code: str, *args: str, timeout: float = 60) -> str:
    """Run ``code`` in a fresh Python process (a guest-like reader)."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                         text=True, timeout=timeout, check=True)
    return out.stdout.strip()


_TRY_WRITE = """
import sys, numpy as np
from hvshare.hvcore import shm
mm, _ = shm.attach_readonly(sys.argv[1])
view = np.frombuffer(mm, dtype=np.uint8)
try:
    view[0] = 1
    print("wrote")
except ValueError as e:
    print("refused")
"""


def test_guest_mapping_is_read_only():
    with Hypervisor(8) as hv:
        hv.create_domain(2)
        assert _run(_TRY_WRITE, hv.pool.name) == "refused"


_READER = """
import sys, numpy as np
from hvshare.hvcore import shm
from hvshare.hvcore.p2m import P2MView
mm, _ = shm.attach_readonly(sys.argv[1])
data = np.frombuffer(mm, dtype=np.uint8).reshape(-1, 4096)
view = P2MView(sys.argv[2])
print("ready", flush=True)
torn = 0
for _ in range(int(sys.argv[3])):
    page = np.frombuffer(view.read_page(data, 0), dtype=np.uint8)
    torn += not (page == page[0]).all()
print(torn)
"""


def test_seqlock_reader_never_sees_a_torn_page():
    """A reader in another process copies gfn 0 while the hypervisor keeps
    rewriting it in two halves and moving it between private and shared
    frames; every page it returns is uniform."""
    with Hypervisor(64) as hv:
        d = hv.create_domain(1)
        other = hv.create_domain(1)
        p = subprocess.Popen([sys.executable, "-c", _READER, hv.pool.name, d.p2m.name, "3000"],
                             stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "ready"
            v = 0
            while p.poll() is None:
                v = (v + 1) % 251
                with d.p2m.changing():
                    m = int(d.p2m.mfn[0])
                    hv.pool.data[m, :2048] = v
                    hv.pool.data[m, 2048:] = v
                h = hv.nominate(d.domid, 0)
                ho = hv.nominate(other.domid, 0)
                if v % 2:
                    hv.share(d.domid, 0, h, other.domid, 0, ho)
                hv.unshare(d.domid, 0)
                if other.p2m.type[0] == 2:
                    hv.unshare(other.domid, 0)
            assert int(p.stdout.read().strip()) == 0
        finally:
            p.kill()
            p.wait()
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
