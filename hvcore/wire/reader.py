"""The one incremental reader of length-prefixed messages.

Both channels frame their messages with a fixed header that gives the body
length: guest pipes (:mod:`.pipe`) and control sockets (:mod:`.control`).
:class:`MessageReader` reassembles them from a non-blocking descriptor for
the hypervisor's event loop, and from a blocking one for the clients. It
validates the header before it buffers any body byte, parses small messages
out of one read buffer, and reads a large body straight into a buffer of
its own, grown with the bytes that arrive (no quadratic concatenation, and
no allocation a header alone can make large).
"""
from __future__ import annotations

import os
import select
import socket
import struct
from typing import Callable

from ..errors import ProtocolError

#: bytes one read takes at most
READ_CHUNK = 1 << 18
#: a body at least this long gets a buffer of its own
BIG_BODY = 1 << 16


class MessageReader:
    """Reassemble length-prefixed messages from a non-blocking fd or socket.

    ``header`` is the struct of the header, ``body_len(fields)`` computes the
    body length from its fields and ``check(fields)`` validates them (raising
    :class:`ProtocolError`) before any body byte is buffered. Small messages
    are parsed out of one read buffer (usually one ``read`` per wake-up); a
    large body gets a buffer of its own that the next reads fill in place.
    """

    def __init__(self, header: struct.Struct, body_len: Callable[[tuple], int],
                 check: Callable[[tuple], None]):
        self._hdr = header
        self._body_len = body_len
        self._check = check
        self._buf = bytearray()
        self._big = None            # (fields, body, filled, size)
        #: the error after the last messages returned (raised by the next pump)
        self.failed: ProtocolError | None = None
        self._scratch = memoryview(bytearray(READ_CHUNK))

    @classmethod
    def for_fd(cls, fd: int, header, body_len, check) -> "MessageReader":
        r = cls(header, body_len, check)
        r._readinto = lambda mv: os.readv(fd, [mv])
        return r

    @classmethod
    def for_socket(cls, sock: socket.socket, header, body_len, check) -> "MessageReader":
        r = cls(header, body_len, check)
        r._readinto = sock.recv_into
        return r

    @property
    def partial(self) -> bool:
        """True when part of a message has been read."""
        return bool(self._buf) or self._big is not None

    def feed(self, data) -> list:
        """Bytes the caller read from the descriptor itself (when no message
        was partial): the complete messages in them; the rest is kept, and
        the next :meth:`pump` goes on from there. Raises ProtocolError."""
        self._buf += data
        msgs: list = []
        self._parse(msgs)
        return msgs

    def pump(self, limit: int = 64) -> tuple[list, bool]:
        """Read what is available now: (complete messages, eof).

        Each message is ``(fields, body)``. Stops at ``limit`` messages so
        one busy peer cannot hold the loop; the rest stays in the descriptor.
        """
        if self.failed is not None:
            raise self.failed
        msgs: list = []
        eof = False
        while len(msgs) < limit:
            try:
                if self._big is not None:
                    fields, body, filled, size = self._big
                    if filled == len(body):
                        # grow with the bytes that arrive, not with what the
                        # header claims: at most twice what was sent
                        body += bytes(min(len(body), size - len(body)))
                    with memoryview(body) as whole, whole[filled:] as room:
                        n = self._readinto(room)
                    if n == 0:
                        eof = True
                        break
                    filled += n
                    if filled == size:
                        self._big = None
                        msgs.append((fields, body))
                    else:
                        self._big = (fields, body, filled, size)
                    continue
                # A reused scratch buffer: no allocation per read.
                n = self._readinto(self._scratch)
            except (BlockingIOError, InterruptedError):
                break
            except (ConnectionResetError, BrokenPipeError):
                eof = True
                break
            if not n:
                eof = True
                break
            self._buf += self._scratch[:n]
            try:
                self._parse(msgs)
            except ProtocolError as e:
                if not msgs:
                    raise
                # the messages before the bad header are good: they go
                # first, and the error is what the next call raises
                self.failed = e
                return msgs, True
            if n < READ_CHUNK and self._big is None:
                break           # drained: no need for a read that says EAGAIN
        return msgs, eof

    def _parse(self, msgs: list) -> None:
        buf, hsz = self._buf, self._hdr.size
        off = 0
        while len(buf) - off >= hsz:
            fields = self._hdr.unpack_from(buf, off)
            self._check(fields)
            n = self._body_len(fields)
            if len(buf) - off - hsz >= n:
                msgs.append((fields, bytes(buf[off + hsz:off + hsz + n])))
                off += hsz + n
                continue
            if n >= BIG_BODY:
                body = bytearray(buf[off + hsz:])
                have = len(body)
                body += bytes(max(BIG_BODY, have) - have)
                self._big = (fields, body, have, n)
                off = len(buf)
            break
        del buf[:off]



def wait_readable(fd: int, timeout: float | None = None) -> bool:
    """Block until ``fd`` is readable (or hung up); False on timeout."""
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while True:
        try:
            return bool(p.poll(None if timeout is None else int(timeout * 1000)))
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            continue

