"""Per-domain p2m tables in shared memory, safe for lock-free readers.

Layout of a p2m segment (little-endian)::

    0   u64 seq      change counter: odd while the hypervisor changes the
                     domain's memory, bumped again (even) when done
    8   u64 npages
    16  u64 domid
    64  i64 mfn[npages]      frame of each gfn (-1 for a hole; 0 in a fork's
                             fresh p2m: readers look at the type first)
    ..  u8  type[npages]     HOLE / RAM_RW / RAM_SHARED

The hypervisor (one thread) is the only writer. Every change a guest could
observe -- a p2m entry, or the bytes of one of the domain's private frames --
happens between two increments of ``seq`` (:meth:`P2M.changing`). A guest
reads ``seq``, then the entry and the frame's bytes, then ``seq`` again, and
retries unless both reads saw the same even value (a seqlock). A frame that
leaves a p2m is only reused after the counter moved, so a reader that raced
with its reuse always retries.
"""
from __future__ import annotations

import os
import time
import weakref

import numpy as np

from . import shm
from .errors import EINVAL, HVError

HOLE, RAM_RW, RAM_SHARED = 0, 1, 2
INVALID_MFN = -1
_HEADER = 64
_ONE = np.uint64(1)


def _size(npages: int) -> int:
    return _HEADER + 9 * npages


def _views(buf, npages: int):
    hdr = np.frombuffer(buf, dtype=np.uint64, count=3)
    mfn = np.frombuffer(buf, dtype=np.int64, count=npages, offset=_HEADER)
    typ = np.frombuffer(buf, dtype=np.uint8, count=npages, offset=_HEADER + 8 * npages)
    return hdr, mfn, typ


class P2M:
    """The writer side, owned by the hypervisor."""

    def __init__(self, token: str, domid: int, npages: int, filled: bool = True):
        """``filled=False``: the entries are left as the new segment has them
        (type HOLE, mfn 0) for the creator to set, chunk by chunk."""
        self.name = f"/{shm.PREFIX}{token}-p2m-{domid}"
        self.npages = npages
        self._mm = shm.create(self.name, _size(npages))
        self._finalizer = weakref.finalize(self, shm.release, self._mm, self.name)
        self._hdr, self.mfn, self.type = _views(self._mm, npages)
        self._hdr[1] = npages
        self._hdr[2] = domid
        if filled:
            self.mfn[:] = INVALID_MFN
        self._depth = 0
        self._change = _Change(self)
        # the header as Python ints: a numpy scalar += would be most of the
        # bracket's cost, paid twice per fault
        self._seqv = memoryview(self._hdr)

    @property
    def seq(self) -> int:
        return int(self._hdr[0])

    def changing(self) -> "_Change":
        """Bracket a change readers must not see half-done (nests)."""
        return self._change

    def begin_change(self) -> None:
        """Open a change bracket by hand: :meth:`changing` without the
        context manager, for the CoW fault path; always paired with
        :meth:`end_change` in a ``finally``."""
        if self._depth == 0:
            self._seqv[0] += 1
        self._depth += 1

    def end_change(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._seqv[0] += 1

    def close(self) -> None:
        if self._seqv is not None:
            self._seqv.release()
        self.mfn = self.type = self._hdr = self._seqv = None
        self._finalizer()


class P2MView:
    """The reader side: a guest's read-only mapping of its own p2m."""

    def __init__(self, name: str):
        self.name = name
        self._mm, _ = shm.attach_readonly(name)
        hdr = np.frombuffer(self._mm, dtype=np.uint64, count=3)
        self.npages = int(hdr[1])
        self.domid = int(hdr[2])
        self._hdr, self.mfn, self.type = _views(self._mm, self.npages)

    @property
    def seq(self) -> int:
        return int(self._hdr[0])

    def stable_seq(self) -> int:
        """The change counter once it is even (no change in progress)."""
        spins = 0
        while True:
            s = int(self._hdr[0])
            if not s & 1:
                return s
            spins += 1
            if spins > 64:
                time.sleep(0.0001)  # the writer was preempted: let it run
            else:
                os.sched_yield()

    def read_page(self, pool_data: np.ndarray, gfn: int) -> bytes:
        """The 4096 bytes of ``gfn``, never torn by a concurrent change."""
        if not 0 <= gfn < self.npages:
            raise HVError(EINVAL, f"gfn {gfn} outside the domain's {self.npages} pages")
        while True:
            s = self.stable_seq()
            if self.type[gfn] == HOLE:
                raise HVError(EINVAL, f"gfn {gfn} is a hole")
            data = pool_data[self.mfn[gfn]].tobytes()
            if int(self._hdr[0]) == s:
                return data

    def read_pages(self, pool_data: np.ndarray, gfns: np.ndarray) -> np.ndarray:
        """Pages ``gfns`` as a ``(k, 4096)`` array, one consistent snapshot."""
        gfns = np.asarray(gfns, dtype=np.int64)
        if len(gfns) and (gfns.min() < 0 or gfns.max() >= self.npages):
            raise HVError(EINVAL, "gfn outside the domain")
        while True:
            s = self.stable_seq()
            if (self.type[gfns] == HOLE).any():
                raise HVError(EINVAL, "a gfn is a hole")
            data = pool_data[self.mfn[gfns]]
            if int(self._hdr[0]) == s:
                return data

    def close(self) -> None:
        self.mfn = self.type = self._hdr = None
        try:
            self._mm.close()
        except BufferError:
            pass


class _Change:
    """Context manager of :meth:`P2M.changing` (a class: it is on the
    CoW fault path, where a generator-based one costs microseconds)."""

    __slots__ = ("p2m",)

    def __init__(self, p2m: P2M):
        self.p2m = p2m

    def __enter__(self) -> None:
        self.p2m.begin_change()

    def __exit__(self, *exc) -> None:
        self.p2m.end_change()

