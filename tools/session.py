"""Starting hypervisors, and sessions that leave nothing behind.

:func:`start_hypervisor` launches ``python -m hvshare.hvcore.process`` detached (a
new session, stdio to the state directory's log) and returns once it
serves, or raises :class:`~tools.errors.HVCtlError` with the hypervisor's
own reason. :func:`cleanup_dead` removes what a dead hypervisor left.

:func:`hvshare_session` (and :class:`HVSession`) starts a real hypervisor
on a private socket in a private directory and, on exit (also on an
exception), stops it and makes sure nothing is left: no process, no
shared-memory segment, no socket.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Iterator

from hvshare.hvcore import shm
from hvshare.hvcore.constants import DEFAULT_FRAMES, DEFAULT_RMAP, DEFAULT_SCHED, DEFAULT_TEARDOWN
from hvshare.hvcore.statedir import (CRASH_NAME, LOG_NAME, cleanup_leftovers, make_private_dirs, not_a_socket,
                             socket_path_problem, state_dir_for)

from .client import HypervisorClient, default_socket_path
from .errors import HVCtlError, NoHypervisor
from .launch import launch

__all__ = ["start_hypervisor", "running_pid", "cleanup_dead", "HVSession", "hvshare_session",
           "SESSION_ROOT"]

#: where :class:`HVSession` makes its private directories (None: the
#: system's temporary directory); test suites point it at a root they check
SESSION_ROOT: str | None = None



def running_pid(socket_path: str) -> int | None:
    """The pid of the hypervisor serving ``socket_path``, or None."""
    try:
        with HypervisorClient(socket_path, timeout=10) as c:
            return c.ping()
    except NoHypervisor:
        return None


#: what backing one frame at start costs at most, for the start's timeout
PREFAULT_SECONDS_PER_FRAME = 50e-6


def start_hypervisor(socket_path: str | None = None, frames: int = DEFAULT_FRAMES,
                     rmap: str = DEFAULT_RMAP, teardown: str = DEFAULT_TEARDOWN,
                     timeout: float = 60.0, sched: str = DEFAULT_SCHED, prefault: bool = False,
                     detach: bool = True) -> subprocess.Popen:
    """Start a hypervisor process and return once it serves.

    Detached (the default), it runs in its own session with its output in
    the state directory's log, and the caller owns the returned Popen only
    to reap it: a terminal's Ctrl-C does not reach it. Attached
    (``detach=False``), it shares the caller's terminal and process group,
    so Ctrl-C stops it, and the caller waits for it. Raises HVCtlError when
    it cannot start, with the hypervisor's reason.
    """
    socket_path = os.path.abspath(socket_path or default_socket_path())
    refused = socket_path_problem(socket_path)
    if refused:
        raise HVCtlError(refused)
    pid = running_pid(socket_path)
    if pid is not None:
        raise HVCtlError(f"a hypervisor (pid {pid}) is already running on {socket_path}", 16, "EBUSY")
    state = state_dir_for(socket_path)
    make_private_dirs(state)
    cmd = [sys.executable, "-m", "hvshare.hvcore.process", "--socket", socket_path, "--frames", str(frames),
           "--rmap", rmap, "--teardown", teardown, "--sched", sched]
    cmd.append("--prefault" if prefault else "--lazy-pool")
    if prefault:
        timeout += frames * PREFAULT_SECONDS_PER_FRAME
    try:
        proc, ready = launch(cmd, os.path.join(state, LOG_NAME), timeout, "the hypervisor",
                             detach=detach)
    except HVCtlError as e:
        busy = "already running" in str(e)
        if not busy:
            _remove_unowned_state(socket_path)
        raise HVCtlError(str(e), *((16, "EBUSY") if busy else (22, "EINVAL"))) from None
    except BaseException:
        # interrupted while it starts: nothing of it may live on unseen
        cleanup_leftovers(socket_path)
        _remove_unowned_state(socket_path)
        raise
    # "ready PID {leftovers removed}"
    try:
        proc.cleaned = json.loads(ready.split(" ", 1)[1])
    except (IndexError, ValueError):
        proc.cleaned = None
    return proc


def _remove_unowned_state(socket_path: str) -> None:
    """Remove a state directory no live hypervisor holds (a failed start)."""
    state = state_dir_for(socket_path)
    pidfile = os.path.join(state, "hypervisor.pid")
    try:
        fd = os.open(pidfile, os.O_RDONLY)
    except FileNotFoundError:
        fd = None
    except OSError:
        return
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return                  # alive: not ours to touch
        shutil.rmtree(state, ignore_errors=True)
    finally:
        if fd is not None:
            os.close(fd)


def _remove_state(state: str) -> None:
    """Remove a dead hypervisor's state directory, but keep the log and the
    crash record of one that died of a bug (the next start reports it)."""
    if not os.path.exists(os.path.join(state, CRASH_NAME)):
        shutil.rmtree(state, ignore_errors=True)
        return
    for n in os.listdir(state):
        if n not in (CRASH_NAME, LOG_NAME):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(state, n))


def cleanup_dead(socket_path: str) -> dict | None:
    """Remove a dead hypervisor's leftovers at ``socket_path`` (None if a
    hypervisor is alive there)."""
    refused = not_a_socket(socket_path)
    if refused:
        raise HVCtlError(refused)
    if running_pid(socket_path) is not None:
        return None
    state = state_dir_for(socket_path)
    if os.path.isdir(state):
        pidfile = os.path.join(state, "hypervisor.pid")
        if os.path.exists(pidfile):
            fd = os.open(pidfile, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None             # starting up right now
            try:
                removed = cleanup_leftovers(socket_path)
                _remove_state(state)
            finally:
                os.close(fd)
            return removed
    return cleanup_leftovers(socket_path)



class HVSession(HypervisorClient):
    """A hypervisor this process started on a private socket; :meth:`close`
    stops it and removes every trace (processes, segments, files)."""

    def __init__(self, frames: int = 4096, rmap: str = DEFAULT_RMAP, teardown: str = DEFAULT_TEARDOWN,
                 directory: str | None = None, timeout: float | None = 120.0, sched: str = DEFAULT_SCHED,
                 prefault: bool = False):
        self._own_dir = directory is None
        # Short paths: a Unix socket path must fit in 107 bytes.
        root = SESSION_ROOT or ("/tmp" if os.path.isdir("/tmp") else None)
        self.directory = directory or tempfile.mkdtemp(prefix="hvs-", dir=root)
        super().__init__(os.path.join(self.directory, "hv.sock"), timeout=timeout)
        self.frames, self.rmap, self.teardown = frames, rmap, teardown
        self._guest_pids: set[int] = set()
        try:
            self.process = start_hypervisor(self.socket_path, frames, rmap, teardown, sched=sched,
                                            prefault=prefault)
        except BaseException:
            if self._own_dir:
                shutil.rmtree(self.directory, ignore_errors=True)
            raise
        self.pid = self.process.pid

    def create_domain(self, *a, **kw) -> dict:
        answer = super().create_domain(*a, **kw)
        self._guest_pids.add(answer["pid"])
        return answer

    def guest_pids(self) -> set[int]:
        """Pids of every guest this session saw (dead ones included)."""
        return set(self._guest_pids)

    def close(self) -> None:
        """Stop the hypervisor (killing it if it does not answer), wait for
        every process, unlink its segments, remove its files."""
        try:
            self._guest_pids |= {d["pid"] for d in self.list() if d.get("pid")}
            self.stop()
        except (HVCtlError, OSError):
            pass
        super().close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        _wait_gone(self._guest_pids, 3.0)
        for name in shm.list_segments():
            if shm.owner_pid(name) == self.pid:
                shm.unlink(name)
        for path in (self.socket_path,):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        shutil.rmtree(state_dir_for(self.socket_path), ignore_errors=True)
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __exit__(self, *exc):
        self.close()


def _wait_gone(pids: set[int], timeout: float) -> None:
    """Wait for processes to exit; SIGKILL the ones still there at the end."""
    import psutil
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(alive, timeout=2)


@contextlib.contextmanager
def hvshare_session(frames: int = 4096, rmap: str = DEFAULT_RMAP, teardown: str = DEFAULT_TEARDOWN,
                    directory: str | None = None, sched: str = DEFAULT_SCHED,
                    prefault: bool = False) -> Iterator[HVSession]:
    """A real hypervisor process on a private socket, gone on exit::

        with hvshare_session(frames=8192) as hv:
            a = hv.create(pages=256, workload="clone", seed=1)
            b = hv.create(pages=256, workload="clone", seed=1)
            hv.range_share(a, b, 0, 255)
            hv.guest(b).write(0, b"new")      # a CoW fault
    """
    s = HVSession(frames, rmap, teardown, directory, sched=sched, prefault=prefault)
    try:
        yield s
    finally:
        s.close()
