"""POSIX shared-memory segments: creation, read-only attachment, clean-up.

Every segment hvshare makes is named ``/hvshare-<pid>-<token>-<what>``: the
pid of the hypervisor that owns it (so a later start can tell a dead
hypervisor's leftovers from a live one's) and a random token (so names cannot
be guessed by another user). Segments are created with mode 0600.
"""
from __future__ import annotations

import mmap
import os
import secrets

import posix_ipc

PREFIX = "hvshare-"
SHM_DIR = "/dev/shm"


def new_token() -> str:
    """An unguessable token for one hypervisor's segment names."""
    return f"{os.getpid()}-{secrets.token_hex(8)}"


def create(name: str, size: int) -> mmap.mmap:
    """Create segment ``name`` (mode 0600, exclusive) of ``size`` bytes and map it read-write."""
    seg = posix_ipc.SharedMemory(name, flags=posix_ipc.O_CREX, mode=0o600, size=size)
    try:
        return mmap.mmap(seg.fd, size)
    except BaseException:
        seg.unlink()
        raise
    finally:
        seg.close_fd()


def attach_readonly(name: str) -> tuple[mmap.mmap, int]:
    """Map an existing segment read-only: a write through it faults (SIGSEGV)."""
    seg = posix_ipc.SharedMemory(name, read_only=True)
    try:
        size = seg.size
        return mmap.mmap(seg.fd, size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED), size
    finally:
        seg.close_fd()


def unlink(name: str) -> bool:
    """Unlink segment ``name``; False if it was already gone."""
    try:
        posix_ipc.unlink_shared_memory(name)
        return True
    except posix_ipc.ExistentialError:
        return False


def release(mm: mmap.mmap, name: str) -> None:
    """Unmap and unlink one of this process's segments (a finalizer).
    A mapping that numpy views still export cannot be closed; unlinking
    the name is what frees the segment once those views go."""
    try:
        mm.close()
    except BufferError:
        pass
    unlink(name)


def list_segments() -> list[str]:
    """Names (with the leading '/') of every hvshare segment on this machine."""
    try:
        return sorted("/" + n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX))
    except FileNotFoundError:
        return []


def owner_pid(name: str) -> int | None:
    """The pid embedded in an hvshare segment name, or None."""
    try:
        return int(name.lstrip("/")[len(PREFIX):].split("-", 1)[0])
    except ValueError:
        return None


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (dead, not yet reaped) owns nothing."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def unlink_stale() -> list[str]:
    """Unlink the segments of hypervisors that are no longer alive."""
    removed = []
    for name in list_segments():
        pid = owner_pid(name)
        if pid is not None and pid != os.getpid() and not pid_alive(pid) and unlink(name):
            removed.append(name)
    return removed
