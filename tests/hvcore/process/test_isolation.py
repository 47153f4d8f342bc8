"""Isolation: who can reach the hypervisor, its memory and its guests.

- the control socket is 0600 in a 0700 directory, guest channels too;
- every segment is 0600 and named with a random 64-bit token;
- a guest can write nothing through its mapping (``test_guests``: the
  mapping is ``r--s`` and a store kills only that guest) and nothing of
  another domain through its pipe (no message names a domain; gfns outside
  its own are refused);
- another user can neither connect to the sockets nor open the segments:
  a small script runs as ``nobody`` and is refused (skipped where the test
  cannot switch user).
"""
from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import stat
import subprocess

import numpy as np
import pytest

from hvshare.hvcore.wire import pipe
from hvshare.hvcore import shm
from hvshare.hvcore.statedir import state_dir_for
from hvshare.tools import api

PAGE = 4096

_NOBODY_SCRIPT = r"""
import errno, json, os, socket, sys
cfg = json.loads(sys.argv[1])
out = {}
for key, path in cfg["sockets"].items():
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        s.sendall(b"\x0f\x00\x00\x00\x00\x00\x00\x00" + b'{"op":"list"}  ')
        out[key] = "connected"
    except OSError as e:
        out[key] = errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()
for name in cfg["segments"]:
    for mode in (os.O_RDONLY, os.O_RDWR):
        try:
            os.close(os.open("/dev/shm/" + name.lstrip("/"), mode))
            out[name + str(mode)] = "opened"
        except OSError as e:
            out[name + str(mode)] = errno.errorcode.get(e.errno, str(e.errno))
try:
    os.listdir(cfg["state"])
    out["state_dir"] = "listed"
except OSError as e:
    out["state_dir"] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(out))
"""


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_sockets_directories_and_segments_are_private(hvs):
    d = hvs.create(16, "zero")
    state = state_dir_for(hvs.socket_path)
    assert _mode(hvs.socket_path) == 0o600 and stat.S_ISSOCK(os.stat(hvs.socket_path).st_mode)
    assert _mode(os.path.dirname(hvs.socket_path)) == 0o700
    assert _mode(state) == 0o700
    guest_sock = hvs.domain(d)["guest_socket"]
    assert os.path.dirname(guest_sock) == state and _mode(guest_sock) == 0o600
    mine = [n for n in shm.list_segments() if shm.owner_pid(n) == hvs.pid]
    assert len(mine) == 2                                       # the pool and one p2m
    for name in mine:
        st = os.stat(os.path.join(shm.SHM_DIR, name.lstrip("/")))
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
        # /hvshare-<pid>-<64 random bits>-<what>
        m = re.fullmatch(rf"/hvshare-{hvs.pid}-([0-9a-f]{{16}})-.*", name)
        assert m, name
    tokens = {re.match(r"/hvshare-\d+-([0-9a-f]+)-", n).group(1) for n in mine}
    assert len(tokens) == 1
    with api.hvshare_session(frames=64) as other:             # another hypervisor: another token
        theirs = {re.match(r"/hvshare-\d+-([0-9a-f]+)-", n).group(1)
                  for n in shm.list_segments() if shm.owner_pid(n) == other.pid}
        assert theirs and not theirs & tokens


def test_a_guest_cannot_touch_another_domain_through_its_pipe(hvs):
    small = hvs.create(8, "zero")
    big = hvs.create(64, "clone", seed=4)
    with hvs.guest(big) as gb:
        before = gb.checksum(0, 64)
    with hvs.guest(small) as g:
        for gfn in (8, 40, 63, 2**63, 2**64 - 1):               # valid in big, not in small
            body = pipe.WRITE.pack(gfn, 0) + b"intruder"
            r = g.pipe_send(pipe.PIPE_HDR.pack(pipe.G_WRITE, 9, len(body)) + body, reply=True)
            assert r["status"] == 22 and r["seq"] == 9, r       # EINVAL
        for gfns in ([8], [-1], [0, 40], [-2**63]):
            body = (pipe.WRITE_PAGES.pack(len(gfns)) + np.array(gfns, "<i8").tobytes()
                    + b"\x5a" * (PAGE * len(gfns)))
            r = g.pipe_send(pipe.PIPE_HDR.pack(pipe.G_WRITE_PAGES, 10, len(body)) + body, reply=True)
            assert r["status"] == 22, r
        assert g.read(0) == bytes(PAGE)                         # a refused batch wrote nothing
    with hvs.guest(big) as gb:
        assert (gb.checksum(0, 64) == before).all()
    assert hvs.domain(small)["state"] == "running"


def _as_nobody():
    if os.geteuid() != 0:
        pytest.skip("switching to another user needs root")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user on this machine")
    python = shutil.which("python3", path="/usr/bin:/bin:/usr/local/bin")
    if python is None:
        pytest.skip("no system python3 another user can run")

    def demote():
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    def run(cfg: dict) -> dict:
        p = subprocess.run([python, "-c", _NOBODY_SCRIPT, json.dumps(cfg)], preexec_fn=demote,
                           capture_output=True, text=True, timeout=30, cwd="/")
        if p.returncode != 0 and "Permission denied" in p.stderr and not p.stdout:
            pytest.skip(f"{python} cannot run as nobody here")
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)
    return run


def test_another_user_can_neither_connect_nor_map(hvs):
    run = _as_nobody()
    d = hvs.create(16, "zero")
    guest_sock = hvs.domain(d)["guest_socket"]
    segments = [n for n in shm.list_segments() if shm.owner_pid(n) == hvs.pid]
    cfg = {"sockets": {"control": hvs.socket_path, "guest": guest_sock}, "segments": segments,
           "state": state_dir_for(hvs.socket_path)}
    out = run(cfg)
    assert out["control"] == "EACCES" and out["guest"] == "EACCES", out
    assert out["state_dir"] == "EACCES", out
    for name in segments:
        assert out[name + str(os.O_RDONLY)] == "EACCES" and out[name + str(os.O_RDWR)] == "EACCES", out
    # Even with the directories opened up, the sockets' own 0600 refuses.
    dirs = [os.path.dirname(hvs.socket_path), state_dir_for(hvs.socket_path)]
    try:
        for x in dirs:
            os.chmod(x, 0o755)
        out = run(cfg)
        assert out["control"] == "EACCES" and out["guest"] == "EACCES", out
    finally:
        for x in dirs:
            os.chmod(x, 0o700)
    assert hvs.ping() == hvs.pid and hvs.audit() == 0
