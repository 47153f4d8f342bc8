"""Processes coming and going: crashed guests, a killed hypervisor, restarts,
stop, and a misbehaving control client."""
from __future__ import annotations

import os
import signal
import socket
import struct
import time

import psutil
import pytest

from hvshare.hvcore import shm
from hvshare.hvcore.statedir import state_dir_for
from hvshare.tools import api


from waiting import wait_until as _wait  # noqa: E402


def test_killed_guest_leaves_a_crashed_domain(hvs):
    a = hvs.create(32, "clone", seed=1)
    b = hvs.create(32, "clone", seed=1)
    hvs.range_share(a, b, 0, 31)
    pid = hvs.domain(a)["pid"]
    os.kill(pid, signal.SIGKILL)
    assert _wait(lambda: hvs.domain(a)["state"] == "crashed", 2.0)
    assert _wait(lambda: hvs.domain(a)["exit"] == "killed by SIGKILL", 2.0)
    d = hvs.domain(a)
    assert d["pages"] == 32 and d["tot_pages"] + d["shr_pages"] == 32     # memory kept
    assert hvs.audit() == 0
    assert hvs.domain(b)["state"] == "running"
    with hvs.guest(b) as g:
        assert len(g.read(0)) == 4096
    saved = hvs.info()["nr_saved_mfns"]
    r = hvs.destroy(a)
    assert r["entries"] == d["shr_pages"]
    assert hvs.info()["nr_saved_mfns"] <= saved


def test_killed_hypervisor_takes_its_guests_and_the_next_start_cleans_up():
    with api.hvshare_session(frames=1024) as s:
        doms = [s.create(16, "zero"), s.create(16, "writer", rate=50)]
        guests = [psutil.Process(s.domain(d)["pid"]) for d in doms]
        old_pid = s.pid
        old_segments = [n for n in shm.list_segments() if shm.owner_pid(n) == old_pid]
        assert len(old_segments) == 3               # the pool and two p2ms
        os.kill(old_pid, signal.SIGKILL)
        s.process.wait()
        t0 = time.monotonic()
        gone, alive = psutil.wait_procs(guests, timeout=1.5)
        assert not alive, "guests outlived their hypervisor"
        assert time.monotonic() - t0 < 1.5
        with pytest.raises(api.NoHypervisor):
            s.list()
        # the dead hypervisor's socket and segments are still there ...
        assert os.path.exists(s.socket_path)
        assert all(n in shm.list_segments() for n in old_segments)
        # ... until the next start on that socket removes them
        proc = api.start_hypervisor(s.socket_path, frames=1024)
        try:
            assert proc.cleaned == {"sockets": 1, "segments": 3} or proc.cleaned["segments"] >= 3
            assert not any(n in shm.list_segments() for n in old_segments)
            with api.HypervisorClient(s.socket_path) as c:
                assert c.ping() == proc.pid
                c.create(8, "zero")
                assert c.audit() == 0
                assert c.stop()["stopped"]
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_second_start_on_a_live_socket_fails(hvs):
    with pytest.raises(api.HVCtlError, match="already running"):
        api.start_hypervisor(hvs.socket_path, frames=64)
    assert hvs.ping() == hvs.pid


def test_hypervisor_runs_real_time_and_its_guests_do_not(hvs):
    # A guest must never preempt a hypervisor step; guests stay ordinary.
    sched = hvs.info()["sched"]
    policy = os.sched_getscheduler(hvs.pid) & ~getattr(os, "SCHED_RESET_ON_FORK", 0)
    if sched != "fifo":
        assert sched == "normal (fifo not permitted)" and policy == os.SCHED_OTHER
        pytest.skip("real-time scheduling is not permitted here")
    assert policy == os.SCHED_FIFO
    pid = hvs.create_domain(8, "zero")["pid"]
    assert os.sched_getscheduler(pid) == os.SCHED_OTHER


def test_normal_scheduling_on_request():
    with api.hvshare_session(frames=64, sched="normal") as s:
        assert os.sched_getscheduler(s.pid) == os.SCHED_OTHER
        assert s.info()["sched"] == "normal"


def test_stop_removes_guests_segments_and_sockets():
    with api.hvshare_session(frames=512) as s:
        pids = [s.create_domain(16, "zero")["pid"] for _ in range(2)]
        mine = [n for n in shm.list_segments() if shm.owner_pid(n) == s.pid]
        assert len(mine) == 3
        assert s.audit() == 0
        r = s.stop()
        assert r == {"stopped": True, "guests": 2, "segments": 3}
        s.process.wait(timeout=5)
        assert not any(psutil.pid_exists(p) for p in pids)
        assert not [n for n in shm.list_segments() if shm.owner_pid(n) == s.pid]
        assert not os.path.exists(s.socket_path)
        assert not os.path.exists(state_dir_for(s.socket_path))


def test_session_cleans_up_after_an_exception():
    with pytest.raises(RuntimeError):
        with api.hvshare_session(frames=256) as s:
            s.create(8, "zero")
            pid, directory = s.pid, s.directory
            raise RuntimeError("boom")
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not os.path.exists(directory)


def test_control_socket_survives_bad_clients(hvs):
    # garbage header: an oversized JSON part
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(hvs.socket_path)
        s.sendall(struct.pack("<II", 1 << 30, 0))
        s.settimeout(5)
        assert b"JSON part" in s.recv(4096)
    # not JSON; then a client that vanishes mid-frame
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(hvs.socket_path)
        s.sendall(struct.pack("<II", 5, 0) + b"hello")
        s.settimeout(5)
        assert b"not valid JSON" in s.recv(4096)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(hvs.socket_path)
        s.sendall(struct.pack("<II", 100, 0) + b"{")
    for bad, match in (({"op": "create"}, "needs pages unless it reads a process or a file"),
                       ({"op": "create", "pages": -1}, "between"),
                       ({"op": "create", "pages": 8, "colour": "red"}, "no argument 'colour'"),
                       ({"op": "create", "pages": 8, "workload": "bogus"}, "unknown workload"),
                       ({"op": "nominate", "domid": 7, "gfn": 0}, "no domain with id 7"),
                       ({"op": "reboot"}, "unknown operation")):
        with pytest.raises(api.HVCtlError, match=match):
            hvs.call(**bad)
    assert os.stat(hvs.socket_path).st_mode & 0o777 == 0o600
    assert os.stat(state_dir_for(hvs.socket_path)).st_mode & 0o777 == 0o700
    assert hvs.ping() == hvs.pid


def test_sharing_hypercalls_over_the_socket(hvs):
    import numpy as np
    a = hvs.create(16, "zero")
    b = hvs.create(16, "zero")
    sh = hvs.nominate(a, 0)
    ch = hvs.nominate(b, 0)
    assert sh == 2 and ch == 3                      # Xen's first handle is 2
    with pytest.raises(api.HVCtlError) as e:
        hvs.share(a, 0, sh + 100, b, 0, ch)
    assert e.value.code == -10 and e.value.code_name == "S_HANDLE_INVALID"
    hvs.share(a, 0, sh, b, 0, ch)
    assert hvs.info()["nr_saved_mfns"] == 1
    hs, codes = hvs.nominate_many(a, np.arange(1, 8))
    hc, codes2 = hvs.nominate_many(b, np.arange(1, 8))
    assert (codes == 0).all() and (codes2 == 0).all()
    out = hvs.share_many(a, np.arange(1, 8), hs, b, np.arange(1, 8), hc)
    assert (out == 0).all() and hvs.info()["nr_saved_mfns"] == 8
    c = hvs.create(16, "zero")                      # per-pair domains: one request, two clients
    hc, _ = hvs.nominate_many(c, [0, 1])
    hb9, _ = hvs.nominate_many(b, [9])
    out = hvs.share_many([a, b], [0, 9], [sh, int(hb9[0])], [c, c], [0, 1], hc)
    assert (out == 0).all()
    assert [d["shr_pages"] for d in hvs.list() if d["domid"] == c] == [2]
    assert hvs.unshare(b, 3) is True
    assert hvs.range_share(a, b, 8, 15) == 8
    assert hvs.domain(b)["shr_pages"] == 15


def test_a_repeated_request_frame_is_checked_once_and_the_memo_stays_bounded(tmp_path):
    # The kill controller sends one destroy frame thousands of times.
    from hvshare.hvcore import errors
    from hvshare.hvcore.process.clients import KNOWN_FRAMES as _KNOWN_FRAMES
    from hvshare.hvcore.process.loop import HypervisorProcess
    clients = HypervisorProcess(str(tmp_path / "hv.sock")).clients
    empty = memoryview(b"")
    body = b'{"op":"destroy","domid":3,"brief":true}'
    first = clients.check({"op": "destroy", "domid": 3, "brief": True}, empty, body)
    assert first[:2] == ("destroy", {"domid": 3, "brief": True}) and clients.known[body] == first
    for i in range(3 * _KNOWN_FRAMES):
        clients.check({"op": "destroy", "domid": i}, empty, b'{"op":"destroy","domid":%d}' % i)
        assert len(clients.known) <= _KNOWN_FRAMES
    with pytest.raises(errors.ProtocolError):
        clients.check({"op": "destroy"}, empty, b'{"op":"destroy"}')
    assert b'{"op":"destroy"}' not in clients.known
    clients.check({"op": "ping"}, empty, None)              # a frame with a payload: not kept
    assert all(v[0] == "destroy" for v in clients.known.values())


def test_real_time_hypervisor_idles_between_steps_before_the_kernel_would_stop_it():
    # The kernel stops real-time tasks that run more than its share of a
    # second; the hypervisor holds control requests first, between steps,
    # not in one, and goes on serving guests; only guest work past the
    # slack idles the whole loop.
    from hvshare.hvcore.process.pacing import PACE_GUEST_SLACK, PACE_WINDOW, Pacer
    cpu = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        time.sleep(s)
    pacer = Pacer(0.5, cpu=lambda: cpu[0], sleep=sleep)     # the loop's CPU time, simulated
    assert pacer.hold() == 0.0                    # opens a window
    time.sleep(0.6 * PACE_WINDOW)
    cpu[0] += 0.4 * PACE_WINDOW
    assert pacer.hold() == 0.0                    # 40 %: goes on
    assert pacer.paced == [0, 0.0]
    cpu[0] += 0.12 * PACE_WINDOW
    hold = pacer.hold()                           # 52 %: control waits out the window
    assert slept == [] and 0 < hold <= 0.4 * PACE_WINDOW      # held, not idled
    assert pacer.paced[0] == 1 and 0 < pacer.paced[1] <= hold
    assert 0 < pacer.hold() <= hold               # the same hold, counted once
    assert pacer.paced[0] == 1
    cpu[0] += PACE_GUEST_SLACK * PACE_WINDOW
    assert pacer.hold() == 0.0                    # guests alone past the slack: idles
    assert len(slept) == 1 and 0 < slept[0] <= hold           # the rest of the window
    assert pacer.hold() == 0.0                    # a new window: goes on
    assert pacer.paced[0] == 1
