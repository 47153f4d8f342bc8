"""Nominate, share, add_to_physmap, range_share and their batch forms, with every error code, on every rmap policy."""
from __future__ import annotations

import numpy as np
import pytest

from hvshare.hvcore import HVError
from hvshare.hvcore.errors import (C_HANDLE_INVALID, E2BIG, EBUSY, EINVAL, ESRCH, S_HANDLE_INVALID)
from hvshare.hvcore.p2m import RAM_RW, RAM_SHARED
from hvshare.hvcore.constants import DOMID_COW


def pages(*values) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.uint8)[:, None], 4096, axis=1)


def code(excinfo) -> int:
    return excinfo.value.code


def test_handles_start_at_two_and_are_versions(hv):
    d = hv.create_domain(4, content=pages(1, 2, 3, 4))
    assert hv.nominate(d.domid, 0) == 2
    assert hv.nominate(d.domid, 1) == 3
    assert hv.nominate(d.domid, 0) == 2           # already shared: same handle
    hv.unshare(d.domid, 0)                        # private again (last gfn)
    assert hv.nominate(d.domid, 0) == 4           # a new version


def test_nominate_effects(hv):
    d = hv.create_domain(4)
    free = hv.pool.nfree
    h = hv.nominate(d.domid, 2)
    m = int(d.p2m.mfn[2])
    assert hv.pool.owner[m] == DOMID_COW and hv.pool.handle[m] == h
    assert d.p2m.type[2] == RAM_SHARED
    assert list(hv.rmap.entries(m)) == [(d.domid, 2)]
    assert (hv.nr_shared_mfns, hv.nr_saved_mfns) == (1, 0)
    assert (d.tot_pages, d.shr_pages) == (3, 1)
    assert hv.pool.nfree == free


def test_nominate_errors(hv):
    d = hv.create_domain(4, holes=[3])
    with pytest.raises(HVError) as e:
        hv.nominate(d.domid, 3)                   # hole
    assert code(e) == EINVAL
    with pytest.raises(HVError) as e:
        hv.nominate(d.domid, 4)                   # outside
    assert code(e) == EINVAL
    with pytest.raises(HVError) as e:
        hv.nominate(99, 0)
    assert code(e) == ESRCH
    hv.map_foreign(d.domid, 1)
    with pytest.raises(HVError) as e:
        hv.nominate(d.domid, 1)                   # extra references
    assert code(e) == E2BIG
    hv.unmap_foreign(d.domid, 1)
    hv.nominate(d.domid, 1)
    hv.kill(d.domid)
    with pytest.raises(HVError) as e:
        hv.nominate(d.domid, 0)                   # dying
    assert code(e) == EBUSY
    hv.relinquish(d.domid)


def test_share_keeps_source_and_frees_client(hv):
    a = hv.create_domain(2, content=pages(7, 0))
    b = hv.create_domain(2, content=pages(7, 0))
    sh, ch = hv.nominate(a.domid, 0), hv.nominate(b.domid, 0)
    smfn, cmfn = int(a.p2m.mfn[0]), int(b.p2m.mfn[0])
    free = hv.pool.nfree
    hv.share(a.domid, 0, sh, b.domid, 0, ch)
    assert int(b.p2m.mfn[0]) == smfn
    assert hv.pool.nfree == free + 1 and hv.pool.owner[cmfn] == -1
    assert sorted(hv.rmap.entries(smfn)) == [(a.domid, 0), (b.domid, 0)]
    assert (hv.nr_shared_mfns, hv.nr_saved_mfns) == (1, 1)
    assert hv.read(b.domid, 0) == bytes([7]) * 4096
    hv.share(a.domid, 0, sh, b.domid, 0, sh)      # same frame: nothing to do
    assert hv.nr_saved_mfns == 1


def test_share_moves_every_pair_of_the_client_frame(hv):
    a, b, c = (hv.create_domain(3) for _ in range(3))
    ch = hv.nominate(b.domid, 0)
    # b's frame gets pairs from b and c: share c into b's frame first
    hc = hv.nominate(c.domid, 1)
    hv.share(b.domid, 0, ch, c.domid, 1, hc)
    sh = hv.nominate(a.domid, 2)
    hv.share(a.domid, 2, sh, b.domid, 0, ch)      # client frame has 2 pairs, 2 domains
    m = int(a.p2m.mfn[2])
    assert sorted(hv.rmap.entries(m)) == sorted([(a.domid, 2), (b.domid, 0), (c.domid, 1)])
    assert int(c.p2m.mfn[1]) == m and hv.pool.type_count[m] == 3
    assert (hv.nr_shared_mfns, hv.nr_saved_mfns) == (1, 2)


def test_share_errors(hv):
    a = hv.create_domain(2)
    b = hv.create_domain(2)
    sh, ch = hv.nominate(a.domid, 0), hv.nominate(b.domid, 0)
    with pytest.raises(HVError) as e:
        hv.share(a.domid, 1, sh, b.domid, 0, ch)  # source not shared
    assert code(e) == S_HANDLE_INVALID
    with pytest.raises(HVError) as e:
        hv.share(a.domid, 0, sh + 100, b.domid, 0, ch)
    assert code(e) == S_HANDLE_INVALID
    with pytest.raises(HVError) as e:
        hv.share(a.domid, 0, sh, b.domid, 1, ch)  # client not shared
    assert code(e) == C_HANDLE_INVALID
    with pytest.raises(HVError) as e:
        hv.share(a.domid, 0, sh, b.domid, 0, ch + 100)
    assert code(e) == C_HANDLE_INVALID


def test_stale_handle_after_write_cannot_share(hv):
    a = hv.create_domain(1, content=pages(5))
    b = hv.create_domain(1, content=pages(5))
    sh, ch = hv.nominate(a.domid, 0), hv.nominate(b.domid, 0)
    hv.write(b.domid, 0, 0, b"changed")           # CoW: the page is private again
    ch2 = hv.nominate(b.domid, 0)
    assert ch2 != ch
    with pytest.raises(HVError) as e:
        hv.share(a.domid, 0, sh, b.domid, 0, ch)
    assert code(e) == C_HANDLE_INVALID
    assert hv.read(b.domid, 0)[:7] == b"changed"


def test_add_to_physmap(hv):
    a = hv.create_domain(2, content=pages(3, 4))
    b = hv.create_domain(2, holes=[1])
    sh = hv.nominate(a.domid, 0)
    hv.add_to_physmap(a.domid, 0, sh, b.domid, 1)
    assert b.p2m.type[1] == RAM_SHARED and hv.read(b.domid, 1) == bytes([3]) * 4096
    assert (hv.nr_shared_mfns, hv.nr_saved_mfns, b.shr_pages) == (1, 1, 1)
    with pytest.raises(HVError) as e:
        hv.add_to_physmap(a.domid, 0, sh, b.domid, 0)   # not a hole
    assert code(e) == C_HANDLE_INVALID
    with pytest.raises(HVError) as e:
        hv.add_to_physmap(a.domid, 1, sh, b.domid, 1)   # source not shared
    assert code(e) == S_HANDLE_INVALID


def test_range_share_skips_what_cannot_be_nominated(hv):
    a = hv.create_domain(8, content=pages(*range(8)), holes=[2])
    b = hv.create_domain(6, content=pages(*range(6)), holes=[4])
    hv.map_foreign(b.domid, 5)
    n = hv.range_share(a.domid, b.domid, 0, 5)
    assert n == 3          # gfns 0, 1, 3; 2 is a hole in a, 4 a hole in b, 5 busy in b
    assert b.p2m.type[5] == RAM_RW and a.p2m.type[5] == RAM_SHARED
    assert [int(a.p2m.mfn[g]) == int(b.p2m.mfn[g]) for g in (0, 1, 3)] == [True] * 3
    hv.unmap_foreign(b.domid, 5)
    with pytest.raises(HVError) as e:
        hv.range_share(a.domid, b.domid, 3, 2)
    assert code(e) == EINVAL


@pytest.mark.parametrize("first, last", [(0, 6), (6, 6), (0, 100)])
def test_range_share_past_the_end_of_either_domain_is_einval_and_does_nothing(hv, first, last):
    a = hv.create_domain(8, content=pages(*range(8)))
    b = hv.create_domain(6, content=pages(*range(6)))
    with pytest.raises(HVError) as e:
        hv.range_share(a.domid, b.domid, first, last)
    assert code(e) == EINVAL and "past the end of domain" in str(e.value)
    assert hv.nr_shared_mfns == 0 and (a.p2m.type[:] == RAM_RW).all() and (b.p2m.type[:] == RAM_RW).all()


def test_range_share_of_a_domain_with_itself_is_einval(hv):
    a = hv.create_domain(4, content=pages(1, 1, 1, 1))
    with pytest.raises(HVError) as e:
        hv.range_share(a.domid, a.domid, 0, 3)
    assert code(e) == EINVAL and hv.nr_shared_mfns == 0


def test_range_share_handles_follow_xens_loop_order(hv):
    a = hv.create_domain(3)
    b = hv.create_domain(3)
    hv.range_share(a.domid, b.domid, 0, 2)
    # source then client per gfn: a0=2 b0=3 a1=4 b1=5 a2=6 b2=7; sources survive
    assert [int(hv.pool.handle[int(a.p2m.mfn[g])]) for g in range(3)] == [2, 4, 6]


def test_batch_forms_match_single_operations(hv):
    a = hv.create_domain(64, content=pages(*[i % 5 for i in range(64)]))
    b = hv.create_domain(64, content=pages(*[i % 5 for i in range(64)]))
    gfns = np.arange(64)
    sh, scode = hv.nominate_many(a.domid, np.concatenate([gfns, [3, 70]]))
    assert (scode[:64] == 0).all() and scode[64] == 0 and scode[65] == EINVAL
    assert sh[64] == sh[3]
    ch, ccode = hv.nominate_many(b.domid, gfns)
    codes = hv.share_many(a.domid, gfns, sh[:64], b.domid, gfns, ch)
    assert (codes == 0).all() and hv.nr_saved_mfns == 64
    bad = hv.share_many(a.domid, [0], [sh[0] + 999], b.domid, [0], [ch[0]])
    assert bad.tolist() == [S_HANDLE_INVALID]
    copies = hv.unshare_many(b.domid, np.arange(0, 64, 2))
    assert copies == 32 and hv.nr_saved_mfns == 32
    faults = hv.write_pages(a.domid, np.arange(0, 64), pages(*([1] * 64)))
    assert faults == 64                           # every a page was shared
    # b's odd gfns keep their frames, now with one pair each
    assert (hv.nr_shared_mfns, hv.nr_saved_mfns) == (32, 0)
    assert hv.read(b.domid, 1) == bytes([1 % 5]) * 4096
