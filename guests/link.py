"""The guest's end of its two pipes to the hypervisor.

One request is in flight at a time, and the thread that sent it reads its
answer itself: no hand-off between threads, nobody else woken, so a CoW
fault costs one pipe round trip. Asynchronous messages of the hypervisor
(pause, unpause, shutdown) that arrive meanwhile are kept and handled in
order; the main thread drains them when the hypervisor rings.
"""
from __future__ import annotations

import os
import random
import select
import threading
import time
from typing import TYPE_CHECKING

from hvshare.hvcore.wire import pipe

if TYPE_CHECKING:
    from .runtime import Guest

__all__ = ["HypervisorLink", "HypervisorGone", "WriteError"]

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


class HypervisorLink:
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

    def raw(self, data: bytes, reply: bool, pieces: int = 1, gap_s: float = 0.0,
            seed: int = 0) -> tuple[int, int, int] | None:
        """Send bytes verbatim on the pipe (a test of the hypervisor's
        defences); with ``reply``, wait for the next H_REPLY: (seq, status, value).
        ``pieces``: in that many writes, cut where ``seed`` picks, ``gap_s``
        apart; the lock is held throughout, so nothing of ours comes between."""
        cuts = sorted(random.Random(seed).sample(range(1, len(data)), min(pieces, len(data)) - 1))
        bounds = [0, *cuts, len(data)]
        view = memoryview(data)
        with self.lock:
            try:
                for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
                    if i and gap_s:
                        time.sleep(gap_s)
                    pipe.write_all(self.wfd, [view[lo:hi]])
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
