"""Unshare and guest writes: the CoW fault, its batch forms, ENOMEM, on every rmap policy."""
from __future__ import annotations

import numpy as np
import pytest

from hvshare.hvcore import HVError
from hvshare.hvcore.errors import (EINVAL, ENOMEM)
from hvshare.hvcore.p2m import RAM_RW, RAM_SHARED


def pages(*values) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.uint8)[:, None], 4096, axis=1)


def code(excinfo) -> int:
    return excinfo.value.code


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
