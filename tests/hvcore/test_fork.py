"""VM fork in the core: lazy filling, CoW, reset, chains, teardown (every rmap policy)."""
from __future__ import annotations

import numpy as np
import pytest

from hvshare.hvcore import HVError
from hvshare.hvcore.errors import EBUSY, EINVAL, ENOMEM
from hvshare.hvcore.p2m import HOLE, RAM_RW, RAM_SHARED

PAGES = 16


def pages_of(seed: int, n: int = PAGES) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 4096), dtype=np.uint8)


@pytest.fixture
def parent(hv):
    return hv.create_domain(PAGES, content=pages_of(1))


def test_fork_is_empty_and_pauses_the_parent(hv, parent):
    free = hv.pool.nfree
    c = hv.fork(parent.domid)
    assert c.parent == parent.domid and c.npages == PAGES
    assert (c.p2m.type == HOLE).all() and c.tot_pages == c.shr_pages == 0
    assert parent.state == "paused" and parent.forks == {c.domid}
    assert hv.pool.nfree == free            # nothing copied at fork time
    assert hv.audit_report() == []


def test_read_shares_the_parents_frame(hv, parent):
    c = hv.fork(parent.domid)
    free = hv.pool.nfree
    assert hv.fork_populate(c.domid, [3, 3, 5]) == 2
    assert hv.pool.nfree == free
    assert c.p2m.type[3] == RAM_SHARED and c.p2m.mfn[3] == parent.p2m.mfn[3]
    assert parent.p2m.type[3] == RAM_SHARED
    assert hv.read(c.domid, 3) == pages_of(1)[3].tobytes()
    assert hv.fork_populate(c.domid, [3]) == 0      # already there
    assert hv.audit_report() == []


def test_write_to_a_hole_copies_privately_and_stays_private(hv, parent):
    c = hv.fork(parent.domid)
    free = hv.pool.nfree
    assert hv.write(c.domid, 4, 10, b"xyz")
    assert hv.pool.nfree == free - 1 and c.p2m.type[4] == RAM_RW
    want = bytearray(pages_of(1)[4].tobytes())
    want[10:13] = b"xyz"
    assert hv.read(c.domid, 4) == bytes(want)
    assert hv.read(parent.domid, 4) == pages_of(1)[4].tobytes()
    assert parent.p2m.type[4] == RAM_RW             # a write never shares the parent's page


def test_write_after_read_is_a_cow_fault(hv, parent):
    c = hv.fork(parent.domid)
    hv.fork_populate(c.domid, [2])
    free = hv.pool.nfree
    assert hv.write(c.domid, 2, 0, b"\x01")
    assert hv.pool.nfree == free - 1
    assert hv.read(parent.domid, 2) == pages_of(1)[2].tobytes()
    assert hv.read(c.domid, 2)[0] == 1


def test_batched_writes_fill_holes(hv, parent):
    c = hv.fork(parent.domid)
    hv.fork_populate(c.domid, [1])
    free = hv.pool.nfree
    new = pages_of(9, 3)
    assert hv.write_pages(c.domid, [0, 1, 7], new) == 3
    assert hv.pool.nfree == free - 3
    for i, g in enumerate((0, 1, 7)):
        assert hv.read(c.domid, g) == new[i].tobytes()
        assert hv.read(parent.domid, g) == pages_of(1)[g].tobytes()
    assert hv.write_many(c.domid, [8, 9], [0, 5], [1, 1], b"ab") == 2
    assert hv.read(c.domid, 9)[:6] == pages_of(1)[9].tobytes()[:5] + b"b"
    assert hv.audit_report() == []


def test_siblings_do_not_see_each_other(hv, parent):
    a, b = hv.fork(parent.domid), hv.fork(parent.domid)
    hv.fork_populate(b.domid, [6])
    hv.write(a.domid, 6, 0, b"A")
    assert hv.read(b.domid, 6) == pages_of(1)[6].tobytes()
    assert hv.read(a.domid, 6)[:1] == b"A"
    assert parent.forks == {a.domid, b.domid}


def test_the_parent_cannot_be_written_or_run_while_it_has_forks(hv, parent):
    c = hv.fork(parent.domid)
    with pytest.raises(HVError) as e:
        hv.write(parent.domid, 0, 0, b"x")
    assert e.value.code == EBUSY
    with pytest.raises(HVError) as e:
        hv.write_pages(parent.domid, [0], np.zeros((1, 4096), np.uint8))
    assert e.value.code == EBUSY
    with pytest.raises(HVError) as e:
        hv.kill(parent.domid)
    assert e.value.code == EBUSY
    hv.destroy_domain(c.domid)
    assert parent.state == "running" and not parent.forks
    hv.write(parent.domid, 0, 0, b"x")


def test_a_parent_paused_before_the_fork_stays_paused(hv):
    p = hv.create_domain(4, paused=True)
    c = hv.fork(p.domid)
    hv.destroy_domain(c.domid)
    assert p.state == "paused"


def test_fork_of_a_fork_reads_the_nearest_ancestor(hv, parent):
    c = hv.fork(parent.domid)
    hv.write(c.domid, 3, 0, b"C")
    g = hv.fork(c.domid)
    assert c.state == "paused" and g.parent == c.domid
    assert hv.fork_populate(g.domid, [3, 4]) == 2
    assert hv.read(g.domid, 3)[:1] == b"C"                    # from its parent
    assert hv.read(g.domid, 4) == pages_of(1)[4].tobytes()   # from the grandparent
    assert c.p2m.type[4] == HOLE                               # the middle one still lacks it
    hv.write(g.domid, 4, 0, b"G")
    assert hv.read(parent.domid, 4) == pages_of(1)[4].tobytes()
    with pytest.raises(HVError) as e:
        hv.kill(c.domid)
    assert e.value.code == EBUSY
    assert hv.descendants(parent.domid) == [g.domid, c.domid]
    assert hv.audit_report() == []


def test_reset_brings_back_the_parent_and_frees_the_frames(hv, parent):
    c = hv.fork(parent.domid)
    free = hv.pool.nfree
    hv.fork_populate(c.domid, [0, 1, 2])
    hv.write_pages(c.domid, [2, 3, 4, 5], pages_of(5, 4))
    assert hv.pool.nfree == free - 4
    assert hv.fork_reset(c.domid) == 4
    assert hv.pool.nfree == free
    assert list(np.flatnonzero(c.p2m.type != HOLE)) == [0, 1]   # shared entries stay
    assert (c.p2m.type[[0, 1]] == RAM_SHARED).all()
    for g in range(PAGES):
        hv.fork_populate(c.domid, [g])
        assert hv.read(c.domid, g) == pages_of(1)[g].tobytes()
    assert hv.audit_report() == []


def test_reset_in_chunks_compacts_the_record(hv, parent):
    c = hv.fork(parent.domid)
    hv.fork_populate(c.domid, np.arange(0, PAGES, 2))
    hv.write_pages(c.domid, np.arange(1, PAGES, 2), pages_of(2, PAGES // 2))
    d = hv.begin_fork_reset(c.domid)
    with pytest.raises(HVError) as e:
        hv.begin_fork_reset(c.domid)
    assert e.value.code == EBUSY
    steps = 1
    while not hv.fork_reset_chunk(d, 3):
        assert hv.audit_report() == []              # consistent between chunks
        steps += 1
    assert steps == -(-PAGES // 3)
    assert d.reset_dropped == PAGES // 2
    assert sorted(d.fork_gfns[:d.fork_n]) == list(range(0, PAGES, 2))
    assert hv.audit_report() == []


def test_reset_refusals(hv, parent):
    with pytest.raises(HVError) as e:
        hv.fork_reset(parent.domid)
    assert e.value.code == EINVAL                   # not a fork
    c = hv.fork(parent.domid)
    hv.kill(c.domid)
    with pytest.raises(HVError) as e:
        hv.fork_reset(c.domid)
    assert e.value.code == EBUSY


def test_reset_keeps_a_page_with_extra_references(hv, parent):
    c = hv.fork(parent.domid)
    hv.write(c.domid, 1, 0, b"z")
    hv.write(c.domid, 2, 0, b"z")
    hv.pool.extra_refs[c.p2m.mfn[1]] += 1           # a foreign mapping of the page
    assert hv.fork_reset(c.domid) == 1
    assert c.p2m.type[1] == RAM_RW and c.p2m.type[2] == HOLE
    hv.pool.extra_refs[c.p2m.mfn[1]] -= 1


def test_a_read_whose_sharing_fails_copies(hv, parent):
    hv.pool.extra_refs[parent.p2m.mfn[5]] += 1      # the parent's page cannot be nominated
    c = hv.fork(parent.domid)
    free = hv.pool.nfree
    assert hv.fork_populate(c.domid, [5]) == 1
    assert c.p2m.type[5] == RAM_RW and hv.pool.nfree == free - 1
    assert hv.read(c.domid, 5) == pages_of(1)[5].tobytes()
    hv.pool.extra_refs[parent.p2m.mfn[5]] -= 1


def test_reset_keeps_a_page_no_ancestor_holds(hv):
    p = hv.create_domain(4, holes=[3])
    c = hv.fork(p.domid)
    other = hv.create_domain(4, content=pages_of(3, 4))
    hv.add_to_physmap(other.domid, 3, hv.nominate(other.domid, 3), c.domid, 3)
    hv.write(c.domid, 3, 0, b"q")
    assert hv.fork_reset(c.domid) == 0              # it could not be populated again
    assert c.p2m.type[3] == RAM_RW


def test_a_hole_in_every_ancestor_is_einval(hv):
    p = hv.create_domain(4, holes=[2])
    c = hv.fork(p.domid)
    for call in (lambda: hv.fork_populate(c.domid, [1, 2]), lambda: hv.write(c.domid, 2, 0, b"x")):
        with pytest.raises(HVError) as e:
            call()
        assert e.value.code == EINVAL
    assert (c.p2m.type == HOLE).all()               # nothing of the batch was filled


def test_enomem_leaves_the_fork_as_it_was(hv):
    p = hv.create_domain(8)
    c = hv.fork(p.domid)
    hog = hv.create_domain(hv.pool.nfree)
    with pytest.raises(HVError) as e:
        hv.write_pages(c.domid, [0, 1], np.ones((2, 4096), np.uint8))
    assert e.value.code == ENOMEM
    assert (c.p2m.type == HOLE).all() and c.fork_n == 0
    assert hv.fork_populate(c.domid, [0, 1]) == 2    # a read needs no frame
    hv.destroy_domain(hog.domid)


def test_dedup_and_add_to_physmap_on_a_fork(hv, parent):
    c = hv.fork(parent.domid)
    hv.write_pages(c.domid, [0, 1], np.zeros((2, 4096), np.uint8))
    h0, h1 = hv.nominate(c.domid, 0), hv.nominate(c.domid, 1)
    hv.share(c.domid, 0, h0, c.domid, 1, h1)
    assert c.p2m.mfn[0] == c.p2m.mfn[1] and c.shr_pages == 2
    other = hv.create_domain(PAGES, content=pages_of(3))
    h = hv.nominate(other.domid, 9)
    hv.add_to_physmap(other.domid, 9, h, c.domid, 9)
    assert hv.read(c.domid, 9) == pages_of(3)[9].tobytes()
    assert hv.audit_report() == []
    hv.write(c.domid, 9, 0, b"q")                   # a CoW fault, then a private page
    # the parent holds gfns 0, 1 and 9: the merged pair and the private page go
    assert hv.fork_reset(c.domid) == 3
    hv.fork_populate(c.domid, [0, 1, 9])
    for g in (0, 1, 9):
        assert hv.read(c.domid, g) == pages_of(1)[g].tobytes()
    hv.destroy_domain(c.domid)
    hv.destroy_domain(other.domid)
    assert parent.state == "running"


def test_fork_refusals(hv, parent):
    with pytest.raises(HVError) as e:
        hv.fork(99)
    assert e.value.code == 3                        # ESRCH
    hv.fork(parent.domid, name="child")
    with pytest.raises(HVError) as e:
        hv.fork(parent.domid, name="child")
    assert e.value.code == 17                       # EEXIST
    d = hv.create_domain(2)
    hv.kill(d.domid)
    with pytest.raises(HVError) as e:
        hv.fork(d.domid)
    assert e.value.code == EBUSY


def test_preemptible_teardown_of_a_fork(hv, parent):
    c = hv.fork(parent.domid)
    hv.fork_populate(c.domid, np.arange(8))
    hv.write_pages(c.domid, np.arange(8, 12), pages_of(4, 4))
    free = hv.pool.nfree
    hv.kill(c.domid)
    while not hv.relinquish(c.domid, lambda: True, chunk_seconds=1e-5):
        pass
    assert hv.pool.nfree == free + 4
    assert c.domid not in hv.domains and not parent.forks and parent.state == "running"
    # the parent keeps its shared pages (its only sharer now) and reads as before
    for g in range(PAGES):
        assert hv.read(parent.domid, g) == pages_of(1)[g].tobytes()
    hv.write(parent.domid, 0, 0, b"p")


def test_reset_drops_a_page_dedup_merged_with_another_domain(hv, parent):
    """After a reset a fork reads exactly its parent, whatever dedup did:
    its written page, merged with another domain's identical page, is no
    longer its parent's entry and goes too."""
    c = hv.fork(parent.domid)
    x = np.full((1, 4096), ord("X"), np.uint8)
    hv.write_pages(c.domid, [0], x)
    other = hv.create_domain(PAGES, content=np.repeat(x, PAGES, axis=0))
    hv.share(other.domid, 5, hv.nominate(other.domid, 5), c.domid, 0, hv.nominate(c.domid, 0))
    assert c.p2m.type[0] == RAM_SHARED and c.p2m.mfn[0] == other.p2m.mfn[5]
    hv.fork_populate(c.domid, [1])                  # the parent's own frame: it stays
    assert hv.fork_reset(c.domid) == 1
    assert c.p2m.type[0] == HOLE and c.p2m.type[1] == RAM_SHARED and c.shr_pages == 1
    hv.fork_populate(c.domid, [0])
    for g in (0, 1):
        assert hv.read(c.domid, g) == pages_of(1)[g].tobytes()
    assert hv.read(other.domid, 5) == x.tobytes()   # the other domain keeps its page
    assert hv.audit_report() == []


def test_descendants_of_a_chain_deeper_than_the_recursion_limit():
    import sys
    from hvshare.hvcore import Hypervisor
    depth = 1500
    assert depth > sys.getrecursionlimit() // 2
    with Hypervisor(16, rmap="index") as h:
        root = h.create_domain(2)
        chain = [root.domid]
        for _ in range(depth):
            chain.append(h.fork(chain[-1]).domid)
        side = h.fork(chain[1]).domid                   # a sibling branch
        tree = h.descendants(root.domid)
        assert tree == chain[:1:-1] + [side, chain[1]]  # deepest first, children in order
        for d in tree + [root.domid]:
            h.destroy_domain(d)
        assert h.domains == {} and h.audit_report() == []
