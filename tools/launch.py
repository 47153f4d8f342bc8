"""Starting a background process that says when it serves.

The hypervisor (``hvctl start``) and the dedup daemon (``hvctl dedup
--detach``) start the same way: a child with its output appended to a log
and a pipe on which it writes one line, ``ready ...`` once it serves or
``error REASON`` if it cannot. :func:`launch` is that handshake, so both
report a failed start with the child's own reason and neither leaves a
child running unseen when the caller is interrupted.
"""
from __future__ import annotations

import os
import select
import subprocess
import time


from .errors import HVCtlError

__all__ = ["launch", "read_line", "log_tail"]


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
