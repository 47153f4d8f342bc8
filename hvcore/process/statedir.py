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
from pathlib import Path

from .. import shm

#: the longest path a Unix socket can bind (sun_path, less the NUL)
SOCKET_PATH_MAX = 107
#: the directory that holds the hvshare packages
_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


def state_dir_for(socket_path: str) -> str:
    """The hypervisor's private directory next to its control socket."""
    base = socket_path[:-5] if socket_path.endswith(".sock") else socket_path
    return base + ".d"


def guest_socket_path(state_dir: str, domid: int) -> str:
    return os.path.join(state_dir, f"guest-{domid}.sock")


def child_env() -> dict:
    """Environment for our child processes: the project importable as is."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH")) if p)
    return env


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
