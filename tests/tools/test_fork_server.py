"""The run's hypervisor fork server: hypervisors forked with the kernels
loaded, re-parented to the run, and nothing of the server left after its
session, even one that crashed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import psutil

from hvshare.tools import api, launch

from waiting import wait_until

SERVER_MODULE = launch.HYPERVISOR_MODULE + ".forkserver"


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_runs_hypervisors_are_forked_by_its_server(hvs):
    server = launch.fork_server()
    assert server is not None and server.proc.poll() is None
    hv = psutil.Process(hvs.pid)
    assert SERVER_MODULE in hv.cmdline()            # a fork of the server, not a new interpreter
    assert hv.ppid() == os.getpid()                 # re-parented to the run, which reaps it
    assert hv.pid != server.pid and os.getsid(hv.pid) == hv.pid       # detached, as hvctl start's
    d = hvs.create_domain(pages=32, workload="clone", seed=1)
    assert hvs.guest(d["domid"]).stats()["pid"] == d["pid"]


def test_hvctl_start_run_by_a_test_uses_the_server(hvctl):
    p = hvctl("start", "--frames", "64")
    assert p.returncode == 0, p.stderr
    pid = json.loads(hvctl("info", "--json").stdout)["pid"]
    assert SERVER_MODULE in psutil.Process(pid).cmdline()
    assert hvctl("stop").returncode == 0


def test_a_launch_with_another_startup_environment_starts_on_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", "ignore::DeprecationWarning:hvshare_test")
    with api.hvshare_session(frames=64) as hv:
        assert SERVER_MODULE not in psutil.Process(hv.pid).cmdline()
        assert hv.ping() == hv.pid


def test_a_closed_server_leaves_nothing(tmp_path):
    server = launch.ForkServer()
    ready_r, ready_w = os.pipe()
    log = os.open(os.devnull, os.O_WRONLY)
    try:
        proc = launch.fork_hypervisor(server.name, ["--socket", str(tmp_path / "hv.sock"), "--frames", "0"],
                                      ready_w, log)
        assert proc is not None and proc.wait(timeout=60) == 1        # it could not start: it said why
        assert launch.read_line(ready_r, 5) == "error the pool needs at least one frame"
    finally:
        for fd in (ready_r, ready_w, log):
            os.close(fd)
        server.close()
    assert server.proc.returncode is not None and _gone(server.pid)
    assert launch.fork_hypervisor(server.name, ["--frames", "0"], 0, 0) is None     # nobody answers


def test_a_crashed_session_leaves_no_server(tmp_path):
    code = textwrap.dedent(f"""
        import os, signal
        from hvshare.tools import launch
        s = launch.start_fork_server()
        r, w = os.pipe()
        null = os.open(os.devnull, os.O_WRONLY)
        p = launch.fork_hypervisor(s.name, ["--socket", "{tmp_path / 'hv.sock'}", "--frames", "0"], w, null)
        p.wait()
        print(s.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr
    pid = int(p.stdout.split()[0])
    assert wait_until(lambda: _gone(pid), 5)
