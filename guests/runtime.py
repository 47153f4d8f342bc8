"""The guest process: one per running domain (``python -m guests.runtime CONFIG``).

The hypervisor spawns it with two pipe ends (``rfd`` from the hypervisor,
``wfd`` to it) and a JSON config naming its frame pool and p2m segments. It

- maps the pool and its own p2m **read-only**: reads come straight from the
  mapping through :class:`hvcore.p2m.P2MView`, whose sequence counter makes
  every read consistent while the hypervisor changes the p2m under it; a
  store through the mapping is refused by the kernel (SIGSEGV);
- **writes by message**: ``G_WRITE`` / ``G_WRITE_PAGES`` on its pipe, and
  waits for the answer (a write to a shared page is a CoW fault the
  hypervisor resolves before answering). One request is in flight at a time;
  the thread that sent it reads its answer itself (no hand-off between
  threads, nobody else woken: the fault round trip stays a pipe round trip);
- reads the hypervisor's **asynchronous messages** (pause, unpause,
  shutdown) when the hypervisor rings it with SIGUSR1 (whichever thread the
  kernel picks, the signal's wake-up byte lands on a pipe the main thread
  polls), or on its half-second watch round; a request in flight handles
  any it meets;
- runs its **workload** (``writer``: random pages at a set rate) in a thread,
  and sends its counters (writes, CoW faults, fault latency p50/p99) every
  half second when they changed;
- serves a small **control channel** on a Unix socket in the hypervisor's
  0700 state directory, for tests and tools (write, read, checksum, verify,
  stats, ...; see ``hvcore.protocol.GUEST_OPS``);
- **dies with its hypervisor**: the kernel sends it SIGKILL when its parent
  dies (PR_SET_PDEATHSIG), and, should that be missed, EOF on its pipe or a
  changed parent pid ends it within half a second.
"""
from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import sys
import threading
import time

import numpy as np

from hvcore.wire import control, pipe, schema
from hvcore import constants
from hvcore import errors
from hvcore.errors import EBUSY, EINVAL, NAMES
from hvcore.p2m import P2MView
from hvcore.shm import attach_readonly

from hvcore import images

from . import workloads

_PR_SET_PDEATHSIG = 1
_clock = time.perf_counter
_PIPE_HDR = pipe.PIPE_HDR
_REPLY_MSG = pipe.REPLY_MSG
_WRITE_MSG = pipe.WRITE_MSG
_WRITE_SIZE = pipe.WRITE.size
_H_REPLY = pipe.H_REPLY
_REPLY_SIZE = pipe.REPLY.size


class HypervisorGone(Exception):
    """The pipe to the hypervisor is closed: the guest has nothing left to do."""


class WriteError(Exception):
    """The hypervisor refused a write (``code`` is the Xen code)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class _Link:
    """The guest's end of its two pipes.

    ``call`` sends a request and reads the answer in the calling thread while
    holding the lock; :meth:`drain` (the main thread) reads asynchronous
    messages (pause, unpause, shutdown, EOF) under the same lock.
    """

    def __init__(self, rfd: int, wfd: int, guest: "Guest"):
        self.rfd, self.wfd = rfd, wfd
        self._poll = select.poll()
        self._poll.register(rfd, select.POLLIN | select.POLLHUP | select.POLLERR)
        self.lock = threading.Lock()
        self.reader = pipe.pipe_reader(rfd, to_hv=False)
        self.guest = guest
        self.seq = 0
        self.inbox: list = []

    def call(self, mtype: int, *body) -> tuple[int, int]:
        with self.lock:
            seq = self.seq = (self.seq + 1) & 0xFFFF
            if len(body) <= 2 and sum(len(b) for b in body) <= 8192:
                # small request: one buffer, one write (atomic up to PIPE_BUF)
                msg = b"".join(body)
                self._write(_PIPE_HDR.pack(mtype, seq, len(msg)) + msg)
            else:
                try:
                    pipe.write_all(self.wfd, pipe.pipe_message(mtype, seq, *body))
                except OSError:
                    raise HypervisorGone() from None
            return self._answer(seq)

    def call_write(self, gfn: int, offset: int, data) -> tuple[int, int]:
        """``call`` of one ``G_WRITE`` (the CoW fault path): header and body
        packed by one struct, one write."""
        with self.lock:
            seq = self.seq = (self.seq + 1) & 0xFFFF
            self._write(_WRITE_MSG.pack(pipe.G_WRITE, seq, _WRITE_SIZE + len(data), gfn, offset) + data)
            return self._answer(seq)

    def _write(self, msg: bytes) -> None:
        try:
            n = os.write(self.wfd, msg)
            if n != len(msg):               # a signal cut a large one short
                pipe.write_all(self.wfd, [memoryview(msg)[n:]])
        except OSError:
            raise HypervisorGone() from None

    def _answer(self, seq: int) -> tuple[int, int]:
        """Wait for the H_REPLY of ``seq`` (lock held), handling the
        asynchronous messages met on the way."""
        if not self.inbox and not self.reader.partial:
            # The usual answer: one read of exactly one H_REPLY.
            try:
                data = os.read(self.rfd, 4096)
            except OSError:
                data = b""
            if len(data) == _REPLY_MSG.size:
                t, s, n, status, value = _REPLY_MSG.unpack(data)
                if t == _H_REPLY and s == seq and n == _REPLY_SIZE:
                    return status, value
            if not data:
                raise HypervisorGone()
            self.inbox += self.reader.feed(data)
        while True:
            (t, s, _), b = self._next()
            if t == pipe.H_REPLY and s == seq:
                return pipe.REPLY.unpack(b)
            self.guest.on_async(t)

    def send(self, mtype: int, *body, block: bool = True) -> bool:
        """Send a message that has no answer; False if the lock was busy."""
        if not self.lock.acquire(blocking=block):
            return False
        try:
            pipe.write_all(self.wfd, pipe.pipe_message(mtype, 0, *body))
        except OSError:
            raise HypervisorGone() from None
        finally:
            self.lock.release()
        return True

    def raw(self, data: bytes, reply: bool) -> tuple[int, int, int] | None:
        """Send bytes verbatim on the pipe (a test of the hypervisor's
        defences); with ``reply``, wait for the next H_REPLY: (seq, status, value)."""
        with self.lock:
            try:
                pipe.write_all(self.wfd, [data])
            except OSError:
                raise HypervisorGone() from None
            while reply:
                (t, s, _), b = self._next()
                if t == pipe.H_REPLY:
                    return (s, *pipe.REPLY.unpack(b))
                self.guest.on_async(t)
        return None

    def _next(self):
        # The descriptor stays blocking: a read waits for the answer itself
        # (one system call, no poll first).
        while not self.inbox:
            msgs, eof = self.reader.pump(limit=1)
            self.inbox += msgs
            if not self.inbox and eof:
                raise HypervisorGone()
        return self.inbox.pop(0)

    def drain(self, block: bool = False) -> None:
        """Handle whatever asynchronous messages arrived (main thread)."""
        if not self.lock.acquire(blocking=block):
            return          # a call is reading the pipe: it handles them
        try:
            if not self._poll.poll(0):
                return      # nothing there: a read would block
            msgs, eof = self.reader.pump(limit=1)
            for (t, _, _), _b in self.inbox + msgs:
                self.guest.on_async(t)
            self.inbox.clear()
            if eof:
                raise HypervisorGone()
        finally:
            self.lock.release()


class Guest:
    """A domain's guest: its mappings, its link to the hypervisor, counters."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.domid = cfg["domid"]
        self.hv_pid = cfg["hv_pid"]
        self.pool_mm, _ = attach_readonly(cfg["pool"])
        self.pool = np.frombuffer(self.pool_mm, dtype=np.uint8).reshape(-1, constants.PAGE_SIZE)
        self.p2m = P2MView(cfg["p2m"])
        self.npages = self.p2m.npages
        self.link = _Link(cfg["rfd"], cfg["wfd"], self)
        self.unpaused = threading.Event()
        if not cfg.get("paused"):
            self.unpaused.set()
        self.alive = True
        self.counters = {"writes": 0, "pages_written": 0, "cow_faults": 0}
        self.fault_lat = workloads.Latencies()
        self.write_lat = workloads.Latencies()
        self._reported: tuple = ()

    # -- the hypervisor's asynchronous messages --------------------------
    def on_async(self, mtype: int) -> None:
        if mtype == pipe.H_PAUSE:
            self.unpaused.clear()
        elif mtype == pipe.H_UNPAUSE:
            self.unpaused.set()
        elif mtype == pipe.H_SHUTDOWN:
            _exit(self, 0)

    # -- writes (through the hypervisor) ---------------------------------
    def write(self, gfn: int, offset: int, data: bytes) -> bool:
        """Write ``data`` at ``offset`` of ``gfn``; True if it was a CoW fault."""
        if not 0 <= gfn < self.npages:
            self._check_gfns(gfn, gfn)
        t0 = _clock()
        status, value = self.link.call_write(gfn, offset, data)
        dt = _clock() - t0
        if status:
            self._account(status, value, 1, dt)
        c = self.counters
        c["writes"] += 1
        c["pages_written"] += 1
        self.write_lat.add(dt)
        if value:
            c["cow_faults"] += 1
            self.fault_lat.add(dt)
            return True
        return False

    def write_pages(self, gfns: np.ndarray, pages: np.ndarray) -> int:
        """Write whole pages in one message; returns the CoW faults taken."""
        if len(gfns):
            self._check_gfns(int(np.min(gfns)), int(np.max(gfns)))
        parts = pipe.encode_write_pages(gfns, pages)
        t0 = time.perf_counter()
        status, value = self.link.call(pipe.G_WRITE_PAGES, *parts)
        self._account(status, value, len(gfns), time.perf_counter() - t0)
        return value

    def write_many(self, gfns, offsets, lengths, data) -> int:
        """Many small writes in one message (write ``i``: the next
        ``lengths[i]`` bytes of ``data`` at ``offsets[i]`` of ``gfns[i]``);
        returns the CoW faults taken."""
        if len(gfns):
            self._check_gfns(int(np.min(gfns)), int(np.max(gfns)))
        parts = pipe.encode_write_many(gfns, offsets, lengths, data)
        t0 = time.perf_counter()
        status, value = self.link.call(pipe.G_WRITE_MANY, *parts)
        self._account(status, value, len(gfns), time.perf_counter() - t0)
        return value

    def _check_gfns(self, lo: int, hi: int) -> None:
        # The hypervisor checks too; this only gives the caller a clear sentence.
        if lo < 0 or hi >= self.npages:
            bad = lo if lo < 0 else hi
            raise WriteError(EINVAL, f"gfn {bad} is outside domain {self.domid}'s {self.npages} pages")

    def _account(self, status: int, value: int, pages: int, seconds: float) -> None:
        if status:
            name = NAMES.get(status, str(status))
            why = "is paused" if status == EBUSY else "refused the write"
            raise WriteError(status, f"domain {self.domid} {why} ({name})")
        c = self.counters
        c["writes"] += 1
        c["pages_written"] += pages
        c["cow_faults"] += value
        self.write_lat.add(seconds)
        if value:
            self.fault_lat.add(seconds)

    # -- reads (straight from the mapping) -------------------------------
    def read(self, gfn: int) -> bytes:
        return self.p2m.read_page(self.pool, gfn)

    def read_pages(self, gfns) -> np.ndarray:
        return self.p2m.read_pages(self.pool, gfns)

    def stats(self) -> dict:
        return {"domid": self.domid, "pid": os.getpid(), "workload": self.cfg["workload"],
                "pages": self.npages, "paused": not self.unpaused.is_set(), **self.counters,
                "fault_p50_us": self.fault_lat.percentile_us(50),
                "fault_p99_us": self.fault_lat.percentile_us(99),
                "write_p50_us": self.write_lat.percentile_us(50),
                "write_p99_us": self.write_lat.percentile_us(99)}

    def report(self) -> None:
        """Send the counters to the hypervisor if they changed (never blocks)."""
        now = tuple(self.counters.values())
        if now != self._reported:
            st = self.stats()
            if self.link.send(pipe.G_STATS, pipe.encode_stats(st), block=False):
                self._reported = now

    # -- the deliberate faults of the control channel --------------------
    def _address(self, gfn: int) -> int:
        if not 0 <= gfn < self.npages:
            raise ValueError(f"gfn {gfn} is outside the domain's {self.npages} pages")
        mfn = max(int(self.p2m.mfn[gfn]), 0)
        return self.pool.ctypes.data + mfn * constants.PAGE_SIZE

    def write_mapping(self, gfn: int) -> dict:
        """Try the ways Python offers to store into the mapping; all must fail."""
        self._address(gfn)
        mfn = max(int(self.p2m.mfn[gfn]), 0)
        errors = []
        try:
            self.pool[mfn, 0] = 1
        except (ValueError, TypeError) as e:
            errors.append(f"numpy: {e}")
        try:
            self.pool_mm[mfn * constants.PAGE_SIZE] = 1
        except (ValueError, TypeError) as e:
            errors.append(f"mmap: {e}")
        return {"refused": len(errors) == 2, "errors": errors}

    def raw_write(self, gfn: int) -> None:
        """Store one byte through the read-only mapping with ctypes: the
        kernel answers with SIGSEGV, which kills this guest and only it."""
        ctypes.memset(self._address(gfn), 0x5A, 1)


# ----------------------------------------------------------------------
# control channel


class _Channel:
    """The guest's control socket: one thread per connection, framed JSON."""

    def __init__(self, guest: Guest, path: str):
        self.guest = guest
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(16)
        threading.Thread(target=self._accept, name="channel", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
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

    def _op_pipe_send(self, payload, reply):
        got = self.guest.link.raw(bytes(payload), reply)
        if got is None:
            return {"sent": len(payload)}
        seq, status, value = got
        return {"sent": len(payload), "seq": seq, "status": status, "value": value}

    def _op_raw_write(self, payload, gfn):
        self.guest.raw_write(gfn)
        return {"survived": True}       # not reached: the kernel kills us


# ----------------------------------------------------------------------
# process main


def _exit(guest: Guest | None, status: int) -> None:
    if guest is not None:
        try:
            os.unlink(guest.cfg["socket"])
        except OSError:
            pass
    os._exit(status)


def _set_pdeathsig() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m guests.runtime CONFIG-JSON (the hypervisor starts guests)", file=sys.stderr)
        return 2
    cfg = json.loads(argv[0])
    _set_pdeathsig()
    if os.getppid() != cfg["hv_pid"]:
        return 1                       # the hypervisor died before we got here
    guest = Guest(cfg)
    _Channel(guest, cfg["socket"])
    # The hypervisor's doorbell: numpy's threads exist already, so SIGUSR1
    # may hit any thread; the wake-up fd turns it into a readable pipe here.
    bell_r, bell_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(bell_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    bell = select.poll()
    bell.register(bell_r, select.POLLIN)
    try:
        guest.link.send(pipe.G_HELLO, pipe.HELLO.pack(os.getpid()))
        if cfg["workload"] == "writer":
            threading.Thread(target=_writer, args=(guest,), name="writer", daemon=True).start()
        guest.link.drain(block=True)   # what came before we listened for SIGUSR1
        while True:
            rung = bell.poll(500)
            if rung:
                os.read(bell_r, 512)
            if os.getppid() != guest.hv_pid:
                break
            guest.link.drain(block=bool(rung))
            guest.report()
    except HypervisorGone:
        pass
    _exit(guest, 0)
    return 0                            # pragma: no cover


def _writer(guest: Guest) -> None:
    cfg = guest.cfg

    def write_pages(gfns, pages):
        try:
            guest.write_pages(gfns, pages)
        except WriteError:
            time.sleep(0.05)            # paused under us: the next round waits
        except HypervisorGone:
            _exit(guest, 0)

    workloads.run_writer(write_pages, guest.npages, cfg["seed"], cfg["instance"],
                         cfg["rate"], cfg["batch"], lambda: guest.alive, guest.unpaused.wait)


if __name__ == "__main__":
    sys.exit(main())
