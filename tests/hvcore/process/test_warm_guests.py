"""Warm guests: creates and forks get a guest process started before them,
from the stock the hypervisor refills; no stock guest outlives its
hypervisor, stopped or killed."""
from __future__ import annotations

import os
import signal
import time

import psutil

from hvshare.tools import api, session

from waiting import wait_until


def _stock(hv) -> dict:
    return hv.info()["warm_guests"]


def _full(hv) -> dict:
    """The stock once every guest in it is warm."""
    assert wait_until(lambda: (lambda w: w["warm"] == w["size"] > 0)(_stock(hv)), 30)
    return _stock(hv)


def _gone(pids) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def test_a_create_takes_a_warm_guest_and_the_stock_is_refilled(hvs):
    before = _full(hvs)
    t_request = time.time()
    d = hvs.create_domain(pages=64, workload="clone", seed=3)
    assert d["pid"] in before["pids"]
    assert psutil.Process(d["pid"]).create_time() < t_request     # started before the create
    assert hvs.guest(d["domid"]).stats()["pid"] == d["pid"]
    after = _full(hvs)
    assert after["taken_warm"] == before["taken_warm"] + 1 and after["cold"] == 0
    assert d["pid"] not in after["pids"] and len(after["pids"]) == after["size"]
    assert after["zygote_pid"] == before["zygote_pid"]


def test_a_fork_takes_a_warm_guest(hvs):
    parent = hvs.create(64, workload="clone", seed=3)
    before = _full(hvs)
    t_request = time.time()
    f = hvs.fork(parent)
    assert f["pid"] in before["pids"]
    assert psutil.Process(f["pid"]).create_time() < t_request
    assert psutil.Process(f["pid"]).ppid() == hvs.pid            # adopted: the hypervisor reaps it
    assert (hvs.guest(f["domid"]).read_pages([0, 63]) == hvs.guest(parent).read_pages([0, 63])).all()
    hvs.destroy(f["domid"])
    _full(hvs)


def test_a_warm_guest_that_crashes_reports_its_exit_status(hvs):
    _full(hvs)
    d = hvs.create_domain(pages=16, workload="clone", seed=1)
    os.kill(d["pid"], signal.SIGKILL)
    assert wait_until(lambda: hvs.domain(d["domid"])["state"] == "crashed", 10)
    # its status, once reaped (at once, or at the next tick on a busy machine)
    assert wait_until(lambda: hvs.domain(d["domid"])["exit"] == "killed by SIGKILL", 5), hvs.domain(d["domid"])
    hvs.destroy(d["domid"])


def test_a_stock_guest_that_dies_is_replaced(hvs):
    before = _full(hvs)
    victim = before["pids"][0]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: victim not in _stock(hvs)["pids"], 10)
    after = _full(hvs)
    assert victim not in after["pids"] and _gone([victim])
    d = hvs.create_domain(pages=16, workload="zero")
    assert d["pid"] in after["pids"]


def test_without_its_zygote_the_stock_starts_guests_cold(hvs):
    before = _full(hvs)
    os.kill(before["zygote_pid"], signal.SIGKILL)
    assert wait_until(lambda: _stock(hvs)["zygote_pid"] is None, 10)
    for _ in range(before["size"]):             # the forked guests go first
        hvs.create(16, workload="zero")
    after = _full(hvs)
    cold = [psutil.Process(pid).cmdline() for pid in after["pids"]]
    assert all("hvshare.guests.runtime" in cmd for cmd in cold), cold
    d = hvs.create_domain(pages=16, workload="zero")
    assert d["pid"] in after["pids"]
    assert hvs.guest(d["domid"]).stats()["pid"] == d["pid"]


def test_a_stopped_hypervisor_leaves_no_idle_guest():
    with api.hvshare_session(frames=256) as hv:
        w = _full(hv)
        idle = w["pids"] + [w["zygote_pid"]]
        assert not _gone(idle)
    assert wait_until(lambda: _gone(idle), 5)


def test_a_killed_hypervisor_leaves_no_idle_guest():
    sock = os.path.join(session.SESSION_ROOT, f"w{os.getpid()}", "hv.sock")
    proc = api.start_hypervisor(sock, frames=256)
    try:
        with api.HypervisorClient(sock) as c:
            w = _full(c)
            d = c.create_domain(pages=16, workload="zero")
            w = _full(c)
        idle = w["pids"] + [w["zygote_pid"], d["pid"]]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert wait_until(lambda: _gone(idle), 3)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        api.cleanup_dead(sock)
