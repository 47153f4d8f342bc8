"""Memory pressure: a CoW fault that finds no free frame pauses its domain,
posts ``enomem`` on the sharing event ring, and its write lands as soon as
frames are freed -- never lost, never failed."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from hvshare.tools import api

PAGE = 4096


from waiting import wait_until as _wait  # noqa: E402


def _full_pool(hv, pages=64):
    """Two zero domains sharing every page, and a filler domain taking every
    frame their sharing saved: no frame is free. (a, b, filler)."""
    a = hv.create(pages, "zero")
    b = hv.create(pages, "zero")
    assert hv.range_share(a, b, 0, pages - 1) == pages
    filler = hv.create(hv.info()["frames_free"], "zero")
    assert hv.info()["frames_free"] == 0
    return a, b, filler


class _Write(threading.Thread):
    """A guest write from the guest's control channel, which blocks while
    the domain waits for memory."""

    def __init__(self, hv, domid, gfn=None, data=b"", gfns=None, pages=None):
        super().__init__(daemon=True)
        self.hv, self.domid, self.gfn, self.data, self.gfns, self.pages = hv, domid, gfn, data, gfns, pages
        self.result = self.error = None
        self.start()

    def run(self):
        try:
            with self.hv.guest(self.domid) as g:
                if self.gfns is None:
                    self.result = g.write(self.gfn, self.data, offset=16)
                else:
                    self.result = g.write_pages(self.gfns, self.pages)
        except Exception as e:          # reported by the test
            self.error = e


def test_fault_without_memory_pauses_then_lands_when_memory_is_freed():
    with api.hvshare_session(frames=256) as hv:
        with hv.events(since=None, timeout=10) as ev:
            a, b, filler = _full_pool(hv)
            w = _Write(hv, b, gfn=5, data=b"waits for a frame")
            got = ev.wait_for(lambda e: e["event"] == "enomem")
            assert got["domid"] == b and got["gfn"] == 5 and got["frames_free"] == 0
            assert got["needed"] == 1 and got["time"] > 0
            d = hv.domain(b)
            assert d["state"] == "paused" and d["waiting_for_memory"] and d["parked_writes"] == 1
            time.sleep(0.3)
            assert w.is_alive() and w.error is None         # the write waits, not failed
            assert hv.audit() == 0
            info = hv.info()
            assert info["parked"] == [b] and info["enomem_waits"] == 1
            with hv.guest(a) as ga:                         # the other domains go on
                assert ga.read(5) == bytes(PAGE)
            hv.destroy(filler)
            w.join(5)
            assert not w.is_alive() and w.error is None and w.result is True
            res = ev.wait_for(lambda e: e["event"] == "resumed")
            assert res["domid"] == b and res["waited_ms"] >= 300 and res["state"] == "running"
            assert hv.domain(b)["state"] == "running" and "waiting_for_memory" not in hv.domain(b)
            with hv.guest(b) as gb:
                page = gb.read(5)
                assert page[16:33] == b"waits for a frame" and page[:16] == bytes(16)
                assert gb.stats()["paused"] is False
                assert gb.write(6, b"and goes on") is True        # another fault, frames free now
            with hv.guest(a) as ga:
                assert ga.read(5) == bytes(PAGE)                   # the other sharer unchanged
            assert hv.audit() == 0
            i = hv.info()
            assert i["parked"] == [] and i["frames_free"] == i["frames_total"] - 64 - 2

            # Full again; this time no frame is ever freed: destroying x
            # leaves y the last sharer of each frame, and a last sharer's
            # write takes the frame itself (found by the housekeeping retry).
            x, y = hv.create(8, "zero"), hv.create(8, "zero")
            hv.range_share(x, y, 0, 7)
            hv.create(hv.info()["frames_free"], "zero")
            w = _Write(hv, y, gfn=7, data=b"last")
            ev.wait_for(lambda e: e["event"] == "enomem" and e["domid"] == y)
            hv.destroy(x)
            assert hv.info()["frames_free"] == 0
            w.join(5)
            assert w.error is None and w.result is True
            ev.wait_for(lambda e: e["event"] == "resumed" and e["domid"] == y)
            with hv.guest(y) as gy:
                assert gy.read(7)[16:20] == b"last"
            assert hv.info()["frames_free"] == 0 and hv.audit() == 0


def test_hvctl_events_streams_json_lines():
    with api.hvshare_session(frames=256) as hv:
        a, b, filler = _full_pool(hv)
        p = subprocess.Popen([sys.executable, "-m", "hvshare.tools.hvctl", "events", "--count", "2",
                              "--socket", hv.socket_path], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        try:
            assert _wait(lambda: hv.info()["event_subscribers"] == 1, 20)
            with hv.events(since=None) as ev:
                w = _Write(hv, b, gfn=0, data=b"x")
                ev.wait_for(lambda e: e["event"] == "enomem")
                hv.destroy(filler)
                ev.wait_for(lambda e: e["event"] == "resumed")
            out, err = p.communicate(timeout=20)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        w.join(5)
        assert p.returncode == 0, err
        lines = [json.loads(x) for x in out.splitlines()]
        assert [x["event"] for x in lines] == ["enomem", "resumed"]
        assert all(x["domid"] == b for x in lines) and lines[0]["seq"] < lines[1]["seq"]
        # the ring keeps them for a late subscriber; the hypervisor's end closes the stream
        p = subprocess.Popen([sys.executable, "-m", "hvshare.tools.hvctl", "events", "--socket", hv.socket_path],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert _wait(lambda: hv.info()["event_subscribers"] == 1, 20)
        hv.stop()
        out, err = p.communicate(timeout=20)
        assert [json.loads(x)["event"] for x in out.splitlines()] == ["enomem", "resumed"]
        assert p.returncode == 1 and err.strip().endswith("stopped.") and "Traceback" not in err
        hv.process.wait(10)


def test_batched_write_waits_for_all_its_frames_pause_holds_and_destroy_cancels():
    with api.hvshare_session(frames=256) as hv:
        a, b, filler = _full_pool(hv)
        gfns = np.arange(10, 20, dtype=np.int64)
        pages = np.random.default_rng(1).integers(0, 256, (10, PAGE), dtype=np.uint8)
        with hv.events(since=None, timeout=10) as ev:
            w = _Write(hv, b, gfns=gfns, pages=pages)
            got = ev.wait_for(lambda e: e["event"] == "enomem")
            assert got["pages"] == 10 and got["needed"] == 10
            # unpause cannot help without memory: one sentence says so
            with pytest.raises(api.HVCtlError, match="waits for free memory") as e:
                hv.unpause(b)
            assert e.value.code_name == "ENOMEM"
            hv.pause(b)                                  # the user wants it paused afterwards
            hv.destroy(filler)
            w.join(5)
            assert w.error is None and w.result == 10
            res = ev.wait_for(lambda e: e["event"] == "resumed")
            assert res["state"] == "paused"
            assert hv.domain(b)["state"] == "paused"
            hv.unpause(b)
            with hv.guest(b) as gb:
                assert (gb.read_pages(gfns) == pages).all()
            assert hv.audit() == 0

            # a domain destroyed while it waits: its write goes with it
            hv.create(hv.info()["frames_free"], "zero")
            w = _Write(hv, b, gfn=3, data=b"never")
            ev.wait_for(lambda e: e["event"] == "enomem" and e["gfn"] == 3)
            free = hv.info()["frames_free"]
            assert hv.destroy(b)["entries"] == 64 - 10
            got = ev.wait_for(lambda e: e["event"] == "cancelled")
            assert got["domid"] == b and got["writes"] == 1 and got["reason"] == "destroyed"
            w.join(5)
            assert isinstance(w.error, api.GuestGone)    # its guest is gone with it
        i = hv.info()
        # b's own 10 private pages come back; its shared entries only drop references
        assert i["parked"] == [] and i["frames_free"] == free + 10 and hv.audit() == 0


def test_batched_small_writes_park_without_memory_and_land_in_order():
    with api.hvshare_session(frames=256) as hv:
        a, b, filler = _full_pool(hv)
        gfns = np.array([30, 31, 30, 32], dtype=np.int64)
        result = {}

        def write():
            try:
                with hv.guest(b) as g:
                    result["faults"] = g.write_many(gfns, [0, 0, 1, 0], [2, 1, 1, 1], b"ABCDE")
            except Exception as e:      # reported by the test
                result["error"] = e

        with hv.events(since=None, timeout=10) as ev:
            t = threading.Thread(target=write, daemon=True)
            t.start()
            got = ev.wait_for(lambda e: e["event"] == "enomem")
            assert got["domid"] == b and got["gfn"] == 30 and got["pages"] == 4 and got["needed"] == 3
            assert hv.domain(b)["state"] == "paused"
            hv.destroy(filler)
            t.join(5)
            assert result == {"faults": 3}
            ev.wait_for(lambda e: e["event"] == "resumed")
        assert hv.domain(b)["state"] == "running"
        with hv.guest(b) as gb:
            assert gb.read(30)[:3] == b"AD\x00" and gb.read(31)[:1] == b"C" and gb.read(32)[:1] == b"E"
            assert gb.stats()["cow_faults"] == 3
        with hv.guest(a) as ga:
            assert ga.read(30) == bytes(PAGE)
        assert hv.audit() == 0
