"""The KSM files in sysfs and procfs, read and written one at a time.

KSM (``mm/ksm.c``) is configured through global knobs in
``/sys/kernel/mm/ksm`` and reports global counters beside them; each process
also has ``/proc/<pid>/ksm_stat``.  This module is the only place that
touches those files: it checks whether KSM can be driven at all
(:func:`ksm_available`, :class:`KsmUnavailable`), reads and writes single
knobs, reads the counters, and lists other processes whose mergeable
memory makes the global counters noisy.  Ordering several knob writes and
undoing them is :mod:`hvshare.perf.peers.ksm_session`'s job.
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Sequence

KSM_DIR = Path("/sys/kernel/mm/ksm")


class KsmUnavailable(RuntimeError):
    """KSM cannot be used here; ``str(exc)`` is the one-line reason."""


# --------------------------------------------------------------------------
# sysfs access

def ksm_available() -> str | None:
    """``None`` if KSM can be driven from this process, else a one-line reason.

    Checks without writing anything, so it is safe to call at test
    collection while another process holds a session.
    """
    if not hasattr(mmap, "MADV_MERGEABLE"):
        return "KSM unavailable: this platform has no MADV_MERGEABLE (not Linux)"
    if not (KSM_DIR / "run").exists():
        return f"KSM absent: {KSM_DIR} does not exist (kernel built without CONFIG_KSM)"
    if os.geteuid() != 0:
        return f"KSM read-only: changing {KSM_DIR} needs root (euid {os.geteuid()})"
    try:
        if os.statvfs(KSM_DIR).f_flag & os.ST_RDONLY:
            return f"KSM read-only: {KSM_DIR} is on a read-only mount"
    except OSError as e:
        return f"KSM unavailable: cannot stat {KSM_DIR}: {e.strerror}"
    if not os.access(KSM_DIR / "run", os.W_OK):
        return f"KSM read-only: {KSM_DIR / 'run'} is not writable"
    return None


def read_knob(name: str) -> str:
    """Current value of a KSM file; for choice files like ``advisor_mode``
    (``[none] scan-time``) the selected choice, which is what writing takes."""
    text = (KSM_DIR / name).read_text().strip()
    if "[" in text:
        text = text[text.index("[") + 1:text.index("]")]
    return text


def write_knob(name: str, value: object) -> None:
    """Write one knob; errors (EBUSY, EINVAL, EPERM...) surface right here.

    ``os.write`` rather than a buffered file, whose error would only show at
    close and be easy to lose.
    """
    fd = os.open(KSM_DIR / name, os.O_WRONLY)
    try:
        os.write(fd, f"{value}\n".encode())
    except OSError as e:
        raise OSError(e.errno, f"writing {value!r} to {KSM_DIR / name}: {e.strerror}") from None
    finally:
        os.close(fd)


def writable_knobs() -> list[str]:
    """Names of the writable files in the KSM directory (the knobs)."""
    return sorted(p.name for p in KSM_DIR.iterdir() if p.is_file() and p.stat().st_mode & 0o200)


def counters() -> dict[str, int]:
    """The global read-only KSM counters (``pages_shared``, ``full_scans``...)."""
    out = {}
    for p in KSM_DIR.iterdir():
        if p.is_file() and not p.stat().st_mode & 0o200:
            try:
                out[p.name] = int(p.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return out


def process_ksm_stat(pid: int | str = "self") -> dict[str, object]:
    """``/proc/<pid>/ksm_stat`` as a dict (Linux 6.1+); empty if unreadable."""
    out: dict[str, object] = {}
    try:
        text = Path(f"/proc/{pid}/ksm_stat").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, val = line.partition(" ")
        key, val = key.rstrip(":"), val.strip()
        out[key] = int(val) if val.lstrip("-").isdigit() else val
    return out


def foreign_mergers() -> list[int]:
    """Pids of other processes with memory KSM may scan: they add noise to
    the global counters and take ksmd's time."""
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        st = process_ksm_stat(entry)
        if st.get("ksm_mergeable") == "yes" or st.get("ksm_merge_any") == "yes" \
                or int(st.get("ksm_rmap_items", 0) or 0) > 0:
            pids.append(int(entry))
    return pids


class CounterPoller:
    """Cheap repeated reads of a few counters: sysfs files regenerate their
    text on a read at offset 0, so an open fd plus ``pread`` is enough."""

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self.fds = [os.open(KSM_DIR / n, os.O_RDONLY) for n in self.names]

    def read(self) -> tuple[int, ...]:
        return tuple(int(os.pread(fd, 64, 0)) for fd in self.fds)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []



def run_until_settled(poll: CounterPoller, start, settle_scans: int, timeout: float,
                      want: tuple[int, int] | None = None, poll_seconds: float = 0.001,
                      min_scans: int = 0) -> dict:
    """Run ksmd (``start()`` turns it on) until the ``pages_shared`` and
    ``pages_sharing`` deltas (``poll`` reads those and ``full_scans``) reach
    ``want``, or stay still for ``settle_scans`` full scans once more than
    ``min_scans`` passed, or ``timeout`` s pass; ksmd is stopped again.

    Returns ``{"counts": (shared, sharing) deltas, "seconds": from start to
    the last change, "full_scans", "settled", "complete" (``want`` reached)}``."""
    import time
    b_shared, b_sharing, b_scans = poll.read()
    last, scans_at_change, scans = (0, 0), b_scans, b_scans
    t0 = t_change = time.perf_counter()
    try:
        start()
        while True:
            shared, sharing, scans = poll.read()
            now = time.perf_counter()
            cur = (shared - b_shared, sharing - b_sharing)
            if cur != last:
                last, t_change, scans_at_change = cur, now, scans
            if want is not None and cur == want and want != (0, 0):
                break
            if scans - scans_at_change >= settle_scans and scans - b_scans > min_scans:
                break
            if now - t0 > timeout:
                break
            time.sleep(poll_seconds)
    finally:
        write_knob("run", 0)
    return {"counts": last, "seconds": t_change - t0, "full_scans": poll.read()[2] - b_scans,
            "settled": scans - scans_at_change >= settle_scans, "complete": want is not None and last == want}
