"""Every sharing operation and every error code, on every rmap policy."""
from __future__ import annotations

import numpy as np
import pytest

from hvcore import HVError
from hvcore.errors import (C_HANDLE_INVALID, E2BIG, EBUSY, EINVAL, ENOMEM, ESRCH,
                           S_HANDLE_INVALID)
from hvcore.p2m import HOLE, RAM_RW, RAM_SHARED
from hvcore.constants import DOMID_COW


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


def test_unshare_copies_unless_last_gfn(hv):
    a = hv.create_domain(1, content=pages(9))
    b = hv.create_domain(1, content=pages(9))
    hv.range_share(a.domid, b.domid, 0, 0)
    m = int(a.p2m.mfn[0])
    free = hv.pool.nfree
    assert hv.unshare(b.domid, 0) is True          # copy
    assert hv.pool.nfree == free - 1 and int(b.p2m.mfn[0]) != m
    assert b.p2m.type[0] == RAM_RW and hv.read(b.domid, 0) == bytes([9]) * 4096
    assert (hv.nr_shared_mfns, hv.nr_saved_mfns) == (1, 0)
    assert hv.unshare(a.domid, 0) is False         # last gfn: takes the frame
    assert int(a.p2m.mfn[0]) == m and hv.pool.owner[m] == a.domid
    assert (hv.nr_shared_mfns, hv.nr_saved_mfns) == (0, 0)
    with pytest.raises(HVError) as e:
        hv.unshare(a.domid, 0)                     # not shared
    assert code(e) == EINVAL


def test_unshare_enomem_changes_nothing(hv):
    a = hv.create_domain(128)
    b = hv.create_domain(128)
    assert hv.range_share(a.domid, b.domid, 0, 127) == 128
    hog = hv.create_domain(hv.pool.nfree)
    assert hv.pool.nfree == 0
    with pytest.raises(HVError) as e:
        hv.write(b.domid, 5, 0, b"x")
    assert code(e) == ENOMEM
    assert b.p2m.type[5] == RAM_SHARED and hv.audit() == 0
    hv.destroy_domain(hog.domid)
    assert hv.write(b.domid, 5, 0, b"x") is True


def test_range_share_skips_what_cannot_be_nominated(hv):
    a = hv.create_domain(8, content=pages(*range(8)), holes=[2])
    b = hv.create_domain(6, content=pages(*range(6)), holes=[4])
    hv.map_foreign(b.domid, 5)
    n = hv.range_share(a.domid, b.domid, 0, 100)
    assert n == 3          # gfns 0, 1, 3; 2 is a hole in a, 4 a hole in b, 5 busy in b
    assert b.p2m.type[5] == RAM_RW and a.p2m.type[5] == RAM_SHARED
    assert [int(a.p2m.mfn[g]) == int(b.p2m.mfn[g]) for g in (0, 1, 3)] == [True] * 3
    hv.unmap_foreign(b.domid, 5)
    with pytest.raises(HVError) as e:
        hv.range_share(a.domid, b.domid, 3, 2)
    assert code(e) == EINVAL


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


def test_unshare_many_gives_the_frame_to_the_last_gfn(hv):
    z = hv.create_domain(10)
    for g in range(10):                            # a 'zero' domain after sharing
        hv.share(z.domid, 0, hv.nominate(z.domid, 0), z.domid, g, hv.nominate(z.domid, g))
    m = int(z.p2m.mfn[0])
    assert hv.pool.type_count[m] == 10 and hv.nr_saved_mfns == 9
    assert hv.unshare_many(z.domid, np.arange(10)) == 9
    assert hv.nr_shared_mfns == 0 and hv.nr_saved_mfns == 0
    assert hv.pool.owner[m] == z.domid


def test_write_validation(hv):
    d = hv.create_domain(2, holes=[1])
    with pytest.raises(HVError) as e:
        hv.write(d.domid, 0, 4090, b"too long")
    assert code(e) == EINVAL
    with pytest.raises(HVError) as e:
        hv.write(d.domid, 1, 0, b"x")
    assert code(e) == EINVAL
    assert hv.write(d.domid, 0, 4095, b"z") is False
    assert hv.read(d.domid, 0)[-1:] == b"z"


def test_write_many_is_one_unshare_then_a_scatter(hv):
    a = hv.create_domain(8, content=pages(*range(8)), holes=[7])
    b = hv.create_domain(8, content=pages(*range(8)), holes=[7])
    assert hv.range_share(a.domid, b.domid, 0, 7) == 7
    saved, free = hv.nr_saved_mfns, hv.pool.nfree
    # gfn 2 twice (overlapping: the later bytes win), gfn 5 private after the first write
    gfns = [2, 0, 2, 3]
    offsets = [10, 4095, 11, 0]
    lengths = [3, 1, 1, 2]
    data = b"abc" + b"z" + b"X" + b"qq"
    assert hv.write_many(b.domid, gfns, offsets, lengths, data) == 3
    assert hv.nr_saved_mfns == saved - 3 and hv.pool.nfree == free - 3
    assert hv.read(b.domid, 2)[9:14] == bytes([2]) + b"aXc" + bytes([2])
    assert hv.read(b.domid, 0)[-2:] == bytes([0]) + b"z"
    assert hv.read(b.domid, 3)[:3] == b"qq" + bytes([3])
    for g in (0, 2, 3):                            # the writer only
        assert b.p2m.type[g] == RAM_RW and hv.read(a.domid, g) == bytes([g]) * 4096
    assert b.p2m.type[1] == RAM_SHARED
    assert hv.write_many(b.domid, [2], [0], [1], b"!") == 0        # private now: no fault
    assert hv.write_many(b.domid, [], [], [], b"") == 0
    assert hv.audit() == 0


def test_write_many_validation_changes_nothing(hv):
    a = hv.create_domain(4, holes=[3])
    b = hv.create_domain(4, holes=[3])
    hv.range_share(a.domid, b.domid, 0, 2)
    before = (hv.nr_shared_mfns, hv.nr_saved_mfns, hv.pool.nfree, b.p2m.type.copy())
    bad = [([4], [0], [1], b"x"),                   # outside the domain
           ([-1], [0], [1], b"x"),
           ([0, 3], [0, 0], [1, 1], b"xy"),         # 3 is a hole
           ([0], [4095], [2], b"xy"),               # crosses the page
           ([0], [0], [2], b"x"),                   # lengths and data disagree
           ([0, 1], [0], [1], b"x")]                # offsets missing
    for args in bad:
        with pytest.raises(HVError) as e:
            hv.write_many(b.domid, *args)
        assert code(e) == EINVAL, args
    assert (hv.nr_shared_mfns, hv.nr_saved_mfns, hv.pool.nfree) == before[:3]
    assert (b.p2m.type == before[3]).all()
    hog = hv.create_domain(hv.pool.nfree)
    with pytest.raises(HVError) as e:
        hv.write_many(b.domid, [0, 1], [0, 0], [1, 1], b"xy")
    assert code(e) == ENOMEM
    assert (b.p2m.type == before[3]).all() and hv.audit() == 0
    hv.destroy_domain(hog.domid)
    assert hv.write_many(b.domid, [0, 1], [0, 0], [1, 1], b"xy") == 2


def test_whole_page_writes_take_their_frames_without_a_copy(hv):
    a = hv.create_domain(3, content=pages(7, 8, 9))
    b = hv.create_domain(3, content=pages(7, 8, 9))
    hv.range_share(a.domid, b.domid, 0, 2)
    assert hv.write(b.domid, 0, 0, bytes([1]) * 4096) is True
    assert hv.write_pages(b.domid, [2, 1, 2], pages(5, 6, 4)) == 2
    assert [hv.read(b.domid, g)[::1024] for g in range(3)] == [bytes([v]) * 4 for v in (1, 6, 4)]
    assert [hv.read(a.domid, g) for g in range(3)] == [bytes([v]) * 4096 for v in (7, 8, 9)]


def test_create_domain_errors_leave_nothing(hv):
    free = hv.pool.nfree
    with pytest.raises(HVError) as e:
        hv.create_domain(free + 1)
    assert code(e) == ENOMEM
    with pytest.raises(HVError) as e:
        hv.create_domain(4, content=np.zeros((3, 4096), np.uint8))
    assert code(e) == EINVAL
    assert hv.pool.nfree == free and not hv.domains


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
