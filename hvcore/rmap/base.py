"""The interface every reverse-map policy implements.

A reverse map (rmap) records, for each shared frame (mfn), the set of
(domid, gfn) pairs whose p2m entries point at it. Its size is the frame's
reference count. One ``Rmap`` object holds the rmaps of *all* frames of a
pool, so that a policy may keep per-frame state in flat arrays.

Contract shared by all policies (the core relies on it):
- ``add`` is only called for a pair not already in the frame's rmap.
- ``remove`` raises ``KeyError`` if the pair is not in the frame's rmap.
- ``entries(mfn)`` walks the frame's rmap; the caller may remove the entry it
  was just given (and only that one) before asking for the next. While a walk
  is active on a frame its representation does not change (no list <-> hash
  conversion); a conversion that a remove would have done is simply skipped.
- Batch forms take equal-length numpy integer arrays and behave as the
  element-wise loop would, in order.
- ``release(mfn)`` is called when a frame stops being shared (its rmap is
  empty); the policy frees whatever it kept for that frame.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator

import numpy as np


class Rmap(ABC):
    #: policy name as used by ``hvctl start --rmap``
    name: str = ""

    def __init__(self, nframes: int):
        self.nframes = nframes

    # -- single-entry accessors -------------------------------------------
    @abstractmethod
    def add(self, mfn: int, domid: int, gfn: int) -> None: ...

    @abstractmethod
    def remove(self, mfn: int, domid: int, gfn: int, convert: bool = True) -> None: ...

    @abstractmethod
    def contains(self, mfn: int, domid: int, gfn: int) -> bool: ...

    @abstractmethod
    def count(self, mfn: int) -> int: ...

    @abstractmethod
    def entries(self, mfn: int) -> Iterator[tuple[int, int]]: ...

    def release(self, mfn: int) -> None:
        """Forget frame ``mfn`` (its rmap is empty)."""

    def release_many(self, mfns: np.ndarray) -> None:
        """``release`` of every frame in ``mfns``."""
        for m in mfns.tolist():
            self.release(m)

    def reserve_nodes(self, n: int) -> None:
        """Have room for ``n`` entries now, written (so no step waits for the
        kernel to provide it), and keep it when the rmap empties: what a
        prefaulted hypervisor does at start. Policies with an arena override."""

    def domain_created(self, domid: int, npages: int) -> None:
        """A domain with gfns 0..npages-1 exists from now on (policies that
        index per domain size their arrays here)."""

    def domain_destroyed(self, domid: int) -> None:
        """The domain is gone; none of its pairs is in any rmap any more."""

    # -- batch forms (policies override with vectorised versions) ---------
    def add_many(self, mfns: np.ndarray, domids: np.ndarray, gfns: np.ndarray) -> None:
        for m, d, g in zip(mfns.tolist(), domids.tolist(), gfns.tolist()):
            self.add(m, d, g)

    def remove_many(self, mfns: np.ndarray, domids: np.ndarray, gfns: np.ndarray) -> None:
        for m, d, g in zip(mfns.tolist(), domids.tolist(), gfns.tolist()):
            self.remove(m, d, g)

    def move_singles(self, srcs: np.ndarray, dsts: np.ndarray, domids: np.ndarray,
                     gfns: np.ndarray) -> None:
        """Frames ``srcs`` (distinct, none of them in ``dsts``) each hold the
        one entry (domids[i], gfns[i]): move it to frame ``dsts[i]``, in
        order, and release ``srcs[i]`` (a batch of shares of private pages).
        Default: remove, release, add."""
        self.remove_many(srcs, domids, gfns)
        self.release_many(srcs)
        self.add_many(dsts, domids, gfns)

    def move_all(self, src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
        """Move every entry of frame ``src`` to frame ``dst`` (the share op).

        Returns the moved (domids, gfns). Default: Xen's walk, deleting each
        entry from ``src`` without conversion and adding it to ``dst``.
        """
        ds, gs = [], []
        for d, g in self.entries(src):
            self.remove(src, d, g, convert=False)
            self.add(dst, d, g)
            ds.append(d)
            gs.append(g)
        self.release(src)
        return np.array(ds, dtype=np.int64), np.array(gs, dtype=np.int64)

    # -- bulk views (the audit) ---------------------------------------------
    def all_entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(mfns, domids, gfns)``, int64: every entry ``entries(m)`` walks,
        of every frame, in no particular order. Default: those walks."""
        ms, ds, gs = [], [], []
        for m in range(self.nframes):
            for d, g in self.entries(m):
                ms.append(m)
                ds.append(d)
                gs.append(g)
        return (np.array(ms, dtype=np.int64), np.array(ds, dtype=np.int64),
                np.array(gs, dtype=np.int64))

    def counts_of(self, mfns: np.ndarray) -> np.ndarray:
        """``count(m)`` of every frame in ``mfns``, int64."""
        return np.array([self.count(m) for m in np.asarray(mfns).tolist()], dtype=np.int64)

    # -- introspection -----------------------------------------------------
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of memory the rmaps use now (all frames)."""

    def representation(self, mfn: int) -> str:
        """'list' or 'hash' or 'index': how frame ``mfn``'s rmap is kept."""
        return self.name
