"""Jobs: a create, range_share and unbudgeted batches run a bounded step at
a time, the hypervisor serving everyone else in between, and a stop
cancels them with a clear answer."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from hvshare.tools import api

from waiting import wait_until

#: big enough that its create takes many steps, small enough to be quick
PAGES = 65536


def _create_in_background(s, pages=PAGES, **kw):
    out = {}

    def run():
        with api.HypervisorClient(s.socket_path) as c:
            try:
                out["answer"] = c.create_domain(pages, "clone", seed=3, **kw)
            except api.HVCtlError as e:
                out["error"] = e
    t = threading.Thread(target=run)
    t.start()
    return t, out


def _creating(s):
    return [d for d in s.list() if d["state"] == "creating"]


def test_a_large_create_is_many_steps_and_others_are_served_meanwhile():
    with api.hvshare_session(frames=PAGES + 1024) as s:
        t, out = _create_in_background(s, name="big")
        assert wait_until(lambda: _creating(s), timeout=30, step=0.002)
        (entry,) = _creating(s)
        assert entry["name"] == "big" and entry["pages"] == PAGES
        # served while the create goes on: a ping, the audit, and a
        # refusal for an operation on the domain being made
        assert s.ping() == s.pid
        assert s.call("audit")["errors"] == 0
        with pytest.raises(api.HVCtlError) as e:
            s.pause(entry["domid"])
        assert e.value.code_name == "EBUSY" and "being created" in str(e.value)
        t.join(60)
        assert out["answer"]["domid"] == entry["domid"]
        info = s.info()
        assert info["pause_by_op"]["create"]["count"] > 1
        (d,) = s.list()
        assert d["state"] == "running" and d["tot_pages"] == PAGES
        assert s.call("audit")["errors"] == 0


def test_the_client_sees_a_create_progress():
    with api.hvshare_session(frames=2 * PAGES) as s:
        seen = []
        r = s.create_domain(2 * PAGES - 512, "clone", progress=lambda e: seen.append(e["populated"]))
        assert s.domain(r["domid"])["state"] == "running"
        if seen:            # a fast machine may finish before the first look
            assert seen == sorted(seen) and seen[-1] <= 2 * PAGES - 512


def test_a_stop_cancels_a_create_and_tells_its_client():
    with api.hvshare_session(frames=4 * PAGES) as s:
        t, out = _create_in_background(s, pages=4 * PAGES - 64)
        assert wait_until(lambda: _creating(s), timeout=30, step=0.002)
        s.stop()
        t.join(30)
    if "answer" in out:     # the create won the race: then it was whole
        pytest.skip("the create finished before the stop arrived")
    e = out["error"]
    assert e.code_name == "ECANCELED"
    assert "hypervisor stopped" in str(e) and "create of domain 1" in str(e)


def test_range_share_and_unbudgeted_batches_are_jobs_with_whole_answers(hvs):
    a = hvs.create(4096, "clone", seed=5)
    b = hvs.create(4096, "clone", seed=5)
    r = hvs.call("range_share", sd=a, cd=b, first=0, last=4095)
    assert r["shared"] > 0
    assert hvs.info()["pause_by_op"]["range_share"]["count"] >= 1
    gfns = np.arange(4096, dtype="<i8")
    ans, data = hvs.request("nominate_many", payload=gfns.tobytes(), domid=a, count=4096)
    assert ans["done"] == 4096 and len(data) == 16 * 4096
    # nominating again gives the same handles: the job answered for every gfn
    again, data2 = hvs.request("nominate_many", payload=gfns.tobytes(), domid=a, count=4096,
                               budget_us=1_000_000)
    assert again["done"] == 4096 and data2 == data
    codes = np.frombuffer(data, "<i8", offset=8 * 4096)
    assert (codes == 0).all()
    assert hvs.info()["pause_by_op"]["nominate_many"]["count"] >= 2


def test_destroying_a_domain_being_created_cancels_its_create():
    with api.hvshare_session(frames=4 * PAGES) as s:
        free = s.info()["frames_free"]
        t, out = _create_in_background(s, pages=4 * PAGES - 64)
        assert wait_until(lambda: _creating(s), timeout=30, step=0.002)
        (entry,) = _creating(s)
        r = s.destroy(entry["domid"])
        assert r["domid"] == entry["domid"] and r["entries"] == 0
        t.join(30)
        if "answer" in out:     # the create won the race: the destroy then tore it down
            pytest.skip("the create finished before the destroy arrived")
        assert out["error"].code_name == "ECANCELED" and "destroyed while being created" in str(out["error"])
        assert s.list() == [] and s.info()["frames_free"] == free
        assert s.call("audit")["errors"] == 0
