"""The hypervisor's files: its control socket and its private state directory.

For a control socket ``DIR/NAME.sock`` the hypervisor keeps a private state
directory ``DIR/NAME.d`` (mode 0700) holding ``hypervisor.pid`` (locked with
``flock`` for the hypervisor's whole life: a start that cannot take the lock
knows another hypervisor is alive), ``hypervisor.log`` (the detached
hypervisor's stderr) and each guest's control channel ``guest-<domid>.sock``.
A start that takes the lock of a dead hypervisor removes its leftovers.

The toolstack imports this module to find those files; it never imports the
hypervisor process itself.
"""
from __future__ import annotations

import os
import stat

from . import shm
from .constants import DOMID_MAX

#: the longest path a Unix socket can bind (sun_path, less the NUL)
SOCKET_PATH_MAX = 107
#: the detached hypervisor's stdout and stderr, in its state directory
LOG_NAME = "hypervisor.log"
#: one line, left with the log when a hypervisor dies of a bug: when and why
CRASH_NAME = "crash"
#: set to 1 to accept a socket directory others could write to (not advised)
INSECURE_DIR_ENV = "HVSHARE_INSECURE_SOCKET_DIR"


def state_dir_for(socket_path: str) -> str:
    """The hypervisor's private directory next to its control socket."""
    base = socket_path[:-5] if socket_path.endswith(".sock") else socket_path
    return base + ".d"


def guest_socket_path(state_dir: str, domid: int) -> str:
    return os.path.join(state_dir, f"guest-{domid}.sock")


def crash_note(socket_path: str) -> str:
    """If the last hypervisor on ``socket_path`` died of a bug: a clause
    that says when, why, and where its log is; else ''."""
    state = state_dir_for(socket_path)
    try:
        with open(os.path.join(state, CRASH_NAME)) as f:
            line = f.readline().strip()
    except OSError:
        return ""
    return f" (the last hypervisor here crashed: {line}; its log is {os.path.join(state, LOG_NAME)})"


def not_a_socket(path: str) -> str | None:
    """A sentence if ``path`` exists and is not a Unix socket, else None.

    hvshare removes only sockets it made; any other file at a socket path
    belongs to the user and is refused, never removed."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{path} cannot be checked: {e.strerror}"
    if stat.S_ISSOCK(mode):
        return None
    kind = "a directory" if stat.S_ISDIR(mode) else "a symbolic link" if stat.S_ISLNK(mode) else \
        "a regular file" if stat.S_ISREG(mode) else "not a socket"
    return f"{path} is {kind}, not a hypervisor's socket: choose another --socket (nothing was removed)"


def socket_path_problem(socket_path: str) -> str | None:
    """A sentence if the hypervisor must not serve ``socket_path``, else None.

    Checked before anything is made, so a refused path leaves nothing
    behind: something that is not a socket is there; the path is too long
    for its guests' sockets; or its directory could let another user
    replace the socket (owned by another user, or writable by others
    without the sticky bit, as ssh's StrictModes refuses), unless
    ``$HVSHARE_INSECURE_SOCKET_DIR`` is 1."""
    refused = not_a_socket(socket_path)
    if refused:
        return refused
    if len(guest_socket_path(state_dir_for(socket_path), DOMID_MAX).encode()) > SOCKET_PATH_MAX:
        return (f"socket path {socket_path} is too long for a Unix socket "
                f"(keep it under about {SOCKET_PATH_MAX - 20} characters)")
    parent = os.path.dirname(socket_path) or "."
    try:
        st = os.stat(parent)
    except FileNotFoundError:
        return None                     # made private (0700) by make_private_dirs
    except OSError as e:
        return f"{parent} cannot be checked: {e.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{parent} is not a directory: choose another --socket"
    if os.environ.get(INSECURE_DIR_ENV) == "1":
        return None
    if st.st_uid not in (os.getuid(), 0):
        return (f"{parent} belongs to another user (uid {st.st_uid}), who could replace the socket: "
                f"choose a directory of yours (or set {INSECURE_DIR_ENV}=1)")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return (f"{parent} is writable by other users and not sticky, so they could replace the "
                f"socket: choose a private directory (or set {INSECURE_DIR_ENV}=1)")
    return None


def make_private_dirs(path: str) -> None:
    """Make ``path`` and each missing parent with mode 0700."""
    missing = []
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        missing.append(p)
        p = os.path.dirname(p)
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass


def cleanup_leftovers(socket_path: str) -> dict:
    """Remove what a dead hypervisor left: its control socket, guest
    sockets, and the segments of every dead hvshare owner. The caller must
    know that no hypervisor serves ``socket_path`` (it holds the lock)."""
    removed = {"sockets": 0, "segments": 0}
    state = state_dir_for(socket_path)
    paths = [socket_path]
    if os.path.isdir(state):
        paths += [os.path.join(state, n) for n in os.listdir(state) if n.endswith(".sock")]
    for p in paths:
        if not_a_socket(p):
            continue                # only sockets are ever ours to remove
        try:
            os.unlink(p)
            removed["sockets"] += 1
        except FileNotFoundError:
            pass
    removed["segments"] = len(shm.unlink_stale())
    return removed
