"""The guest zygote: one per hypervisor, it forks the warm guests.

``python -m hvshare.guests.zygote BOOT``: the hypervisor starts it once,
with one end of a ``SOCK_SEQPACKET`` socket pair (``sock``) and the boot
config every guest shares (the pool, the hypervisor's pid). It imports
the guest runtime and maps the pool once; then each message on ``sock``
carries the three pipe ends of a new guest (``rfd``, ``wfd``,
``ready_fd``, as ``SCM_RIGHTS``), and the zygote forks a guest with them
(:func:`hvshare.hvcore.forking.fork_adoptable`: re-parented to the
hypervisor, a child subreaper, so the hypervisor reaps it and it dies with
the hypervisor) and answers with its pid, 8 bytes (0: it could not). A
fork costs milliseconds of the zygote's time where a new interpreter costs
hundreds, and none of the hypervisor's.

It runs single-threaded (its numpy without helper threads), so a fork
copies a consistent process. It ends with its hypervisor (PR_SET_PDEATHSIG)
and when its socket closes.
"""
from __future__ import annotations

import os
import socket
import sys
import traceback

from hvshare.hvcore.forking import fork_and_answer, wait_adopted

from . import runtime

#: one request: its three descriptors and a one-byte body
_FDS = 3


def serve(sock: socket.socket, boot: dict, pool_mm) -> None:
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 16, _FDS)
        except (ConnectionError, OSError):
            return
        if not msg:
            return
        child = None
        if len(fds) == _FDS:
            cfg = dict(boot, rfd=fds[0], wfd=fds[1], ready_fd=fds[2])
            child = lambda: _guest(sock, cfg, pool_mm)     # noqa: E731
        if not fork_and_answer(sock, fds, child):
            return


def _guest(sock: socket.socket, boot: dict, pool_mm) -> None:
    sock.close()
    if not wait_adopted(boot["hv_pid"]):
        os._exit(1)
    try:
        status = runtime.run(boot, pool_mm)
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    boot = runtime.boot_of(sys.argv[1:] if argv is None else argv, "zygote")
    if isinstance(boot, int):
        return boot
    sock = socket.socket(fileno=boot.pop("sock"))
    serve(sock, boot, runtime.attach_pool(boot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
