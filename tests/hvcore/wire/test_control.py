"""Control frames and request schemas; the blocking FrameReader."""
from __future__ import annotations

import os
import socket

import pytest

from hvshare.hvcore.wire import control, schema
from hvshare.hvcore import errors


def _pipe():
    r, w = os.pipe()
    os.set_blocking(r, False)
    return r, w


def test_frames_and_schemas():
    a, b = socket.socketpair()
    with a, b:
        control.send_frame(a, {"op": "read", "gfn": 3}, b"\x00" * 10)
        frames = control.FrameReader(b)
        obj, payload = frames.next()
        assert obj == {"op": "read", "gfn": 3} and payload == bytes(10)
        a.close()
        assert frames.next() is None
    op, args = schema.check_request({"op": "create", "pages": 4}, schema.CONTROL_OPS)
    assert op == "create" and args["workload"] == "zero" and args["paused"] is False
    for bad, match in (({"op": "create", "pages": True}, "integer"),
                       ({"op": "create", "pages": 4, "paused": 1}, "true or false"),
                       ({"op": "create", "pages": 4, "name": "x" * 100}, "longer"),
                       ({"op": "create", "pages": 4, "rate": "fast"}, "number"),
                       ({"op": "share", "sd": 1}, "needs"),
                       ({"op": 5}, "unknown operation"),
                       ({"op": "verify", "first": 0, "count": 0}, None)):
        with pytest.raises(errors.ProtocolError, match=match):
            schema.check_request(bad, schema.GUEST_OPS if bad["op"] == "verify" else schema.CONTROL_OPS)
    with pytest.raises(errors.ProtocolError):
        control.check_frame_header(1 << 30, 0)
    with pytest.raises(errors.ProtocolError, match="JSON object"):
        control.parse_frame(2, b"[]")


def test_frame_reader_returns_a_frame_that_fills_one_read_exactly():
    # A blocking client must not wait for bytes nobody sends: a frame that
    # fills the reader's read buffer to the byte is complete as it stands.
    from hvshare.hvcore.wire.reader import READ_CHUNK
    a, b = socket.socketpair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        hdr, js, _ = control.frame({"op": "x"}, b"")
        payload = bytes(READ_CHUNK - len(hdr) - len(js))
        a.sendall(b"".join(bytes(x) for x in control.frame({"op": "x"}, payload)))
        b.settimeout(5)
        obj, got = control.FrameReader(b).next()
        assert obj == {"op": "x"} and got == payload
