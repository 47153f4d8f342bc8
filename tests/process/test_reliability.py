"""Reliability: a client that never reads its answers, unpause of a domain
that waits for memory, and what a crashed domain shows."""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from hvcore.wire import control
from tools import api
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
