"""Domain teardown on a real hypervisor: the preemptible destroy, the kill
controller (``hvctl destroy``), resuming after the controller is killed,
guests faulting while a domain dies, and nothing leaked in the end."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from hvshare.hvcore import images
from hvshare.hvcore.errors import EBUSY, ESRCH
from hvshare.perf.teardown import heavy_domain
from hvshare.tools import api, killctl

DESTROY_KEYS = {"domid", "seconds", "entries", "continuations", "max_pause_ms"}

from waiting import wait_until as _wait  # noqa: E402


def _entry(hv, domid):
    return next(d for d in hv.list() if d["domid"] == domid)


def _hvctl(socket, *args, **kw):
    return subprocess.Popen([sys.executable, "-m", "hvshare.tools.hvctl", *args, "--socket", socket],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _all_free(hv):
    i = hv.info()
    return i["frames_free"] == i["frames_total"] and i["nr_shared_mfns"] == 0 and i["nr_saved_mfns"] == 0


# ----------------------------------------------------------------------


def test_killed_controller_leaves_the_domain_dying_and_a_second_one_finishes():
    n = 40_000
    with api.hvshare_session(frames=n + 1024, rmap="list") as hv:     # a teardown that lasts
        d, other = heavy_domain(hv, n)
        guest_pid = _entry(hv, d)["pid"]
        ctl = _hvctl(hv.socket_path, "destroy", str(d), "--json")
        try:
            # Kill the controller as soon as the teardown is under way.
            assert _wait(lambda: _entry(hv, d).get("cursor", 0) > 0, 30, 0.005), "teardown never started"
            ctl.send_signal(signal.SIGKILL)
        finally:
            ctl.wait()
        assert ctl.returncode == -signal.SIGKILL, "the controller finished before it was killed"
        time.sleep(0.05)            # the step in flight, if any, ends
        left = _entry(hv, d)
        assert left["state"] == "dying" and left["phase"] == "shared", left
        assert 0 < left["cursor"] < n and 0 < left["relinquished"] < n, left
        assert left["pid"] is None and _wait(lambda: not _alive(guest_pid), 3)
        assert hv.audit() == 0
        with pytest.raises(api.HVCtlError) as e:
            hv.nominate(d, n - 1)
        assert e.value.code == EBUSY
        text = subprocess.run([sys.executable, "-m", "hvshare.tools.hvctl", "list", "--socket", hv.socket_path],
                              capture_output=True, text=True, timeout=60).stdout
        assert "dying" in text

        p = subprocess.run([sys.executable, "-m", "hvshare.tools.hvctl", "destroy", str(d), "--json",
                            "--socket", hv.socket_path], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        r = json.loads(p.stdout)
        assert DESTROY_KEYS <= set(r)
        assert r["domid"] == d and r["resumed"] is True
        assert r["entries"] == n                      # the whole teardown's, across both controllers
        assert r["continuations"] > 0 and r["max_pause_ms"] > 0
        assert d not in {x["domid"] for x in hv.list()}
        assert _entry(hv, other)["shr_pages"] == 4 and hv.audit() == 0
        hv.destroy(other)
        assert _all_free(hv), hv.info()


@pytest.mark.parametrize("mode", ["preemptible", "monolithic"])
@pytest.mark.parametrize("rmap", ["list", "buckets", "index"])
def test_every_frame_comes_back(rmap, mode):
    """Heavy sharing, clone sharing, CoW copies, a crashed guest: once every
    domain is destroyed the pool is whole again, audit 0 at every step."""
    with api.hvshare_session(frames=8192, rmap=rmap, teardown=mode) as hv:
        heavy, other = heavy_domain(hv, 1500, also=8)
        a = hv.create(512, "clone", seed=3)
        b = hv.create(512, "clone", seed=3)
        runs = images.shareable_runs(3, 512)
        for f, l in runs:
            hv.range_share(a, b, f, l)
        with hv.guest(b) as g:
            assert g.write(runs[0][0], b"copy on write") is True
        crashed = hv.create(64, "clone", seed=3)
        for f, l in images.shareable_runs(3, 64):
            hv.range_share(a, crashed, f, l)
        os.kill(_entry(hv, crashed)["pid"], signal.SIGKILL)
        assert _wait(lambda: _entry(hv, crashed)["state"] == "crashed", 5)
        assert hv.audit() == 0
        expected = {x["domid"]: x["shr_pages"] for x in hv.list()}
        for d in (heavy, b, crashed, a, other):
            r = hv.destroy(d)
            assert r["entries"] == expected[d]
            if mode == "monolithic":
                assert r["continuations"] == 0 and r["steps"] == 1
            assert hv.audit() == 0
        assert hv.list() == []
        assert _all_free(hv), hv.info()


def test_guests_fault_during_a_teardown_and_their_writes_land():
    n = 60_000
    pages = 256
    with api.hvshare_session(frames=n + 4 * pages + 1024, rmap="list") as hv:     # a teardown that lasts
        victim, other = heavy_domain(hv, n)
        writers = [hv.create(pages, "zero") for _ in range(2)]
        twin = hv.create(pages, "zero")
        for w in writers:
            assert hv.range_share(twin, w, 0, pages - 1) == pages
        result = {}
        ctl = threading.Thread(target=lambda: result.update(hv_destroy(hv.socket_path, victim)))
        written = {w: {} for w in writers}
        during = 0
        rng = np.random.default_rng(7)
        guests = {w: hv.guest(w) for w in writers}
        try:
            ctl.start()
            assert _wait(lambda: _entry(hv, victim).get("cursor", 0) > 0 or "domid" in result, 30, 0.002)
            gfn = 0
            while ctl.is_alive() and gfn < pages:
                for w, g in guests.items():
                    data = images.random_pages(rng, 1)[0]
                    assert g.write(gfn, data.tobytes()) is True          # a CoW fault, answered
                    written[w][gfn] = data
                    during += ctl.is_alive()
                gfn += 1
            ctl.join(120)
            assert not ctl.is_alive()
            assert during >= 10, "no fault overlapped the teardown"
            assert result["continuations"] > 0 and result["entries"] == n
            for w, g in guests.items():
                gfns = np.array(sorted(written[w]), dtype=np.int64)
                want = np.stack([written[w][x] for x in gfns.tolist()])
                assert (g.read_pages(gfns) == want).all()                 # the guest's own mapping
                assert all(hv.read(w, int(x)) == written[w][int(x)].tobytes() for x in gfns[:16])
        finally:
            for g in guests.values():
                g.close()
            ctl.join(120)
        with hv.guest(twin) as g:                                            # CoW kept the twin apart
            assert not g.read_pages(np.arange(pages)).any()
        assert hv.audit() == 0
        for d in (*writers, twin, other):
            hv.destroy(d)
        assert _all_free(hv), hv.info()


def hv_destroy(socket_path, domid):
    with api.HypervisorClient(socket_path, timeout=None) as c:
        return c.destroy(domid)


def test_dying_domain_refuses_nominate_and_shows_its_cursor():
    n = 20_000
    with api.hvshare_session(frames=n + 1024, rmap="buckets") as hv:
        d, other = heavy_domain(hv, n)
        spare = hv.create(16, "zero")
        first = hv.destroy_step(d)
        assert first["done"] is False and first["state"] == "dying" and first["resumed"] is False
        assert 0 < first["cursor"] < n and first["entries"] == first["cursor"]
        assert first["entries_total"] == n and first["continuations"] == 1
        with pytest.raises(api.HVCtlError) as e:
            hv.nominate(d, n - 1)
        assert e.value.code == EBUSY and "dying" in str(e.value)
        _, codes = hv.nominate_many(d, [n - 2, n - 1])
        assert (codes == EBUSY).all()
        with pytest.raises(api.HVCtlError):
            hv.pause(d)
        # nothing can be mapped into it either (gfn 0 is a hole behind the cursor)
        h = hv.nominate(spare, 0)
        with pytest.raises(api.HVCtlError) as e:
            hv.add_to_physmap(spare, 0, h, d, 0)
        assert e.value.code == EBUSY
        listed = _entry(hv, d)
        assert listed["state"] == "dying" and listed["cursor"] == first["cursor"]
        assert listed["shr_pages"] == n - first["entries"]
        assert hv.audit() == 0
        second = hv.destroy_step(d)
        assert second["resumed"] is True and second["cursor"] >= first["cursor"]
        r = hv.destroy(d)
        assert r["resumed"] is True and r["entries"] == n
        assert r["continuations"] >= 2 and r["steps"] == r["continuations"] + 1
        assert hv.audit() == 0


def test_two_controllers_on_one_domain_exactly_one_reports_the_teardown():
    n = 20_000
    with api.hvshare_session(frames=n + 1024, rmap="list") as hv:     # a teardown that lasts
        d, other = heavy_domain(hv, n)
        results, errors = [], []

        def controller():
            try:
                results.append(hv_destroy(hv.socket_path, d))
            except api.HVCtlError as e:
                errors.append(e)
        threads = [threading.Thread(target=controller) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        # one controller drives and reports every entry; the other is told
        # that another controller runs it, or, if it came late or stopped
        # asking for a while (then the other took over), that it is done
        reports = [r for r in results if not r.get("finished_elsewhere")]
        assert len(reports) == 1 and reports[0]["entries"] == n, (results, errors)
        told = errors + [r for r in results if r.get("finished_elsewhere")]
        assert len(told) == 1, (results, errors)
        if errors:
            assert errors[0].code in (EBUSY, ESRCH), errors
            assert ("another controller" in str(errors[0])) == (errors[0].code == EBUSY)
        else:
            assert told[0]["entries"] < n
        assert d not in {x["domid"] for x in hv.list()} and hv.audit() == 0
        hv.destroy(other)
        assert _all_free(hv)


@pytest.mark.parametrize("mode", ["preemptible", "monolithic"])
def test_continuations_by_mode(mode):
    n = 50_000
    with api.hvshare_session(frames=n + 1024, rmap="index", teardown=mode) as hv:
        d, other = heavy_domain(hv, n)
        r = hv.destroy(d)
        assert r["entries"] == n and hv.audit() == 0
        if mode == "preemptible":
            assert r["continuations"] > 0 and r["steps"] == r["continuations"] + 1
            assert r["max_pause_ms"] < r["hv_seconds"] * 1e3
        else:
            assert r["continuations"] == 0 and r["steps"] == 1
            assert r["max_pause_ms"] == pytest.approx(r["hv_seconds"] * 1e3, rel=0.01)
        assert hv.info()["teardown"] == mode
        hv.destroy(other)
        assert _all_free(hv)


def test_hvctl_destroy_json_and_errors(hvs):
    a = hvs.create(64, "clone", seed=2)
    b = hvs.create(64, "clone", seed=2)
    assert hvs.range_share(a, b, 0, 63) == 64

    def hvctl(*args):
        return subprocess.run([sys.executable, "-m", "hvshare.tools.hvctl", *args, "--socket", hvs.socket_path],
                              capture_output=True, text=True, timeout=60)

    p = hvctl("destroy", str(b), "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert DESTROY_KEYS <= set(r) and r["domid"] == b and r["entries"] == 64 and r["resumed"] is False
    p = hvctl("destroy", str(a))
    assert p.returncode == 0 and p.stdout.startswith(f"domain {a} destroyed in ")
    assert p.stderr == ""                         # not a terminal: no progress bar
    for domid, words in ((b, "already destroyed"), (a, "already destroyed"), (4242, "no domain with id 4242")):
        p = hvctl("destroy", str(domid), "--json")
        assert p.returncode == 1 and p.stdout == ""
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in p.stderr, p.stderr
    with pytest.raises(api.HVCtlError) as e:
        hvs.destroy(b)
    assert e.value.code == ESRCH


def test_progress_bar_only_on_a_terminal(hvs):
    class Tty(io.StringIO):
        def isatty(self):
            return True
    assert killctl.terminal_progress(io.StringIO()) is None
    d, other = heavy_domain(hvs, 2000)
    out = Tty()
    bar = killctl.terminal_progress(out)
    seen = []
    r = hvs.destroy(d, progress=lambda a: (seen.append(a), bar(a)))
    assert r["entries"] == 2000 and seen[-1]["done"] and seen[-1]["state"] == "destroyed"
    assert [a["entries"] for a in seen] == sorted(a["entries"] for a in seen)
    bar.close()


def test_brief_restarts_carry_what_changes_and_progress_sees_every_key():
    # A brief "restart" is small (the kill controller reads thousands); the
    # final answer, and what progress() gets, have every key. (Enough entries
    # that even a quiet machine's growing chunks take several steps.)
    step_keys = {"domid", "done", "phase", "cursor", "entries", "steps", "continuations",
                 "step_ms", "max_pause_ms", "max_pause_cpu_ms", "hv_seconds"}
    with api.hvshare_session(frames=100_000, rmap="buckets", teardown="preemptible") as hv:
        d, other = heavy_domain(hv, 40_000)
        full = hv.call("destroy", domid=d)
        answers = [full]
        while not answers[-1]["done"]:
            answers.append(hv.call("destroy", domid=d, brief=True))
        assert not full["done"] and {"npages", "entries_total", "resumed", "state", "seconds"} <= set(full)
        assert len(answers) > 2 and all(set(a) == step_keys for a in answers[1:-1])
        assert set(answers[-1]) >= step_keys | set(full) and answers[-1]["entries"] == 40_000
        assert [a["entries"] for a in answers] == sorted(a["entries"] for a in answers)
        assert [a["steps"] for a in answers] == list(range(1, len(answers) + 1))
        hv.destroy(other)
        d, other = heavy_domain(hv, 40_000)
        seen = []
        r = hv.destroy(d, progress=seen.append)
        assert r["continuations"] > 0 and len(seen) == r["steps"]
        assert all(set(full) - {"seconds"} <= set(a) for a in seen)
        assert all(a["npages"] == 40_000 and a["entries_total"] == 40_000 for a in seen)
        hv.destroy(other)
        assert hv.audit() == 0 and _all_free(hv)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
