"""``hvctl top`` as a user runs it: one frame with --once, frames until
Ctrl-C, q on a terminal, or the hypervisor's end."""
from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import threading
import time

from hvshare.tools import api

HVCTL = [sys.executable, "-m", "hvshare.tools.hvctl"]


def hvctl(sock: str, *args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*HVCTL, *args, "--socket", sock], capture_output=True, text=True,
                          timeout=timeout)


def test_once_shows_domains_sharing_cow_rates_dedup_and_steps(hvs):
    a, b = hvs.create(128, "clone", seed=2), hvs.create(128, "clone", seed=2)
    assert hvctl(hvs.socket_path, "dedup").returncode == 0
    p = hvctl(hvs.socket_path, "dedup", "--detach", "--interval", "0.05")
    assert p.returncode == 0, p.stderr
    try:
        done = threading.Event()

        def write():                            # CoW faults on b's shared pages meanwhile
            with hvs.guest(b) as g:
                gfn = 0
                while not done.is_set() and gfn < 128:
                    g.write(gfn, b"\xff" * 16)
                    gfn += 1
                    time.sleep(0.01)
        t = threading.Thread(target=write)
        t.start()
        try:
            p = hvctl(hvs.socket_path, "top", "--once", "--json", "--interval", "0.5")
        finally:
            done.set()
            t.join()
        assert p.returncode == 0, p.stderr
        f = json.loads(p.stdout)
        doms = {d["domid"]: d for d in f["domains"]}
        assert doms[b]["cow_faults_per_s"] > 0 and doms[a]["cow_faults_per_s"] == 0
        assert doms[a]["shr_pages"] > 0 and doms[a]["state"] == "running"
        assert f["dedup"]["passes"] >= 1 and f["hypervisor"]["pause_histogram"]
        p = hvctl(hvs.socket_path, "top", "--once", "--interval", "0.1")
        assert p.returncode == 0, p.stderr
        names = [d["name"] for d in hvs.list()]
        for word in (*names, "running", "SHR_PAGES", "COW/s", "SHR MiB", "saved", "dedup daemon", "passes",
                     "full scans", "pages_sharing", "hypervisor steps", "longest", "< "):
            assert word in p.stdout, word
    finally:
        assert hvctl(hvs.socket_path, "dedup", "--stop").returncode == 0
    assert "no daemon" in hvctl(hvs.socket_path, "top", "--once", "--interval", "0.1").stdout


def _top(sock: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([*HVCTL, "top", "--interval", "0.1", "--socket", sock], text=True, **kw)


def test_ctrl_c_ends_it_cleanly(hvs):
    hvs.create(64, "zero")
    proc = _top(hvs.socket_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while "hypervisor steps" not in proc.stdout.readline():
            assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and err == ""


def test_it_ends_when_the_hypervisor_goes_away():
    with api.hvshare_session(frames=1024) as hv:
        proc = _top(hv.socket_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout.readline()
            hv.stop()
            _, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "went away" in lines[0] and "Traceback" not in err


def test_q_on_a_terminal_ends_it_and_restores_the_terminal(hvs):
    master, slave = pty.openpty()
    mode = termios.tcgetattr(slave)
    proc = _top(hvs.socket_path, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    seen = b""
    try:
        while b"hypervisor steps" not in seen:
            assert select.select([master], [], [], 30)[0]
            seen += os.read(master, 65536)
        os.write(master, b"q")
        assert proc.wait(timeout=10) == 0
        assert termios.tcgetattr(master) == mode        # cbreak undone
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
