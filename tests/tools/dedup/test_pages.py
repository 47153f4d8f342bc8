"""The scanner's byte compare: in place on the mapping, the same answer as comparing copies."""
from __future__ import annotations

import mmap

import numpy as np

from hvshare.hvcore.constants import PAGE_SIZE
from hvshare.tools.dedup.pages import rows_equal


def _pool(pages: list[bytes]) -> mmap.mmap:
    mm = mmap.mmap(-1, len(pages) * PAGE_SIZE)
    for i, p in enumerate(pages):
        mm[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = p
    return mm


def test_rows_equal_matches_comparing_copies():
    rng = np.random.default_rng(1)
    base = [rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8).tobytes() for _ in range(3)]
    pages = []
    for i in range(40):
        p = bytearray(base[i % 3])
        if i % 7 == 3:
            p[0] ^= 1                       # differs in its first byte
        if i % 7 == 5:
            p[-1] ^= 1                      # ... in its last byte
        if i % 11 == 4:                     # contains its source's start at a later offset
            p[100:] = base[i % 3][:PAGE_SIZE - 100]
        pages.append(bytes(p))
    pages[:3] = base
    mm = _pool(pages)
    a = rng.integers(0, 40, 200)
    b = rng.integers(0, 3, 200)
    want = np.array([pages[x] == pages[y] for x, y in zip(a.tolist(), b.tolist())])
    assert want.any() and not want.all()
    whole = memoryview(mm)
    assert (rows_equal(whole, a, b) == want).all()
    # a view that is not the whole mapping: offsets are the view's own
    part = whole[PAGE_SIZE:]
    sel = (a >= 1) & (b >= 1)
    assert (rows_equal(part, a[sel] - 1, b[sel] - 1) == want[sel]).all()
    del whole, part
    mm.close()
