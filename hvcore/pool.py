"""The frame pool: machine frames in one POSIX shared-memory segment, and the
frame table that says who owns each frame.

Frame ``m`` is bytes ``[m*4096, (m+1)*4096)`` of the segment, seen as row
``m`` of ``data`` (a numpy ``(nframes, 4096)`` uint8 view). The frame table is
four numpy arrays indexed by mfn:

- ``owner``: a domid, ``DOMID_COW`` for a shared frame, ``OWNER_FREE``;
- ``type_count``: for a shared frame, the number of gfns mapping it (it always
  equals the size of the frame's rmap: the audit checks it);
- ``handle``: the sharing handle (version) of a shared frame, else 0;
- ``extra_refs``: references held by someone other than the owner's p2m (a
  foreign mapping); a page with extra references cannot be nominated.

The free list is a stack of mfns in a numpy array: single and batch
allocation and release are O(1) and O(k) with no Python per-frame loop.
A domain being created *reserves* the frames it will populate, chunk by
chunk, before it takes them: reserved frames stay on the free list but
count as taken for everyone else (``nfree``), so a create that has begun
cannot run out of frames half way.
"""
from __future__ import annotations

import weakref

import numpy as np

from . import shm
from .constants import OWNER_FREE, PAGE_SIZE
from .errors import ENOMEM, HVError

#: madvise(2) advice that allocates and maps pages for writing (Linux 5.14)
MADV_POPULATE_WRITE = 23
#: frames backed per madvise call of :meth:`FramePool.prefault`
PREFAULT_SLAB = 1 << 16


class FramePool:
    """``nframes`` frames in shared memory, their frame table and free list."""

    def __init__(self, nframes: int, token: str | None = None):
        if nframes <= 0:
            raise ValueError("a frame pool needs at least one frame")
        self.nframes = nframes
        self.token = token or shm.new_token()
        self.name = f"/{shm.PREFIX}{self.token}-pool"
        self._mm = shm.create(self.name, nframes * PAGE_SIZE)
        # Unlink the segment even if the owner forgets to close the pool.
        self._finalizer = weakref.finalize(self, shm.release, self._mm, self.name)
        self.data = np.frombuffer(self._mm, dtype=np.uint8).reshape(nframes, PAGE_SIZE)
        # The frame table is written whole now (np.full, not np.zeros): a
        # page of it the kernel first provides in the middle of a step can
        # hold that step for milliseconds.
        self.owner = np.full(nframes, OWNER_FREE, dtype=np.int32)
        self.type_count = np.full(nframes, 0, dtype=np.int64)
        self.handle = np.full(nframes, 0, dtype=np.uint64)
        self.extra_refs = np.full(nframes, 0, dtype=np.int32)
        # Free stack: the top is the end; lowest mfns are handed out first.
        self._free = np.arange(nframes - 1, -1, -1, dtype=np.int64)
        self._nfree = nframes
        #: frames on the free list promised to creates in progress
        self.reserved = 0

    @property
    def nfree(self) -> int:
        """Free frames anyone may take (the free list less the reserved)."""
        return self._nfree - self.reserved

    @property
    def listed(self) -> int:
        """Frames on the free list, reserved or not."""
        return self._nfree

    def reserve(self, k: int) -> None:
        """Promise ``k`` free frames to a create (ENOMEM if not free)."""
        if k > self._nfree - self.reserved:
            raise HVError(ENOMEM, f"{k} frames asked, {self._nfree - self.reserved} free")
        self.reserved += k

    def unreserve(self, k: int) -> None:
        """Give back ``k`` reserved frames not taken (a cancelled create)."""
        assert 0 <= k <= self.reserved, "more frames unreserved than reserved"
        self.reserved -= k

    def alloc(self, owner: int) -> int:
        """Take one free frame for ``owner``; ENOMEM if none is left."""
        if self._nfree <= self.reserved:
            raise HVError(ENOMEM, "no free frame")
        self._nfree -= 1
        m = int(self._free[self._nfree])
        self.owner[m] = owner
        return m

    def alloc_many(self, k: int, owner: int, reserved: bool = False) -> np.ndarray:
        """Take ``k`` free frames for ``owner`` (all or none); ``reserved``:
        frames this caller reserved before."""
        if reserved:
            assert k <= self.reserved, "more reserved frames taken than reserved"
            self.reserved -= k
        elif k > self._nfree - self.reserved:
            raise HVError(ENOMEM, f"{k} frames asked, {self._nfree - self.reserved} free")
        top = self._nfree
        self._nfree = top - k
        mfns = self._free[self._nfree:top][::-1].copy()
        self.owner[mfns] = owner
        return mfns

    def free_many(self, mfns: np.ndarray) -> None:
        """Return frames to the free list; their frame-table entries are reset."""
        k = len(mfns)
        if k == 0:
            return
        # A frame is on the free list at most once.
        assert (self.owner[mfns] != OWNER_FREE).all(), "double free of a frame"
        self.owner[mfns] = OWNER_FREE
        self.handle[mfns] = 0
        self.type_count[mfns] = 0
        self._free[self._nfree:self._nfree + k] = mfns
        self._nfree += k

    def prefault(self, progress=None) -> None:
        """Back every frame with memory now (``MADV_POPULATE_WRITE``, or a
        write to each page where the kernel lacks it), as a real host's RAM
        always is: a create or a CoW fault then never waits for the kernel
        to allocate a page. ``progress(done, total)`` is called per slab."""
        slab = PREFAULT_SLAB
        for lo in range(0, self.nframes, slab):
            hi = min(self.nframes, lo + slab)
            try:
                self._mm.madvise(MADV_POPULATE_WRITE, lo * PAGE_SIZE, (hi - lo) * PAGE_SIZE)
            except (OSError, ValueError):
                self.data[lo:hi, ::PAGE_SIZE] = 0     # the frames are free: any byte will do
            if progress is not None:
                progress(hi, self.nframes)

    def close(self) -> None:
        """Unmap and unlink the segment (idempotent)."""
        self.data = None
        self._finalizer()

