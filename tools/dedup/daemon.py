"""The dedup daemon's files and its control socket.

One watch (``hvctl dedup --watch``, in the foreground or detached) runs per
hypervisor, as one ksmd runs per kernel. For the hypervisor's socket
``DIR/NAME.sock`` it keeps its files in the hypervisor's private state
directory ``DIR/NAME.d/`` (mode 0700, so only the hypervisor's user can
reach them):

- ``dedup.pid``: the watch's pid, locked (``flock``) for its whole life: a
  second watch that cannot take the lock knows one runs;
- ``dedup.sock``: its control socket, framed as the hypervisor's
  (:mod:`hvshare.hvcore.wire.control`): ``show`` answers the knobs and counters,
  ``set`` changes knobs (all or nothing), ``stop`` ends the watch;
- ``dedup.log``: a detached watch's output.

The watch removes them when it ends; the hypervisor's stop removes its whole
state directory, and the watch, finding the hypervisor gone at its next
pass or liveness check, ends too.
"""
from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
from typing import Callable

from hvshare.hvcore.errors import ProtocolError
from hvshare.hvcore.statedir import state_dir_for
from hvshare.hvcore.wire import control

from ..client import Channel, Requester
from ..errors import HVCtlError
from .knobs import Knobs, check

__all__ = ["ControlServer", "DaemonClient", "NoDaemon", "paths", "PID_NAME", "SOCK_NAME", "LOG_NAME",
           "wait_gone"]

PID_NAME, SOCK_NAME, LOG_NAME = "dedup.pid", "dedup.sock", "dedup.log"
#: seconds a control connection may stay silent before the daemon drops it
CLIENT_TIMEOUT = 10.0


class NoDaemon(HVCtlError):
    """No watch serves the hypervisor's dedup control socket."""


def paths(hv_socket: str) -> dict:
    """The daemon's files for the hypervisor on ``hv_socket``."""
    state = state_dir_for(os.path.abspath(hv_socket))
    return {"pid": os.path.join(state, PID_NAME), "sock": os.path.join(state, SOCK_NAME),
            "log": os.path.join(state, LOG_NAME)}


def _pid_in(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def holder(hv_socket: str) -> int | None:
    """The pid of the watch holding the lock for ``hv_socket``, or None."""
    path = paths(hv_socket)["pid"]
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _pid_in(path) or -1
    finally:
        os.close(fd)
    return None


def wait_gone(hv_socket: str, timeout: float) -> bool:
    """Wait until no watch holds the lock for ``hv_socket``; True if none does."""
    end = time.monotonic() + timeout
    while holder(hv_socket) is not None:
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


class ControlServer:
    """A watch's lock and control socket, served by a thread of its own.

    ``status()`` answers ``show`` and ``stop`` (the caller's counters and
    anything else to report; ``show`` adds the knobs); ``on_stop()`` is
    called once a ``stop`` is answered.
    """

    def __init__(self, hv_socket: str, knobs: Knobs, status: Callable[[], dict],
                 on_stop: Callable[[], None]):
        self.hv_socket = os.path.abspath(hv_socket)
        self.paths = paths(self.hv_socket)
        self.knobs, self.status, self.on_stop = knobs, status, on_stop
        self._lock_fd: int | None = None
        self._lsock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    def open(self) -> None:
        """Take the lock and serve; HVCtlError (EBUSY) if a watch runs."""
        fd = os.open(self.paths["pid"], os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = _pid_in(self.paths["pid"])
            raise HVCtlError(f"a dedup daemon{f' (pid {pid})' if pid else ''} is already running "
                             f"for the hypervisor on {self.hv_socket}: 'hvctl dedup-show' shows it, "
                             f"'hvctl dedup --stop' stops it", 16, "EBUSY") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        try:
            try:
                os.unlink(self.paths["sock"])     # a killed watch's: we hold the lock
            except FileNotFoundError:
                pass
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(self.paths["sock"])
            os.chmod(self.paths["sock"], 0o600)
            s.listen(8)
            s.settimeout(0.2)
            self._lsock = s
        except BaseException:
            self.close()
            raise
        self._thread = threading.Thread(target=self._serve, name="dedup-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        conn.settimeout(CLIENT_TIMEOUT)
        try:
            frames = control.FrameReader(conn)
            while True:
                got = frames.next()
                if got is None:
                    break
                answer = self.answer(got[0])
                control.send_frame(conn, answer)
                if got[0].get("op") == "stop" and answer["ok"]:
                    self.on_stop()      # once answered: the watch may end at once
        except (OSError, ProtocolError):
            pass                        # a client that went away or spoke nonsense
        finally:
            conn.close()

    def answer(self, req: dict) -> dict:
        """The answer to one request."""
        op = req.get("op")
        if op == "show":
            return {"ok": True, **self.status(), "knobs": self.knobs.values()}
        if op == "set":
            changes = req.get("knobs")
            if not isinstance(changes, dict) or not changes:
                return _error("set takes knobs: an object of knob names and values")
            _, errors = check(changes)
            if errors:
                return {**_error("; ".join(errors)), "errors": errors}
            before = self.knobs.update(changes)
            return {"ok": True, "before": before, "knobs": self.knobs.values()}
        if op == "stop":
            return {"ok": True, **self.status()}
        return _error(f"unknown request {op!r} (show, set, stop)")

    def close(self) -> None:
        """Stop serving; remove the socket and the pid file, then unlock."""
        self._closing.set()
        if self._lsock is not None:
            self._lsock.close()
            self._lsock = None
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        if self._lock_fd is not None:
            for p in (self.paths["sock"], self.paths["pid"]):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "ControlServer":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _error(sentence: str) -> dict:
    return {"ok": False, "error": sentence, "code": 22, "code_name": "EINVAL"}


class DaemonClient(Requester):
    """The control socket of the watch on the hypervisor ``hv_socket``."""

    def __init__(self, hv_socket: str, timeout: float = CLIENT_TIMEOUT):
        self.hv_socket = os.path.abspath(hv_socket)
        self._ch = Channel(paths(self.hv_socket)["sock"], timeout, "dedup daemon", gone=NoDaemon)

    def request(self, op: str, payload=b"", **args):
        try:
            return super().request(op, payload, **args)
        except NoDaemon:
            raise NoDaemon(f"no dedup daemon is running for the hypervisor on {self.hv_socket} "
                           f"(start one with 'hvctl dedup --watch --detach')", 3, "ESRCH") from None

    def show(self) -> dict:
        return self.call("show")

    def set(self, **knobs) -> dict:
        return self.call("set", knobs=knobs)

    def stop(self) -> dict:
        return self.call("stop")
