"""hvshare's pytest plugin: a real hypervisor per test, a leak check, KSM tests.

Installed as the ``pytest11`` entry point ``hvshare``, so it loads in every
pytest run once hvshare is installed (``-p no:hvshare`` turns it off,
``-p hvshare`` loads it where autoloading is disabled). It provides:

- ``hvshare``: a running hypervisor (:func:`hvshare.tools.api.hvshare_session`, 8192
  frames) whose audit must find no error when the test ends. Options come
  from ``@pytest.mark.hvshare(frames=65536, rmap="index")`` (the closest
  marker wins) and from an indirect parameter, a dict that overrides the
  marker: ``@pytest.mark.parametrize("hvshare", [{"rmap": "index"}],
  indirect=True)``.
- the run's hypervisors are forked by one fork server that loaded the
  hypervisor and its kernels once (:class:`hvshare.tools.launch.ForkServer`),
  not started as new interpreters; the ini option ``hvshare_fork_server =
  false`` or ``HVSHARE_FORK_SERVER=0`` turns it off. It ends with the run.
- ``hvshare_leaks``: fails the test if it leaves a child process, an
  hvshare shared-memory segment it owns, or a Unix socket under the run's
  session root, and removes what it found. The ini option
  ``hvshare_leak_check = true`` applies it to every test.
- ``@pytest.mark.ksm(**knobs)``: the test needs Linux KSM; it is skipped
  with the reason when ``/sys/kernel/mm/ksm`` cannot be driven, otherwise
  it runs inside :func:`hvshare.perf.peers.ksm_session.ksm_session` (``knobs`` set
  on entry, every knob restored after the test's fixtures are torn down).

Being loaded changes nothing in the process. A run that opts in (the ini
option, or the first test that uses ``hvshare`` or ``hvshare_leaks``)
becomes a child subreaper, so a detached hypervisor or an orphaned guest is
re-parented to pytest where the leak check sees it, and gets a private
session root (``hvshare.tools.session.SESSION_ROOT`` and ``$HVSHARE_SOCKET``), so no
test reaches a user's own hypervisor; the end of the run undoes both.

It lives in ``perf`` because it combines the toolstack's sessions with the
KSM knobs of :mod:`hvshare.perf.peers`, and imports point perf -> tools. Modules
beyond the standard library are imported when a test needs them: every
pytest run on a machine with hvshare installed imports this one.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import stat
import tempfile
import time

import pytest

from hvshare.perf.peers.ksm_session import ksm_session
from hvshare.perf.peers.ksm_sysfs import KsmUnavailable

#: pool size of the ``hvshare`` fixture unless a marker or parameter says otherwise
HVSHARE_FRAMES = 8192

#: how long the leak check waits for processes to go (the guests of a
#: killed hypervisor notice within a second)
LEAK_GRACE_SECONDS = 3.0

#: process-wide helpers multiprocessing starts once and keeps (not leaks)
_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def pytest_addoption(parser):
    parser.addini("hvshare_leak_check", "fail every test that leaves an hvshare process, "
                  "shared-memory segment or socket behind", type="bool", default=False)
    parser.addini("hvshare_fork_server", "start the run's hypervisors from one fork server that "
                  "loaded the hypervisor and its kernels once", type="bool", default=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "hvshare(**options): options of the hvshare fixture's hypervisor "
                            "(frames, rmap, teardown, sched, prefault)")
    config.addinivalue_line("markers", "ksm(**knobs): needs Linux KSM (skipped where "
                            "/sys/kernel/mm/ksm cannot be driven); knobs set for the test, "
                            "all restored after it")
    config.stash[_RUN] = run = _RunEnvironment(config.getini("hvshare_fork_server")
                                               and os.environ.get("HVSHARE_FORK_SERVER") != "0")
    if config.getini("hvshare_leak_check"):
        run.activate()
        config.pluginmanager.register(_LeakCheckEveryTest(), "hvshare-leak-check")


def pytest_unconfigure(config):
    run = config.stash.get(_RUN, None)
    if run is not None:
        run.deactivate()


class _RunEnvironment:
    """The process-wide state of a run that starts hypervisors: the child
    subreaper, a private session root and the hypervisors' fork server
    (:class:`hvshare.tools.launch.ForkServer`, unless turned off), set once
    and undone at the end."""

    def __init__(self, fork_server: bool = False) -> None:
        self.root: str | None = None
        self._saved: tuple | None = None
        self.fork_server = fork_server

    def activate(self) -> str:
        if self.root is None:
            from hvshare.tools import launch, session
            _set_child_subreaper(True)
            if self.fork_server:
                launch.start_fork_server()
            self.root = tempfile.mkdtemp(prefix="hvs-pytest-", dir="/tmp" if os.path.isdir("/tmp") else None)
            self._saved = (session.SESSION_ROOT, os.environ.get("HVSHARE_SOCKET"))
            session.SESSION_ROOT = self.root
            os.environ["HVSHARE_SOCKET"] = os.path.join(self.root, "default", "hv.sock")
        return self.root

    def deactivate(self) -> None:
        if self.root is None:
            return
        from hvshare.tools import launch, session
        launch.stop_fork_server()
        session.SESSION_ROOT, old_socket = self._saved
        if old_socket is None:
            os.environ.pop("HVSHARE_SOCKET", None)
        else:
            os.environ["HVSHARE_SOCKET"] = old_socket
        _set_child_subreaper(False)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None


_RUN = pytest.StashKey[_RunEnvironment]()
_KSM = pytest.StashKey[contextlib.ExitStack]()


def _set_child_subreaper(on: bool) -> None:
    from hvshare.hvcore.forking import become_subreaper
    become_subreaper(on)


# --------------------------------------------------------------------------
# the hypervisor

@pytest.fixture
def hvshare(request):
    """A real hypervisor process on a private socket; its audit must be 0
    when the test ends (unless the test stopped or killed it)."""
    from hvshare.tools import api
    request.config.stash[_RUN].activate()
    options = {"frames": HVSHARE_FRAMES}
    marker = request.node.get_closest_marker("hvshare")
    if marker is not None:
        if marker.args:
            pytest.fail("@pytest.mark.hvshare takes keyword options only, e.g. frames=65536", pytrace=False)
        options.update(marker.kwargs)
    options.update(getattr(request, "param", None) or {})
    with api.hvshare_session(**options) as s:
        yield s
        try:
            alive = s.ping() == s.pid
        except api.HVCtlError:
            alive = False
        if alive:
            report = s.call("audit")
            if report["errors"]:
                pytest.fail(f"the hypervisor's audit found {report['errors']} errors after the test:\n"
                            f"{report['report']}", pytrace=False)


# --------------------------------------------------------------------------
# the leak check

@pytest.fixture
def hvshare_leaks(request):
    """Fail the test if it leaves a process, a segment or a socket behind."""
    root = request.config.stash[_RUN].activate()
    with _leak_check(root) as problems:
        yield
    if problems:
        pytest.fail("the test left behind: " + "; ".join(problems), pytrace=False)


class _LeakCheckEveryTest:
    """Registered when ``hvshare_leak_check = true``."""

    @pytest.fixture(autouse=True)
    def _hvshare_leak_check(self, hvshare_leaks):
        return None


@contextlib.contextmanager
def _leak_check(root: str):
    """Yields a list that, after the block, names what it left behind
    (everything named is already killed or removed)."""
    import psutil
    from hvshare.hvcore import shm
    before_procs = {p.pid for p in _descendants()}
    before_segs = set(shm.list_segments())
    before_socks = _sockets(root)
    problems: list[str] = []
    yield problems
    seen: set[int] = set()
    deadline = time.monotonic() + LEAK_GRACE_SECONDS
    while True:
        extra = [p for p in _descendants() if p.pid not in before_procs]
        seen |= {p.pid for p in extra}
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if extra:
        problems.append("processes " + ", ".join(f"{p.pid} ({_cmdline(p)})" for p in extra))
        for p in extra:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(extra, timeout=3)
        _descendants()          # reaps the orphans among them
    segs = sorted(s for s in set(shm.list_segments()) - before_segs if _owned_by_us(s, seen))
    if segs:
        problems.append("shared-memory segments " + ", ".join(segs))
        for s in segs:
            shm.unlink(s)
    socks = sorted(_sockets(root) - before_socks)
    if socks:
        problems.append("sockets " + ", ".join(socks))
        for s in socks:
            with contextlib.suppress(OSError):
                os.unlink(s)


def _sockets(root: str) -> set[str]:
    found = set()
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(p).st_mode):
                    found.add(p)
    return found


def _descendants() -> list:
    """Live descendants of this process, minus multiprocessing's helpers
    and the run's fork server; reaps the zombies among the orphans
    re-parented to it."""
    import psutil
    from hvshare.tools import launch
    server = launch.fork_server()
    out = []
    for p in psutil.Process().children(recursive=True):
        if server is not None and p.pid == server.pid:
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                if p.ppid() == os.getpid():
                    os.waitpid(p.pid, os.WNOHANG)
                continue
            if any(h in " ".join(p.cmdline()) for h in _HELPERS):
                continue
            out.append(p)
        except (psutil.NoSuchProcess, ChildProcessError):
            pass
    return out


def _cmdline(p) -> str:
    import psutil
    try:
        return " ".join(p.cmdline()[:3])
    except psutil.Error:
        return "?"


def _owned_by_us(segment: str, pids: set[int]) -> bool:
    """A segment this run made: its owner is us, a process we started, or
    dead (other users of the machine own live hypervisors)."""
    import psutil
    from hvshare.hvcore import shm
    pid = shm.owner_pid(segment)
    if pid is None:
        return False
    return pid == os.getpid() or pid in pids or not psutil.pid_exists(pid)


# --------------------------------------------------------------------------
# KSM

def pytest_runtest_setup(item):
    """Borrow the KSM knobs before the test's fixtures are set up.

    A plain hook (not tryfirst): pytest's own skip/skipif evaluation runs
    first, so a test skipped anyway never takes the KSM lock; ours runs
    before the default one that sets up fixtures, being registered later.
    """
    marker = item.get_closest_marker("ksm")
    if marker is None:
        return
    if marker.args:
        pytest.fail("@pytest.mark.ksm takes knobs as keywords only, e.g. pages_to_scan=1000", pytrace=False)
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(ksm_session(**marker.kwargs))
    except KsmUnavailable as e:
        pytest.skip(str(e))
    item.stash[_KSM] = stack


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Restore the KSM knobs once the test's fixtures are torn down."""
    try:
        return (yield)
    finally:
        stack = item.stash.get(_KSM, None)
        if stack is not None:
            del item.stash[_KSM]
            stack.close()
