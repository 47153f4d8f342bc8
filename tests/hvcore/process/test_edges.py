"""Edges a careless or hostile client can reach through the public socket:
each case is tried for real against a live hypervisor."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from hvshare.hvcore.wire import control


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
    return subprocess.run([sys.executable, "-m", "hvshare.tools.hvctl", *args], capture_output=True, text=True,
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


def _refused(p, *words):
    assert p.returncode != 0, p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_a_socket_directory_others_could_write_to_is_refused_unless_insisted(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)                       # world-writable, not sticky
    sock = str(shared / "hv.sock")
    _refused(_hvctl("start", "--frames", "64", "--socket", sock), "writable by other users")
    assert os.listdir(shared) == []
    os.chmod(shared, 0o1777)                      # sticky, as /tmp: nobody can replace our socket
    try:
        assert _hvctl("start", "--frames", "64", "--socket", sock).returncode == 0
    finally:
        assert _hvctl("stop", "--socket", sock).returncode == 0
    os.chmod(shared, 0o777)
    env = dict(os.environ, HVSHARE_INSECURE_SOCKET_DIR="1")
    p = subprocess.run([sys.executable, "-m", "hvshare.tools.hvctl", "start", "--frames", "64", "--socket", sock],
                       capture_output=True, text=True, timeout=60, env=env)
    try:
        assert p.returncode == 0, p.stderr
    finally:
        subprocess.run([sys.executable, "-m", "hvshare.tools.hvctl", "stop", "--socket", sock], env=env,
                       capture_output=True, timeout=60)


def test_a_socket_directory_of_another_user_is_refused(tmp_path):
    if os.getuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    _refused(_hvctl("start", "--frames", "64", "--socket", str(theirs / "hv.sock")),
             "belongs to another user", "uid 65534")
    assert os.listdir(theirs) == []


def test_a_socket_path_too_long_is_refused_and_leaves_no_directory(tmp_path):
    top = tmp_path / "new"
    sock = str(top / ("x" * 40) / ("y" * 40) / "hv.sock")
    _refused(_hvctl("start", "--frames", "64", "--socket", sock), "too long")
    assert not top.exists()


def test_missing_socket_directories_are_made_private(tmp_path):
    sock = tmp_path / "a" / "b" / "hv.sock"
    try:
        assert _hvctl("start", "--frames", "64", "--socket", str(sock)).returncode == 0
        for d in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "hv.d"):
            assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
    finally:
        _hvctl("stop", "--socket", str(sock))


def test_headers_that_claim_large_payloads_cost_only_the_bytes_that_arrive(hvs):
    import psutil
    hv = psutil.Process(hvs.pid)
    before = hv.memory_info().rss
    conns = []
    try:
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX)
            s.connect(hvs.socket_path)
            # a frame of a 2-byte JSON part and a 64 MiB payload: header, JSON, 100 KiB
            s.sendall(control.FRAME_HDR.pack(2, control.MAX_PAYLOAD) + b"{}" + bytes(100 << 10))
            conns.append(s)
        deadline = time.monotonic() + 10
        while hvs.info()["pause_by_op"].get("read", {}).get("count", 0) < 20:
            assert time.monotonic() < deadline, "the hypervisor did not read the frames"
            time.sleep(0.01)
        grown = hv.memory_info().rss - before
        assert grown < 64 << 20, f"{grown >> 20} MiB for 2 MiB of frames that arrived"
        assert hvs.ping() == hvs.pid
    finally:
        for s in conns:
            s.close()
    assert hvs.ping() == hvs.pid


def test_requests_before_a_bad_frame_in_the_same_read_are_answered_first(hvs):
    ping = b"".join(bytes(x) for x in control.frame({"op": "ping"}))
    bad = control.FRAME_HDR.pack(control.MAX_JSON + 1, 0)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(hvs.socket_path)
        s.sendall(ping + ping + bad)              # one write: most likely one read
        frames = control.FrameReader(s)
        answers = []
        try:
            while (got := frames.next()) is not None:
                answers.append(got[0])
        except (ConnectionError, OSError):
            pass
    assert [a.get("pid") for a in answers[:2]] == [hvs.pid, hvs.pid], answers
    assert len(answers) == 3 and not answers[2]["ok"] and "bad control frame" in answers[2]["error"]
    assert hvs.ping() == hvs.pid
