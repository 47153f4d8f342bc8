"""Processes forked by a helper and adopted by the process that wants them.

A process that is already started, its imports done, can fork a copy of
itself in a few milliseconds where a new interpreter takes hundreds. The
hypervisor gets its warm guests that way (:mod:`hvshare.guests.zygote`), and
a test session its hypervisors (:mod:`hvshare.hvcore.process.forkserver`).
Yet the process that wants the child must be its parent: only a parent
collects an exit status, and PR_SET_PDEATHSIG ends a child with its parent.

So the helper forks twice: its child forks the wanted process and exits at
once, and the kernel re-parents the orphan to the nearest *child
subreaper* among its ancestors: the requester, which marked itself one
(:func:`become_subreaper`) and started the helper. The helper reaps the
middle process, which happens only after the re-parenting, and then names
the new pid; the requester holds it as an :class:`AdoptedProcess`.
"""
from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
#: how long an adopted child waits to be re-parented to its adopter
ADOPTION_SECONDS = 5.0
#: environment variables read when an interpreter and its modules start: a
#: process forked from a helper started with other values would differ
#: from one started anew
STARTUP_ENV = ("PYTHON", "NUMBA_", "LD_", "OPENBLAS_", "OMP_", "MKL_")


def startup_env_of(env) -> dict:
    """The part of ``env`` that an interpreter's start reads (:data:`STARTUP_ENV`)."""
    return {k: v for k, v in env.items() if k.startswith(STARTUP_ENV)}


#: in a child of :func:`fork_adoptable`: the middle process, its first parent
_middle: int | None = None


def _prctl(option: int, value: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def become_subreaper(on: bool = True) -> None:
    """Orphaned descendants re-parent to this process (PR_SET_CHILD_SUBREAPER)."""
    _prctl(_PR_SET_CHILD_SUBREAPER, int(on))


def die_with_parent(parent: int) -> bool:
    """SIGKILL this process when its parent dies (PR_SET_PDEATHSIG); False
    if the parent is not ``parent`` (it died already)."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    return os.getppid() == parent


def fork_adoptable(child) -> int:
    """Fork ``child()`` (which must not return) as an orphan for the nearest
    subreaper above us; its pid, once it is re-parented. In the child,
    :func:`wait_adopted` tells when that happened."""
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:                                     # the middle process
        try:
            os.close(r)
            global _middle
            _middle = os.getpid()
            pid = os.fork()
            if pid == 0:
                os.close(w)
                try:
                    child()
                finally:
                    os._exit(1)
            os.write(w, pid.to_bytes(8, "little"))
        finally:
            os._exit(0)
    os.close(w)
    got = b""
    while len(got) < 8:
        chunk = os.read(r, 8 - len(got))
        if not chunk:
            break
        got += chunk
    os.close(r)
    os.waitpid(middle, 0)                               # after this, it is adopted
    if len(got) < 8:
        raise OSError("the forked process could not be started")
    return int.from_bytes(got, "little")


def fork_and_answer(conn, fds: list[int], child) -> bool:
    """A helper's answer to one request: fork ``child()`` adoptable (None:
    the request is refused), close the request's descriptors, send the pid
    on ``conn`` (8 bytes; 0: none). False if ``conn`` is gone."""
    pid = 0
    try:
        if child is not None:
            pid = fork_adoptable(child)
    except OSError:
        pid = 0
    finally:
        for fd in fds:
            os.close(fd)
    try:
        conn.send(pid.to_bytes(8, "little"))
    except OSError:
        return False
    return True


def wait_adopted(adopter: int, timeout: float = ADOPTION_SECONDS) -> bool:
    """In a child of :func:`fork_adoptable`: wait until ``adopter`` is our
    parent, then die with it; False if it is not (it died, or is no subreaper)."""
    # the middle process may not have exited yet: then our parent is still it
    end = time.monotonic() + timeout
    while os.getppid() == _middle and time.monotonic() < end:
        time.sleep(0.0002)
    return die_with_parent(adopter)


class AdoptedProcess:
    """A process this one did not start itself: the part of
    :class:`subprocess.Popen` the hypervisor and the toolstack use
    (``pid``, ``returncode``, ``poll``, ``wait``, ``kill``, ``terminate``,
    ``send_signal``).

    Usually it was re-parented here and is reaped here, with its exit
    status. When another process of the session is its parent (a fork
    server's hypervisor asked for by ``hvctl start``, re-parented to the
    test run), it is watched through a pidfd, which turns readable when it
    exits; its status is then not known (``returncode`` 0)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None
        self.args = None
        self._pidfd: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                if not self._exited_elsewhere(0):
                    return None
                self.returncode = 0
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def _exited_elsewhere(self, timeout: float) -> bool:
        """Not our child: whether it has exited (waiting up to ``timeout``)."""
        if self._pidfd is None:
            try:
                self._pidfd = os.pidfd_open(self.pid)
            except ProcessLookupError:
                return True
            except (OSError, AttributeError):
                try:
                    os.kill(self.pid, 0)
                except ProcessLookupError:
                    return True
                if timeout:
                    time.sleep(min(timeout, 0.01))
                return False
        if select.select([self._pidfd], [], [], timeout)[0]:
            os.close(self._pidfd)
            self._pidfd = -1
            return True
        return False

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            try:
                fd = os.pidfd_open(self.pid) if self._pidfd is None else self._pidfd
            except ProcessLookupError:
                continue                # gone: the next poll says how
            except (OSError, AttributeError):
                time.sleep(0.001 if left is None else min(left, 0.001))
                continue
            try:
                select.select([fd], [], [], left)
            finally:
                if fd != self._pidfd:
                    os.close(fd)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)
