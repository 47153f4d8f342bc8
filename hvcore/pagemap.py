"""Which pages of a process are present: its ``/proc/PID/pagemap``, a
bounded piece at a time.

A process may map far more address space than it uses (a 100 TiB
``MAP_NORESERVE`` reservation with a few pages touched), so what a walk
costs must follow the pages present, not the span. The kernel's
``PAGEMAP_SCAN`` ioctl (Linux 6.7, admin-guide/mm/pagemap.rst) does that:
it walks the page tables, skips what was never populated at the top
levels, and returns the matching pages as runs ``(start, end,
categories)``, stopping at ``max_pages`` pages or ``vec_len`` runs and
saying where (``walk_end``), so the next call resumes there. A kernel
without it (``ENOTTY``, ``EINVAL``) is read the old way: 8-byte pagemap
entries, a stride of addresses per call, whose cost follows the span.

:class:`Pagemap` is the one reader of a process's pagemap: the listing of
a snapshot (:mod:`hvshare.hvcore.snapshot`) and its re-checks of pages that
could not be read both go through it.
"""
from __future__ import annotations

import errno
import fcntl
import os

import numpy as np

from .constants import PAGE_SIZE
from .errors import ESRCH, HVError

#: pagemap entry bits (the stride reading)
PM_PRESENT = np.uint64(1 << 63)
PM_SWAPPED = np.uint64(1 << 62)
#: PAGEMAP_SCAN page categories (include/uapi/linux/fs.h)
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
#: ``struct pm_scan_arg``: twelve u64 fields
_SCAN_ARG_WORDS = 12
_SCAN_ARG_SIZE = 8 * _SCAN_ARG_WORDS
#: ``_IOWR('f', 16, struct pm_scan_arg)``
PAGEMAP_SCAN = (3 << 30) | (_SCAN_ARG_SIZE << 16) | (ord("f") << 8) | 16
#: ``struct page_region`` slots one scan call may fill
SCAN_REGIONS = 4096
#: errors that say the kernel has no PAGEMAP_SCAN
_NO_SCAN = (errno.ENOTTY, errno.EINVAL)
#: False forces the stride reading (as on a kernel without PAGEMAP_SCAN)
USE_SCAN = True


def _scan_ioctl(fd: int, arg: np.ndarray) -> int:
    """The PAGEMAP_SCAN call: runs filled (``arg``'s ``walk_end`` updated)."""
    return fcntl.ioctl(fd, PAGEMAP_SCAN, arg, True)


class Pagemap:
    """The pagemap of process ``pid``, open as ``fd``.

    :meth:`runs` gives the present pages of an address range from its
    start, as runs, for at most a given amount of work, and where it
    stopped; the caller resumes there. Swapped-out pages are counted.
    """

    def __init__(self, fd: int, pid: int):
        self.fd, self.pid = fd, pid
        self.scan = USE_SCAN
        self._arg = np.zeros(_SCAN_ARG_WORDS, dtype=np.uint64)
        self._vec = np.zeros((SCAN_REGIONS, 3), dtype=np.uint64)

    def runs(self, lo: int, hi: int, most: int):
        """The present pages of ``[lo, hi)`` from ``lo`` on: ``(starts,
        counts, swapped, end, spent)``, runs of adjacent present pages
        (start addresses and page counts), swapped-out pages seen, the
        address the walk stopped at (``hi``: done) and the work done
        (pages found by a scan, entries read by a stride), at most about
        ``most``. None if this range's pagemap cannot be read."""
        if self.scan:
            got = self._scan(lo, hi, most)
            if got is not None or self.scan:
                return got
        return self._stride(lo, hi, most)

    def _scan(self, lo: int, hi: int, most: int):
        arg, vec = self._arg, self._vec
        arg[:] = (_SCAN_ARG_SIZE, 0, lo, hi, 0, vec.ctypes.data, min(most, SCAN_REGIONS), most,
                  0, 0, PAGE_IS_PRESENT | PAGE_IS_SWAPPED, PAGE_IS_PRESENT | PAGE_IS_SWAPPED)
        try:
            n = _scan_ioctl(self.fd, arg)
        except OSError as e:
            if e.errno in _NO_SCAN:
                self.scan = False
                return None
            if e.errno == errno.ESRCH:
                raise HVError(ESRCH, f"process {self.pid} exited during its snapshot") from None
            return None
        got = vec[:n].astype(np.int64)
        counts = (got[:, 1] - got[:, 0]) // PAGE_SIZE
        present = (got[:, 2] & PAGE_IS_PRESENT) != 0
        swapped = int(counts[~present].sum())
        end = int(arg[4]) or hi
        return got[present, 0], counts[present], swapped, end, int(counts.sum())

    def _stride(self, lo: int, hi: int, most: int):
        page = lo // PAGE_SIZE
        n = max(1, min(most, hi // PAGE_SIZE - page))
        entries = self.entries(page, n)
        if entries is None:
            return None
        present = (entries & PM_PRESENT) != 0
        swapped = int(np.count_nonzero(~present & ((entries & PM_SWAPPED) != 0)))
        edges = np.flatnonzero(np.diff(np.concatenate([[0], present.view(np.int8), [0]])))
        starts, ends = edges[::2], edges[1::2]
        return (page + starts) * PAGE_SIZE, ends - starts, swapped, (page + n) * PAGE_SIZE, n

    def entries(self, page: int, n: int) -> np.ndarray | None:
        """The pagemap entries of pages ``page..page+n-1`` (past the end
        of the address space: zeros); None if they cannot be read."""
        try:
            raw = os.pread(self.fd, 8 * n, 8 * page)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise HVError(ESRCH, f"process {self.pid} exited during its snapshot") from None
            return None
        if not raw:
            raise HVError(ESRCH, f"process {self.pid} exited during its snapshot")
        entries = np.frombuffer(raw, dtype=np.uint64)
        if len(entries) < n:
            entries = np.concatenate([entries, np.zeros(n - len(entries), dtype=np.uint64)])
        return entries

    def gone(self) -> bool:
        """True if the process's memory is gone (it exited or ran exec):
        its pagemap reads as nothing then."""
        try:
            return not os.pread(self.fd, 8, 0)
        except OSError:
            return True

