"""Fixtures shared by every test: a real hypervisor, and a leak check.

- The test process becomes a *child subreaper*: a hypervisor that ``hvctl
  start`` detached, or a guest whose hypervisor died, is re-parented to it
  rather than to init, so the leak check sees (and reaps) it.
- Every hvshare session the tests start lives under one private root
  (``tools.session.SESSION_ROOT``), and ``$HVSHARE_SOCKET`` points there too, so
  no test can touch a user's own hypervisor.
- ``no_leftovers`` (autouse) fails any test that leaves a child process, an
  hvshare shared-memory segment it owns, or a Unix socket under that root,
  and then removes what it found so the next test starts clean.
- ``hvs`` is a running hypervisor (:func:`tools.api.hvshare_session`) whose
  audit must be 0 at the end of the test.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

try:
    import tools  # noqa: F401
except ImportError:  # run as plain `pytest` without the project installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvcore import shm  # noqa: E402
from tools import api, session  # noqa: E402

_PR_SET_CHILD_SUBREAPER = 36
ROOT = tempfile.mkdtemp(prefix="hvs-pytest-", dir="/tmp" if os.path.isdir("/tmp") else None)


def pytest_configure(config):
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    session.SESSION_ROOT = ROOT
    os.environ["HVSHARE_SOCKET"] = os.path.join(ROOT, "default", "hv.sock")


def pytest_unconfigure(config):
    shutil.rmtree(ROOT, ignore_errors=True)


def _sockets() -> set[str]:
    found = set()
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                if stat.S_ISSOCK(os.lstat(p).st_mode):
                    found.add(p)
            except OSError:
                pass
    return found


#: process-wide helpers multiprocessing starts once and keeps (not leaks)
_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _descendants() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                if p.ppid() == os.getpid():
                    os.waitpid(p.pid, os.WNOHANG)     # an orphan re-parented to us
                continue
            if any(h in " ".join(p.cmdline()) for h in _HELPERS):
                continue
            out.append(p)
        except (psutil.NoSuchProcess, ChildProcessError):
            pass
    return out


def _owned_by_us(segment: str, pids: set[int]) -> bool:
    """A segment this test run made: its owner is us, a process we started,
    or dead (other users of the machine own live hypervisors)."""
    pid = shm.owner_pid(segment)
    if pid is None:
        return False
    return pid == os.getpid() or pid in pids or not psutil.pid_exists(pid)


@pytest.fixture(autouse=True)
def no_leftovers():
    """Fail the test if it leaves a process, a segment or a socket behind."""
    before_procs = {p.pid for p in _descendants()}
    before_segs = set(shm.list_segments())
    before_socks = _sockets()
    seen: set[int] = set()
    yield
    problems = []
    deadline = time.monotonic() + 3.0       # guests of a killed hypervisor need up to 1 s
    while True:
        extra = [p for p in _descendants() if p.pid not in before_procs]
        seen |= {p.pid for p in extra}
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if extra:
        problems.append("processes " + ", ".join(f"{p.pid} ({' '.join(p.cmdline()[:3])})" for p in extra))
        for p in extra:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(extra, timeout=3)
        _descendants()
    segs = sorted(s for s in set(shm.list_segments()) - before_segs if _owned_by_us(s, seen))
    if segs:
        problems.append("shared-memory segments " + ", ".join(segs))
        for s in segs:
            shm.unlink(s)
    socks = sorted(_sockets() - before_socks)
    if socks:
        problems.append("sockets " + ", ".join(socks))
        for s in socks:
            try:
                os.unlink(s)
            except OSError:
                pass
    if problems:
        pytest.fail("the test left behind: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def hvs():
    """A real hypervisor process on a private socket (8192 frames)."""
    with api.hvshare_session(frames=8192) as s:
        yield s
        try:
            alive = s.ping() == s.pid
        except api.HVCtlError:
            alive = False
        if alive:
            report = s.call("audit")
            assert report["errors"] == 0, report["report"]
