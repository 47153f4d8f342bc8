"""Copy-on-write: unshare, and the guest writes that fault.

A write to a ``ram_shared`` entry is a CoW fault: the writer gets a
private copy of the frame, or the frame itself when it is the frame's last
gfn (no copy). :meth:`CopyOnWrite.write` is the path of one guest fault and
is kept scalar, with Python ints: it is the latency-critical path. The
batch forms (``unshare_many``, ``write_pages``, ``write_many``) do the
same for many gfns with numpy.

Invariants this module keeps:

- an unshare allocates before it changes anything, so ``ENOMEM`` leaves
  the domain as it was;
- every change a guest could see (its p2m entry, the bytes of its private
  frame) happens inside the p2m's change bracket, so lock-free readers
  never see it half-done.
"""
from __future__ import annotations

import numpy as np
# np.unique(return_inverse=...) imports numpy.ma on first use: tens of
# milliseconds inside the first batched unshare. Pay it at import instead.
import numpy.ma  # noqa: F401  (imported for its side effect)

from . import kernels
from .constants import PAGE_SIZE
from .domains import Domain
from .errors import EBUSY, EINVAL, ESRCH, HVError
from .p2m import HOLE, RAM_RW, RAM_SHARED


class CopyOnWrite:
    """Breaking sharing (a part of :class:`hvshare.hvcore.core.Hypervisor`).

    Uses the core's ``pool``, ``rmap``, ``domains`` and the frame counters.
    """

    def unshare(self, domid: int, gfn: int) -> bool:
        """Break sharing of ``gfn`` for ``domid``; True if a copy was made."""
        d = self.domain(domid)
        gfn = self._gfn(d, gfn)
        if d.p2m.type[gfn] != RAM_SHARED:
            raise HVError(EINVAL, f"gfn {gfn} of domain {domid} is not shared")
        m = d.p2m.mfn.item(gfn)
        return self._unshare_one(d, gfn) != m

    def _unshare_one(self, d: Domain, gfn: int, copy: bool = True, offset: int = 0, data=None) -> int:
        """The CoW fault of one shared gfn; returns the frame that backs it
        now (its old frame if it was the last gfn: no copy). Scalar code with
        Python ints, no numpy batch machinery: a guest fault is the
        latency-critical path. ``copy=False`` leaves a new frame's bytes
        as they are, for a caller that overwrites the whole page. ``data``
        (a byte view) is then written at ``offset`` of the page, inside the
        same change bracket."""
        pool = self.pool
        p2m = d.p2m
        domid = d.domid
        m = p2m.mfn.item(gfn)
        count = pool.type_count.item(m)
        if count == 1:
            # Last gfn: no copy, the frame becomes private to d again.
            p2m.begin_change()
            try:
                self.rmap.remove(m, domid, gfn)
                self.rmap.release(m)
                pool.type_count[m] = 0
                pool.owner[m] = domid
                pool.handle[m] = 0
                p2m.type[gfn] = RAM_RW
                if data is not None:
                    at = m * PAGE_SIZE + offset
                    (self._pool_bytes or self._bytes())[at:at + len(data)] = data
            finally:
                p2m.end_change()
            self.nr_shared_mfns -= 1
            new = m
        else:
            new = pool.alloc(domid)                 # ENOMEM before any change
            p2m.begin_change()
            try:
                b = self._pool_bytes or self._bytes()
                at = new * PAGE_SIZE
                if copy:
                    b[at:at + PAGE_SIZE] = b[m * PAGE_SIZE:(m + 1) * PAGE_SIZE]
                self.rmap.remove(m, domid, gfn)
                pool.type_count[m] = count - 1
                p2m.mfn[gfn] = new
                p2m.type[gfn] = RAM_RW
                if data is not None:
                    at += offset
                    b[at:at + len(data)] = data
            finally:
                p2m.end_change()
            self.nr_saved_mfns -= 1
        d.shr_pages -= 1
        d.tot_pages += 1
        return new

    #: the pool as one flat byte view once :meth:`_bytes` made it
    _pool_bytes: memoryview | None = None

    def _bytes(self) -> memoryview:
        """The pool as one flat writable memoryview: slicing it costs a
        fraction of numpy's fancy indexing for a few bytes (dropped by
        :meth:`close` so the segment can be unmapped)."""
        mv = self.__dict__.get("_pool_bytes")
        if mv is None:
            mv = self._pool_bytes = memoryview(self.pool.data.reshape(-1))
        return mv

    def _copy_frames(self, dst: np.ndarray, src: np.ndarray) -> None:
        """Copy frames ``src`` into frames ``dst`` in one compiled pass
        (``kernels.copy_frames``): no temporary, where a numpy gather of the
        batch would be one of up to 16 MiB (freshly mapped, so page-faulted)
        and a gather through a bounce buffer copies every byte twice."""
        kernels.copy_frames(self.pool.data.view(np.uint64), np.asarray(dst, dtype=np.int64),
                            np.asarray(src, dtype=np.int64))

    def unshare_many(self, domid: int, gfns, copy: bool = True) -> int:
        """Unshare distinct shared gfns of one domain; returns copies made.

        All or nothing: if the copies need more frames than are free, ENOMEM
        is raised and nothing changed. The last gfn of a frame takes the
        frame itself (no copy). ``copy=False`` skips copying the old
        contents into the new frames, for a caller that overwrites every
        one of those pages whole.
        """
        d = self.domain(domid)
        gfns = np.unique(self._gfns(d, gfns))
        if len(gfns) == 0:
            return 0
        if (d.p2m.type[gfns] != RAM_SHARED).any():
            raise HVError(EINVAL, f"unshare of a gfn that is not shared in domain {domid}")
        return self._unshare_many(d, gfns, copy)

    def _unshare_many(self, d: Domain, gfns: np.ndarray, copy: bool = True) -> int:
        """:meth:`unshare_many` of distinct, shared gfns (checked by the caller)."""
        domid = d.domid
        pool = self.pool
        ms = d.p2m.mfn[gfns]
        frames, inverse, counts = np.unique(ms, return_inverse=True, return_counts=True)
        # Frames all of whose gfns are in this batch: their last gfn (the
        # last of the batch) keeps the frame.
        whole = counts == pool.type_count[frames]
        if whole.any():
            last_pos = len(gfns) - 1 - np.unique(inverse[::-1], return_index=True)[1]
            keeps = np.zeros(len(gfns), dtype=bool)
            keeps[last_pos[whole]] = True
            cp = ~keeps
            ncopy = int(cp.sum())
        else:
            cp = slice(None)
            ncopy = len(gfns)
        new = pool.alloc_many(ncopy, owner=domid)       # may raise ENOMEM: nothing done yet
        with d.p2m.changing():
            if copy and ncopy:
                self._copy_frames(new, ms[cp])
            self.rmap.remove_many(ms, np.full(len(gfns), domid, dtype=np.int64), gfns)
            pool.type_count[frames] -= counts
            kept = frames[whole]
            if len(kept):
                self.rmap.release_many(kept)
                pool.owner[kept] = domid
                pool.handle[kept] = 0
            d.p2m.mfn[gfns[cp]] = new
            d.p2m.type[gfns] = RAM_RW
        self.nr_shared_mfns -= len(kept)
        self.nr_saved_mfns -= ncopy
        d.shr_pages -= len(gfns)
        d.tot_pages += len(gfns)
        return ncopy

    def write(self, domid: int, gfn: int, offset: int, data) -> bool:
        """A guest write of bytes-like ``data`` at ``offset`` of ``gfn``;
        True if it was a CoW fault (the page was shared)."""
        try:
            d = self.domains[domid]
        except (KeyError, TypeError):
            raise HVError(ESRCH, f"no domain {domid}") from None
        if not 0 <= gfn < d.npages:
            raise HVError(EINVAL, f"gfn {gfn} outside domain {domid}'s {d.npages} pages")
        if type(data) is not bytes:
            data = memoryview(data).cast("B")
        n = len(data)
        if offset < 0 or offset + n > PAGE_SIZE:
            raise HVError(EINVAL, "write crosses the page boundary")
        if d.state == "dying":
            raise HVError(EBUSY, f"domain {domid} is dying")
        if d.forks:
            raise HVError(EBUSY, f"domain {domid} has forks: its memory is theirs to read")
        p2m = d.p2m
        t = p2m.type.item(gfn)
        if t == RAM_SHARED:
            # the fault and the write, in the unshare's one change bracket
            self._unshare_one(d, gfn, n < PAGE_SIZE, offset, data)
            return True
        if t == HOLE:
            if d.parent is not None:
                return self._fork_write(d, gfn, offset, data)
            raise HVError(EINVAL, f"gfn {gfn} of domain {domid} is a hole")
        at = p2m.mfn.item(gfn) * PAGE_SIZE + offset
        p2m.begin_change()
        try:
            (self._pool_bytes or self._bytes())[at:at + n] = data
        finally:
            p2m.end_change()
        return False

    def write_pages(self, domid: int, gfns, pages) -> int:
        """Write whole pages; returns the number of CoW faults taken.

        A gfn listed twice gets its last page. ENOMEM leaves everything as it
        was. The new frames of CoW faults are not filled with the old
        contents first: every byte of them is overwritten.
        """
        d = self.domain(domid)
        gfns = self._gfns(d, gfns)
        pages = np.asarray(pages, dtype=np.uint8).reshape(len(gfns), PAGE_SIZE)
        if d.dying:
            raise HVError(EBUSY, f"domain {domid} is dying")
        # keep the last occurrence of each gfn
        rev_u, rev_i = np.unique(gfns[::-1], return_index=True)
        if len(rev_u) < len(gfns):
            pick = len(gfns) - 1 - rev_i
            gfns, pages = rev_u, pages[pick]
        shared = self._written_shared(d, gfns)
        with d.p2m.changing():
            filled = self._fork_fill_written(d, gfns) if d.parent is not None else 0
            if len(shared):
                self._unshare_many(d, shared, copy=False)
            self.pool.data[d.p2m.mfn[gfns]] = pages
        return len(shared) + filled

    def _written_shared(self, d: Domain, gfns: np.ndarray) -> np.ndarray:
        """The shared gfns among the distinct gfns a batched write names;
        EINVAL, before anything changes, if one is a hole (but in a fork,
        whose holes the write fills from its ancestors: :mod:`hvshare.hvcore.fork`)."""
        if d.forks:
            raise HVError(EBUSY, f"domain {d.domid} has forks: its memory is theirs to read")
        t = d.p2m.type[gfns]
        if d.parent is None and (t == HOLE).any():
            raise HVError(EINVAL, f"write to a hole of domain {d.domid}")
        return gfns[t == RAM_SHARED]

    def write_many(self, domid: int, gfns, offsets, lengths, data) -> int:
        """Many small writes in one call: write ``i`` puts the next
        ``lengths[i]`` bytes of ``data`` at ``offsets[i]`` of ``gfns[i]``,
        in order (a later write to the same bytes wins). Returns the CoW
        faults taken (shared gfns written). Vectorised: one batched unshare,
        then one scatter of every byte. ENOMEM leaves everything as it was.
        """
        d = self.domain(domid)
        gfns = self._gfns(d, gfns)
        k = len(gfns)
        offsets = np.asarray(offsets, dtype=np.int64).ravel()
        lengths = np.asarray(lengths, dtype=np.int64).ravel()
        data = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        if len(offsets) != k or len(lengths) != k:
            raise HVError(EINVAL, f"{k} gfns need as many offsets and lengths")
        if k and ((offsets < 0).any() or (lengths < 0).any() or (offsets + lengths > PAGE_SIZE).any()):
            raise HVError(EINVAL, "a write crosses the page boundary")
        total = int(lengths.sum())
        if total != len(data):
            raise HVError(EINVAL, f"the writes take {total} bytes, {len(data)} given")
        if d.dying:
            raise HVError(EBUSY, f"domain {domid} is dying")
        if k == 0:
            return 0
        ug = np.unique(gfns)
        shared = self._written_shared(d, ug)
        with d.p2m.changing():
            filled = self._fork_fill_written(d, ug) if d.parent is not None else 0
            if len(shared):
                self._unshare_many(d, shared)
            starts = d.p2m.mfn[gfns] * PAGE_SIZE + offsets
            if total == k:                  # one byte each: the common case
                pos = starts
            else:
                ends = np.cumsum(lengths)
                pos = np.repeat(starts - (ends - lengths), lengths) + np.arange(total)
            if len(ug) < k:
                # a gfn written twice: the last write of each byte wins
                pos, last = np.unique(pos[::-1], return_index=True)
                data = data[::-1][last]
            self.pool.data.reshape(-1)[pos] = data
        return len(shared) + filled

    def read(self, domid: int, gfn: int) -> bytes:
        d = self.domain(domid)
        gfn = self._gfn(d, gfn)
        if d.p2m.type[gfn] == HOLE:
            raise HVError(EINVAL, f"gfn {gfn} of domain {domid} is a hole")
        return self.pool.data[int(d.p2m.mfn[gfn])].tobytes()
