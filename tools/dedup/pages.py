"""What the scanner reads in a page: the zero test, the hash, byte equality.

The scanner maps the frame pool read-only and reads frames in place. Zero
pages, the common case, are found without hashing; the others are hashed
with xxh3_64, one C call per page on a slice of the mapping. Two pages are
merged only after their bytes compared equal (:func:`rows_equal`): a hash
is a hint, never a proof. :func:`snapshot` reads a p2m under its seqlock.
"""
from __future__ import annotations

import numpy as np
import xxhash

from hvshare.hvcore.constants import PAGE_SIZE
from hvshare.hvcore.p2m import P2MView

__all__ = ["zero_pages", "page_hashes", "checksums", "rows_equal", "snapshot", "ZERO_SUM",
           "CHUNK_PAGES", "WORDS_PER_PAGE"]

#: Pages per vectorised chunk of the zero test: 4 MiB temporaries.
CHUNK_PAGES = 1024

#: 8-byte words per page: the pool seen as (nframes, WORDS_PER_PAGE) uint64
WORDS_PER_PAGE = PAGE_SIZE // 8
#: The checksum of a zero page: what xxh3_64 gives for PAGE_SIZE zero bytes, so a
#: page that becomes zero, or stops being zero, looks changed.
ZERO_SUM = np.uint64(xxhash.xxh3_64_intdigest(bytes(PAGE_SIZE)))


def zero_pages(words: np.ndarray, mfns: np.ndarray, chunk: int = CHUNK_PAGES) -> np.ndarray:
    """Which frames ``mfns`` are all zero; ``words`` is the pool as
    ``(nframes, 512)`` uint64.

    Two stages so that nonzero pages cost one gathered word: only frames
    whose first word is zero are tested whole. Those are tested in mfn
    order, on a slice of the mapping where the chunk's frames are dense
    (no copy), else on a gathered copy.
    """
    mfns = np.asarray(mfns, dtype=np.int64)
    out = np.zeros(len(mfns), dtype=bool)
    if len(mfns) == 0:
        return out
    maybe = np.nonzero(words[mfns, 0] == 0)[0]
    maybe = maybe[np.argsort(mfns[maybe], kind="stable")]
    for start in range(0, len(maybe), chunk):
        idx = maybe[start:start + chunk]
        m = mfns[idx]
        lo, hi = int(m[0]), int(m[-1]) + 1
        if hi - lo <= 2 * len(m):
            out[idx] = ~words[lo:hi].any(axis=1)[m - lo]
        else:
            out[idx] = ~words[m].any(axis=1)
    return out


def page_hashes(frames: memoryview, mfns: np.ndarray) -> np.ndarray:
    """xxh3_64 of each frame ``mfns``; ``frames`` is the whole pool as bytes.

    One C call per page on a slice of the mapping (no copy), frames visited
    in mfn order for locality. A vectorised numpy hash would have to gather
    every frame first, which costs more (docs/design.md, "Dedup").
    """
    mfns = np.asarray(mfns, dtype=np.int64)
    order = np.argsort(mfns, kind="stable")
    h = xxhash.xxh3_64_intdigest
    out = np.empty(len(mfns), dtype=np.uint64)
    out[order] = np.fromiter((h(frames[m << 12:(m + 1) << 12]) for m in mfns[order].tolist()),
                             dtype=np.uint64, count=len(mfns))
    return out


def checksums(words: np.ndarray, frames: memoryview, mfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(checksum, is_zero) of frames: ZERO_SUM for zero pages, else the hash."""
    zero = zero_pages(words, mfns)
    sums = np.full(len(mfns), ZERO_SUM, dtype=np.uint64)
    nz = ~zero
    if nz.any():
        # looked up at call time, so tests can replace the hash
        sums[nz] = page_hashes(frames, mfns[nz])
    return sums, zero


def rows_equal(frames: memoryview, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Byte equality of frames ``a[i]`` and ``b[i]``; ``frames`` is the pool.

    Pairs are visited by source, so that a source shared by many members
    (every zero page of a pass, every page of an identical run) is copied
    once; each member is then compared in place, with no copy: ``find`` of
    the source's bytes in exactly the member's frame (a memcmp; the mapping,
    ``frames.obj``, has it). Copying each member out first costs about four
    times more, and gathering both sides into numpy rows more still
    (docs/perf/README.md, "Dedup").
    """
    order = np.argsort(b, kind="stable")
    whole = frames.obj
    find = getattr(whole, "find", None)
    if find is None or len(whole) != frames.nbytes:
        find = bytes(frames).find                   # (not a whole mapping: one copy)
    res = []
    last, src = -1, b""
    for x, y in zip(a[order].tolist(), b[order].tolist()):
        if y != last:
            last, src = y, frames[y << 12:(y + 1) << 12].tobytes()
        lo = x << 12
        res.append(find(src, lo, lo + PAGE_SIZE) == lo)
    out = np.empty(len(a), dtype=bool)
    out[order] = res
    return out


# snapshots


def snapshot(view: P2MView, gfns: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(type, mfn) of every gfn (or of ``gfns``), one consistent view."""
    while True:
        s = view.stable_seq()
        if gfns is None:
            typ, mfn = view.type.copy(), view.mfn.copy()
        else:
            typ, mfn = view.type[gfns], view.mfn[gfns]
        if view.seq == s:
            return typ, mfn
