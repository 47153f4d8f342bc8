"""Guest pipe messages: framing, reassembly from any split, refusal of bad ones."""
from __future__ import annotations

import os

import numpy as np
import pytest

from hvshare.hvcore.wire import pipe
from hvshare.hvcore import errors


def _pipe():
    r, w = os.pipe()
    os.set_blocking(r, False)
    return r, w


def test_pipe_messages_reassemble_from_any_split():
    r, w = _pipe()
    try:
        reader = pipe.pipe_reader(r, to_hv=True)
        gfns = np.array([5, 1, 9], dtype=np.int64)
        pages = np.arange(3 * 4096, dtype=np.uint64).astype(np.uint8).reshape(3, 4096)
        stream = b"".join(bytes(p) for p in
                          pipe.pipe_message(pipe.G_WRITE, 7, pipe.WRITE.pack(3, 10), b"abc")
                          + pipe.pipe_message(pipe.G_WRITE_PAGES, 8, *pipe.encode_write_pages(gfns, pages))
                          + pipe.pipe_message(pipe.G_STATS, 0, pipe.encode_stats({"writes": 2, "cow_faults": 1})))
        got = []
        for i in range(0, len(stream), 1000):          # arbitrary chunking
            os.write(w, stream[i:i + 1000])
            msgs, eof = reader.pump()
            got += msgs
            assert not eof
        assert [(t, s) for (t, s, _), _ in got] == [(pipe.G_WRITE, 7), (pipe.G_WRITE_PAGES, 8), (pipe.G_STATS, 0)]
        assert pipe.decode_write(got[0][1])[:2] == (3, 10) and bytes(pipe.decode_write(got[0][1])[2]) == b"abc"
        g, pg = pipe.decode_write_pages(got[1][1])
        assert (g == gfns).all() and (pg == pages).all()
        st = pipe.decode_stats(got[2][1])
        assert st["writes"] == 2 and st["cow_faults"] == 1 and st["fault_p50_us"] is None
        os.close(w)
        w = None
        assert reader.pump() == ([], True)
    finally:
        os.close(r)
        if w is not None:
            os.close(w)


def test_large_batch_crosses_a_pipe():
    r, w = _pipe()
    try:
        reader = pipe.pipe_reader(r, to_hv=True)
        k = 300                                        # 1.2 MiB: bigger than the pipe
        parts = pipe.pipe_message(pipe.G_WRITE_PAGES, 1, *pipe.encode_write_pages(np.arange(k), np.ones((k, 4096), np.uint8)))
        data = b"".join(bytes(p) for p in parts)
        got, off = [], 0
        while not got:
            try:
                off += os.write(w, data[off:off + 65536])
            except BlockingIOError:
                pass
            got += reader.pump()[0]
        assert off == len(data)
        gfns, pages = pipe.decode_write_pages(got[0][1])
        assert len(gfns) == k and pages.sum() == k * 4096
    finally:
        os.close(r)
        os.close(w)


def test_bad_pipe_messages_are_refused():
    with pytest.raises(errors.ProtocolError, match="unknown"):
        pipe.check_to_hv(99, 0)
    with pytest.raises(errors.ProtocolError, match="limit"):
        pipe.check_to_hv(pipe.G_WRITE_PAGES, 1 << 30)
    with pytest.raises(errors.ProtocolError, match="expected"):
        pipe.check_to_guest(pipe.H_REPLY, 3)
    with pytest.raises(errors.ProtocolError, match="does not fit"):
        pipe.decode_write(pipe.WRITE.pack(0, 4000) + b"x" * 200)
    with pytest.raises(errors.ProtocolError, match="needs"):
        pipe.decode_write_pages(pipe.WRITE_PAGES.pack(2) + bytes(8))
    with pytest.raises(errors.ProtocolError, match="allowed"):
        pipe.decode_write_pages(pipe.WRITE_PAGES.pack(0))


def test_write_many_messages_round_trip_and_are_checked():
    parts = pipe.encode_write_many([7, 2], [4094, 0], [2, 3], b"ababc")
    body = b"".join(bytes(p) for p in parts)
    gfns, offsets, lengths, data = pipe.decode_write_many(body)
    assert gfns.tolist() == [7, 2] and offsets.tolist() == [4094, 0] and lengths.tolist() == [2, 3]
    assert bytes(data) == b"ababc"
    with pytest.raises(errors.ProtocolError, match="too short"):
        pipe.decode_write_many(b"\x01")
    with pytest.raises(errors.ProtocolError, match="allowed"):
        pipe.decode_write_many(pipe.WRITE_MANY.pack(0))
    with pytest.raises(errors.ProtocolError, match="needs"):
        pipe.decode_write_many(body[:-1])                 # truncated data
    with pytest.raises(errors.ProtocolError, match="needs"):
        pipe.decode_write_many(body + b"x")               # trailing bytes
    with pytest.raises(errors.ProtocolError, match="at least"):
        pipe.decode_write_many(pipe.WRITE_MANY.pack(3) + bytes(20))
    crossing = b"".join(bytes(p) for p in pipe.encode_write_many([1], [4095], [1], b"x"))
    crossing = crossing[:20] + (2).to_bytes(4, "little") + b"xy"   # offset 4095, 2 bytes
    with pytest.raises(errors.ProtocolError, match="does not fit"):
        pipe.decode_write_many(crossing)
    empty = pipe.WRITE_MANY.pack(1) + bytes(16)           # one write of 0 bytes
    with pytest.raises(errors.ProtocolError, match="empty"):
        pipe.decode_write_many(empty)
    pipe.check_to_hv(pipe.G_WRITE_MANY, len(body))
    with pytest.raises(ValueError):
        pipe.encode_write_many([1], [4095], [2], b"xy")
    with pytest.raises(ValueError):
        pipe.encode_write_many([1, 2], [0, 0], [1, 1], b"x")


def test_reader_feed_continues_where_the_caller_read():
    r, w = _pipe()
    try:
        reader = pipe.pipe_reader(r, to_hv=True)
        one = b"".join(bytes(p) for p in pipe.pipe_message(pipe.G_WRITE, 3, pipe.WRITE.pack(1, 0), b"ab"))
        two = b"".join(bytes(p) for p in pipe.pipe_message(pipe.G_WRITE, 4, pipe.WRITE.pack(2, 0), b"cd"))
        got = reader.feed(one + two[:5])
        assert [f[1] for f, _ in got] == [3] and reader.partial
        os.write(w, two[5:])
        got, eof = reader.pump()
        assert [f[1] for f, _ in got] == [4] and not eof and not reader.partial
        with pytest.raises(errors.ProtocolError):
            reader.feed(pipe.PIPE_HDR.pack(0x4242, 1, 0))
    finally:
        os.close(r)
        os.close(w)


def test_write_all_waits_out_a_full_non_blocking_pipe():
    import threading
    r, w = os.pipe()
    os.set_blocking(w, False)
    data = bytes(range(256)) * 4096              # 1 MiB: more than a pipe holds
    got = bytearray()

    def drain():
        while len(got) < len(data):
            got.extend(os.read(r, 1 << 16))
    t = threading.Thread(target=drain, daemon=True)
    try:
        t.start()
        pipe.write_all(w, [data[:100], data[100:]])
        t.join(10)
        assert bytes(got) == data
    finally:
        os.close(r)
        os.close(w)
