"""The hypervisor process: one thread, one event loop.

It models one hypervisor CPU: a ``selectors`` loop over

- the **control socket** (Unix, mode 0600), where toolstack clients send
  framed JSON requests (:mod:`hvshare.hvcore.wire.control`);
- one **pipe pair per guest**: the guest's writes and CoW faults come in as
  binary messages and are answered on the second pipe. The pipe identifies
  the domain, so a guest can only ever touch its own gfns;

and runs every step (a request, a guest message, one step of a job or of a
guest's batch continued across steps) to completion before looking at the
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

Guests are real processes (``python -m hvshare.guests.runtime``) with two pipe
ends (``pass_fds``), started ahead into a small stock of warm guests
(:mod:`.stock`) and handed their domain once its memory is filled.
The create request is answered once the guest has mapped its memory and said
hello. A guest that exits (EOF on its pipe, then its exit status is
collected) leaves its domain ``crashed`` with its memory kept until destroy.
A CoW fault that finds no free frame does not fail the write: the domain
pauses, its write is parked (the guest simply waits for the answer) and an
``enomem`` event goes onto the sharing event ring (:mod:`.parking`,
``hvctl events``); after every step that freed frames the parked writes are
retried, and the domain runs again once its writes are done.

:class:`HypervisorProcess` is the composition root: it builds the parts,
each an object whose constructor names what it depends on, and runs the
loop between them (``docs/design.md``, "The hypervisor process")::

    HypervisorProcess: selector, Pacer (.pacing), tick, start and stop
      +- Clients (.clients)       control connections -> ControlOps.serve
      +- ControlOps (.control)    the op table, its context explicit
      +- JobQueue (.jobs)         jobs, seeing only a JobHost
      +- GuestTable (.guests)     guest processes and their pipes
      +- WritePath (.writes)      the one guest write path
      +- ParkingLot (.parking)    parked and held writes, the event ring
      +- Budget, StepMeter (.steps)

Its files are laid out by :mod:`hvshare.hvcore.statedir`.
"""
from __future__ import annotations

import argparse
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
import sys
import time
import traceback

import numpy as np

from .. import shm
from ..constants import (DEFAULT_FRAMES, DEFAULT_RMAP, DEFAULT_SCHED, DEFAULT_TEARDOWN, DEFAULT_WARM_GUESTS, PAGE_SIZE,
                         RMAP_POLICIES, SCHED_MODES, TEARDOWN_MODES)
from ..sharing_stats import reserve_scratch
from ..statedir import CRASH_NAME, LOG_NAME, cleanup_leftovers, make_private_dirs, socket_path_problem, state_dir_for
from .clients import Clients
from .control import ControlOps
from .guests import GuestTable
from .jobs import JobQueue, tell_now
from .pacing import Pacer, apply_sched, pace_duty
from .parking import EventRing, ParkingLot
from .steps import Budget, StepMeter, collect_young, quiet_collector
from .writes import StepPlan, WritePath

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


class JobContext:
    """What a job may use (:class:`.jobs.JobHost`): the core, the clients'
    answer, and the guest table's spawn and fork calls."""

    __slots__ = ("hv", "answer", "spawn_guest", "fork_made", "fork_gone")

    def __init__(self, hv, clients: Clients, guests: GuestTable):
        self.hv, self.answer = hv, clients.answer
        self.spawn_guest, self.fork_made, self.fork_gone = guests.spawn, guests.fork_made, guests.fork_gone


class HypervisorProcess:
    """The hypervisor process: its parts, the loop between them, start and stop.

    The parts that need the core (the parking lot, the write path, the
    guest table, the job queue and the op table) are built by
    :meth:`open`, once the core exists.
    """

    def __init__(self, socket_path: str, frames: int = DEFAULT_FRAMES, rmap: str = DEFAULT_RMAP,
                 teardown: str = DEFAULT_TEARDOWN, sched: str = DEFAULT_SCHED, prefault: bool = True,
                 warm_guests: int = DEFAULT_WARM_GUESTS):
        #: back the whole pool, the rmap's entries and the report's scratch
        #: with memory before serving (:meth:`reserve`)
        self.prefault = prefault
        #: guest processes kept started and waiting for a domain (.stock)
        self.warm_guests = warm_guests
        self.socket_path = os.path.abspath(socket_path)
        self.state_dir = state_dir_for(self.socket_path)
        self.frames, self.rmap, self.teardown, self.sched = frames, rmap, teardown, sched
        self.started = time.time()
        self.hv = None
        self.sel = LoopSelector()
        self.meter = StepMeter()
        self.budget = Budget(self.sel, self.meter)
        self.pacer = Pacer()
        self.clients = Clients(self.sel, self.meter, self.budget)
        self.ring = EventRing()
        self.lot: ParkingLot | None = None
        self.writes: WritePath | None = None
        self.guests: GuestTable | None = None
        self.jobs: JobQueue | None = None
        self.ops: ControlOps | None = None
        self.running = False
        self._lsock: socket.socket | None = None
        self._lock_fd: int | None = None
        self._closed = False
        #: why the loop died of a bug (kept with the log), else None
        self.crash: str | None = None
        self._next_tick = 0.0

    def _assemble(self, hv, sched: str) -> None:
        """Build the parts around the core ``hv``; ``sched``: the scheduling got."""
        self.hv = hv
        self.lot = ParkingLot(hv, self.ring)
        self.writes = WritePath(hv, self.lot, self.meter, StepPlan(lambda: self.budget.others_ready(None)))
        self.guests = GuestTable(hv, self.sel, self.meter, self.writes, self.lot, self.clients.answer,
                                 self.state_dir, self.warm_guests)
        self.jobs = JobQueue(JobContext(hv, self.clients, self.guests), self.budget, self.meter)
        self.ops = ControlOps(hv, guests=self.guests, writes=self.writes, lot=self.lot, jobs=self.jobs,
                              budget=self.budget, meter=self.meter, clients=self.clients,
                              teardown=self.teardown, sched=sched, socket_path=self.socket_path,
                              started=self.started, pacer=self.pacer, stop=self.close)
        self.clients.bind(self.ops.serve)

    # -- start and stop ------------------------------------------------
    def open(self) -> dict:
        """Take the state directory's lock, clear a dead predecessor's
        leftovers, build the core and the parts, and listen. Raises StartError."""
        from ..core import Hypervisor
        if self.rmap not in RMAP_POLICIES:
            raise StartError(f"unknown rmap policy {self.rmap!r} (choose from {', '.join(RMAP_POLICIES)})")
        if self.teardown not in TEARDOWN_MODES:
            raise StartError(f"unknown teardown mode {self.teardown!r} (choose from {', '.join(TEARDOWN_MODES)})")
        if self.sched not in SCHED_MODES:
            raise StartError(f"unknown scheduling {self.sched!r} (choose from {', '.join(SCHED_MODES)})")
        if self.frames < 1:
            raise StartError("the pool needs at least one frame")
        if self.warm_guests < 0:
            raise StartError("the number of warm guests cannot be negative")
        try:
            free = shutil.disk_usage(shm.SHM_DIR).free
        except OSError:
            free = None
        if free is not None and self.frames * PAGE_SIZE > free:
            # tmpfs would accept the size and fail later, with SIGBUS on a write
            raise StartError(f"a pool of {self.frames} frames needs {self.frames * PAGE_SIZE / 2**30:.1f} GiB "
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
            hv = Hypervisor(self.frames, rmap=self.rmap)
        except (OSError, ValueError, MemoryError) as e:
            self._release_files()
            raise StartError(f"cannot create a pool of {self.frames} frames: {e}") from None
        if self.prefault:
            self.reserve(hv)
        self._lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self._lsock.bind(self.socket_path)
        except OSError as e:
            hv.close()
            self._release_files()
            raise StartError(f"cannot listen on {self.socket_path}: {e.strerror}") from None
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        self._lsock.listen(64)
        self._lsock.setblocking(False)
        lsock = self._lsock
        self.sel.register(lsock, selectors.EVENT_READ, lambda mask: self.clients.accept(lsock))
        sched = apply_sched(self.sched)
        if sched == "fifo":
            self.pacer.duty = pace_duty()
        self._assemble(hv, sched)
        self.guests.fill_stock()            # they start while the kernels load
        self.running = self.clients.running = True
        return cleaned

    def reserve(self, hv) -> None:
        """Back, before serving, what the steps would otherwise have the
        kernel provide a page at a time: every frame of the pool, room for
        as many rmap entries as frames, and the sharing report's per-frame
        scratch -- as Xen's RAM and p2m pool are, at boot. A page first
        touched in a step costs that step up to a millisecond on a loaded
        host (docs/design.md, "Steps")."""
        hv.pool.prefault()
        hv.rmap.reserve_nodes(self.frames)
        reserve_scratch(hv)

    def run(self) -> None:
        """Serve until a stop request or a terminating signal."""
        # A signal wakes the loop through this pipe (its handler only flags).
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(wake_r, selectors.EVENT_READ, lambda mask: os.read(wake_r, 512))
        old_wake = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        ready, monotonic = self.sel.ready, time.monotonic
        clients, pacer, jobs, writes = self.clients, self.pacer, self.jobs, self.writes
        parked, pending = self.lot.parked, jobs.jobs        # tested every turn: plain containers
        continued, guests = writes.continued, self.guests
        now = monotonic()
        try:
            while self.running:
                if pacer.duty is not None:
                    pace_s = pacer.hold(now)
                    clients.paced = pace_s > 0
                if clients.paced:
                    deferred, timeout = [], min(pace_s, _TICK)   # guests only, meanwhile
                else:
                    deferred, clients.deferred = clients.deferred, []
                    timeout = 0 if deferred or pending else _TICK
                for callback, mask in ready(0 if continued else timeout):
                    callback(mask)
                    if parked:
                        writes.retry()
                    if not self.running:
                        break
                # a guest write continued across steps: its next step, after
                # what was ready
                if continued and self.running:
                    guests.continue_write()
                # after the work a teardown step yielded to: its answer, then
                # its next request
                if deferred or clients.deferred:
                    clients.serve_deferred(deferred)
                if pending and not clients.paced and self.running:
                    jobs.step()
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

    def _on_signal(self, signum, frame) -> None:
        self.running = self.clients.running = False

    def close(self) -> dict:
        """Stop every guest, free every segment, remove our files (idempotent)."""
        if self._closed:
            return {"guests": 0, "segments": 0}
        self._closed = True
        self.running = self.clients.running = False
        if self.hv is not None:
            self.jobs.cancel_all("the hypervisor stopped")
            self.guests.abandon_starts(tell_now)
        self.clients.drop_all()
        n_guests = self.guests.close() if self.guests is not None else 0
        n_segments = 0
        if self.hv is not None:
            n_segments = 1 + len(self.hv.domains)
            self.hv.close()
        if self._lsock is not None:
            self.sel.unregister(self._lsock)
            self._lsock.close()
        self._release_files()
        return {"guests": n_guests, "segments": n_segments}

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

    def _tick(self) -> None:
        """Housekeeping, every _TICK seconds: reap guests, time out starts."""
        step = self.meter.begin()
        now = time.monotonic()
        self._next_tick = now + _TICK
        self.meter.fold()
        self.guests.housekeeping(now)
        self.meter.end(step, "tick", "tick")
        collect_young(self.meter)
        self.guests.refill_stock()
        if self.lot.parked:
            self.writes.retry(changed_only=True)


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


def serve(socket_path: str, frames: int = DEFAULT_FRAMES, rmap: str = DEFAULT_RMAP,
          teardown: str = DEFAULT_TEARDOWN, ready_fd: int | None = None,
          sched: str = DEFAULT_SCHED, prefault: bool = True, warm_guests: int = DEFAULT_WARM_GUESTS) -> int:
    """Run a hypervisor on ``socket_path`` until it is stopped.

    ``ready_fd`` (a pipe) receives one line once it serves -- ``ready PID`` --
    or why it could not start -- ``error SENTENCE`` -- and is closed: the
    launcher waits on it.
    """
    srv = HypervisorProcess(socket_path, frames, rmap, teardown, sched, prefault, warm_guests)
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
    """``python -m hvshare.hvcore.process``: what ``hvctl start`` runs (in a new session)."""
    p = argparse.ArgumentParser(prog="python -m hvshare.hvcore.process", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", required=True)
    p.add_argument("--frames", type=int, default=DEFAULT_FRAMES)
    p.add_argument("--rmap", default=DEFAULT_RMAP)
    p.add_argument("--teardown", default=DEFAULT_TEARDOWN)
    p.add_argument("--sched", default=DEFAULT_SCHED)
    p.add_argument("--prefault", action="store_true", default=True,
                   help="back the pool before serving (the default)")
    p.add_argument("--lazy-pool", dest="prefault", action="store_false",
                   help="leave the pool's pages to be provided when first written")
    p.add_argument("--warm-guests", type=int, default=DEFAULT_WARM_GUESTS)
    p.add_argument("--ready-fd", type=int)
    a = p.parse_args(argv)
    return serve(a.socket, a.frames, a.rmap, a.teardown, a.ready_fd, sched=a.sched, prefault=a.prefault,
                 warm_guests=a.warm_guests)


if __name__ == "__main__":
    sys.exit(main())
