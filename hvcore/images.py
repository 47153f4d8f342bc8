"""Content images: the bytes the hypervisor fills a new domain with.

A domain is created with the image of its workload
(:data:`hvshare.hvcore.constants.WORKLOADS`):

- ``zero``: every page zero (the heavy-sharing case: one frame can back all).
- ``clone``: a VM booted from a common image. The gfns are cut into extents
  of :data:`EXTENT` pages; each extent is, by the seed alone, *image* (pages
  of the image chosen by ``--seed``, identical in every clone of that seed at
  the same gfns), *zero*, or *private* (random pages unique to the domain).
  So clones of one seed agree everywhere except on the private extents, and
  :func:`shareable_runs` says which gfn ranges may be shared between them.
- ``writer`` and ``fuzz``: a clone's memory (their guests then dirty it:
  see :mod:`hvshare.guests.workloads`).

Contents are deterministic (a seed sequence per block of 64 pages, so any
chunking of the generation gives the same bytes) and generated with numpy a
block at a time. Every non-zero page is *stamped*: its first 8 bytes are a
weighted sum of the other 511 words, so a page mixing two versions (a torn
read) is detected by :func:`valid_pages` without knowing what it should hold.
A zero page is valid as it is.
"""
from __future__ import annotations

import numpy as np

from .constants import PAGE_SIZE, WORKLOADS
#: pages per layout extent of a clone
EXTENT = 16
#: share of extents that are zero and private in a clone (the rest: image)
ZERO_SHARE, PRIVATE_SHARE = 0.20, 0.15
#: pages per generated block (one seed sequence each): small enough that a
#: create chunk generating one costs little more than its pages
_BLOCK = 64
_IMAGE, _PRIVATE, _LAYOUT = 0x1A6E, 0x9417, 0x4B1D
KIND_IMAGE, KIND_ZERO, KIND_PRIVATE = 0, 1, 2

# Odd 64-bit weights of the stamp, fixed for all time (part of the format).
_WEIGHTS = np.random.default_rng(0x5EED5EED).integers(1, 1 << 63, 511, dtype=np.uint64) | np.uint64(1)


def stamp(pages: np.ndarray) -> np.ndarray:
    """Write each page's stamp into its first 8 bytes (in place); returns pages."""
    w = pages.view(np.uint64)
    w[:, 0] = _stamp_of(w)
    return pages


def _stamp_of(words: np.ndarray) -> np.ndarray:
    # uint64 arithmetic wraps: a multiply-add hash that any mix of two
    # versions of a page breaks with overwhelming probability.
    return (words[:, 1:] * _WEIGHTS).sum(axis=1, dtype=np.uint64)


def valid_pages(pages: np.ndarray) -> np.ndarray:
    """Per page: True if its stamp matches (a zero page always does)."""
    w = np.ascontiguousarray(pages).view(np.uint64).reshape(len(pages), PAGE_SIZE // 8)
    return w[:, 0] == _stamp_of(w)


def checksums(pages: np.ndarray) -> np.ndarray:
    """A 64-bit checksum per page (a different weighting than the stamp)."""
    w = np.ascontiguousarray(pages).view(np.uint64).reshape(len(pages), PAGE_SIZE // 8)
    return (w * np.concatenate([_WEIGHTS[::-1], _WEIGHTS[:1]])).sum(axis=1, dtype=np.uint64)


def random_pages(rng: np.random.Generator, k: int) -> np.ndarray:
    """``k`` stamped random pages."""
    raw = rng.bit_generator.random_raw(k * PAGE_SIZE // 8)
    return stamp(raw.view(np.uint8).reshape(k, PAGE_SIZE))


def extent_kinds(seed: int, npages: int) -> np.ndarray:
    """Kind of every extent of EXTENT gfns of a clone (see :func:`clone_kinds`)."""
    n_ext = -(-npages // EXTENT)
    u = np.random.default_rng([seed, _LAYOUT]).random(n_ext)
    kinds = np.full(n_ext, KIND_IMAGE, dtype=np.uint8)
    kinds[u < ZERO_SHARE + PRIVATE_SHARE] = KIND_PRIVATE
    kinds[u < ZERO_SHARE] = KIND_ZERO
    return kinds


def clone_kinds(seed: int, npages: int) -> np.ndarray:
    """Kind of every gfn of a clone: KIND_IMAGE, KIND_ZERO or KIND_PRIVATE."""
    return np.repeat(extent_kinds(seed, npages), EXTENT)[:npages]


def shareable_runs(seed: int, npages: int) -> list[tuple[int, int]]:
    """Inclusive gfn ranges that hold the same bytes in every clone of ``seed``
    (image and zero extents): what ``range_share`` may merge between them."""
    ok = clone_kinds(seed, npages) != KIND_PRIVATE
    edges = np.diff(np.concatenate([[0], ok.astype(np.int8), [0]]))
    starts = np.nonzero(edges == 1)[0]
    ends = np.nonzero(edges == -1)[0] - 1
    return list(zip(starts.tolist(), ends.tolist()))


def _block(seed_seq: list[int], block: int) -> np.ndarray:
    # SFC64's raw output is the fastest deterministic source numpy has.
    raw = np.random.SFC64(seed_seq + [block]).random_raw(_BLOCK * PAGE_SIZE // 8)
    return raw.view(np.uint8).reshape(_BLOCK, PAGE_SIZE)


class CloneImage:
    """The content of a clone for the core's ``create_domain``: called as
    ``image(start_gfn, count) -> (count, 4096) uint8``, or written straight
    into frames with :meth:`into` (the create path: no page is copied
    twice)."""

    def __init__(self, seed: int, instance: int, npages: int):
        self.seed, self.instance, self.npages = seed, instance, npages
        self._extents = None        # extent_kinds, made on the first use
        self._tags = ((KIND_IMAGE, [seed, _IMAGE]), (KIND_PRIVATE, [seed, _PRIVATE, instance]))
        #: kind -> (block, its pages): the last block made of each kind. A
        #: create's chunks may be smaller than a block; the chunks after
        #: the first in it take their pages from here, not a new block.
        self._last: dict = {}

    def _block_of(self, kind: int, tag: list, b: int) -> np.ndarray:
        last = self._last.get(kind)
        if last is None or last[0] != b:
            last = self._last[kind] = (b, _block(tag, b))
        return last[1]

    def __call__(self, start: int, count: int) -> np.ndarray:
        out = np.empty((count, PAGE_SIZE), dtype=np.uint8)
        self.into(out, start)
        return out

    def into(self, dst: np.ndarray, start: int) -> None:
        """Write the pages of gfns ``start..start+len(dst)-1`` into ``dst``."""
        count = len(dst)
        if self._extents is None:
            self._extents = extent_kinds(self.seed, self.npages)
        e0 = start // EXTENT
        k = np.repeat(self._extents[e0:-(-(start + count) // EXTENT)], EXTENT)[start - e0 * EXTENT:][:count]
        for b in range(start // _BLOCK, (start + count - 1) // _BLOCK + 1):
            lo, hi = max(start, b * _BLOCK), min(start + count, (b + 1) * _BLOCK)
            part = dst[lo - start:hi - start]
            sel = k[lo - start:hi - start]
            src_rows = slice(lo - b * _BLOCK, hi - b * _BLOCK)
            for kind, tag in self._tags:
                rows = np.flatnonzero(sel == kind)
                if len(rows) == len(sel):
                    part[:] = self._block_of(kind, tag, b)[src_rows]
                elif len(rows):
                    part[rows] = self._block_of(kind, tag, b)[src_rows][rows]
            live = sel != KIND_ZERO
            if live.all():
                stamp(part)
            elif live.any():
                part[~live] = 0
                part[live] = stamp(part[live])
            else:
                part[:] = 0


def clone_content(seed: int, instance: int, npages: int) -> CloneImage:
    """The content of clone ``instance`` of ``seed`` (see :class:`CloneImage`)."""
    return CloneImage(seed, instance, npages)


def content_for(workload: str, seed: int, instance: int, npages: int):
    """What the hypervisor fills a new domain with (None: zero pages)."""
    if workload == "zero":
        return None
    if workload in ("clone", "writer", "fuzz"):
        return clone_content(seed, instance, npages)
    raise ValueError(f"unknown workload {workload!r} (choose from {', '.join(WORKLOADS)})")
