"""Edges a careless or hostile client can reach through the public socket:
each case is tried for real against a live hypervisor."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from hvcore.wire import control


def _split_send(path: str, obj: dict, pause: float = 0.05) -> tuple[dict, bytes] | None:
    """Send one frame in two writes with a pause between, so the hypervisor
    reads it in more than one piece; return its answer."""
    hdr, js, payload = control.frame(obj)
    data = bytes(hdr) + bytes(js) + bytes(payload)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        half = len(data) // 2
        s.sendall(data[:half])
        time.sleep(pause)
        s.sendall(data[half:])
        return control.FrameReader(s).next()


def test_a_large_json_frame_in_pieces_gets_an_answer_and_the_hypervisor_lives(hvs):
    # A JSON part of 64 KiB or more is read into a buffer of its own.
    request = {"op": "ping", "pad": "x" * (80 << 10)}
    assert len(json.dumps(request)) > 64 << 10
    answer, _ = _split_send(hvs.socket_path, request)
    assert answer["ok"] is False and "pad" in answer["error"]
    # the same frame again (the parsed-request memo must not hold it), then real work
    answer, _ = _split_send(hvs.socket_path, request)
    assert answer["ok"] is False
    assert hvs.ping() == hvs.pid
    d = hvs.create(16, "zero")
    assert hvs.domain(d)["pages"] == 16


def _hvctl(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "tools.hvctl", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_a_socket_path_naming_a_users_file_is_refused_and_the_file_kept(tmp_path):
    for kind in ("file", "directory"):
        path = tmp_path / f"precious-{kind}"
        if kind == "file":
            path.write_text("the user's data\n")
        else:
            path.mkdir()
            (path / "inside").write_text("kept\n")
        for cmd in ("stop", "start"):
            p = _hvctl(cmd, "--socket", str(path))
            assert p.returncode != 0, (cmd, p.stdout)
            lines = p.stderr.strip().splitlines()
            assert len(lines) == 1 and "not a hypervisor's socket" in lines[0], p.stderr
            assert "Traceback" not in p.stderr
        if kind == "file":
            assert path.read_text() == "the user's data\n"
        else:
            assert (path / "inside").read_text() == "kept\n"
        assert not os.path.exists(str(path) + ".d"), "a start that was refused must leave no state directory"
