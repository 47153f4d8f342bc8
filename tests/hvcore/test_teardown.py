"""The preemptible teardown: chunks, the saved cursor, adaptive chunk sizes, on every rmap policy."""
from __future__ import annotations

import numpy as np
import pytest



def pages(*values) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.uint8)[:, None], 4096, axis=1)


def code(excinfo) -> int:
    return excinfo.value.code


def test_teardown_is_preemptible_and_resumes(hv):
    z = hv.create_domain(200)
    other = hv.create_domain(1)
    hv.range_share(other.domid, z.domid, 0, 0)
    h = hv.nominate(other.domid, 0)
    for g in range(1, 200):
        hv.share(other.domid, 0, h, z.domid, g, hv.nominate(z.domid, g))
    assert z.shr_pages == 200
    hv.kill(z.domid)
    steps = 0
    while not hv.relinquish(z.domid, should_yield=lambda: True):
        steps += 1
        assert hv.audit() == 0
        assert z.state == "dying"
    # 200 shared gfns x 0x10 = 0xC80 < 0x2000: one shared chunk, one private
    # chunk, then forgetting the domain (a step of its own once one is spent)
    assert steps == 2
    assert z.domid not in hv.domains and z.relinquished == 200
    assert hv.nr_shared_mfns == 1 and hv.nr_saved_mfns == 0


def test_teardown_chunks_are_512_shared_gfns(hv):
    z = hv.create_domain(1)
    src = hv.create_domain(1)
    h = hv.nominate(src.domid, 0)
    big = hv.create_domain(1200, holes=np.arange(1200))
    for g in range(1200):
        hv.add_to_physmap(src.domid, 0, h, big.domid, g)
    hv.kill(big.domid)
    cursors = []
    while not hv.relinquish(big.domid, should_yield=lambda: True):
        cursors.append(big.relinquish_cursor)
    assert cursors[:3] == [512, 1024, 1200]
    hv.destroy_domain(z.domid)


def test_adaptive_teardown_starts_with_one_shared_gfn_and_grows_at_most_4x(hv):
    d = hv.create_domain(200)
    h, codes = hv.nominate_many(d.domid, np.arange(200))
    assert (codes == 0).all()
    hv.kill(d.domid)
    # a generous time target: every chunk is far under it, so each grows 4x
    assert hv.relinquish(d.domid, should_yield=lambda: True, chunk_seconds=1.0) is False
    assert d.relinquish_cursor == 1 and d.relinquished == 1
    hv.relinquish(d.domid, should_yield=lambda: True, chunk_seconds=1.0)
    assert d.relinquish_cursor == 1 + 4
    hv.relinquish(d.domid, should_yield=lambda: True, chunk_seconds=1.0)
    assert d.relinquish_cursor == 1 + 4 + 16
    while not hv.relinquish(d.domid, should_yield=lambda: True, chunk_seconds=1.0):
        assert hv.audit() == 0
    assert d.domid not in hv.domains and d.relinquished == 200
    assert hv.pool.nfree == hv.pool.nframes


@pytest.mark.parametrize("preempt", [False, True])
def test_teardown_without_checks_matches_the_chunked_one(hv, preempt):
    # Without should_yield nothing can preempt: the rest of the teardown runs
    # as one batch, with the same result as Xen's chunks (shared, private
    # and holes mixed; several frames, one of them outliving the domain).
    src = hv.create_domain(3)
    hs = [hv.nominate(src.domid, g) for g in range(3)]
    private = np.arange(0, 3000, 50)
    d = hv.create_domain(3000, holes=np.setdiff1d(np.arange(3000), private))
    for g in range(1, 3000, 3):
        if g % 50:
            hv.add_to_physmap(src.domid, g % 3, hs[g % 3], d.domid, g)
    free, shared = hv.pool.nfree, d.shr_pages
    assert shared > 512
    hv.kill(d.domid)
    if preempt:
        while not hv.relinquish(d.domid, should_yield=lambda: True):
            assert hv.audit() == 0
    else:
        assert hv.relinquish(d.domid) is True
    assert d.domid not in hv.domains and d.relinquished == shared
    assert hv.nr_shared_mfns == 3 and hv.nr_saved_mfns == 0
    assert hv.pool.nfree == free + len(private)
