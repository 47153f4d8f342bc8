"""The hypervisor's side of guest writes: counters and steps of the fast path and the
general one, and a batch continued across steps while another guest faults."""
from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import termios
import threading

import numpy as np

from hvshare.hvcore.wire import control, pipe
from waiting import wait_until

PAGE = 4096


def test_hypervisor_counts_writes_faults_and_guest_steps(hvs):
    a = hvs.create(16, "zero")
    b = hvs.create(16, "zero")
    assert hvs.range_share(a, b, 0, 15) == 16
    steps0 = hvs.info()["pause_by_op"].get("guest", {}).get("count", 0)
    with hvs.guest(b) as g:
        assert g.write(0, b"x") is True                 # CoW fault
        assert g.write(0, b"y", offset=PAGE - 1) is False   # private now
        assert g.write(1, b"z" * PAGE) is True          # whole page: no copy needed
        assert g.write(2, b"\x01" * 10, offset=7) is True
        assert g.write_many(np.array([3, 4, 5]), np.zeros(3, dtype=np.uint32),
                            np.ones(3, dtype=np.uint32), b"abc") == 3
        assert g.read(0)[:1] == b"x" and g.read(0)[-1:] == b"y"
        assert g.read(1) == b"z" * PAGE and g.read(2)[7:17] == b"\x01" * 10
        assert [g.read(k)[:1] for k in (3, 4, 5)] == [b"a", b"b", b"c"]
    d = hvs.domain(b)
    assert (d["writes"], d["pages_written"], d["cow_faults"]) == (5, 7, 6)
    info = hvs.info()
    assert info["cow_faults"] == 6
    assert info["pause_by_op"]["guest"]["count"] - steps0 >= 5     # the writes, the hello, stats
    assert hvs.read(a, 0) == bytes(PAGE)                          # the sharer kept its page
    assert hvs.audit() == 0


def _bytes_waiting_for(hv_pid: int, guest_pid: int) -> int:
    """Bytes in a guest's pipe to the hypervisor that the hypervisor has not
    read yet: the pipe end the hypervisor reads, opened again through /proc."""
    guest_pipes = set()
    for fd in os.listdir(f"/proc/{guest_pid}/fd"):
        try:
            guest_pipes.add(os.readlink(f"/proc/{guest_pid}/fd/{fd}"))
        except OSError:
            pass
    for fd in os.listdir(f"/proc/{hv_pid}/fd"):
        try:
            link = os.readlink(f"/proc/{hv_pid}/fd/{fd}")
            with open(f"/proc/{hv_pid}/fdinfo/{fd}") as f:
                flags = int(f.read().split("flags:")[1].split()[0], 8)
        except OSError:
            continue
        if link.startswith("pipe:") and link in guest_pipes and flags & os.O_ACCMODE == os.O_RDONLY:
            r = os.open(f"/proc/{hv_pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK)
            try:
                return struct.unpack("i", fcntl.ioctl(r, termios.FIONREAD, b"\0" * 4))[0]
            finally:
                os.close(r)
    raise AssertionError(f"no pipe from guest {guest_pid} to the hypervisor {hv_pid}")


class _Call(threading.Thread):
    """A blocking call (a guest write from its control channel) in a thread."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.result = fn, args, None

    def run(self):
        self.result = self.fn(*self.args)


def test_another_guests_fault_is_answered_while_a_long_batch_is_in_progress(hvs):
    """Ordering, not timing: with the hypervisor stopped, guest B's batch of
    writes, then guest C's single fault, then a pause of B are queued, in
    that order. The hypervisor starts B's batch, answers C's fault and
    serves the pause between two of the batch's steps: the pause holds the
    rest of the batch, unanswered and partly applied. The unpause lets it
    finish with one answer."""
    n = 2048
    a, b, c = hvs.create(n, "zero"), hvs.create(n, "zero"), hvs.create(16, "zero")
    assert hvs.range_share(a, b, 0, n - 1) == n and hvs.range_share(a, c, 0, 15) == 16
    gb, gc = hvs.guest(b), hvs.guest(c)
    hv_pid, pb, pc = hvs.ping(), hvs.domain(b)["pid"], hvs.domain(c)["pid"]
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ctl.connect(hvs.socket_path)
    frames = control.FrameReader(ctl)
    control.send_frame(ctl, {"op": "ping"})
    assert frames.next()[0]["ok"]                       # accepted: the next request is read at once
    batch = _Call(gb.write_many, np.arange(n), np.zeros(n, np.uint32), np.ones(n, np.uint32),
                  bytes(range(256)) * (n // 256))
    fault = _Call(gc.write, 3, b"c")
    os.kill(hv_pid, signal.SIGSTOP)
    try:
        batch.start()
        assert wait_until(lambda: _bytes_waiting_for(hv_pid, pb) == pipe.PIPE_HDR.size + pipe.WRITE_MANY.size + 17 * n)
        fault.start()
        assert wait_until(lambda: _bytes_waiting_for(hv_pid, pc) > 0)
        control.send_frame(ctl, {"op": "pause", "domid": b})
    finally:
        os.kill(hv_pid, signal.SIGCONT)
    fault.join(30)
    assert fault.result is True                         # C's fault answered
    answer, _ = frames.next()
    assert answer["ok"] and answer["state"] == "paused"
    assert wait_until(lambda: hvs.info()["pause_by_op"].get("guest", {}).get("count", 0) > 0)
    d = hvs.domain(b)
    assert 0 < n - d["shr_pages"] < n                   # the batch: started, held by the pause
    assert batch.is_alive() and d["writes"] == 0        # and not answered
    hvs.unpause(b)
    batch.join(30)
    assert batch.result == n                            # one answer, every write a CoW fault
    d = hvs.domain(b)
    assert (d["shr_pages"], d["writes"], d["pages_written"], d["cow_faults"]) == (0, 1, n, n)
    assert [gb.read(k)[:1] for k in (0, 255, 256, n - 1)] == [b"\x00", b"\xff", b"\x00", b"\xff"]
    assert gc.read(3)[:1] == b"c"
    ctl.close()
    gb.close()
    gc.close()
    assert hvs.audit() == 0
