"""Guest pipe messages: the hot path of every guest write and CoW fault.

A message is an 8-byte header ``<HHI`` (type, seq, body length) and a body
of packed structs and raw numpy arrays; the types and their bodies are
listed in :mod:`hvshare.hvcore.wire`. The pipe identifies the domain, so no message
names a domid. A status in a reply is 0 or the Xen code of the failure
(:mod:`hvshare.hvcore.errors`).
"""
from __future__ import annotations

import os
import select
import struct

from ..constants import MAX_BATCH_PAGES, PAGE_SIZE
from ..errors import ProtocolError
from .reader import MessageReader

PIPE_HDR = struct.Struct("<HHI")        # type, seq, body length
G_HELLO, G_WRITE, G_WRITE_PAGES, G_STATS, G_WRITE_MANY = 1, 2, 3, 4, 5
#: a fork's read fault (gfns to populate from its ancestors), and the end
#: of one iteration of the fuzz workload (no answer)
G_POPULATE, G_DONE = 6, 7
H_REPLY, H_PAUSE, H_UNPAUSE, H_SHUTDOWN = 0x81, 0x82, 0x83, 0x84
#: run one iteration of the fuzz workload
H_RUN = 0x85
#: a warm guest's domain: its configuration (JSON), the first message it reads
H_CONFIG = 0x86
#: the longest configuration a guest accepts
MAX_CONFIG_BODY = 1 << 16

HELLO = struct.Struct("<I")
WRITE = struct.Struct("<QI")
WRITE_PAGES = struct.Struct("<I4x")
REPLY = struct.Struct("<iq")
WRITE_MANY = struct.Struct("<I4x")
POPULATE = struct.Struct("<I4x")
#: iteration number, pages written, pages read
DONE = struct.Struct("<QII")
#: header and body of a G_WRITE in one struct (the hypervisor's fast path)
WRITE_MSG = struct.Struct("<HHIQI")
#: header and body of an H_REPLY in one struct
REPLY_MSG = struct.Struct("<HHIiq")
#: writes, pages written, CoW faults, fault p50 us, fault p99 us, write p50 us
STATS = struct.Struct("<QQQddd")
STATS_FIELDS = ("writes", "pages_written", "cow_faults", "fault_p50_us", "fault_p99_us",
                "write_p50_us")

MAX_GUEST_BODY = WRITE_PAGES.size + MAX_BATCH_PAGES * (8 + PAGE_SIZE)
_BODIES_TO_HV = {G_HELLO, G_WRITE, G_WRITE_PAGES, G_STATS, G_WRITE_MANY, G_POPULATE, G_DONE}
_BODIES_TO_GUEST = {H_REPLY: REPLY.size, H_PAUSE: 0, H_UNPAUSE: 0, H_SHUTDOWN: 0, H_RUN: 0}


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


def _batch_count(body, head: struct.Struct, what: str, unit: str) -> int:
    """The count that opens a batch body (``head``), checked to be 1..MAX_BATCH_PAGES."""
    if len(body) < head.size:
        raise ProtocolError(f"{what} message too short")
    (count,) = head.unpack_from(body)
    if not 1 <= count <= MAX_BATCH_PAGES:
        raise ProtocolError(f"{what} of {count} {unit} (allowed 1..{MAX_BATCH_PAGES})")
    return count


def decode_write_pages(body):
    """``G_WRITE_PAGES`` body -> (gfns int64[k], pages uint8[k, 4096]) as views."""
    import numpy as np
    count = _batch_count(body, WRITE_PAGES, "write_pages", "pages")
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
    count = _batch_count(body, WRITE_MANY, "write_many", "writes")
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


def decode_populate(body):
    """``G_POPULATE`` body -> gfns int64[k] (a view of ``body``)."""
    import numpy as np
    count = _batch_count(body, POPULATE, "populate", "gfns")
    if len(body) != POPULATE.size + 8 * count:
        raise ProtocolError(f"populate of {count} gfns needs {POPULATE.size + 8 * count} bytes, "
                            f"got {len(body)}")
    return np.frombuffer(body, dtype="<i8", count=count, offset=POPULATE.size)


def encode_populate(gfns) -> list:
    """Body parts of a ``G_POPULATE`` message."""
    import numpy as np
    gfns = np.ascontiguousarray(gfns, dtype="<i8")
    if not 1 <= len(gfns) <= MAX_BATCH_PAGES:
        raise ValueError(f"a populate names 1..{MAX_BATCH_PAGES} gfns, not {len(gfns)}")
    return [POPULATE.pack(len(gfns)), memoryview(gfns).cast("B")]


def decode_done(body) -> tuple[int, int, int]:
    """``G_DONE`` body -> (iteration, pages written, pages read)."""
    if len(body) != DONE.size:
        raise ProtocolError(f"done message has {len(body)} bytes, expected {DONE.size}")
    return DONE.unpack(body)


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


def encode_config(config: dict) -> list:
    """An ``H_CONFIG`` message: the domain a warm guest is to run."""
    import json
    body = json.dumps(config).encode()
    if len(body) > MAX_CONFIG_BODY:
        raise ValueError(f"a guest configuration of {len(body)} bytes exceeds {MAX_CONFIG_BODY}")
    return pipe_message(H_CONFIG, 0, body)


def read_config(fd: int) -> dict | None:
    """Wait on the blocking ``fd`` for the ``H_CONFIG`` a warm guest starts
    with; its configuration, or None if the pipe ends first."""
    import json
    head = _read_exact(fd, PIPE_HDR.size)
    if head is None:
        return None
    mtype, _, length = PIPE_HDR.unpack(head)
    if mtype != H_CONFIG or length > MAX_CONFIG_BODY:
        raise ProtocolError(f"a warm guest expected its configuration, got message {mtype:#x} "
                            f"of {length} bytes")
    body = _read_exact(fd, length)
    if body is None:
        return None
    return json.loads(body)


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def pipe_reader(fd: int, to_hv: bool) -> MessageReader:
    """A reader of guest-pipe messages on ``fd`` (``to_hv``: the hypervisor's side)."""
    check = check_to_hv if to_hv else check_to_guest
    return MessageReader.for_fd(fd, PIPE_HDR, lambda f: f[2], lambda f: check(f[0], f[2]))

