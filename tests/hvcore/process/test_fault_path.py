"""The hypervisor's side of guest writes: counters and steps of the fast path and the general one."""
from __future__ import annotations

import numpy as np

PAGE = 4096


def test_hypervisor_counts_writes_faults_and_guest_steps(hvs):
    a = hvs.create(16, "zero")
    b = hvs.create(16, "zero")
    assert hvs.range_share(a, b, 0, 15) == 16
    steps0 = hvs.info()["pause_by_op"].get("guest", {}).get("count", 0)
    with hvs.guest(b) as g:
        assert g.write(0, b"x") is True                 # CoW fault
        assert g.write(0, b"y", offset=PAGE - 1) is False   # private now
        assert g.write(1, b"z" * PAGE) is True          # whole page: no copy needed
        assert g.write(2, b"\x01" * 10, offset=7) is True
        assert g.write_many(np.array([3, 4, 5]), np.zeros(3, dtype=np.uint32),
                            np.ones(3, dtype=np.uint32), b"abc") == 3
        assert g.read(0)[:1] == b"x" and g.read(0)[-1:] == b"y"
        assert g.read(1) == b"z" * PAGE and g.read(2)[7:17] == b"\x01" * 10
        assert [g.read(k)[:1] for k in (3, 4, 5)] == [b"a", b"b", b"c"]
    d = hvs.domain(b)
    assert (d["writes"], d["pages_written"], d["cow_faults"]) == (5, 7, 6)
    info = hvs.info()
    assert info["cow_faults"] == 6
    assert info["pause_by_op"]["guest"]["count"] - steps0 >= 5     # the writes, the hello, stats
    assert hvs.read(a, 0) == bytes(PAGE)                          # the sharer kept its page
    assert hvs.audit() == 0
