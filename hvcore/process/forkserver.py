"""The hypervisor fork server: hypervisors started by forking, kernels loaded once.

A hypervisor's start pays an interpreter, its imports, numba's import and
the load of the compiled kernels (:func:`hvshare.hvcore.kernels.warm`):
about a second. A session that starts many hypervisors (a test run) starts
this server once instead (:class:`hvshare.tools.launch.ForkServer`); it
pays that second, then forks each hypervisor the session asks for, which
starts serving in milliseconds with everything loaded.

``python -m hvshare.hvcore.process.forkserver BOOT``: ``BOOT`` names its
owner (the session's pid), the descriptor of a listening
``SOCK_SEQPACKET`` socket in the abstract namespace (no file: nothing to
leave behind) and the owner's startup environment. Each connection of
the same user carries one request: JSON ``{"argv", "env", "cwd"}`` (the
arguments of ``python -m hvshare.hvcore.process`` without ``--ready-fd``)
and two descriptors, the ready pipe and the log. The server forks the
hypervisor twice over (:func:`hvshare.hvcore.forking.fork_adoptable`) so
that the kernel re-parents it to the owner, a child subreaper, which reaps
it like one it started itself (whichever process of the session asked:
``hvctl start`` run by a test too); the hypervisor is then what ``hvctl
start`` makes: a new session, stdin closed, stdout and stderr to the log,
the asker's environment. The answer is its pid (8 bytes; 0: refused, the
asker starts the hypervisor itself).

The server holds no file, socket path or segment; it ends when its owner
closes it and when its owner dies (PR_SET_PDEATHSIG), so nothing of it
outlives its session, even one that crashed.
"""
from __future__ import annotations

import gc
import json
import os
import signal
import socket
import struct
import sys

from ..forking import die_with_parent, fork_and_answer, startup_env_of

#: descriptors of a request: the ready pipe, the log
_FDS = 2
#: the longest request
MAX_REQUEST = 1 << 20
#: how long a connection may take to send its request
REQUEST_SECONDS = 5.0


def serve(lsock: socket.socket, startup_env: dict) -> None:
    """Answer one request per connection on the listening ``lsock``."""
    while True:
        try:
            conn, _ = lsock.accept()
        except OSError:
            return
        with conn:
            _answer(lsock, conn, startup_env)


def _answer(lsock: socket.socket, conn: socket.socket, startup_env: dict) -> None:
    conn.settimeout(REQUEST_SECONDS)
    try:
        msg, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, _FDS)
    except OSError:
        return
    child = None
    try:
        req = json.loads(msg)
        # a request whose interpreter would start otherwise is refused: its
        # launcher starts the hypervisor on its own
        if len(fds) == _FDS and _same_user(conn) and startup_env_of(req["env"]) == startup_env:
            child = lambda: _hypervisor(lsock, conn, req, *fds)     # noqa: E731
    except (ValueError, KeyError, TypeError, AttributeError):
        child = None
    fork_and_answer(conn, fds, child)


def _same_user(conn: socket.socket) -> bool:
    """Only our own user may ask (the socket is abstract: it has no mode)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid == os.getuid()


def _hypervisor(lsock: socket.socket, conn: socket.socket, req: dict, ready_fd: int, log_fd: int) -> None:
    """The forked hypervisor: what ``hvctl start`` would have run."""
    from .loop import main
    lsock.close()
    conn.close()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    sys.argv = [sys.argv[0], *req["argv"]]
    try:
        rc = main([*req["argv"], "--ready-fd", str(ready_fd)])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m hvshare.hvcore.process.forkserver BOOT-JSON "
              "(hvshare.tools.launch.ForkServer starts it)", file=sys.stderr)
        return 2
    boot = json.loads(argv[0])
    if not die_with_parent(boot["owner"]):
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # a Ctrl-C is for the session
    lsock = socket.socket(fileno=boot["sock"])
    from .. import kernels
    from . import loop  # noqa: F401  (imported once, for every hypervisor)
    kernels.warm()
    gc.collect()
    gc.freeze()                 # the forks share these objects' pages
    serve(lsock, boot["startup_env"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
