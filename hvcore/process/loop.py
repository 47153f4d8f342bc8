"""The hypervisor process: one thread, one event loop.

It models one hypervisor CPU: a ``selectors`` loop over

- the **control socket** (Unix, mode 0600), where toolstack clients send
  framed JSON requests (:mod:`hvcore.protocol`);
- one **pipe pair per guest**: the guest's writes and CoW faults come in as
  binary messages and are answered on the second pipe. The pipe identifies
  the domain, so a guest can only ever touch its own gfns;

and runs every request or guest message to completion before looking at the
next, so that while it runs one step nothing else is served. Each step is
timed: the longest is ``max_pause_ms`` in ``hvctl info``, and a log2
histogram of all of them shows the shape of the freeze-ups.

Files: for a control socket ``DIR/NAME.sock`` the hypervisor keeps a private
state directory ``DIR/NAME.d`` (mode 0700) holding ``hypervisor.pid`` (locked
with ``flock`` for the hypervisor's whole life: a start that cannot take the
lock knows another hypervisor is alive), ``hypervisor.log`` (the detached
hypervisor's stderr) and each guest's control channel ``guest-<domid>.sock``.
A start that takes the lock of a dead hypervisor removes its leftovers: the
old socket, guest sockets, and every hvshare shared-memory segment whose
owner pid is dead.

Guests are real processes (``python -m guests.runtime``), spawned at create
with their two pipe ends (``pass_fds``) after the domain's memory is filled.
The create request is answered once the guest has mapped its memory and said
hello. A guest that exits (EOF on its pipe, then its exit status is
collected) leaves its domain ``crashed`` with its memory kept until destroy.
A CoW fault that finds no free frame does not fail the write: the domain
pauses, its write is parked (the guest simply waits for the answer) and an
``enomem`` event goes onto the sharing event ring (:mod:`hvcore.events`,
``hvctl events``); after every step that freed frames the parked writes are
retried, and the domain runs again once its writes are done.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import gc
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

from ..wire import control, pipe, schema
from .. import constants
from .. import errors
from .. import images, shm
from ..constants import DEFAULT_FRAMES, DOMID_MAX, RMAP_POLICIES, SCHED_MODES, TEARDOWN_MODES, WORKLOADS
from ..errors import EBUSY, EINVAL, ENOMEM, ESRCH, HVError
from ..events import EventRing, Parked, ParkedWrite
from ..budget import ChunkCost
from .statedir import (SOCKET_PATH_MAX, child_env, cleanup_leftovers, guest_socket_path, not_a_socket,
                       state_dir_for)

#: Pacing of a real-time hypervisor. The kernel lets real-time tasks run at
#: most sched_rt_runtime_us of every sched_rt_period_us (950 ms of 1 s) and
#: then stops them for the rest of the period: a hypervisor kept busy for a
#: second (a teardown whose controller pipelines its requests) would freeze
#: for 50 ms in the middle of a step. So it keeps its own duty cycle under
#: the kernel's: once it has run (CPU time: the kernel's measure) PACE_DUTY
#: of a PACE_WINDOW, it holds control requests (a teardown's next step, any
#: toolstack request) for the rest of the window and serves only guests
#: (``info``: ``paced``), so a CoW fault is not kept waiting by a
#: teardown's pacing. Only if guest work takes the window past PACE_DUTY +
#: PACE_GUEST_SLACK does the whole loop idle out the window.
PACE_WINDOW = 0.1
PACE_DUTY = 0.9
PACE_GUEST_SLACK = 0.03
#: A preemptible destroy step yields before a chunk that would end past this
#: budget (judged by the last chunk, or by the target if that was shorter),
#: or as soon as other work is pending, so that one step stays under 1 ms
#: and, when nothing waits, does several chunks of work per answer.
TEARDOWN_STEP_BUDGET = 0.0008
#: Relinquish chunks are sized to take about this long: a fault that
#: arrives mid-step waits at most one chunk before the step yields to it
#: (a writer's median fault during a teardown: ~300 us with 0.2 ms chunks,
#: ~220 us with 0.1 ms, ~80 us idle). Not much less: a chunk has a fixed
#: cost of some 5-10 us.
TEARDOWN_CHUNK_SECONDS = 0.0002
#: when the fixed cost of a chunk nearly fills the budget, a budgeted
#: nominate_many or share_many may take up to this many times the budget
#: (see :class:`hvcore.budget.ChunkCost`)
BATCH_OVERRUN = 1.5
#: A brief destroy "restart" (see Server._op_destroy): the keys of the
#: full answer that change between steps; the values are ints, floats and
#: a phase name, which %d, %r and %s write as JSON does.
_RESTART_JSON = ('{"ok":true,"domid":%d,"done":false,"phase":"%s","cursor":%d,"entries":%d,'
                 '"steps":%d,"continuations":%d,"step_ms":%r,"max_pause_ms":%r,'
                 '"max_pause_cpu_ms":%r,"hv_seconds":%r}')
#: frames without payload whose checked request is remembered (see
#: Server._check), and the longest such frame
_KNOWN_FRAMES = 64
_KNOWN_BYTES = 256
#: bytes an event subscriber may fall behind before it is dropped
EVENTS_MAX_QUEUE = 1 << 20
#: how long a new guest may take to map its memory and say hello
GUEST_START_TIMEOUT = 30.0
#: how long EOF on a guest's pipe waits for the guest's exit status
GUEST_EXIT_WAIT = 0.005
_TICK = 0.1
#: allocations between two collections of the youngest generation (CPython: 700)
GC_YOUNG_THRESHOLD = 20_000
#: bytes the hypervisor reads from a guest pipe at once
_GUEST_READ = 1 << 16
_WRITE_MSG = pipe.WRITE_MSG
_REPLY_MSG = pipe.REPLY_MSG


class StartError(Exception):
    """The hypervisor cannot start (one sentence for the user)."""


# ----------------------------------------------------------------------
# timing


class PauseMeter:
    """Longest uninterrupted step, and how long all steps took (log2 buckets).

    Bucket ``i`` counts steps of ``[2**(i-1), 2**i)`` microseconds (bucket 0:
    under 1 us). Steps are also summed per kind (the control op's name,
    ``guest`` or ``tick``): how long one kind of request holds the CPU is
    what a batch size is chosen by (``info``'s ``pause_by_op``).
    """

    def __init__(self):
        self.buckets = [0] * 48
        self.max_s = 0.0
        self.max_what = ""
        self.steps = 0
        self.busy_s = 0.0                      # all steps together
        self.by_kind: dict[str, list] = {}     # kind -> [count, total s, max s, buckets]

    def record(self, seconds: float, what: str, kind: str | None = None) -> None:
        """One step of ``seconds``; ``kind`` defaults to the first word of
        ``what`` (callers on the hot path pass it precomputed)."""
        self.steps += 1
        self.busy_s += seconds
        b = int(seconds * 1e6).bit_length()
        if b > 47:
            b = 47
        self.buckets[b] += 1
        if seconds > self.max_s:
            self.max_s, self.max_what = seconds, what
        if kind is None:
            kind = what.split(" ", 1)[0]
        k = self.by_kind.get(kind)
        if k is None:
            k = self.by_kind[kind] = [0, 0.0, 0.0, [0] * len(self.buckets)]
        k[0] += 1
        k[1] += seconds
        if seconds > k[2]:
            k[2] = seconds
        k[3][b] += 1

    def by_op(self) -> dict:
        """Per kind of step: ``count``, ``total_ms``, ``max_ms`` and its own
        ``histogram`` (as :meth:`histogram`)."""
        return {k: {"count": c, "total_ms": round(t * 1e3, 3), "max_ms": round(m * 1e3, 3),
                    "histogram": [{"lt_us": 1 << i, "count": n} for i, n in enumerate(b) if n]}
                for k, (c, t, m, b) in self.by_kind.items()}

    def histogram(self) -> list[dict]:
        """Non-empty buckets as ``{"lt_us": upper bound, "count": n}``."""
        return [{"lt_us": 1 << i, "count": c} for i, c in enumerate(self.buckets) if c]


# ----------------------------------------------------------------------
# endpoints


class _Endpoint:
    """A non-blocking descriptor with an output queue, registered in the loop."""

    def __init__(self, server: "Server", fd: int):
        self.server = server
        self.fd = fd
        self.out = bytearray()
        self.closed = False

    def _send(self, mv) -> int:                 # pragma: no cover - overridden
        raise NotImplementedError

    def queue(self, parts) -> None:
        if self.closed:
            return
        if not self.out:
            # Fast path: most answers fit in one write.
            data = b"".join(parts)
            try:
                n = self._send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except (BrokenPipeError, ConnectionResetError):
                self.server.lost(self)
                return
            if n == len(data):
                return
            self.out += memoryview(data)[n:]
        else:
            for p in parts:
                self.out += p
        self.server.want_write(self, True)

    def flush(self) -> None:
        if self.closed:
            return          # dropped by an earlier event of the same select() batch
        try:
            while self.out:
                n = self._send(memoryview(self.out)[:1 << 20])
                del self.out[:n]
        except (BlockingIOError, InterruptedError):
            return
        except (BrokenPipeError, ConnectionResetError):
            self.server.lost(self)
            return
        self.server.want_write(self, False)


class _Client(_Endpoint):
    """One toolstack connection on the control socket."""

    def __init__(self, server, sock: socket.socket):
        super().__init__(server, sock.fileno())
        self.sock = sock
        self.reader = control.frame_reader(sock)
        self.waiting = False            # a deferred answer (create) is pending
        self.backlog: list = []
        #: the answer of a step that yielded to other work, held until that
        #: work is served (see Server.run): sent at once it would wake this
        #: client first, on a core the waiting guest may share
        self.later: list = []

    def _send(self, mv) -> int:
        return self.sock.send(mv)

    def release(self) -> None:
        """Send the held answer (:attr:`later`)."""
        parts, self.later = self.later, []
        self.queue(parts)

    def reply(self, obj: dict, payload=b"") -> None:
        self.queue(control.frame(obj, payload))


class _Guest(_Endpoint):
    """The hypervisor's side of one guest: its process and its two pipes."""

    def __init__(self, server, domid: int, proc: subprocess.Popen, rfd: int, wfd: int,
                 sock_path: str, config: dict):
        super().__init__(server, rfd)
        self.domid = domid
        self.proc = proc
        self.wfd = wfd
        self.reader = pipe.pipe_reader(rfd, to_hv=True)
        self.sock_path = sock_path
        self.config = config
        self.ready = False
        self.started = time.monotonic()
        self.creator: _Client | None = None
        self.exit: str | None = None
        self.counters = {"writes": 0, "pages_written": 0, "cow_faults": 0}
        self.reported: dict = {}
        self.kill_pending = False       # stopped by destroy; SIGKILL at the next tick
        #: what the pause meter calls this guest's steps
        self.step_name = f"guest {domid}"
        #: the hypervisor's read buffer for this pipe (one read per wake-up)
        self.inbuf = memoryview(bytearray(_GUEST_READ))

    def _send(self, mv) -> int:
        return os.write(self.wfd, mv)

    def send(self, mtype: int, seq: int = 0, *body) -> None:
        self.queue(pipe.pipe_message(mtype, seq, *body))

    def reply(self, seq: int, status: int, value: int) -> None:
        """An ``H_REPLY``: one precompiled struct, one write when nothing is
        queued (a 20-byte pipe write is all or nothing), else the queue."""
        msg = _REPLY_MSG.pack(pipe.H_REPLY, seq & 0xFFFF, pipe.REPLY.size, status, value)
        if not self.out and not self.closed:
            try:
                os.write(self.wfd, msg)
                return
            except (BlockingIOError, InterruptedError):
                pass
            except (BrokenPipeError, ConnectionResetError):
                self.server.lost(self)
                return
        self.queue((msg,))

    def notify(self, mtype: int) -> None:
        """An asynchronous message, and SIGUSR1 so the guest reads it now
        (a guest only watches its pipe while it waits for an answer)."""
        self.send(mtype)
        if self.ready and not self.closed and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass


# ----------------------------------------------------------------------
# the server


class Server:
    """The hypervisor process's state: the core, the loop and its endpoints."""

    def __init__(self, socket_path: str, frames: int = DEFAULT_FRAMES, rmap: str = "buckets",
                 teardown: str = "preemptible", sched: str = "fifo"):
        self.socket_path = os.path.abspath(socket_path)
        self.state_dir = state_dir_for(self.socket_path)
        self.frames, self.rmap, self.teardown, self.sched = frames, rmap, teardown, sched
        #: the scheduling the process got (``fifo`` may be refused)
        self.sched_applied = "normal"
        #: most of a PACE_WINDOW the loop may run (None: no pacing), its
        #: CPU clock, the current window (start, CPU time then, control held
        #: in it), holds of control requests and their seconds
        self._pace_duty: float | None = None
        self._cpu = time.thread_time
        self._window = (0.0, 0.0, False)
        self.paced = [0, 0.0]
        #: control requests wait (see _pace): guests only until the window ends
        self._holding = False
        self.hv = None
        self.sel = selectors.DefaultSelector()
        self.meter = PauseMeter()
        self.clients: set[_Client] = set()
        self.guests: dict[int, _Guest] = {}
        self.zombies: list[_Guest] = []
        #: final teardown record of every domain destroy finished (domids
        #: are never reused, so a second destroy can say "already destroyed")
        self.destroyed: dict[int, dict] = {}
        #: a teardown step just yielded to other ready work (see _other_work)
        self._preempted = False
        #: clients whose next requests wait until that work has been served
        self._deferred: list[_Client] = []
        self._held: set[_Client] = set()     # the same, as a set
        #: checked requests by frame (see _check), at most _KNOWN_FRAMES
        self._known: dict[bytes, tuple] = {}
        self.cow_faults = 0
        #: the sharing event ring, and the CoW writes waiting for a frame
        self.ring = EventRing()
        self.parked: dict[int, Parked] = {}
        self._parked_free = 0          # fewest free frames seen since a retry failed
        self._parked_mark: tuple = ()  # (free, shared, saved) when the last retry failed
        self.enomem_waits = 0
        self.running = False
        self.started = time.time()
        self.requests = 0
        #: cost model of a budgeted batch request's chunks, by op (_bounded)
        self._chunk_cost: dict[str, ChunkCost] = {}
        self.instances = 0
        self._lsock: socket.socket | None = None
        self._lock_fd: int | None = None
        self._closed = False
        self._next_tick = 0.0

    # -- start and stop ------------------------------------------------
    def open(self) -> dict:
        """Take the state directory's lock, clear a dead predecessor's
        leftovers, build the core and listen. Raises StartError."""
        from ..core import Hypervisor
        if self.rmap not in RMAP_POLICIES:
            raise StartError(f"unknown rmap policy {self.rmap!r} (choose from {', '.join(RMAP_POLICIES)})")
        if self.teardown not in TEARDOWN_MODES:
            raise StartError(f"unknown teardown mode {self.teardown!r} (choose from {', '.join(TEARDOWN_MODES)})")
        if self.sched not in SCHED_MODES:
            raise StartError(f"unknown scheduling {self.sched!r} (choose from {', '.join(SCHED_MODES)})")
        if self.frames < 1:
            raise StartError("the pool needs at least one frame")
        try:
            free = shutil.disk_usage(shm.SHM_DIR).free
        except OSError:
            free = None
        if free is not None and self.frames * 4096 > free:
            # tmpfs would accept the size and fail later, with SIGBUS on a write
            raise StartError(f"a pool of {self.frames} frames needs {self.frames * 4096 / 2**30:.1f} GiB "
                             f"but {shm.SHM_DIR} has {free / 2**30:.1f} GiB free")
        refused = not_a_socket(self.socket_path)
        if refused:
            raise StartError(refused)
        if len(guest_socket_path(self.state_dir, DOMID_MAX).encode()) > SOCKET_PATH_MAX:
            raise StartError(f"socket path {self.socket_path} is too long for a Unix socket "
                             f"(keep it under about {SOCKET_PATH_MAX - 20} characters)")
        try:
            os.makedirs(os.path.dirname(self.socket_path), mode=0o700, exist_ok=True)
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            os.chmod(self.state_dir, 0o700)
            self._lock_fd = os.open(os.path.join(self.state_dir, "hypervisor.pid"),
                                    os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StartError(f"cannot prepare {self.state_dir}: {e.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._lock_fd)
            self._lock_fd = None
            raise StartError(f"a hypervisor (pid {other}) is already running on {self.socket_path}") from None
        cleaned = cleanup_leftovers(self.socket_path)
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        try:
            self.hv = Hypervisor(self.frames, rmap=self.rmap)
        except (OSError, ValueError, MemoryError) as e:
            self._release_files()
            raise StartError(f"cannot create a pool of {self.frames} frames: {e}") from None
        self._lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self._lsock.bind(self.socket_path)
        except OSError as e:
            self.hv.close()
            self._release_files()
            raise StartError(f"cannot listen on {self.socket_path}: {e.strerror}") from None
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        self._lsock.listen(64)
        self._lsock.setblocking(False)
        self.sel.register(self._lsock, selectors.EVENT_READ, self._accept)
        self.sched_applied = _apply_sched(self.sched)
        if self.sched_applied == "fifo":
            self._pace_duty = _pace_duty()
        self.running = True
        return cleaned

    def run(self) -> None:
        """Serve until a stop request or a terminating signal."""
        # A signal wakes the loop through this pipe (its handler only flags).
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(wake_r, selectors.EVENT_READ, lambda mask: os.read(wake_r, 512))
        old_wake = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            while self.running:
                hold = self._pace() if self._pace_duty is not None else 0.0
                self._holding = hold > 0
                if self._holding:
                    deferred, timeout = [], min(hold, _TICK)   # guests only, meanwhile
                else:
                    deferred, self._deferred = self._deferred, []
                    timeout = 0 if deferred else _TICK
                for key, mask in self.sel.select(timeout):
                    key.data(mask)
                    if self.parked:
                        self._retry_parked()
                    if not self.running:
                        break
                # after the work a teardown step yielded to: its answer, then
                # its next request
                for c in self._deferred if self._holding else deferred:
                    if c.later:
                        c.release()
                for c in deferred:
                    self._held.discard(c)
                    self._serve_backlog(c)
                if self.running and time.monotonic() >= self._next_tick:
                    self._tick()
        finally:
            signal.set_wakeup_fd(old_wake)
            for s, h in handlers.items():
                signal.signal(s, h)
            self.close()
            self.sel.close()
            os.close(wake_r)
            os.close(wake_w)

    def _pace(self) -> float:
        """Seconds control requests must still wait in this window (0.0:
        none): the rest of the window once the loop ran PACE_DUTY of it.
        Guests are served meanwhile; if they take the window past
        PACE_DUTY + PACE_GUEST_SLACK, this idles out the window."""
        now = time.monotonic()
        start, cpu0, _ = self._window
        if now - start >= PACE_WINDOW:
            self._window = (now, self._cpu(), False)
            return 0.0
        if now - start <= self._pace_duty * PACE_WINDOW:
            return 0.0      # it cannot have run longer: no clock read (~1 us)
        busy = self._cpu() - cpu0
        if busy <= self._pace_duty * PACE_WINDOW:
            return 0.0
        left = start + PACE_WINDOW - now
        if not self._window[2]:             # the hold starts: counted once
            self._window = (start, cpu0, True)
            self.paced[0] += 1
            self.paced[1] += left
        if busy > (self._pace_duty + PACE_GUEST_SLACK) * PACE_WINDOW:
            time.sleep(left)
            self._window = (time.monotonic(), self._cpu(), False)
            return 0.0
        return left

    def _on_signal(self, signum, frame) -> None:
        self.running = False

    def close(self) -> dict:
        """Stop every guest, free every segment, remove our files (idempotent)."""
        if self._closed:
            return {"guests": 0, "segments": 0}
        self._closed = True
        self.running = False
        for c in list(self.clients):
            self._drop_client(c)
        procs = []
        for g in list(self.guests.values()) + self.zombies:
            self._detach_guest(g)
            if g.proc.poll() is None:
                g.proc.kill()
            procs.append(g.proc)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not wait
                pass
        n_segments = 0
        if self.hv is not None:
            n_segments = 1 + len(self.hv.domains)
            self.hv.close()
        if self._lsock is not None:
            self.sel.unregister(self._lsock)
            self._lsock.close()
        self._release_files()
        return {"guests": len(procs), "segments": n_segments}

    def _release_files(self) -> None:
        for p in [self.socket_path]:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        if os.path.isdir(self.state_dir):
            for n in os.listdir(self.state_dir):
                try:
                    os.unlink(os.path.join(self.state_dir, n))
                except OSError:
                    pass
            try:
                os.rmdir(self.state_dir)
            except OSError:
                pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)     # drops the flock
            self._lock_fd = None

    # -- loop plumbing ---------------------------------------------------
    def want_write(self, ep: _Endpoint, on: bool) -> None:
        if isinstance(ep, _Client):
            ev = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
            self.sel.modify(ep.sock, ev, self._client_event(ep))
        elif on and not getattr(ep, "_wregistered", False):
            self.sel.register(ep.wfd, selectors.EVENT_WRITE, lambda mask, g=ep: g.flush())
            ep._wregistered = True
        elif not on and getattr(ep, "_wregistered", False):
            self.sel.unregister(ep.wfd)
            ep._wregistered = False

    def lost(self, ep: _Endpoint) -> None:
        """A peer went away while we wrote to it."""
        if isinstance(ep, _Client):
            self._drop_client(ep)
        else:
            self._guest_gone(ep)

    def _client_event(self, c: _Client):
        def on_event(mask, c=c):
            if mask & selectors.EVENT_WRITE:
                c.flush()
            if mask & selectors.EVENT_READ and not c.closed:
                self._client_readable(c)
        return on_event

    def _accept(self, mask) -> None:
        while True:
            try:
                sock, _ = self._lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            c = _Client(self, sock)
            self.clients.add(c)
            self.sel.register(sock, selectors.EVENT_READ, self._client_event(c))

    def _drop_client(self, c: _Client) -> None:
        if c.closed:
            return
        c.closed = True
        self.clients.discard(c)
        self.sel.unregister(c.sock)
        c.sock.close()

    def _client_readable(self, c: _Client) -> None:
        try:
            msgs, eof = c.reader.pump(limit=16)
        except errors.ProtocolError as e:
            c.reply(schema.error(f"bad control frame: {e}"))
            self._drop_client(c)
            return
        c.backlog += msgs
        self._serve_backlog(c)
        if eof:
            # A pending create goes on; its answer has nobody to go to.
            self._drop_client(c)

    def _serve_backlog(self, c: _Client) -> None:
        if c in self._held:
            return          # read, not served: the loop serves it after the others
        if self._holding:   # paced: served once the window ends
            self._held.add(c)
            self._deferred.append(c)
            return
        while c.backlog and not c.waiting and not c.closed and self.running:
            (jlen, blen), body = c.backlog.pop(0)
            t0 = time.perf_counter()
            op = "?"
            self._preempted = False
            try:
                # Only small frames without payload are remembered; a large
                # body arrives in a bytearray of its own and is never a key.
                memo = not blen and len(body) <= _KNOWN_BYTES
                known = self._known.get(body) if memo else None
                if known is None:
                    obj, payload = control.parse_frame(jlen, body)
                    op = str(obj.get("op"))
                    known = self._check(obj, payload, bytes(body) if memo else None)
                op = known[0]
                self._request(c, *known)
            except errors.ProtocolError as e:
                c.reply(schema.error(str(e)))
            finally:
                self.meter.record(time.perf_counter() - t0, op)
            if self._preempted:
                # A teardown step yielded because others wait: they go first,
                # then this client's requests (the kill controller keeps its
                # next destroys queued), also those that arrive meanwhile.
                self._preempted = False
                self._held.add(c)
                self._deferred.append(c)
                break

    # -- control requests ----------------------------------------------
    def _check(self, obj: dict, payload, body: bytes | None) -> tuple[str, dict, memoryview]:
        """(op, arguments, payload) of a parsed request (ProtocolError if
        it is not a valid one). Remembered by its frame ``body`` when given
        (a frame without payload): parsing and checking are pure, and the
        kill controller sends one destroy request thousands of times."""
        op, args = schema.check_request(obj, schema.CONTROL_OPS)
        if body is not None:
            if len(self._known) >= _KNOWN_FRAMES:
                self._known.clear()
            self._known[body] = (op, args, payload)
        return op, args, payload

    def _request(self, c: _Client, op: str, args: dict, payload) -> None:
        """Serve one checked request (arguments are passed as a copy)."""
        self.requests += 1
        try:
            result = getattr(self, "_op_" + op)(c, payload=payload, **args)
        except HVError as e:
            c.reply(schema.error(_sentence(e), e.code, e.name))
            return
        except errors.ProtocolError as e:    # a payload that does not match its arguments
            c.reply(schema.error(f"{op}: {e}"))
            return
        except Exception as e:          # a bug must not take every guest down
            traceback.print_exc()
            c.reply(schema.error(f"internal error in {op}: {e!r}", errno.EIO, "EIO"))
            return
        if result is None:          # answered later (create) or already (stop)
            return
        obj, data = result if isinstance(result, tuple) else (result, b"")
        c.reply(schema.ok(**obj), data)

    def _op_ping(self, c, payload):
        return {"pid": os.getpid()}

    def _op_info(self, c, payload):
        st = self.hv.stats()
        st.update(teardown=self.teardown, sched=self.sched_applied, max_pause_ms=round(self.meter.max_s * 1e3, 3),
                  max_pause_op=self.meter.max_what, pause_histogram=self.meter.histogram(),
                  steps=self.meter.steps, requests=self.requests, pid=os.getpid(),
                  socket=self.socket_path, uptime_s=round(time.time() - self.started, 3),
                  pool=self.hv.pool.name, pause_by_op=self.meter.by_op(),
                  cow_faults=self.cow_faults)
        st.update(paced=self.paced[0], paced_ms=round(self.paced[1] * 1e3, 3))
        st.update(enomem_waits=self.enomem_waits, parked=sorted(self.parked),
                  events_posted=self.ring.posted, event_subscribers=self.ring.live())
        return st

    def _op_list(self, c, payload):
        return {"domains": [self._describe(d) for d in self.hv.domains.values()]}

    def _describe(self, d) -> dict:
        g = self.guests.get(d.domid)
        out = {"domid": d.domid, "name": d.name, "state": d.state, "pages": d.npages,
               "tot_pages": d.tot_pages, "shr_pages": d.shr_pages,
               "pid": g.proc.pid if g else None, "p2m": d.p2m.name}
        if d.dying:
            # where an interrupted teardown stands: 'hvctl destroy' resumes here
            out.update(phase=d.teardown_phase, cursor=d.relinquish_cursor,
                       relinquished=d.relinquished)
        if d.domid in self.parked:
            out.update(self._describe_parked(d.domid))
        if g is not None:
            out.update(workload=g.config["workload"], seed=g.config["seed"],
                       guest_socket=g.sock_path if g.exit is None else None,
                       exit=g.exit, **g.counters,
                       fault_p50_us=g.reported.get("fault_p50_us"),
                       fault_p99_us=g.reported.get("fault_p99_us"))
        return out

    def _op_audit(self, c, payload):
        report = self.hv.audit_report()
        return {"errors": len(report), "report": report[:20]}

    def _op_stop(self, c, payload):
        # Keep the asking connection out of the clean-up: it gets the answer.
        self.clients.discard(c)
        self.sel.unregister(c.sock)
        c.closed = True
        summary = self.close()
        try:
            c.sock.setblocking(True)
            control.send_frame(c.sock, schema.ok(stopped=True, **summary))
        except OSError:
            pass
        c.sock.close()
        return None

    def _op_create(self, c, payload, pages, workload, seed, name, paused, rate, batch):
        if workload not in WORKLOADS:
            raise HVError(EINVAL, f"unknown workload {workload!r} (choose from {', '.join(WORKLOADS)})")
        if pages > self.hv.pool.nfree:
            # refused before anything is sized by ``pages`` (up to 2**31)
            raise HVError(ENOMEM, f"cannot create a domain of {pages} pages: "
                                  f"{pages} frames asked, {self.hv.pool.nfree} free")
        instance = self.instances + 1
        content = images.content_for(workload, seed, instance, pages)
        try:
            d = self.hv.create_domain(pages, content=content, name=name, paused=paused)
        except HVError as e:
            raise HVError(e.code, f"cannot create a domain of {pages} pages: {_sentence(e)}") from None
        self.instances = instance
        try:
            g = self._spawn_guest(d, dict(workload=workload, seed=seed, instance=instance,
                                          paused=paused, rate=rate, batch=batch, name=d.name))
        except OSError as e:
            self.hv.destroy_domain(d.domid)
            raise HVError(EINVAL, f"cannot start the guest process: {e.strerror}") from None
        g.creator = c
        c.waiting = True
        return None

    def _op_destroy(self, c, payload, domid, brief):
        """One step of a domain's teardown (Xen's preemptible domain_kill).

        The first step stops the guest and marks the domain dying (nominate
        on it fails with EBUSY from then on); every step relinquishes from
        the saved cursor. Preemptible mode stops as soon as other work is
        pending or the step's budget is spent and answers ``done: false``
        ("restart"): the kill controller asks again. Monolithic mode does
        the whole teardown in this one step. Each answer carries the
        progress and the teardown's totals so far; a ``brief`` restart only
        what changes from step to step (:data:`_RESTART_JSON`, encoded
        without the JSON encoder: a restart is answered thousands of times
        a second while guests wait behind it).
        """
        t0, cpu0 = time.perf_counter(), time.thread_time()
        d = self.hv.domains.get(domid)
        if d is None and domid in self.destroyed:
            raise HVError(ESRCH, f"domain {domid} is already destroyed")
        d = self.hv.domain(domid)
        resumed = d.dying
        if not resumed:
            self._stop_guest(domid)
            self.hv.kill(domid)
        td = d.info.get("teardown")
        if td is None:
            td = d.info["teardown"] = {
                "started": time.monotonic(), "entries_total": d.shr_pages,
                "steps": 0, "continuations": 0, "max_step_s": 0.0, "max_step_cpu_s": 0.0, "busy_s": 0.0}
        if self.teardown == "monolithic":
            done = self.hv.relinquish(domid)
        else:
            done = self.hv.relinquish(domid, self._other_work(c, t0),
                                      chunk_seconds=TEARDOWN_CHUNK_SECONDS)
        step = time.perf_counter() - t0
        td["steps"] += 1
        td["continuations"] += not done
        td["busy_s"] += step
        td["max_step_s"] = max(td["max_step_s"], step)
        # CPU time too: on a busy machine a step's wall time includes the
        # time other processes held our CPU, which is not the step's work
        td["max_step_cpu_s"] = max(td["max_step_cpu_s"], time.thread_time() - cpu0)
        if brief and not done:
            js = (_RESTART_JSON % (
                domid, d.teardown_phase, d.relinquish_cursor, d.relinquished, td["steps"],
                td["continuations"], round(step * 1e3, 3), round(td["max_step_s"] * 1e3, 3),
                round(td["max_step_cpu_s"] * 1e3, 3), round(td["busy_s"], 6))).encode()
            if self._preempted or c.later:      # (answers keep their order)
                c.later += (control.FRAME_HDR.pack(len(js), 0), js)
            else:
                c.queue((control.FRAME_HDR.pack(len(js), 0), js))
            return None
        out = {"domid": domid, "done": done, "state": "destroyed" if done else "dying",
               "phase": "gone" if done else d.teardown_phase, "cursor": d.relinquish_cursor,
               "npages": d.npages, "entries": d.relinquished, "entries_total": td["entries_total"],
               "resumed": resumed, "steps": td["steps"], "continuations": td["continuations"],
               "step_ms": round(step * 1e3, 3), "max_pause_ms": round(td["max_step_s"] * 1e3, 3),
               "max_pause_cpu_ms": round(td["max_step_cpu_s"] * 1e3, 3),
               "hv_seconds": round(td["busy_s"], 6),
               "seconds": round(time.monotonic() - td["started"], 6)}
        if done:
            self.destroyed[domid] = out
        return out

    def _others_ready(self, c: _Client) -> bool:
        """Is anything but client ``c``'s connection ready (a guest's fault,
        another request, a new connection, a signal)? A zero-timeout poll:
        where a preemptible step asks whether to give way."""
        mine = c.sock
        return any(key.fileobj is not mine for key, _ in self.sel.select(0))

    def _other_work(self, c: _Client, t0: float):
        """The preemptible teardown's ``should_yield``: true when another
        chunk as long as the last one would end past the step's budget, or
        anything but the asking connection is ready (a guest's fault,
        another request, a new connection, a signal).

        Asked after every chunk, so it must be cheap: a clock read and a
        zero-timeout poll of the selector.
        """
        deadline = t0 + TEARDOWN_STEP_BUDGET
        clock, others_ready = time.perf_counter, self._others_ready
        last = [t0]

        def should_yield() -> bool:
            now = clock()
            chunk, last[0] = now - last[0], now
            # chunks grow up to 4x from one to the next: expect the target
            if now + max(chunk, TEARDOWN_CHUNK_SECONDS) >= deadline:
                return True
            if others_ready(c):
                self._preempted = True
                return True
            return False
        return should_yield

    def _op_pause(self, c, payload, domid):
        return self._set_paused(domid, True)

    def _op_unpause(self, c, payload, domid):
        return self._set_paused(domid, False)

    def _set_paused(self, domid: int, paused: bool) -> dict:
        d = self.hv.domain(domid)
        if domid in self.parked and d.state == "paused":
            return self._set_paused_parked(domid, paused)
        if d.state not in ("running", "paused"):
            raise HVError(EINVAL, f"domain {domid} is {d.state}")
        d.state = "paused" if paused else "running"
        g = self.guests.get(domid)
        if g is not None:
            g.notify(pipe.H_PAUSE if paused else pipe.H_UNPAUSE)
        return {"domid": domid, "state": d.state}

    def _op_nominate(self, c, payload, domid, gfn):
        return {"handle": self.hv.nominate(domid, gfn)}

    def _op_share(self, c, payload, sd, sgfn, sh, cd, cgfn, ch):
        self.hv.share(sd, sgfn, sh, cd, cgfn, ch)
        return {}

    def _op_add_to_physmap(self, c, payload, sd, sgfn, sh, cd, cgfn):
        self.hv.add_to_physmap(sd, sgfn, sh, cd, cgfn)
        return {}

    def _op_range_share(self, c, payload, sd, cd, first, last):
        return {"shared": self.hv.range_share(sd, cd, first, last)}

    def _op_unshare(self, c, payload, domid, gfn):
        return {"copied": bool(self.hv.unshare(domid, gfn))}

    def _op_read(self, c, payload, domid, gfn):
        return {}, self.hv.read(domid, gfn)

    def _op_nominate_many(self, c, payload, domid, count, budget_us):
        gfns = _array(payload, count, [np.int64])[0]
        t0 = time.perf_counter()
        parts, done = self._bounded(c, "nominate_many", count, budget_us,
                                    lambda lo, hi: self.hv.nominate_many(domid, gfns[lo:hi]))
        handles = np.concatenate([h for h, _ in parts])
        codes = np.concatenate([k for _, k in parts])
        # work_ms: the work's own time, without the framing
        return {"count": count, "done": done, "work_ms": round((time.perf_counter() - t0) * 1e3, 3)}, \
            np.concatenate([handles.astype("<u8").view(np.uint8),
                            codes.astype("<i8").view(np.uint8)]).tobytes()

    def _op_share_many(self, c, payload, sd, cd, count, budget_us):
        if (sd is None) != (cd is None):
            raise HVError(EINVAL, "share_many needs both sd and cd, or a domain per pair for both")
        if sd is None:
            sd, sg, sh, cd, cg, ch = _array(payload, count, [np.int64, np.int64, np.uint64,
                                                             np.int64, np.int64, np.uint64])
        else:
            sg, sh, cg, ch = _array(payload, count, [np.int64, np.uint64, np.int64, np.uint64])

        def work(lo, hi):
            part = slice(lo, hi)
            return self.hv.share_many(sd if np.ndim(sd) == 0 else sd[part], sg[part], sh[part],
                                      cd if np.ndim(cd) == 0 else cd[part], cg[part], ch[part])
        t0 = time.perf_counter()
        parts, done = self._bounded(c, "share_many", count, budget_us, work)
        codes = np.concatenate(parts)
        return {"count": count, "done": done, "shared": int((codes == 0).sum()),
                "work_ms": round((time.perf_counter() - t0) * 1e3, 3)}, codes.astype("<i8").tobytes()

    def _bounded(self, c: _Client, op: str, n: int, budget_us: int | None,
                 work: Callable[[int, int], object]) -> tuple[list, int]:
        """Run ``work(lo, hi)`` over items ``[0, n)`` in order, in chunks,
        within one step: (the chunks' results, items done).

        Without a budget, one chunk of everything. With ``budget_us``, the
        first chunk is sized by the op's cost model (:class:`ChunkCost`)
        to fill the budget, so a step is usually one chunk, one call into
        the core. Another chunk follows only while half the budget is left
        and nothing but this client is ready (a guest's fault, another
        request: they go first, as after a teardown step that yields). The
        answer says how many items were done; the caller sends the rest
        again. The first chunk always runs, so every request progresses.
        """
        if budget_us is None or n == 0:
            out = [work(0, n)]
            _settle()
            return out, n
        clock = time.perf_counter
        budget = budget_us * 1e-6
        deadline = clock() + budget
        cost = self._chunk_cost.get(op)
        if cost is None:
            cost = self._chunk_cost[op] = ChunkCost()
        out, lo = [], 0
        while lo < n:
            now = clock()
            left = deadline - now
            if lo:
                others = self._others_ready(c)
                if others or left < budget / 2:
                    self._preempted = others
                    break
            hi = min(n, lo + cost.items(left, BATCH_OVERRUN * budget))
            out.append(work(lo, hi))
            cost.learn(hi - lo, clock() - now)
            lo = hi
        _settle()
        return out, lo

    # -- guests --------------------------------------------------------
    def _spawn_guest(self, d, config: dict) -> _Guest:
        g2h_r, g2h_w = os.pipe()
        h2g_r, h2g_w = os.pipe()
        for fd in (g2h_r, h2g_r):
            pipe.set_pipe_size(fd)
        sock_path = guest_socket_path(self.state_dir, d.domid)
        config.update(domid=d.domid, pool=self.hv.pool.name, p2m=d.p2m.name, rfd=h2g_r,
                      wfd=g2h_w, socket=sock_path, hv_pid=os.getpid())
        try:
            proc = subprocess.Popen([sys.executable, "-m", "guests.runtime", json.dumps(config)],
                                    pass_fds=(h2g_r, g2h_w), stdin=subprocess.DEVNULL,
                                    env=child_env(), cwd="/")
        finally:
            # Only the guest keeps its ends: our copies would hide its death.
            os.close(g2h_w)
            os.close(h2g_r)
            if "proc" not in locals():
                os.close(g2h_r)
                os.close(h2g_w)
        os.set_blocking(g2h_r, False)
        os.set_blocking(h2g_w, False)
        g = _Guest(self, d.domid, proc, g2h_r, h2g_w, sock_path, config)
        self.guests[d.domid] = g
        self.sel.register(g2h_r, selectors.EVENT_READ, lambda mask, g=g: self._guest_readable(g))
        return g

    def _guest_readable(self, g: _Guest) -> None:
        if g.closed:
            # Destroyed by an earlier event of the same select() batch: its
            # descriptor is closed (and its number may already be reused).
            return
        reader = g.reader
        if reader.partial:
            try:
                msgs, eof = reader.pump(limit=32)
            except errors.ProtocolError as e:
                self._crash(g, f"protocol violation: {e}")
                return
        else:
            # One read; what a waiting guest sends is one message, usually
            # a small G_WRITE, served here without the reader's machinery.
            buf = g.inbuf
            try:
                n = os.readv(g.fd, (buf,))
            except (BlockingIOError, InterruptedError):
                return
            except (ConnectionResetError, BrokenPipeError):
                n = 0
            if n == 0:
                self._guest_eof(g)
                return
            if _WRITE_MSG.size < n <= _WRITE_MSG.size + constants.PAGE_SIZE:
                mtype, seq, blen, gfn, offset = _WRITE_MSG.unpack_from(buf)
                if mtype == pipe.G_WRITE and blen == n - 8 and offset + n - _WRITE_MSG.size <= constants.PAGE_SIZE:
                    self._guest_write(g, seq, gfn, offset, n)
                    return
            try:
                msgs = reader.feed(buf[:n])
                eof = False
                if n == len(buf) or reader.partial:
                    more, eof = reader.pump(limit=32)
                    msgs += more
            except errors.ProtocolError as e:
                self._crash(g, f"protocol violation: {e}")
                return
        name = g.step_name
        for (mtype, seq, _), body in msgs:
            t0 = time.perf_counter()
            try:
                self._guest_message(g, mtype, seq, body)
            except errors.ProtocolError as e:
                self._crash(g, f"protocol violation: {e}")
                return
            except Exception as e:      # a bug: crash this domain, not the host
                traceback.print_exc()
                self._crash(g, f"internal error: {e!r}")
                return
            finally:
                self.meter.record(time.perf_counter() - t0, name, "guest")
            if g.closed:
                return
        if eof:
            self._guest_eof(g)

    def _guest_eof(self, g: _Guest) -> None:
        """EOF on a guest's pipe: a dying process closes its files a moment
        before the kernel has its exit status; wait that moment (bounded,
        once per guest) so that the domain's ``exit`` says how it died."""
        if g.proc.poll() is None:
            try:
                g.proc.wait(timeout=GUEST_EXIT_WAIT)
            except subprocess.TimeoutExpired:
                pass                    # alive without its pipe: reaped later
        self._guest_gone(g)

    def _guest_write(self, g: _Guest, seq: int, gfn: int, offset: int, n: int) -> None:
        """One well-formed ``G_WRITE`` of ``n`` bytes in ``g.inbuf`` (header
        included): the CoW fault fast path, one timed step. A domain that is
        not simply running takes the general path."""
        t0 = time.perf_counter()
        try:
            d = self.hv.domains[g.domid]
            if d.state != "running" or g.domid in self.parked:
                self._guest_message(g, pipe.G_WRITE, seq, bytes(g.inbuf[8:n]))
                return
            try:
                value = self.hv.write(g.domid, gfn, offset, g.inbuf[_WRITE_MSG.size:n])
                status = 0
            except HVError as e:
                if e.code == ENOMEM:
                    self._park(g, pipe.G_WRITE, seq, bytes(g.inbuf[8:n]))
                    return
                status, value = e.code, 0
            else:
                c = g.counters
                c["writes"] += 1
                c["pages_written"] += 1
                if value:
                    c["cow_faults"] += 1
                    self.cow_faults += 1
            g.reply(seq, status, value)
        except errors.ProtocolError as e:
            self._crash(g, f"protocol violation: {e}")
        except Exception as e:          # a bug: crash this domain, not the host
            traceback.print_exc()
            self._crash(g, f"internal error: {e!r}")
        finally:
            self.meter.record(time.perf_counter() - t0, g.step_name, "guest")

    def _guest_message(self, g: _Guest, mtype: int, seq: int, body) -> None:
        if mtype == pipe.G_WRITE or mtype == pipe.G_WRITE_PAGES or mtype == pipe.G_WRITE_MANY:
            if g.domid in self.parked:
                # waiting for memory: later writes queue behind, in order
                self._park(g, mtype, seq, body)
                return
            d = self.hv.domains[g.domid]
            status = value = 0
            try:
                if d.state == "paused":
                    raise HVError(EBUSY, f"domain {g.domid} is paused")
                value = self._apply_write(g, mtype, body)
            except HVError as e:
                if e.code == ENOMEM:
                    # The vCPU pauses and the sharing ring says why; the
                    # write is answered once frames are free again.
                    self._park(g, mtype, seq, body)
                    return
                status = e.code
            g.reply(seq, status, value)
        elif mtype == pipe.G_STATS:
            g.reported = pipe.decode_stats(body)
        elif mtype == pipe.G_HELLO:
            if len(body) != pipe.HELLO.size:
                raise errors.ProtocolError("bad hello message")
            g.ready = True
            self._answer_creator(g, None)

    # -- memory pressure: the sharing event ring ------------------------
    def _apply_write(self, g: _Guest, mtype: int, body) -> int:
        """Apply one guest write message; the CoW faults it took.
        Raises HVError (ENOMEM: nothing changed) or ProtocolError."""
        if mtype == pipe.G_WRITE:
            gfn, offset, data = pipe.decode_write(body)
            value = int(self.hv.write(g.domid, gfn, offset, data))
            g.counters["pages_written"] += 1
        elif mtype == pipe.G_WRITE_MANY:
            gfns, offsets, lengths, data = pipe.decode_write_many(body)
            value = int(self.hv.write_many(g.domid, gfns, offsets, lengths, data))
            g.counters["pages_written"] += len(gfns)
        else:
            gfns, pages = pipe.decode_write_pages(body)
            value = int(self.hv.write_pages(g.domid, gfns, pages))
            g.counters["pages_written"] += len(gfns)
        g.counters["writes"] += 1
        g.counters["cow_faults"] += value
        self.cow_faults += value
        return value

    def _park(self, g: _Guest, mtype: int, seq: int, body) -> None:
        """Keep a write that found no free frame: pause the domain (its
        guest already waits for the answer) and post ``enomem`` on the ring."""
        if mtype == pipe.G_WRITE:
            gfn, _, _ = pipe.decode_write(body)            # refuses garbage before keeping it
            pages, needed = 1, 1
        elif mtype == pipe.G_WRITE_MANY:
            gfns = pipe.decode_write_many(body)[0]
            gfn, pages = int(gfns[0]), len(gfns)
            needed = self._frames_needed(g.domid, gfns)
        else:
            gfns, _ = pipe.decode_write_pages(body)
            gfn, pages = int(gfns[0]), len(gfns)
            needed = self._frames_needed(g.domid, gfns)
        p = self.parked.get(g.domid)
        first = p is None
        if first:
            p = self.parked[g.domid] = Parked()
        p.writes.append(ParkedWrite(mtype, seq, body, int(gfn), pages))
        if not first:
            return
        d = self.hv.domains[g.domid]
        d.state = "paused"
        g.notify(pipe.H_PAUSE)
        self.enomem_waits += 1
        free = self.hv.pool.nfree
        self._parked_free = free if len(self.parked) == 1 else min(self._parked_free, free)
        self._parked_mark = self._sharing_mark()
        self.ring.post("enomem", domid=g.domid, gfn=int(gfn), pages=pages, needed=needed,
                       frames_free=free, frames_total=self.hv.pool.nframes)

    def _frames_needed(self, domid: int, gfns) -> int:
        """Frames a batched write must allocate: one per shared gfn, less
        the frames whose every sharer is in the batch (the last takes it)."""
        from ..p2m import RAM_SHARED
        d = self.hv.domains.get(domid)
        try:
            gfns = np.unique(np.asarray(gfns, dtype=np.int64))
            gfns = gfns[(gfns >= 0) & (gfns < d.npages)]
            shared = gfns[d.p2m.type[gfns] == RAM_SHARED]
            frames, counts = np.unique(d.p2m.mfn[shared], return_counts=True)
            return int(len(shared) - (counts == self.hv.pool.type_count[frames]).sum())
        except (AttributeError, IndexError, ValueError):
            return 0

    def _sharing_mark(self) -> tuple:
        hv = self.hv
        return (hv.pool.nfree, hv.nr_shared_mfns, hv.nr_saved_mfns)

    def _retry_parked(self, changed_only: bool = False) -> None:
        """Give parked writes another go, oldest domain first.

        Called after every step, so it must be cheap when nothing can have
        changed: it retries only when more frames are free than at the last
        failure. The housekeeping tick (``changed_only``) also retries when
        the sharing counters moved, which catches a parked gfn that became
        the last sharer of its frame (unshared elsewhere: no copy needed).
        """
        free = self.hv.pool.nfree
        if changed_only:
            if self._sharing_mark() == self._parked_mark:
                return
        elif free <= self._parked_free:
            self._parked_free = free
            return
        t0 = time.perf_counter()
        for domid in list(self.parked):
            self._resume_parked(domid)
        self._parked_free = self.hv.pool.nfree
        self._parked_mark = self._sharing_mark()
        self.meter.record(time.perf_counter() - t0, "resume")

    def _resume_parked(self, domid: int) -> bool:
        """Apply a domain's parked writes in order; True once none is left.
        The last answer goes after the unpause, so the guest runs on at once."""
        p = self.parked.get(domid)
        if p is None:
            return True
        g = self.guests.get(domid)
        d = self.hv.domains.get(domid)
        if g is None or g.closed or d is None or d.dying:
            self._cancel_parked(domid, "the domain is gone")
            return True
        first = p.writes[0] if p.writes else None
        while p.writes:
            w = p.writes[0]
            status = value = 0
            try:
                value = self._apply_write(g, w.mtype, w.body)
            except HVError as e:
                if e.code == ENOMEM:
                    return False
                status = e.code
            except errors.ProtocolError as e:             # checked when parked: not expected
                self._crash(g, f"protocol violation: {e}")
                return True
            p.writes.popleft()
            if not p.writes:
                del self.parked[domid]
                d.state = "paused" if p.hold else "running"
                if not p.hold:
                    g.notify(pipe.H_UNPAUSE)
                self.ring.post("resumed", domid=domid, gfn=first.gfn if first else None,
                               waited_ms=round((time.monotonic() - p.since) * 1e3, 3),
                               state=d.state, frames_free=self.hv.pool.nfree)
            g.reply(w.seq, status, value)
        return True

    def _cancel_parked(self, domid: int, why: str) -> None:
        """The domain of parked writes is destroyed or crashed: its writes
        die with it (nobody waits for them any more)."""
        p = self.parked.pop(domid, None)
        if p is not None:
            self.ring.post("cancelled", domid=domid, writes=len(p.writes), reason=why,
                           waited_ms=round((time.monotonic() - p.since) * 1e3, 3))

    def _set_paused_parked(self, domid: int, paused: bool) -> dict:
        """pause/unpause of a domain that waits for memory: pause makes it
        stay paused once its write is done; unpause retries now and says
        so if there is still no frame."""
        p = self.parked[domid]
        p.hold = paused
        if not paused and not self._resume_parked(domid):
            raise HVError(ENOMEM, f"domain {domid} waits for free memory for a copy-on-write "
                                  f"fault; it resumes by itself once frames are freed")
        return {"domid": domid, "state": self.hv.domains[domid].state}

    def _describe_parked(self, domid: int) -> dict:
        p = self.parked.get(domid)
        if p is None:
            return {}
        return {"waiting_for_memory": True, "parked_writes": len(p.writes),
                "waiting_ms": round((time.monotonic() - p.since) * 1e3, 3)}

    def _op_events(self, c, payload, since):
        """Subscribe this connection to the sharing event ring: an answer,
        the retained events after ``since`` (none if not given), then every
        new event as its own frame, until either side closes. Pushing only
        queues bytes, so a slow subscriber never holds the loop; one that
        falls :data:`EVENTS_MAX_QUEUE` bytes behind is dropped."""
        c.reply(schema.ok(subscribed=True, seq=self.ring.seq, parked=sorted(self.parked)))

        def push(ev, c=c) -> bool:
            if c.closed:
                return False
            if len(c.out) > EVENTS_MAX_QUEUE:
                self._drop_client(c)
                return False
            c.reply(ev)
            return not c.closed
        for ev in (self.ring.since(since) if since is not None else ()):
            push(ev)
        self.ring.subscribe(push, lambda c=c: not c.closed)
        return None

    def _answer_creator(self, g: _Guest, failure: str | None) -> None:
        c, g.creator = g.creator, None
        if c is None:
            return
        c.waiting = False
        if failure is None:
            c.reply(schema.ok(domid=g.domid, pid=g.proc.pid, name=self.hv.domains[g.domid].name,
                         guest_socket=g.sock_path))
        else:
            c.reply(schema.error(failure, EINVAL, "EINVAL"))
        self._serve_backlog(c)

    def _detach_guest(self, g: _Guest) -> None:
        """Close our pipe ends and forget the descriptors (idempotent)."""
        if g.closed:
            return
        g.closed = True
        if g.domid in self.parked:
            self._cancel_parked(g.domid, g.exit or "the guest exited")
        self.sel.unregister(g.fd)
        if getattr(g, "_wregistered", False):
            self.sel.unregister(g.wfd)
        os.close(g.fd)
        os.close(g.wfd)
        try:
            os.unlink(g.sock_path)
        except FileNotFoundError:
            pass

    def _guest_gone(self, g: _Guest) -> None:
        """The guest's pipe hit EOF: its process is exiting or gone."""
        if g.closed:
            return
        self._detach_guest(g)
        d = self.hv.domains.get(g.domid)
        if d is not None and d.state in ("running", "paused"):
            d.state = "crashed"
        g.exit = g.exit or "exited"
        self._reap(g)
        if g.creator is not None:
            self.hv.destroy_domain(g.domid)
            self.guests.pop(g.domid, None)
            self._answer_creator(g, f"the guest process of domain {g.domid} {g.exit} while starting")

    def _reap(self, g: _Guest) -> None:
        rc = g.proc.poll()
        if rc is None:
            if g not in self.zombies:
                self.zombies.append(g)
            return
        if g in self.zombies:
            self.zombies.remove(g)
        if g.exit in (None, "exited"):
            g.exit = _describe_exit(rc)

    def _crash(self, g: _Guest, why: str) -> None:
        """Crash a domain: its guest is killed, its memory kept until destroy."""
        d = self.hv.domains.get(g.domid)
        if d is not None and d.state in ("running", "paused"):
            d.state = "crashed"
        g.exit = why
        if g.proc.poll() is None:
            g.proc.kill()
        self._guest_gone(g)
        print(f"hvshare: domain {g.domid} crashed: {why}", file=sys.stderr, flush=True)

    def _stop_guest(self, domid: int) -> None:
        """Stop a domain's guest now and forget its pipes (destroy).

        SIGSTOP stops it at once: from here on it neither reads nor writes.
        Its SIGKILL waits for the next housekeeping tick, because a SIGKILL
        wakes the guest to die and a busy scheduler may run that exit in
        the middle of our step (milliseconds of wall time, where the stop
        costs some 50 us).
        """
        g = self.guests.pop(domid, None)
        if g is None:
            return
        self._cancel_parked(domid, "destroyed")
        if g.proc.poll() is None:
            try:
                os.kill(g.proc.pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
            g.kill_pending = True
        self._detach_guest(g)
        if g.creator is not None:
            self._answer_creator(g, f"domain {domid} was destroyed while its guest started")
        self._reap(g)

    def _tick(self) -> None:
        """Housekeeping, every _TICK seconds: reap guests, time out starts."""
        t0 = time.perf_counter()
        now = time.monotonic()
        self._next_tick = now + _TICK
        for g in list(self.zombies):
            if g.kill_pending:
                g.kill_pending = False          # stopped by destroy: now it dies
                if g.proc.poll() is None:
                    g.proc.kill()
            self._reap(g)
        for g in list(self.guests.values()):
            if g.closed:
                continue
            if g.proc.poll() is not None:
                # Dead without us seeing EOF yet: the pipe will say so too.
                self._guest_readable(g)
            elif not g.ready and now - g.started > GUEST_START_TIMEOUT:
                self._crash(g, f"did not start within {GUEST_START_TIMEOUT:g} s")
        self.meter.record(time.perf_counter() - t0, "tick")
        if self.parked:
            self._retry_parked(changed_only=True)


def _apply_sched(mode: str) -> str:
    """Schedule this process as ``mode`` asks; returns what it got
    (``fifo`` needs CAP_SYS_NICE or an RLIMIT_RTPRIO: without, ``normal``)."""
    if mode != "fifo":
        return "normal"
    try:
        policy = os.SCHED_FIFO | getattr(os, "SCHED_RESET_ON_FORK", 0)
        os.sched_setscheduler(0, policy, os.sched_param(os.sched_get_priority_min(os.SCHED_FIFO)))
    except (OSError, AttributeError):
        return "normal (fifo not permitted)"
    return "fifo"


def _pace_duty() -> float | None:
    """The duty cycle a real-time hypervisor keeps under: PACE_DUTY, or
    less if the kernel allows real-time tasks less; None if unlimited."""
    try:
        with open("/proc/sys/kernel/sched_rt_runtime_us") as f:
            runtime = int(f.read())
        with open("/proc/sys/kernel/sched_rt_period_us") as f:
            period = int(f.read())
    except (OSError, ValueError):
        return PACE_DUTY
    if runtime < 0:
        return None
    return min(PACE_DUTY, runtime / period - 0.05)


def _array(payload, count: int, dtypes) -> list[np.ndarray]:
    """Split a request payload into ``count``-long little-endian arrays."""
    want = 8 * count * len(dtypes)
    if len(payload) != want:
        raise errors.ProtocolError(f"payload of {len(payload)} bytes, expected {want}")
    return [np.frombuffer(payload, dtype=np.dtype(t).newbyteorder("<"), count=count, offset=8 * count * i)
            for i, t in enumerate(dtypes)]


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with status {rc}"


def _sentence(e: HVError) -> str:
    msg = str(e)
    prefix = f"{e.name}: "
    if msg.startswith(prefix):
        msg = msg[len(prefix):]
    if e.code == ESRCH and msg.startswith("no domain "):
        msg = "no domain with id " + msg[len("no domain "):]
    return msg or e.name


# ----------------------------------------------------------------------
# entry points


def serve(socket_path: str, frames: int = DEFAULT_FRAMES, rmap: str = "buckets",
          teardown: str = "preemptible", ready_fd: int | None = None, announce=None,
          sched: str = "fifo") -> int:
    """Run a hypervisor on ``socket_path`` until it is stopped.

    ``ready_fd`` (a pipe) receives one line once it serves -- ``ready PID`` --
    or why it could not start -- ``error SENTENCE`` -- and is closed: the
    launcher waits on it. ``announce(server, cleaned)`` is called once
    serving (the foreground start prints there).
    """
    srv = Server(socket_path, frames, rmap, teardown, sched)
    try:
        cleaned = srv.open()
    except StartError as e:
        _notify(ready_fd, f"error {e}")
        if ready_fd is None:
            print(f"hvshare: {e}", file=sys.stderr)
        return 1
    _notify(ready_fd, f"ready {os.getpid()} {json.dumps(cleaned)}")
    if announce is not None:
        announce(srv, cleaned)
    _quiet_collector()
    srv.run()
    return 0


def _quiet_collector() -> None:
    """Keep the cycle collector's passes short: what exists once the
    hypervisor serves (modules, the core, its arrays) lives as long as the
    process, so it is frozen out of every pass, and the youngest generation
    is collected less often. A full pass over a busy hypervisor's objects
    (an rmap frame per shared page) would otherwise be a step of several ms."""
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, GC_YOUNG_THRESHOLD), gen1, gen2)


def _settle() -> None:
    """After a batch that made shared frames: what it made (rmap frame
    objects, one per nominated page) lives until unshared, so it joins the
    frozen state out of the cycle collector's passes (O(1)). Left young, a
    dedup pass's 50,000 frames would trigger collections of 0.6 ms (the
    youngest generation) to 5 ms (the next) in the middle of later steps."""
    gc.freeze()


def _notify(fd: int | None, line: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, (line + "\n").encode())
        os.close(fd)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    """``python -m hvcore.process``: what ``hvctl start`` runs (in a new session)."""
    p = argparse.ArgumentParser(prog="python -m hvcore.process", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", required=True)
    p.add_argument("--frames", type=int, default=DEFAULT_FRAMES)
    p.add_argument("--rmap", default="buckets")
    p.add_argument("--teardown", default="preemptible")
    p.add_argument("--sched", default="fifo")
    p.add_argument("--ready-fd", type=int)
    a = p.parse_args(argv)
    return serve(a.socket, a.frames, a.rmap, a.teardown, a.ready_fd, sched=a.sched)


if __name__ == "__main__":
    sys.exit(main())
