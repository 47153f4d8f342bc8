"""An interrupted start or request leaves nothing running and nothing out of step."""
from __future__ import annotations

import os
import signal
import threading

import pytest

from tools import api, launch, session


def test_an_interrupted_start_leaves_no_hypervisor(tmp_path, monkeypatch):
    sock = os.path.join(session.SESSION_ROOT, f"int-{os.getpid()}.sock")
    started = []
    real_popen = launch.subprocess.Popen

    def popen(*a, **kw):
        p = real_popen(*a, **kw)
        started.append(p)
        return p

    def interrupted(fd, timeout):
        raise KeyboardInterrupt
    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    monkeypatch.setattr(launch, "read_line", interrupted)
    with pytest.raises(KeyboardInterrupt):
        api.start_hypervisor(sock, frames=64)
    (p,) = started
    assert p.poll() is not None             # killed and reaped
    assert api.running_pid(sock) is None and not os.path.exists(sock)


def test_a_request_interrupted_before_its_answer_does_not_shift_the_next(hvs):
    c = api.HypervisorClient(hvs.socket_path)
    timer = threading.Timer(0.05, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGINT))
    d = hvs.create(4096, "clone")
    try:
        with pytest.raises(KeyboardInterrupt):
            timer.start()
            while True:                 # an audit is long enough to be interrupted in
                c.call("audit")
    finally:
        timer.cancel()
    # the next request gets its own answer, not the audit's
    assert [x["domid"] for x in c.list()] == [d]
    c.close()
