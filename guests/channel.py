"""The guest's control channel: a Unix socket for tests and tools.

It lives in the hypervisor's 0700 state directory and serves framed JSON
(:mod:`hvshare.hvcore.wire.control`), one thread per connection: write, read,
checksum, verify, stats, timed write loops, and the probes of a hostile
guest (a store through the read-only mapping, raw bytes on the pipe). The
operations and their arguments are ``hvshare.hvcore.wire.schema.GUEST_OPS``.
"""
from __future__ import annotations

import os
import queue
import socket
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from hvshare.hvcore import constants, errors, images
from hvshare.hvcore.errors import NAMES
from hvshare.hvcore.wire import control, pipe, schema

from .link import HypervisorGone, WriteError

if TYPE_CHECKING:
    from .runtime import Guest

__all__ = ["ControlChannel"]


class ControlChannel:
    """The guest's control socket: one thread per connection, framed JSON.

    Made in two halves: the accepting thread is started while the guest
    is warm (a thread's start waits for the scheduler, which a loaded
    machine makes slow), the socket bound once the guest has its domain
    (:meth:`open`); connections wait in the backlog until the thread
    takes the socket.
    """

    def __init__(self):
        self.guest: Guest | None = None
        self.path: str | None = None
        self.sock: socket.socket | None = None
        self._handoff: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._accept, name="channel", daemon=True).start()

    def open(self, guest: Guest, path: str) -> None:
        """Serve ``guest`` on a new socket at ``path`` (mode 0600)."""
        self.guest, self.path = guest, path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(16)
        self._handoff.put(self.sock)

    def _accept(self) -> None:
        sock = self._handoff.get()
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        frames = control.FrameReader(conn)
        with conn:
            while True:
                try:
                    got = frames.next()
                except (errors.ProtocolError, ConnectionError, OSError):
                    return
                if got is None:
                    return
                obj, payload = got
                try:
                    op, args = schema.check_request(obj, schema.GUEST_OPS)
                    result = getattr(self, "_op_" + op)(payload, **args)
                    res, data = result if isinstance(result, tuple) else (result, b"")
                    answer = (schema.ok(**res), data)
                except errors.ProtocolError as e:
                    answer = (schema.error(str(e)), b"")
                except WriteError as e:
                    answer = (schema.error(str(e), e.code, NAMES.get(e.code, str(e.code))), b"")
                except HypervisorGone:
                    return
                except Exception as e:   # an HVError from a read, a bad gfn, ...
                    code = getattr(e, "code", 22)
                    answer = (schema.error(str(e).split(": ", 1)[-1] if hasattr(e, "code") else str(e),
                                      code, NAMES.get(code, str(code))), b"")
                try:
                    control.send_frame(conn, *answer)
                except OSError:
                    return

    def _gfns(self, payload, count: int) -> np.ndarray:
        if len(payload) < 8 * count:
            raise errors.ProtocolError(f"payload holds fewer than {count} gfns")
        return np.frombuffer(payload, dtype="<i8", count=count)

    def _op_ping(self, payload):
        return {"pid": os.getpid(), "domid": self.guest.domid}

    def _op_stats(self, payload):
        return self.guest.stats()

    def _op_write(self, payload, gfn, offset):
        if not payload or offset + len(payload) > constants.PAGE_SIZE:
            raise errors.ProtocolError(f"write of {len(payload)} bytes at offset {offset} does not fit in one page")
        return {"cow": self.guest.write(gfn, offset, payload)}

    def _op_write_pages(self, payload, count):
        if len(payload) != count * (8 + constants.PAGE_SIZE):
            raise errors.ProtocolError(f"write_pages of {count} pages needs {count * (8 + constants.PAGE_SIZE)} payload bytes")
        gfns = self._gfns(payload, count)
        pages = np.frombuffer(payload, dtype=np.uint8, offset=8 * count).reshape(count, constants.PAGE_SIZE)
        return {"cow_faults": self.guest.write_pages(gfns, pages)}

    def _op_write_many(self, payload, count):
        head = 16 * count
        if len(payload) < head:
            raise errors.ProtocolError(f"write_many of {count} writes needs at least {head} payload bytes")
        gfns = self._gfns(payload, count)
        offsets = np.frombuffer(payload, dtype="<u4", count=count, offset=8 * count)
        lengths = np.frombuffer(payload, dtype="<u4", count=count, offset=12 * count)
        try:
            parts = pipe.encode_write_many(gfns, offsets, lengths, memoryview(payload)[head:])
        except ValueError as e:
            raise errors.ProtocolError(str(e)) from None
        return {"cow_faults": self.guest.write_many(gfns, offsets, lengths, parts[-1])}

    def _op_read(self, payload, gfn):
        return {}, self.guest.read(gfn)

    def _op_read_pages(self, payload, count):
        return {}, self.guest.read_pages(self._gfns(payload, count)).tobytes()

    def _op_checksum(self, payload, first, count):
        gfns = np.arange(first, first + count, dtype=np.int64)
        return {"count": count}, images.checksums(self.guest.read_pages(gfns)).astype("<u8").tobytes()

    def _op_verify(self, payload, first, count, rounds, seconds):
        """Read the pages again and again, counting pages whose stamp is wrong
        (a torn read would show here)."""
        gfns = np.arange(first, first + count, dtype=np.int64)
        end = time.monotonic() + seconds
        n = bad = 0
        first_bad = None
        while n < rounds or time.monotonic() < end:
            ok = images.valid_pages(self.guest.read_pages(gfns))
            n += 1
            if not ok.all():
                bad += int((~ok).sum())
                if first_bad is None:
                    first_bad = int(gfns[~ok][0])
        return {"rounds": n, "pages_checked": n * count, "bad": bad, "first_bad": first_bad}

    def _op_time_writes(self, payload, first, count, size):
        """Write ``size`` bytes to each of ``count`` gfns in turn, timing each
        round trip here, where a guest's CoW fault is felt."""
        g = self.guest
        g._check_gfns(first, first + count - 1)
        data = bytes(size)
        lat = []
        add = lat.append
        write = g.write
        clock = time.perf_counter_ns
        for gfn in range(first, first + count):
            t0 = clock()
            write(gfn, 0, data)
            add(clock() - t0)
        return {"count": count}, np.array(lat, dtype="<i8").tobytes()

    def _op_time_write_pages(self, payload, first, count, batch):
        """Write whole pages first..first+count-1, ``batch`` per message; the
        guest-side time of the whole run."""
        g = self.guest
        g._check_gfns(first, first + count - 1)
        pages = np.zeros((min(batch, count), constants.PAGE_SIZE), dtype=np.uint8)
        pages[:, 1] = 1
        faults = messages = 0
        t0 = time.perf_counter()
        for lo in range(first, first + count, batch):
            k = min(batch, first + count - lo)
            faults += g.write_pages(np.arange(lo, lo + k, dtype=np.int64), pages[:k])
            messages += 1
        return {"seconds": time.perf_counter() - t0, "pages": count, "messages": messages,
                "cow_faults": faults}

    def _op_time_write_many(self, payload, first, count, batch, size, offset):
        """Write ``size`` bytes at ``offset`` of each page first..first+count-1,
        ``batch`` writes per message; the guest-side time of the whole run."""
        g = self.guest
        g._check_gfns(first, first + count - 1)
        if offset + size > constants.PAGE_SIZE:
            raise errors.ProtocolError(f"a write of {size} bytes at offset {offset} does not fit in one page")
        k = min(batch, count)
        offsets = np.full(k, offset, dtype="<u4")
        lengths = np.full(k, size, dtype="<u4")
        data = np.ones(k * size, dtype=np.uint8)
        faults = messages = 0
        t0 = time.perf_counter()
        for lo in range(first, first + count, batch):
            k = min(batch, first + count - lo)
            faults += g.write_many(np.arange(lo, lo + k, dtype=np.int64), offsets[:k], lengths[:k],
                                   data[:k * size])
            messages += 1
        return {"seconds": time.perf_counter() - t0, "pages": count, "messages": messages,
                "cow_faults": faults}

    def _op_write_mapping(self, payload, gfn):
        return self.guest.write_mapping(gfn)

    def _op_pipe_send(self, payload, reply, pieces, gap_us, split_seed):
        got = self.guest.link.raw(bytes(payload), reply, pieces, gap_us * 1e-6, split_seed)
        if got is None:
            return {"sent": len(payload)}
        seq, status, value = got
        return {"sent": len(payload), "seq": seq, "status": status, "value": value}

    def _op_raw_write(self, payload, gfn):
        self.guest.raw_write(gfn)
        return {"survived": True}       # not reached: the kernel kills us
