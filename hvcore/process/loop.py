"""The hypervisor process: one thread, one event loop.

It models one hypervisor CPU: a ``selectors`` loop over

- the **control socket** (Unix, mode 0600), where toolstack clients send
  framed JSON requests (:mod:`hvcore.wire.control`);
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
``enomem`` event goes onto the sharing event ring (:mod:`.parking`,
``hvctl events``); after every step that freed frames the parked writes are
retried, and the domain runs again once its writes are done.

The process is :class:`HypervisorProcess`, composed of one part per
concern: :mod:`.control` (the op table), :mod:`.steps` (the step meter and
budget), :mod:`.guests` (guest processes), :mod:`.parking` (parked writes
and the event ring), :mod:`.endpoints` (the peers); its files are laid out by
:mod:`hvcore.statedir`. This module holds the loop itself: the selector, the tick,
signals, pacing under real-time scheduling, and start and stop.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import fcntl
import json
import math
import os
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback

import numpy as np

from ..wire import schema
from .. import errors, shm
from ..errors import ECANCELED
from ..constants import DEFAULT_FRAMES, RMAP_POLICIES, SCHED_MODES, TEARDOWN_MODES
from ..budget import ChunkCost
from ..statedir import CRASH_NAME, LOG_NAME, cleanup_leftovers, make_private_dirs, socket_path_problem, state_dir_for
from .control import ControlOps
from .jobs import Jobs, tell_now
from .endpoints import ControlConnection, Endpoint, GuestEndpoint
from .guests import GUEST_START_TIMEOUT, GuestLifecycle
from .parking import ParkedWrites, EventRing, Parked
from .steps import BudgetedSteps, StepMeter, quiet_collector

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
_TICK = 0.1
#: C heap the hypervisor backs at start for its steps' temporaries
HEAP_SCRATCH_BYTES = 24 << 20
#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


class LoopSelector(selectors.DefaultSelector):
    """The loop's selector: a :class:`selectors.DefaultSelector` whose
    :meth:`ready` hands out ``(data, events)`` of the ready descriptors
    without building the ``(SelectorKey, events)`` pairs of
    :meth:`select` (the loop registers callbacks as the data)."""

    def ready(self, timeout: float | None = None) -> list:
        poll = getattr(self, "_selector", None)
        if not isinstance(poll, _EPOLL):
            return [(key.data, ev) for key, ev in self.select(timeout)]
        if timeout is None:
            timeout = -1
        elif timeout > 0:
            timeout = math.ceil(timeout * 1e3) * 1e-3     # as select(): never early
        else:
            timeout = 0
        keys = self._fd_to_key
        out = []
        try:
            got = poll.poll(timeout, max(len(keys), 1))
        except InterruptedError:
            return out
        for fd, ev in got:
            key = keys.get(fd)
            if key is not None:
                out.append((key.data, ((ev & _EPOLL_READ and selectors.EVENT_READ)
                                       | (ev & _EPOLL_WRITE and selectors.EVENT_WRITE)) & key.events))
        return out


_EPOLL = getattr(select, "epoll", ())
_EPOLL_READ = ~getattr(select, "EPOLLOUT", 4)
_EPOLL_WRITE = ~getattr(select, "EPOLLIN", 1)


class StartError(Exception):
    """The hypervisor cannot start (one sentence for the user)."""


class HypervisorProcess(ControlOps, Jobs, BudgetedSteps, GuestLifecycle, ParkedWrites):
    """The hypervisor process's state: the core, the loop and its endpoints."""

    def __init__(self, socket_path: str, frames: int = DEFAULT_FRAMES, rmap: str = "buckets",
                 teardown: str = "preemptible", sched: str = "fifo", prefault: bool = False):
        #: back the whole pool with memory before serving (FramePool.prefault)
        self.prefault = prefault
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
        self._pacing = False
        self.hv = None
        self.sel = LoopSelector()
        self.meter = StepMeter()
        self.clients: set[ControlConnection] = set()
        self.guests: dict[int, GuestEndpoint] = {}
        self.zombies: list[GuestEndpoint] = []
        #: final teardown record of every domain destroy finished (domids
        #: are never reused, so a second destroy can say "already destroyed")
        self.destroyed: dict[int, dict] = {}
        #: a teardown step just yielded to other ready work (see _other_work)
        self._preempted = False
        #: clients whose next requests wait until that work has been served
        self._deferred: list[ControlConnection] = []
        self._deferred_set: set[ControlConnection] = set()     # the same, as a set
        #: checked requests by frame (see _check), at most KNOWN_FRAMES
        self._known: dict[bytes, tuple] = {}
        self.cow_faults = 0
        #: the sharing event ring, and the CoW writes waiting for a frame
        self.ring = EventRing()
        self.parked: dict[int, Parked] = {}
        #: writes of paused domains' guests, answered once unpaused
        self.paused_writes: dict[int, collections.deque] = {}
        #: fuzz runs waiting for their guest's G_DONE: domid -> (client, answer, t0)
        self.fuzz_waiters: dict[int, tuple] = {}
        self._parked_free = 0          # fewest free frames seen since a retry failed
        self._parked_mark: tuple = ()  # (free, shared, saved) when the last retry failed
        self.enomem_waits = 0
        self.running = False
        self.started = time.time()
        self.requests = 0
        #: cost model of a budgeted batch request's chunks, by op (_bounded)
        self._chunk_cost: dict[str, ChunkCost] = {}
        self.instances = 0
        #: operations continuing a step at a time (see .jobs), oldest first
        self.jobs: collections.deque = collections.deque()
        self._lsock: socket.socket | None = None
        self._lock_fd: int | None = None
        self._closed = False
        #: why the loop died of a bug (kept with the log), else None
        self.crash: str | None = None
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
        refused = socket_path_problem(self.socket_path)
        if refused:
            raise StartError(refused)
        try:
            make_private_dirs(self.state_dir)
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
        try:
            os.unlink(os.path.join(self.state_dir, CRASH_NAME))   # reported by the start
        except FileNotFoundError:
            pass
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        try:
            self.hv = Hypervisor(self.frames, rmap=self.rmap)
        except (OSError, ValueError, MemoryError) as e:
            self._release_files()
            raise StartError(f"cannot create a pool of {self.frames} frames: {e}") from None
        if self.prefault:
            self.hv.pool.prefault()
            self.hv.rmap.reserve_nodes(self.frames)
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
        ready, monotonic = self.sel.ready, time.monotonic
        now = monotonic()
        try:
            while self.running:
                if self._pace_duty is not None:
                    pace_s = self._pace(now)
                    self._pacing = pace_s > 0
                if self._pacing:
                    deferred, timeout = [], min(pace_s, _TICK)   # guests only, meanwhile
                else:
                    deferred, self._deferred = self._deferred, []
                    timeout = 0 if deferred or self.jobs else _TICK
                for callback, mask in ready(timeout):
                    callback(mask)
                    if self.parked:
                        self._retry_parked()
                    if not self.running:
                        break
                # after the work a teardown step yielded to: its answer, then
                # its next request
                if deferred or self._deferred:
                    for c in self._deferred if self._pacing else deferred:
                        if c.deferred_answer:
                            c.send_deferred()
                    for c in deferred:
                        self._deferred_set.discard(c)
                        self._serve_backlog(c)
                if self.jobs and not self._pacing and self.running:
                    self._job_step()
                now = monotonic()
                if now >= self._next_tick and self.running:
                    self._tick()
        except Exception as e:
            # A bug of the hypervisor: its domains are lost, but not the
            # trace. The log and the reason stay in the state directory,
            # where hvctl finds them.
            traceback.print_exc()
            self.crash = f"{type(e).__name__}: {e}"
            raise
        finally:
            signal.set_wakeup_fd(old_wake)
            for s, h in handlers.items():
                signal.signal(s, h)
            self.close()
            self.sel.close()
            os.close(wake_r)
            os.close(wake_w)

    def _pace(self, now: float | None = None) -> float:
        """Seconds control requests must still wait in this window (0.0:
        none): the rest of the window once the loop ran PACE_DUTY of it.
        Guests are served meanwhile; if they take the window past
        PACE_DUTY + PACE_GUEST_SLACK, this idles out the window. ``now``:
        the monotonic clock at the end of the last loop turn (default: now)."""
        if now is None:
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
        if not self._window[2]:             # the pacing starts: counted once
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
        self._cancel_jobs("the hypervisor stopped")
        for g in self.guests.values():
            if g.creator is not None and not g.creator.closed:
                c, g.creator = g.creator, None
                tell_now(c, schema.error(f"the hypervisor stopped before the guest of domain "
                                         f"{g.domid} started", ECANCELED, "ECANCELED"))
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
        keep = ()
        if self.crash is not None:
            keep = (LOG_NAME, CRASH_NAME)
            with open(os.path.join(self.state_dir, CRASH_NAME), "w") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {self.crash}\n")
        if os.path.isdir(self.state_dir):
            for n in os.listdir(self.state_dir):
                if n in keep:
                    continue
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
    def want_write(self, ep: Endpoint, on: bool) -> None:
        if isinstance(ep, ControlConnection):
            ev = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
            self.sel.modify(ep.sock, ev, self._client_event(ep))
        elif on and not getattr(ep, "_wregistered", False):
            self.sel.register(ep.wfd, selectors.EVENT_WRITE, lambda mask, g=ep: g.flush())
            ep._wregistered = True
        elif not on and getattr(ep, "_wregistered", False):
            self.sel.unregister(ep.wfd)
            ep._wregistered = False

    def lost(self, ep: Endpoint) -> None:
        """A peer went away while we wrote to it."""
        if isinstance(ep, ControlConnection):
            self._drop_client(ep)
        else:
            self._guest_gone(ep)

    def _client_event(self, c: ControlConnection):
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
            c = ControlConnection(self, sock)
            self.clients.add(c)
            self.sel.register(sock, selectors.EVENT_READ, self._client_event(c))

    def _drop_client(self, c: ControlConnection) -> None:
        if c.closed:
            return
        c.closed = True
        self.clients.discard(c)
        self.sel.unregister(c.sock)
        c.sock.close()

    def _client_readable(self, c: ControlConnection) -> None:
        t0, cpu0 = time.perf_counter(), time.thread_time()
        try:
            try:
                msgs, eof = c.reader.pump(limit=16)
            finally:
                # reading is work too: a step of its own
                self.meter.record(time.perf_counter() - t0, "read", "read", time.thread_time() - cpu0)
        except errors.ProtocolError as e:
            c.reply(schema.error(f"bad control frame: {e}"))
            self._drop_client(c)
            return
        c.backlog += msgs
        self._serve_backlog(c)
        if c.reader.failed is not None:
            # good requests before a bad frame were answered first
            c.reply(schema.error(f"bad control frame: {c.reader.failed}"))
            self._drop_client(c)
            return
        if eof:
            # A pending create goes on; its answer has nobody to go to.
            self._drop_client(c)

    def _tick(self) -> None:
        """Housekeeping, every _TICK seconds: reap guests, time out starts."""
        t0, cpu0 = time.perf_counter(), time.thread_time()
        now = time.monotonic()
        self._next_tick = now + _TICK
        self.meter.fold()
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
        self.meter.record(time.perf_counter() - t0, "tick", "tick", time.thread_time() - cpu0)
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


def _keep_scratch_mapped() -> None:
    """Let the C heap keep what numpy's temporaries freed (glibc:
    ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` up), so that a step's
    scratch arrays reuse mapped memory instead of faulting in fresh pages,
    which the kernel may take milliseconds to provide."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        return
    # and back that much heap now, once, rather than in a step
    scratch = np.ones(HEAP_SCRATCH_BYTES, np.uint8)
    del scratch


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


def serve(socket_path: str, frames: int = DEFAULT_FRAMES, rmap: str = "buckets",
          teardown: str = "preemptible", ready_fd: int | None = None,
          sched: str = "fifo", prefault: bool = False) -> int:
    """Run a hypervisor on ``socket_path`` until it is stopped.

    ``ready_fd`` (a pipe) receives one line once it serves -- ``ready PID`` --
    or why it could not start -- ``error SENTENCE`` -- and is closed: the
    launcher waits on it.
    """
    srv = HypervisorProcess(socket_path, frames, rmap, teardown, sched, prefault)
    try:
        cleaned = srv.open()
    except StartError as e:
        _notify(ready_fd, f"error {e}")
        if ready_fd is None:
            print(f"hvshare: {e}", file=sys.stderr)
        return 1
    from .. import kernels
    kernels.warm()                      # compiled, or loaded from the cache
    _notify(ready_fd, f"ready {os.getpid()} {json.dumps(cleaned)}")
    quiet_collector()
    _keep_scratch_mapped()
    srv.run()
    return 0


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
    p.add_argument("--prefault", action="store_true")
    p.add_argument("--ready-fd", type=int)
    a = p.parse_args(argv)
    return serve(a.socket, a.frames, a.rmap, a.teardown, a.ready_fd, sched=a.sched, prefault=a.prefault)


if __name__ == "__main__":
    sys.exit(main())
