"""Endpoints: the two kinds of peer the hypervisor loop serves.

:class:`ControlConnection` is a toolstack client on the control socket
(framed JSON requests, :mod:`hvshare.hvcore.wire.control`); :class:`GuestEndpoint`
is one guest's pipe pair (binary messages, :mod:`hvshare.hvcore.wire.pipe`). Both
queue their answers and flush them when the descriptor is writable, so a
slow peer never blocks the loop.

An endpoint knows only its :class:`PeerHost`, the part that registered it
(the clients for a connection, the guest table for a guest): the host
watches its descriptor for writability and hears when the peer is lost.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

from typing import Protocol

from ..wire import control, pipe

#: bytes the hypervisor reads from a guest pipe at once
GUEST_READ_BYTES = 1 << 16
REPLY_MSG = pipe.REPLY_MSG
_REPLY_PACK = REPLY_MSG.pack
_H_REPLY = pipe.H_REPLY
_REPLY_SIZE = pipe.REPLY.size
_write = os.write


class PeerHost(Protocol):
    """What an endpoint needs of the part that serves it."""

    def want_write(self, ep: "Endpoint", on: bool) -> None:
        """Watch (or stop watching) ``ep`` for writability: its queue waits."""

    def lost(self, ep: "Endpoint") -> None:
        """The peer went away while we wrote to it."""


class Endpoint:
    """A non-blocking descriptor with an output queue, registered in the loop."""

    def __init__(self, host: PeerHost, fd: int):
        self.host = host
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
                self.host.lost(self)
                return
            if n == len(data):
                return
            self.out += memoryview(data)[n:]
        else:
            for p in parts:
                self.out += p
        self.host.want_write(self, True)

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
            self.host.lost(self)
            return
        self.host.want_write(self, False)


class ControlConnection(Endpoint):
    """One toolstack connection on the control socket."""

    def __init__(self, host: PeerHost, sock: socket.socket):
        super().__init__(host, sock.fileno())
        self.sock = sock
        self.reader = control.frame_reader(sock)
        self.waiting = False            # a deferred answer (create) is pending
        self.backlog: list = []
        #: not read while too many of its answers wait (see .clients)
        self.read_paused = False
        #: the answer of a step that yielded to other work, deferred until that
        #: work is served (see .loop): sent at once it would wake this
        #: client first, on a core the waiting guest may share
        self.deferred_answer: list = []

    def _send(self, mv) -> int:
        return self.sock.send(mv)

    def send_deferred(self) -> None:
        """Send the deferred answer (:attr:`deferred_answer`)."""
        parts, self.deferred_answer = self.deferred_answer, []
        self.queue(parts)

    def reply(self, obj: dict, payload=b"") -> None:
        self.queue(control.frame(obj, payload))


class GuestEndpoint(Endpoint):
    """The hypervisor's side of one guest: its process and its two pipes."""

    def __init__(self, host: PeerHost, domid: int, proc: subprocess.Popen, rfd: int, wfd: int,
                 sock_path: str, config: dict, steplog: list):
        super().__init__(host, rfd)
        self.domid = domid
        self.proc = proc
        self.wfd = wfd
        self.reader = pipe.pipe_reader(rfd, to_hv=True)
        self.sock_path = sock_path
        self.config = config
        self.ready = False
        self.started = time.monotonic()
        self.creator: ControlConnection | None = None
        self.exit: str | None = None
        #: write messages applied, CoW faults taken, and of the batched
        #: messages among the writes: how many, and the pages they named
        #: (see :attr:`counters`)
        self.writes = self.cow_faults = 0
        self.batch_writes = self.batch_pages = 0
        #: a fork's read faults (gfns filled by G_POPULATE), fuzz iterations done
        self.read_faults = self.iterations = 0
        #: the writable end is watched (its queue waits)
        self.wregistered = False
        self.reported: dict = {}
        self.kill_pending = False       # stopped by destroy; SIGKILL at the next tick
        #: what the pause meter calls this guest's steps
        self.step_name = f"guest {domid}"
        #: where this guest's step times go (:meth:`.steps.StepMeter.log`)
        self.steplog: list = steplog
        #: the hypervisor's read buffer for this pipe (one read per wake-up)
        self.inbuf = memoryview(bytearray(GUEST_READ_BYTES))

    @property
    def counters(self) -> dict:
        """``writes``, ``pages_written`` and ``cow_faults`` so far."""
        return {"writes": self.writes,
                "pages_written": self.writes - self.batch_writes + self.batch_pages,
                "cow_faults": self.cow_faults}

    def _send(self, mv) -> int:
        return os.write(self.wfd, mv)

    def send(self, mtype: int, seq: int = 0, *body) -> None:
        self.queue(pipe.pipe_message(mtype, seq, *body))

    def reply(self, seq: int, status: int, value: int) -> None:
        """An ``H_REPLY``: one precompiled struct, one write when nothing is
        queued (a 20-byte pipe write is all or nothing), else the queue."""
        msg = _REPLY_PACK(_H_REPLY, seq & 0xFFFF, _REPLY_SIZE, status, value)
        if not self.out and not self.closed:
            try:
                _write(self.wfd, msg)
                return
            except (BlockingIOError, InterruptedError):
                pass
            except (BrokenPipeError, ConnectionResetError):
                self.host.lost(self)
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
