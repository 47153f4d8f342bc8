"""An interrupted start or request leaves nothing running and nothing out of
step; Ctrl-C anywhere in hvctl ends it quietly with status 130."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from hvshare.tools import api, launch, session


@pytest.mark.parametrize("forked", [False, True], ids=["spawned", "fork-server"])
def test_an_interrupted_start_leaves_no_hypervisor(tmp_path, monkeypatch, forked):
    sock = os.path.join(session.SESSION_ROOT, f"int-{os.getpid()}.sock")
    started = []
    if forked:
        assert os.environ.get(launch.FORK_SOCKET_ENV)          # the run's fork server
        real = launch.fork_hypervisor

        def fork(*a, **kw):
            p = real(*a, **kw)
            started.append(p)
            return p
        monkeypatch.setattr(launch, "fork_hypervisor", fork)
    else:
        monkeypatch.delenv(launch.FORK_SOCKET_ENV, raising=False)
        real_popen = launch.subprocess.Popen

        def popen(*a, **kw):
            p = real_popen(*a, **kw)
            started.append(p)
            return p
        monkeypatch.setattr(launch.subprocess, "Popen", popen)

    def interrupted(fd, timeout):
        raise KeyboardInterrupt
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


#: delays, after hvctl's own code starts, at which Ctrl-C lands: while the
#: command line's modules load (a few hundred ms), then in the command
DELAYS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.6, 1.2)


def _ctrl_c_after(args: list[str], delay: float) -> tuple[int, str]:
    """Run ``hvctl ARGS`` and send SIGINT ``delay`` seconds after its own
    code began: its exit status and what it printed on stderr.

    The interpreter's own start (the site module and the environment's
    ``.pth`` hooks: tens of ms with an editable install) runs before any of
    hvctl's code and is Python's, so the clock starts when hvctl's entry
    has imported :mod:`hvshare.tools.interrupts` (``-X importtime`` reports it), a
    few instructions before the handler is installed."""
    p = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "hvshare.tools.hvctl", *args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in p.stderr:
            lines.append(line)
            if line.rstrip().endswith(" hvshare.tools.interrupts"):
                break
        else:
            raise AssertionError(f"hvctl never loaded hvshare.tools.interrupts: {''.join(lines)}")
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        rest = p.stderr.read()
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    said = [x for x in (lines + rest.splitlines(keepends=True)) if not x.startswith("import time:")]
    return p.returncode, "".join(said)


@pytest.mark.parametrize("delay", DELAYS)
def test_ctrl_c_while_hvctl_starts_or_streams_is_quiet(hvs, delay):
    status, said = _ctrl_c_after(["events", "--new", "--socket", hvs.socket_path], delay)
    assert status == 130 and "Traceback" not in said and "KeyboardInterrupt" not in said, said
    assert said == "", said


@pytest.mark.parametrize("delay", DELAYS[:3])
def test_ctrl_c_while_destroy_starts_is_quiet(hvs, delay):
    hvs.create(64, "zero", name="big")
    status, said = _ctrl_c_after(["destroy", "big", "--socket", hvs.socket_path], delay)
    assert status == 130 and "Traceback" not in said and "KeyboardInterrupt" not in said, said
    assert [d["name"] for d in hvs.list()] == ["big"]   # interrupted before it asked
