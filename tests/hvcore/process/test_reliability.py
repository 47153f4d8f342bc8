"""Reliability: a client that never reads its answers, unpause of a domain
that waits for memory, and what a crashed domain shows."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from hvshare.hvcore.wire import control
from hvshare.tools import api
from waiting import wait_until

MiB = 1 << 20
#: requests the greedy client sends at most (each asks for a page back)
GREEDY_REQUESTS = 200_000
#: what the hypervisor may grow by while a client reads none of its answers
GREEDY_RSS_GROWTH = 64 * MiB


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        assert got, "the hypervisor closed the connection"
        buf += got
    return bytes(buf)


def _read_answer(sock: socket.socket) -> tuple[dict, bytes]:
    jlen, blen = control.FRAME_HDR.unpack(_recv_exact(sock, control.FRAME_HDR.size))
    body = _recv_exact(sock, jlen + blen)
    return json.loads(body[:jlen]), body[jlen:]


def _marked_domain(hv, pages: int) -> int:
    """A domain whose page ``i`` starts with the mark ``b"page %d"``."""
    d = hv.create(pages, "zero")
    with hv.guest(d) as g:
        for gfn in range(pages):
            g.write(gfn, b"page %d" % gfn)
    return d


def test_a_client_that_reads_nothing_holds_no_more_than_a_bounded_queue(hvs):
    d = _marked_domain(hvs, 4)
    request = b"".join(bytes(p) for p in control.frame({"op": "read", "domid": d, "gfn": 1}))
    chunk = request * 256
    # the stock of warm guests refilled and warm: its descriptors stay as they are
    assert wait_until(lambda: (lambda w: w["warm"] == w["size"])(hvs.info()["warm_guests"]), 30)
    before = _rss(hvs.pid)
    fds = len(os.listdir(f"/proc/{hvs.pid}/fd"))
    greedy = hvs.open_connection()
    greedy.setblocking(False)
    sent = 0                    # bytes of the requests sent
    stalled_since = None
    others_served = 0
    while sent < GREEDY_REQUESTS * len(request):
        at = sent % len(chunk)
        try:
            sent += greedy.send(chunk[at:])
            stalled_since = None
        except BlockingIOError:
            now = time.monotonic()
            stalled_since = stalled_since or now
            if now - stalled_since > 1.0:
                break           # the hypervisor stopped reading this client
            # meanwhile every other client is served
            assert hvs.ping() == hvs.pid
            assert [x["domid"] for x in hvs.list()] == [d]
            others_served += 1
            time.sleep(0.01)
    grown = _rss(hvs.pid) - before
    print(f"greedy client: {sent // len(request)} requests sent, hypervisor RSS +{grown / MiB:.1f} MiB")
    assert grown < GREEDY_RSS_GROWTH, f"the hypervisor grew by {grown / MiB:.0f} MiB"
    assert sent < GREEDY_REQUESTS * len(request), "the hypervisor read every request"
    assert others_served > 0
    assert hvs.read(d, 1).startswith(b"page 1")
    greedy.close()
    # the connection and its queue are gone: the hypervisor serves on
    assert wait_until(lambda: _rss(hvs.pid) - before < GREEDY_RSS_GROWTH)
    assert wait_until(lambda: len(os.listdir(f"/proc/{hvs.pid}/fd")) == fds)
    assert hvs.ping() == hvs.pid
    assert hvs.read(d, 3).startswith(b"page 3")
    hvs.destroy(d)
    assert hvs.list() == []
    assert hvs.audit() == 0


def test_pipelined_requests_read_late_are_all_answered_in_order(hvs):
    pages = 16
    d = _marked_domain(hvs, pages)
    n = 4000                    # 16 MiB of answers: reading is paused on the way
    frames = b"".join(b"".join(bytes(p) for p in control.frame({"op": "read", "domid": d, "gfn": i % pages}))
                      for i in range(n))
    conn = hvs.open_connection()
    sender = threading.Thread(target=conn.sendall, args=(frames,), daemon=True)
    sender.start()
    time.sleep(0.5)             # the answers queue up unread meanwhile
    assert hvs.ping() == hvs.pid
    for i in range(n):
        ans, page = _read_answer(conn)
        assert ans.get("ok") is True, ans
        assert page.startswith(b"page %d\0" % (i % pages)), (i, page[:16])
    sender.join(10)
    assert not sender.is_alive()
    conn.close()
    hvs.destroy(d)
    assert hvs.audit() == 0


def _hvctl(sock: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hvshare.tools.hvctl", *args, "--socket", sock],
                          capture_output=True, text=True, timeout=60)


class _Write(threading.Thread):
    """A guest write (through its control channel) that waits while its
    domain waits for memory."""

    def __init__(self, hv, domid: int, gfn: int, data: bytes):
        super().__init__(daemon=True)
        self.hv, self.domid, self.gfn, self.data = hv, domid, gfn, data
        self.result = self.error = None
        self.start()

    def run(self):
        try:
            with self.hv.guest(self.domid) as g:
                self.result = g.write(self.gfn, self.data)
        except Exception as e:          # reported by the test
            self.error = e


def test_unpause_of_a_user_paused_domain_waiting_for_memory_lifts_only_the_user_pause():
    with api.hvshare_session(frames=256) as hv:
        pages = 64
        a, b = hv.create(pages, "zero"), hv.create(pages, "zero")
        assert hv.range_share(a, b, 0, pages - 1) == pages
        filler = hv.create(hv.info()["frames_free"], "zero")
        with hv.events(since=None, timeout=10) as ev:
            w = _Write(hv, b, 5, b"parked")
            ev.wait_for(lambda e: e["event"] == "enomem" and e["domid"] == b)
            assert hv.pause(b)["state"] == "paused"
            # the user's pause is lifted; the vCPU still waits for a frame
            ans = hv.unpause(b)
            d = hv.domain(b)
            assert ans["state"] == d["state"] == "paused"
            assert ans["waiting_for_memory"] is True and d["waiting_for_memory"] is True
            # no user pause left: a second unpause cannot help, and says so
            with pytest.raises(api.HVCtlError, match="waits for free memory") as e:
                hv.unpause(b)
            assert e.value.code_name == "ENOMEM"
            assert hv.domain(b)["state"] == "paused"
            # memory frees: the write lands and the domain runs (nobody paused it)
            hv.destroy(filler)
            w.join(5)
            assert w.error is None and w.result is True
            res = ev.wait_for(lambda e: e["event"] == "resumed" and e["domid"] == b)
            assert res["state"] == "running"
            assert hv.domain(b)["state"] == "running"
            with hv.guest(b) as g:
                assert g.read(5).startswith(b"parked")
            assert hv.audit() == 0


def test_a_crashed_domain_lists_no_pid(hvs):
    d = hvs.create(8, "zero")
    pid = hvs.domain(d)["pid"]
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: hvs.domain(d)["state"] == "crashed")
    listed = json.loads(_hvctl(hvs.socket_path, "list", "--json").stdout)
    doms = listed["domains"] if isinstance(listed, dict) else listed
    (dom,) = [x for x in doms if x["domid"] == d]
    assert dom["state"] == "crashed" and dom["pid"] is None
    text = _hvctl(hvs.socket_path, "list").stdout
    (row,) = [line.split() for line in text.splitlines()[1:] if line.split()[0] == str(d)]
    header = text.splitlines()[0].split()
    # the state's "(killed by SIGKILL)" takes three more words than its header
    assert row[header.index("PID") + 3] == "-", text
    hvs.destroy(d)
    assert hvs.audit() == 0
