"""Wire formats: the control socket and the guest pipes, with validation.

Two channels, two formats, chosen for what travels on them:

**Guest pipes** (one pair per guest, hot path: every guest write and CoW
fault) carry compact binary messages: an 8-byte header ``<HHI`` (type, seq,
body length) and a body of packed structs and raw numpy arrays. The pipe
identifies the domain, so no message names a domid. Guest -> hypervisor:

- ``G_HELLO``  ``<I`` pid: the guest has mapped its memory and serves.
- ``G_WRITE``  ``<QI`` gfn, offset, then the bytes to write (one page at most).
- ``G_WRITE_PAGES`` ``<I4x`` count, then ``int64[count]`` gfns, then
  ``count * 4096`` bytes of pages: one message, one batched core call.
- ``G_STATS``  the guest's own counters (:data:`STATS`), no answer.
- ``G_WRITE_MANY`` ``<I4x`` count, then ``int64[count]`` gfns,
  ``uint32[count]`` offsets, ``uint32[count]`` lengths, then the bytes of
  every write in order: many small writes (a CoW fault each, if shared) in
  one message, one batched core call.

Hypervisor -> guest: ``H_REPLY`` (``<iq`` status, value; ``seq`` is the
request's), and the bodiless ``H_PAUSE``, ``H_UNPAUSE``, ``H_SHUTDOWN``.
A status is 0 or the Xen code of the failure (:mod:`hvcore.errors`).

**Control socket and guest control channels** (toolstack requests, rare and
rich) carry frames: an 8-byte header ``<II`` (JSON length, binary length), a
JSON object, then an optional binary payload (page contents, gfn arrays).
A request is ``{"op": NAME, ...arguments}``; an answer is ``{"ok": true,
...result}`` or ``{"ok": false, "error": SENTENCE, "code": N, "code_name":
NAME}``. Every request is checked against a schema (:func:`check_request`)
before anything acts on it: unknown operations, unknown or missing
arguments, wrong types and out-of-range numbers are refused with one
sentence.

Both directions of both channels are read with :class:`MessageReader`, an
incremental decoder for non-blocking descriptors that validates lengths
from the header before it buffers a body, and reads large bodies straight
into their own buffer (no quadratic concatenation).
"""
from __future__ import annotations

import errno
import json
import os
import select
import socket
import struct
from typing import Callable

PAGE_SIZE = 4096
#: most pages one batched write may carry (16 MiB of page data)
MAX_BATCH_PAGES = 4096

# ----------------------------------------------------------------------
# guest pipes

PIPE_HDR = struct.Struct("<HHI")        # type, seq, body length
G_HELLO, G_WRITE, G_WRITE_PAGES, G_STATS, G_WRITE_MANY = 1, 2, 3, 4, 5
H_REPLY, H_PAUSE, H_UNPAUSE, H_SHUTDOWN = 0x81, 0x82, 0x83, 0x84

HELLO = struct.Struct("<I")
WRITE = struct.Struct("<QI")
WRITE_PAGES = struct.Struct("<I4x")
REPLY = struct.Struct("<iq")
WRITE_MANY = struct.Struct("<I4x")
#: header and body of a G_WRITE in one struct (the hypervisor's fast path)
WRITE_MSG = struct.Struct("<HHIQI")
#: header and body of an H_REPLY in one struct
REPLY_MSG = struct.Struct("<HHIiq")
#: writes, pages written, CoW faults, fault p50 us, fault p99 us, write p50 us
STATS = struct.Struct("<QQQddd")
STATS_FIELDS = ("writes", "pages_written", "cow_faults", "fault_p50_us", "fault_p99_us",
                "write_p50_us")

MAX_GUEST_BODY = WRITE_PAGES.size + MAX_BATCH_PAGES * (8 + PAGE_SIZE)
_BODIES_TO_HV = {G_HELLO, G_WRITE, G_WRITE_PAGES, G_STATS, G_WRITE_MANY}
_BODIES_TO_GUEST = {H_REPLY: REPLY.size, H_PAUSE: 0, H_UNPAUSE: 0, H_SHUTDOWN: 0}


class ProtocolError(Exception):
    """A peer sent something the protocol does not allow (one sentence)."""


def pipe_message(mtype: int, seq: int, *parts) -> list:
    """Header plus body parts (bytes-like), ready for ``os.writev``."""
    n = sum(memoryview(p).nbytes for p in parts)
    return [PIPE_HDR.pack(mtype, seq & 0xFFFF, n), *parts]


def check_to_hv(mtype: int, length: int) -> None:
    """Validate a guest -> hypervisor header before its body is read."""
    if mtype not in _BODIES_TO_HV:
        raise ProtocolError(f"unknown guest message type {mtype}")
    if length > MAX_GUEST_BODY:
        raise ProtocolError(f"guest message of {length} bytes exceeds the {MAX_GUEST_BODY}-byte limit")


def check_to_guest(mtype: int, length: int) -> None:
    """Validate a hypervisor -> guest header."""
    want = _BODIES_TO_GUEST.get(mtype)
    if want is None:
        raise ProtocolError(f"unknown hypervisor message type {mtype:#x}")
    if length != want:
        raise ProtocolError(f"hypervisor message {mtype:#x} has {length} body bytes, expected {want}")


def decode_write(body) -> tuple[int, int, memoryview]:
    """``G_WRITE`` body -> (gfn, offset, data)."""
    if len(body) < WRITE.size:
        raise ProtocolError("write message too short")
    gfn, offset = WRITE.unpack_from(body)
    data = memoryview(body)[WRITE.size:]
    if not data.nbytes or offset + data.nbytes > PAGE_SIZE:
        raise ProtocolError(f"write of {data.nbytes} bytes at offset {offset} does not fit in one page")
    return gfn, offset, data


def decode_write_pages(body):
    """``G_WRITE_PAGES`` body -> (gfns int64[k], pages uint8[k, 4096]) as views."""
    import numpy as np
    if len(body) < WRITE_PAGES.size:
        raise ProtocolError("write_pages message too short")
    (count,) = WRITE_PAGES.unpack_from(body)
    if not 1 <= count <= MAX_BATCH_PAGES:
        raise ProtocolError(f"write_pages of {count} pages (allowed 1..{MAX_BATCH_PAGES})")
    want = WRITE_PAGES.size + count * (8 + PAGE_SIZE)
    if len(body) != want:
        raise ProtocolError(f"write_pages of {count} pages needs {want} bytes, got {len(body)}")
    off = WRITE_PAGES.size
    gfns = np.frombuffer(body, dtype="<i8", count=count, offset=off)
    pages = np.frombuffer(body, dtype=np.uint8, count=count * PAGE_SIZE,
                          offset=off + 8 * count).reshape(count, PAGE_SIZE)
    return gfns, pages


def decode_write_many(body):
    """``G_WRITE_MANY`` body -> (gfns int64[k], offsets uint32[k], lengths
    uint32[k], data uint8[sum(lengths)]) as views of ``body``."""
    import numpy as np
    if len(body) < WRITE_MANY.size:
        raise ProtocolError("write_many message too short")
    (count,) = WRITE_MANY.unpack_from(body)
    if not 1 <= count <= MAX_BATCH_PAGES:
        raise ProtocolError(f"write_many of {count} writes (allowed 1..{MAX_BATCH_PAGES})")
    off = WRITE_MANY.size
    head = off + 16 * count
    if len(body) < head:
        raise ProtocolError(f"write_many of {count} writes needs at least {head} bytes, got {len(body)}")
    gfns = np.frombuffer(body, dtype="<i8", count=count, offset=off)
    offsets = np.frombuffer(body, dtype="<u4", count=count, offset=off + 8 * count)
    lengths = np.frombuffer(body, dtype="<u4", count=count, offset=off + 12 * count)
    if not lengths.all() or (offsets.astype(np.int64) + lengths > PAGE_SIZE).any():
        raise ProtocolError("a write of write_many is empty or does not fit in one page")
    total = int(lengths.sum(dtype=np.int64))
    if len(body) != head + total:
        raise ProtocolError(f"write_many of {total} bytes needs {head + total} bytes, got {len(body)}")
    data = np.frombuffer(body, dtype=np.uint8, count=total, offset=head)
    return gfns, offsets, lengths, data


def encode_write_many(gfns, offsets, lengths, data) -> list:
    """Body parts of a ``G_WRITE_MANY`` message (no copy of the data)."""
    import numpy as np
    gfns = np.ascontiguousarray(gfns, dtype="<i8")
    k = len(gfns)
    offsets = np.ascontiguousarray(offsets, dtype="<u4").reshape(-1)
    lengths = np.ascontiguousarray(lengths, dtype="<u4").reshape(-1)
    data = memoryview(data if isinstance(data, (bytes, bytearray, memoryview))
                      else np.ascontiguousarray(data, dtype=np.uint8)).cast("B")
    if not 1 <= k <= MAX_BATCH_PAGES:
        raise ValueError(f"a batch holds 1..{MAX_BATCH_PAGES} writes, not {k}")
    if len(offsets) != k or len(lengths) != k:
        raise ValueError(f"{k} gfns need {k} offsets and {k} lengths")
    if not lengths.all() or (offsets.astype(np.int64) + lengths > PAGE_SIZE).any():
        raise ValueError("every write must hold 1 byte at least and fit in one page")
    if int(lengths.sum(dtype=np.int64)) != data.nbytes:
        raise ValueError(f"the lengths add up to {int(lengths.sum())} bytes, the data has {data.nbytes}")
    if WRITE_MANY.size + 16 * k + data.nbytes > MAX_GUEST_BODY:
        raise ValueError(f"a write_many message is limited to {MAX_GUEST_BODY} bytes")
    return [WRITE_MANY.pack(k), memoryview(gfns).cast("B"), memoryview(offsets).cast("B"),
            memoryview(lengths).cast("B"), data]


def encode_write_pages(gfns, pages) -> list:
    """Body parts of a ``G_WRITE_PAGES`` message (no copy of the pages)."""
    import numpy as np
    gfns = np.ascontiguousarray(gfns, dtype="<i8")
    pages = np.ascontiguousarray(pages, dtype=np.uint8)
    if pages.shape != (len(gfns), PAGE_SIZE):
        raise ValueError(f"pages must have shape ({len(gfns)}, {PAGE_SIZE}), not {pages.shape}")
    if not 1 <= len(gfns) <= MAX_BATCH_PAGES:
        raise ValueError(f"a batch holds 1..{MAX_BATCH_PAGES} pages, not {len(gfns)}")
    return [WRITE_PAGES.pack(len(gfns)), memoryview(gfns).cast("B"), memoryview(pages).cast("B")]


def decode_stats(body) -> dict:
    """``G_STATS`` body -> counters; a latency with no sample (NaN) is None."""
    if len(body) != STATS.size:
        raise ProtocolError(f"stats message has {len(body)} bytes, expected {STATS.size}")
    return {k: (None if v != v else v) for k, v in zip(STATS_FIELDS, STATS.unpack(body))}


def encode_stats(st: dict) -> bytes:
    vals = [st.get(k) for k in STATS_FIELDS]
    return STATS.pack(*(int(v or 0) for v in vals[:3]),
                      *(float("nan") if v is None else float(v) for v in vals[3:]))


def set_pipe_size(fd: int, size: int = 1 << 20) -> None:
    """Grow a pipe so a batch of pages crosses it in few wake-ups (best effort)."""
    F_SETPIPE_SZ = 1031
    try:
        import fcntl
        fcntl.fcntl(fd, F_SETPIPE_SZ, size)
    except OSError:
        pass


def write_all(fd: int, parts: list) -> None:
    """Write every part to a blocking or non-blocking descriptor, in order."""
    views = [memoryview(p).cast("B") for p in parts]
    views = [v for v in views if v.nbytes]
    while views:
        try:
            n = os.writev(fd, views)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        while n:
            if n >= views[0].nbytes:
                n -= views[0].nbytes
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


# ----------------------------------------------------------------------
# control frames

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
    if pl.nbytes <= _BIG:
        sock.sendall(b"".join((hdr, js, pl)))
    else:
        sock.sendall(hdr + js)
        sock.sendall(pl)


def recv_frame(sock: socket.socket) -> tuple[dict, bytes] | None:
    """Receive one frame from a blocking socket; None on a clean EOF."""
    hdr = _recv_exact(sock, FRAME_HDR.size, eof_ok=True)
    if hdr is None:
        return None
    jlen, blen = FRAME_HDR.unpack(hdr)
    check_frame_header(jlen, blen)
    body = _recv_exact(sock, jlen + blen)
    obj, pl = parse_frame(jlen, body)
    return obj, bytes(pl)


def _recv_exact(sock: socket.socket, n: int, eof_ok: bool = False):
    buf = bytearray(n)
    mv = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(mv[got:])
        if k == 0:
            if eof_ok and got == 0:
                return None
            raise ConnectionError("connection closed in the middle of a frame")
        got += k
    return buf


# ----------------------------------------------------------------------
# incremental reader for non-blocking descriptors

_CHUNK = 1 << 18
_BIG = 1 << 16


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
        self._big = None            # (fields, body, filled)
        self._scratch = memoryview(bytearray(_CHUNK))

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
        msgs: list = []
        eof = False
        while len(msgs) < limit:
            try:
                if self._big is not None:
                    fields, body, filled = self._big
                    n = self._readinto(memoryview(body)[filled:])
                    if n == 0:
                        eof = True
                        break
                    filled += n
                    if filled == len(body):
                        self._big = None
                        msgs.append((fields, body))
                    else:
                        self._big = (fields, body, filled)
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
            self._parse(msgs)
            if n < _CHUNK and self._big is None:
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
            if n >= _BIG:
                body = bytearray(n)
                have = len(buf) - off - hsz
                body[:have] = buf[off + hsz:]
                self._big = (fields, body, have)
                off = len(buf)
            break
        del buf[:off]


def pipe_reader(fd: int, to_hv: bool) -> MessageReader:
    """A reader of guest-pipe messages on ``fd`` (``to_hv``: the hypervisor's side)."""
    check = check_to_hv if to_hv else check_to_guest
    return MessageReader.for_fd(fd, PIPE_HDR, lambda f: f[2], lambda f: check(f[0], f[2]))


def frame_reader(sock: socket.socket) -> MessageReader:
    """A reader of control frames on a non-blocking socket; bodies are JSON + payload."""
    return MessageReader.for_socket(sock, FRAME_HDR, lambda f: f[0] + f[1],
                                    lambda f: check_frame_header(f[0], f[1]))


def wait_readable(fd: int, timeout: float | None = None) -> bool:
    """Block until ``fd`` is readable (or hung up); False on timeout."""
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while True:
        try:
            return bool(p.poll(None if timeout is None else int(timeout * 1000)))
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            continue


# ----------------------------------------------------------------------
# request schemas


class _Arg:
    __slots__ = ("kind", "default", "lo", "hi", "choices")
    REQUIRED = object()

    def __init__(self, kind, default=REQUIRED, lo=None, hi=None, choices=None):
        self.kind, self.default, self.lo, self.hi, self.choices = kind, default, lo, hi, choices


def Int(lo=0, hi=(1 << 63) - 1, default=_Arg.REQUIRED):
    return _Arg(int, default, lo, hi)


def U64(default=_Arg.REQUIRED):
    return _Arg(int, default, 0, (1 << 64) - 1)


def Num(lo=0.0, hi=1e9, default=_Arg.REQUIRED):
    return _Arg(float, default, lo, hi)


def Str(default=_Arg.REQUIRED, maxlen=64, choices=None):
    return _Arg(str, default, 0, maxlen, choices)


def Bool(default=False):
    return _Arg(bool, default)


GFN = Int(0)
DOMID = Int(0, 0x7FEF)

#: Operations of the hypervisor's control socket and their arguments.
CONTROL_OPS: dict[str, dict[str, _Arg]] = {
    "ping": {},
    "info": {},
    "list": {},
    "audit": {},
    "stop": {},
    "create": {"pages": Int(1, 1 << 31), "workload": Str("zero"), "seed": Int(0, (1 << 32) - 1, 0),
               "name": Str(None), "paused": Bool(False), "rate": Num(0.0, 1e6, 200.0),
               "batch": Int(1, MAX_BATCH_PAGES, 1)},
    # one preemptible teardown step (the kill controller repeats it while
    # "done" is false): done, state (dying/destroyed), phase, cursor, npages,
    # entries, entries_total, resumed, steps, continuations, step_ms,
    # max_pause_ms, max_pause_cpu_ms, hv_seconds, seconds. With brief, a
    # "restart" leaves out what the first answer told already (state, npages,
    # entries_total, resumed) and seconds; the final answer has every key
    "destroy": {"domid": DOMID, "brief": Bool()},
    "pause": {"domid": DOMID},
    "unpause": {"domid": DOMID},
    "nominate": {"domid": DOMID, "gfn": GFN},
    "share": {"sd": DOMID, "sgfn": GFN, "sh": U64(), "cd": DOMID, "cgfn": GFN, "ch": U64()},
    "add_to_physmap": {"sd": DOMID, "sgfn": GFN, "sh": U64(), "cd": DOMID, "cgfn": GFN},
    "range_share": {"sd": DOMID, "cd": DOMID, "first": GFN, "last": GFN},
    "unshare": {"domid": DOMID, "gfn": GFN},
    "read": {"domid": DOMID, "gfn": GFN},
    # payload: int64[count] gfns -> answer payload: uint64 handles, int64 codes
    # of the first `done` gfns. With budget_us the step stops once that much
    # work time is spent or other work waits (at least one chunk is done);
    # the caller sends the rest again ("restart")
    "nominate_many": {"domid": DOMID, "count": Int(0, 1 << 24), "budget_us": Int(1, 1_000_000, None)},
    # payload: [int64 sds], int64 sgfns, uint64 shs, [int64 cds], int64 cgfns,
    # uint64 chs -> int64 codes of the first `done` pairs; sds/cds travel only
    # when sd/cd are not given; budget_us as for nominate_many
    "share_many": {"sd": Int(0, 0x7FEF, None), "cd": Int(0, 0x7FEF, None), "count": Int(0, 1 << 24),
                   "budget_us": Int(1, 1_000_000, None)},
    # subscribe to the sharing event ring: the answer, the retained events
    # after `since` (none if not given), then one frame per new event
    "events": {"since": Int(0, (1 << 63) - 1, None)},
}

#: Operations of a guest's control channel.
GUEST_OPS: dict[str, dict[str, _Arg]] = {
    "ping": {},
    "stats": {},
    "write": {"gfn": GFN, "offset": Int(0, PAGE_SIZE - 1, 0)},         # payload: the bytes
    "write_pages": {"count": Int(1, MAX_BATCH_PAGES)},                 # payload: gfns, pages
    "read": {"gfn": GFN},
    "read_pages": {"count": Int(1, 1 << 20)},                          # payload: gfns
    "checksum": {"first": GFN, "count": Int(1, 1 << 24)},
    "verify": {"first": GFN, "count": Int(1, 1 << 24), "rounds": Int(1, 1 << 30, 1),
               "seconds": Num(0.0, 3600.0, 0.0)},
    "write_mapping": {"gfn": GFN},
    "raw_write": {"gfn": GFN},
    # tests: the payload goes verbatim onto the guest's pipe to the hypervisor
    # (anything a guest could send); with reply, the next H_REPLY comes back
    "pipe_send": {"reply": Bool(False)},
    # benchmarks: the guest times its own writes (answer payload: int64 ns each)
    "time_writes": {"first": GFN, "count": Int(1, 1 << 20), "size": Int(1, PAGE_SIZE, 1)},
    "time_write_pages": {"first": GFN, "count": Int(1, 1 << 24), "batch": Int(1, MAX_BATCH_PAGES, 1024)},
    # payload: int64 gfns, uint32 offsets, uint32 lengths, then the bytes
    "write_many": {"count": Int(1, MAX_BATCH_PAGES)},
    # benchmarks: ``size`` bytes at ``offset`` of each page, ``batch`` writes per message
    "time_write_many": {"first": GFN, "count": Int(1, 1 << 24), "batch": Int(1, MAX_BATCH_PAGES, 1024),
                        "size": Int(1, PAGE_SIZE, 1), "offset": Int(0, PAGE_SIZE - 1, 0)},
}


def check_request(obj: dict, ops: dict[str, dict[str, _Arg]]) -> tuple[str, dict]:
    """Validate a request object against ``ops``: (op, arguments with defaults)."""
    op = obj.get("op")
    if not isinstance(op, str) or op not in ops:
        raise ProtocolError(f"unknown operation {op!r}")
    schema = ops[op]
    extra = sorted(set(obj) - set(schema) - {"op"})
    if extra:
        raise ProtocolError(f"{op} takes no argument {extra[0]!r}")
    args = {}
    for key, a in schema.items():
        if key not in obj or obj[key] is None:
            if a.default is _Arg.REQUIRED:
                raise ProtocolError(f"{op} needs the argument {key!r}")
            args[key] = a.default
            continue
        args[key] = _check_value(op, key, obj[key], a)
    return op, args


def _check_value(op: str, key: str, v, a: _Arg):
    if a.kind is bool:
        if not isinstance(v, bool):
            raise ProtocolError(f"{op}: {key} must be true or false")
        return v
    if a.kind is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ProtocolError(f"{op}: {key} must be an integer")
        if not a.lo <= v <= a.hi:
            raise ProtocolError(f"{op}: {key} must be between {a.lo} and {a.hi}, not {v}")
        return v
    if a.kind is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise ProtocolError(f"{op}: {key} must be a number")
        if not a.lo <= v <= a.hi:
            raise ProtocolError(f"{op}: {key} must be between {a.lo:g} and {a.hi:g}, not {v}")
        return float(v)
    if not isinstance(v, str):
        raise ProtocolError(f"{op}: {key} must be a string")
    if len(v) > a.hi:
        raise ProtocolError(f"{op}: {key} is longer than {a.hi} characters")
    if a.choices and v not in a.choices:
        raise ProtocolError(f"{op}: {key} must be one of {', '.join(a.choices)}")
    return v


def ok(**result) -> dict:
    return {"ok": True, **result}


def error(message: str, code: int = errno.EINVAL, code_name: str = "EINVAL") -> dict:
    return {"ok": False, "error": message, "code": code, "code_name": code_name}
