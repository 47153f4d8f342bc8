"""fork_reset through the control socket, with real guests: after dedup
merged a page the fork wrote with another domain's identical page, the
reset still brings back exactly the parent's page."""
from __future__ import annotations

import numpy as np

PAGES = 16


def test_a_reset_after_dedup_reads_the_parent(hvs):
    parent = hvs.create(PAGES, workload="clone", seed=7)
    child = hvs.fork(parent)["domid"]
    other = hvs.create(PAGES, workload="zero")
    x = np.full((1, 4096), ord("X"), np.uint8)
    hvs.guest(child).write_pages([0], x)
    hvs.guest(other).write_pages([3], x)
    hvs.share(other, 3, hvs.nominate(other, 3), child, 0, hvs.nominate(child, 0))
    assert hvs.read(child, 0) == x.tobytes()        # merged: one frame for both
    r = hvs.fork_reset(child)
    assert r["pages_dropped"] == 1
    assert hvs.guest(child).read(0) == hvs.read(parent, 0) != x.tobytes()
    assert hvs.read(other, 3) == x.tobytes()
    assert hvs.audit() == 0
    hvs.destroy(child)
    hvs.destroy(other)
    hvs.destroy(parent)
