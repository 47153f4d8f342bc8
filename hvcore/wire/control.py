"""Control frames: toolstack requests to the hypervisor and to guests.

A frame is an 8-byte header ``<II`` (JSON length, binary length), a JSON
object, then an optional binary payload (page contents, gfn arrays). A
request is ``{"op": NAME, ...arguments}`` (:mod:`.schema`); an answer is
``{"ok": true, ...result}`` or ``{"ok": false, "error": SENTENCE, "code":
N, "code_name": NAME}``.

The hypervisor reads frames with :func:`frame_reader` in its event loop;
a client reads the answers of one connection with a :class:`FrameReader`.
"""
from __future__ import annotations

import collections
import json
import socket
import struct

from ..errors import ProtocolError
from .reader import BIG_BODY, MessageReader

FRAME_HDR = struct.Struct("<II")        # JSON length, binary length
MAX_JSON = 1 << 20
MAX_PAYLOAD = 64 << 20


def frame(obj: dict, payload=b"") -> list:
    """A frame as a list of buffers: header, JSON, payload."""
    js = json.dumps(obj, separators=(",", ":")).encode()
    pl = memoryview(payload).cast("B") if payload is not None else memoryview(b"")
    if len(js) > MAX_JSON or pl.nbytes > MAX_PAYLOAD:
        raise ProtocolError("message too large for a control frame")
    return [FRAME_HDR.pack(len(js), pl.nbytes), js, pl]


def check_frame_header(jlen: int, blen: int) -> None:
    if not 2 <= jlen <= MAX_JSON:
        raise ProtocolError(f"control frame with a {jlen}-byte JSON part (allowed 2..{MAX_JSON})")
    if blen > MAX_PAYLOAD:
        raise ProtocolError(f"control frame with a {blen}-byte payload (limit {MAX_PAYLOAD})")


def parse_frame(jlen: int, body) -> tuple[dict, memoryview]:
    """Body of a frame (JSON then payload) -> (request object, payload view)."""
    mv = memoryview(body)
    try:
        obj = json.loads(bytes(mv[:jlen]))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("control frame is not valid JSON") from None
    except RecursionError:      # "[[[[...": json.loads recurses per level
        raise ProtocolError("control frame nests JSON too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError("control frame is not a JSON object")
    return obj, mv[jlen:]


def send_frame(sock: socket.socket, obj: dict, payload=b"") -> None:
    """Send one frame on a blocking socket (one write unless the payload is big)."""
    hdr, js, pl = frame(obj, payload)
    if pl.nbytes <= BIG_BODY:
        sock.sendall(b"".join((hdr, js, pl)))
    else:
        sock.sendall(hdr + js)
        sock.sendall(pl)



class FrameReader:
    """The frames arriving on one blocking socket, in order.

    Keep one per connection: a read may bring several answers at once (a
    pipelined client's), and the ones not yet asked for wait here.
    """

    def __init__(self, sock: socket.socket):
        self._reader = frame_reader(sock)
        self._ready: collections.deque = collections.deque()

    def next(self) -> tuple[dict, bytes] | None:
        """The next frame as (object, payload); None on a clean EOF.
        Raises ConnectionError on EOF in the middle of a frame, and
        ProtocolError on a frame the protocol does not allow."""
        while not self._ready:
            # one message is enough: on a blocking socket another read
            # would wait for bytes nobody has sent yet
            msgs, eof = self._reader.pump(limit=1)
            for (jlen, _blen), body in msgs:
                obj, payload = parse_frame(jlen, body)
                self._ready.append((obj, bytes(payload)))
            if eof and not self._ready:
                if self._reader.partial:
                    raise ConnectionError("connection closed in the middle of a frame")
                return None
        return self._ready.popleft()


def frame_reader(sock: socket.socket) -> MessageReader:
    """A reader of control frames on a non-blocking socket; bodies are JSON + payload."""
    return MessageReader.for_socket(sock, FRAME_HDR, lambda f: f[0] + f[1],
                                    lambda f: check_frame_header(f[0], f[1]))

