"""Starting a background process that says when it serves.

The hypervisor (``hvctl start``) and the dedup daemon (``hvctl dedup
--detach``) start the same way: a child with its output appended to a log
and a pipe on which it writes one line, ``ready ...`` once it serves or
``error REASON`` if it cannot. :func:`launch` is that handshake, so both
report a failed start with the child's own reason and neither leaves a
child running unseen when the caller is interrupted.

A session that starts many hypervisors (a test run) may start a
:class:`ForkServer` (:func:`start_fork_server`): a process with the
hypervisor's modules and compiled kernels loaded once
(:mod:`hvshare.hvcore.process.forkserver`), which forks each detached
hypervisor the session launches instead of a new interpreter loading them
again (any process of the session: it finds the server in
``$HVSHARE_FORK_SOCKET``). A launch falls back to the usual way if the
server is gone or refuses (another startup environment).
"""
from __future__ import annotations

import json
import os
import secrets
import select
import socket
import subprocess
import sys
import time

from hvshare.hvcore.forking import AdoptedProcess, become_subreaper, startup_env_of

from .errors import HVCtlError

__all__ = ["launch", "read_line", "log_tail", "ForkServer", "fork_hypervisor", "start_fork_server",
           "stop_fork_server", "fork_server"]

#: the module a hypervisor runs (what the fork server can fork)
HYPERVISOR_MODULE = "hvshare.hvcore.process"
#: how long a request waits for the fork server (its first one: its start)
FORK_SERVER_TIMEOUT = 60.0
#: names the session's fork server (set by :class:`ForkServer`)
FORK_SOCKET_ENV = "HVSHARE_FORK_SOCKET"


def launch(cmd: list[str], log_path: str, timeout: float, what: str, *,
           detach: bool = True) -> tuple[subprocess.Popen, str]:
    """Run ``cmd --ready-fd N`` and wait for the line it writes on fd N.

    Detached (the default), the child runs in a session of its own with
    stdin closed and stdout and stderr appended to ``log_path``; attached,
    it shares the caller's terminal and process group. Returns the process
    and the rest of its ``ready`` line. If it does not get ready within
    ``timeout`` seconds it is killed (unless it said ``error``, and is
    exiting by itself) and reaped, and :class:`HVCtlError` says why: its
    ``error`` line, else the last line of its log, else its exit status
    (``what`` names it). Anything raised while it starts (Ctrl-C) kills
    and reaps it before propagating.
    """
    ready_r, ready_w = os.pipe()
    try:
        with open(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
            server = os.environ.get(FORK_SOCKET_ENV) \
                if detach and cmd[:3] == [sys.executable, "-m", HYPERVISOR_MODULE] else None
            proc = fork_hypervisor(server, cmd[3:], ready_w, log.fileno()) if server else None
            if proc is None:
                out = dict(stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True) \
                    if detach else {}
                proc = subprocess.Popen([*cmd, "--ready-fd", str(ready_w)], pass_fds=(ready_w,),
                                        cwd="/", **out)
    except BaseException:
        os.close(ready_r)
        raise
    finally:
        os.close(ready_w)
    try:
        line = read_line(ready_r, timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        os.close(ready_r)
    if line == "ready" or line.startswith("ready "):
        return proc, line[len("ready "):]
    if proc.poll() is None and not line.startswith("error "):
        proc.kill()
    proc.wait()
    reason = line[len("error "):] if line.startswith("error ") else log_tail(log_path) or \
        f"{what} exited with status {proc.returncode} before serving"
    raise HVCtlError(reason.rstrip("."))


def read_line(fd: int, timeout: float) -> str:
    """The first line written on ``fd`` (stripped), or what came before
    its end or ``timeout`` seconds."""
    buf = b""
    end = time.monotonic() + timeout
    while b"\n" not in buf:
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").strip()


def log_tail(path: str) -> str:
    """The last line of the log at ``path`` ("" if none)."""
    try:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


class ForkServer:
    """A session's hypervisor fork server (see the module's docstring).

    It is a child of the process that starts it, which becomes a child
    subreaper so that the hypervisors it forks are re-parented there; its
    socket (:attr:`name`) is what :func:`start_fork_server` puts in
    ``$HVSHARE_FORK_SOCKET``, so the processes the session starts (``hvctl
    start`` run by a test) use it too. It ends with that process
    (PR_SET_PDEATHSIG) and with :meth:`close`.
    """

    def __init__(self):
        become_subreaper()
        self.name = f"hvshare-fork-{os.getpid()}-{secrets.token_hex(8)}"
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            lsock.bind("\0" + self.name)           # abstract: no file to leave behind
            lsock.listen(64)
            boot = {"owner": os.getpid(), "sock": lsock.fileno(), "startup_env": startup_env_of(os.environ)}
            self.proc = subprocess.Popen(
                [sys.executable, "-m", HYPERVISOR_MODULE + ".forkserver", json.dumps(boot)],
                pass_fds=(lsock.fileno(),), stdin=subprocess.DEVNULL, cwd="/",
                env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
        finally:
            lsock.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def fork_hypervisor(name: str, argv: list[str], ready_fd: int, log_fd: int) -> AdoptedProcess | None:
    """A hypervisor running ``python -m hvshare.hvcore.process ARGV`` forked
    by the fork server ``name``: detached, its output to ``log_fd``, its
    ready line to ``ready_fd``; None if the server is not there or refuses
    (the caller starts it itself)."""
    req = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": "/"}).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(FORK_SERVER_TIMEOUT)
            s.connect("\0" + name)
            socket.send_fds(s, [req], [ready_fd, log_fd])
            got = s.recv(8)
    except OSError:
        return None
    pid = int.from_bytes(got, "little") if len(got) == 8 else 0
    return AdoptedProcess(pid) if pid else None


_server: ForkServer | None = None


def start_fork_server() -> ForkServer:
    """Start this process's fork server (if not started); launches of a
    hypervisor in this session use it from now on."""
    global _server
    if _server is None:
        _server = ForkServer()
        os.environ[FORK_SOCKET_ENV] = _server.name
    return _server


def stop_fork_server() -> None:
    """Stop this process's fork server (if any)."""
    global _server
    server, _server = _server, None
    if server is not None:
        if os.environ.get(FORK_SOCKET_ENV) == server.name:
            del os.environ[FORK_SOCKET_ENV]
        server.close()


def fork_server() -> ForkServer | None:
    """This process's fork server, if it started one."""
    return _server
