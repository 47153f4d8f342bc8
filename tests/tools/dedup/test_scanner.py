"""The dedup scanner (``hvshare.tools.dedup``) on the in-process core.

Real behaviour only: domains with known contents, a real read-only mapping
of the pool and p2ms, real nominate/share through :class:`InProcessBackend`.
Every test checks the bytes every gfn reads afterwards against what it was
given or written (gfns sharing a frame read the same bytes, so this is also
the proof that no frame is shared by different contents) and that the
core's audit is clean.
"""
from __future__ import annotations

import threading
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvshare.hvcore import Hypervisor
from hvshare.hvcore.p2m import RAM_RW, RAM_SHARED
from hvshare.hvcore.constants import PAGE_SIZE, RMAP_POLICIES as POLICIES
from hvshare.perf.peers.contents import ksm_clone_pages
from hvshare.tools import dedup
from hvshare.tools.dedup import InProcessBackend, Scanner


def page(byte: int, tag: int | None = None) -> np.ndarray:
    """A page of ``byte``; ``tag`` makes it differ in its last word only."""
    p = np.full(PAGE_SIZE, byte, dtype=np.uint8)
    if tag is not None:
        p[-8:] = np.frombuffer(np.uint64(tag).tobytes(), dtype=np.uint8)
    return p


def stack(*pages) -> np.ndarray:
    return np.stack(pages)


@pytest.fixture
def hv():
    h = Hypervisor(8192)
    try:
        yield h
        assert h.audit_report() == []
    finally:
        h.close()


@pytest.fixture
def scanner(hv):
    with Scanner(InProcessBackend(hv)) as s:
        yield s


def contents(hv, domid) -> np.ndarray:
    d = hv.domain(domid)
    return np.stack([np.frombuffer(hv.read(domid, g), dtype=np.uint8) for g in range(d.npages)])


def saved_from_content(*memories: np.ndarray) -> int:
    """Frames saved if every set of identical pages shares one frame."""
    rows = np.concatenate(memories)
    _, counts = np.unique(rows.view(np.dtype((np.void, PAGE_SIZE))).ravel(), return_counts=True)
    return int((counts - 1).sum())


def unique_mask(*memories: np.ndarray) -> list[np.ndarray]:
    """Per memory, which of its pages have no identical page anywhere."""
    rows = np.concatenate(memories)
    _, inv, counts = np.unique(rows.view(np.dtype((np.void, PAGE_SIZE))).ravel(),
                               return_inverse=True, return_counts=True)
    alone = counts[inv.ravel()] == 1
    return np.split(alone, np.cumsum([len(m) for m in memories])[:-1])


def check(hv, expected: dict[int, np.ndarray]) -> None:
    """Every gfn reads what the test expects, and audit is clean."""
    for domid, mem in expected.items():
        assert np.array_equal(contents(hv, domid), mem), f"domain {domid} reads changed content"
    assert hv.audit_report() == []


# ----------------------------------------------------------------------
# merging

@pytest.mark.parametrize("policy", POLICIES)
def test_clones_share_image_and_zero_pages_private_pages_stay(policy):
    n = 700
    with Hypervisor(4 * n, rmap=policy) as hv, Scanner(InProcessBackend(hv), batch_pages=50) as sc:
        mems = [ksm_clone_pages(n, seed=s, image_pages=120) for s in (1, 2, 3)]
        doms = [hv.create_domain(n, content=m).domid for m in mems]
        res = sc.scan_pass()
        want = saved_from_content(*mems)
        assert want > n                       # the clones really have a lot in common
        assert hv.nr_saved_mfns == want == res.saved_delta == res.nr_saved_mfns
        assert res.merged == want and res.scanned == 3 * n and res.full_scan
        alone = unique_mask(*mems)
        for domid, mem, lone in zip(doms, mems, alone):
            typ = hv.domain(domid).p2m.type
            assert (typ[lone] == RAM_RW).all(), "a page with no twin was touched"
            assert (typ[~lone] == RAM_SHARED).all(), "a page with a twin was not shared"
        zero_gfns = [np.nonzero(~m.any(axis=1))[0] for m in mems]
        zero_frames = {int(hv.domain(d).p2m.mfn[g]) for d, gs in zip(doms, zero_gfns) for g in gs}
        assert len(zero_frames) == 1          # every zero page on one frame
        c = sc.counters
        assert c["pages_sharing"] == want
        assert c["pages_unshared"] == sum(int(a.sum()) for a in alone) == res.unmatched
        assert c["pages_volatile"] == 0 and c["full_scans"] == 1
        check(hv, dict(zip(doms, mems)))
        again = sc.scan_pass()                # nothing left to do, shared pages skipped
        assert again.merged == 0 and again.saved_delta == 0
        assert again.scanned == sum(int(a.sum()) for a in alone)
        assert again.batches == 0


def test_new_clone_merges_into_existing_frames(hv, scanner):
    n = 400
    a, b = (ksm_clone_pages(n, seed=s, image_pages=60) for s in (1, 2))
    da = hv.create_domain(n, content=a).domid
    db = hv.create_domain(n, content=b).domid
    scanner.scan_pass()
    shared_before = hv.nr_shared_mfns
    c = ksm_clone_pages(n, seed=3, image_pages=60)
    dc = hv.create_domain(n, content=c).domid
    res = scanner.scan_pass()
    assert hv.nr_saved_mfns == saved_from_content(a, b, c)
    # image and zero pages of the new clone joined the existing frames: only
    # image pages the first two never used can have made new frames
    new_frames = hv.nr_shared_mfns - shared_before
    ab = set(np.concatenate([a, b]).view(np.dtype((np.void, PAGE_SIZE))).ravel().tolist())
    fresh = {r for r in c.view(np.dtype((np.void, PAGE_SIZE))).ravel().tolist() if r not in ab}
    assert new_frames <= len(fresh)
    assert res.merged > 0
    check(hv, {da: a, db: b, dc: c})


def test_identical_pages_in_one_domain_merge_across_batches(hv):
    n = 500
    mem = np.repeat(page(7)[None], n, axis=0)
    d = hv.create_domain(n, content=mem).domid
    sizes = {"nominate": [], "share": []}

    def recording(kind, fn):            # the core's batch calls: (domid or sds, gfns, ...)
        def call(*args):
            sizes[kind].append(len(args[1]))
            return fn(*args)
        return call
    hv.nominate_many = recording("nominate", hv.nominate_many)
    hv.share_many = recording("share", hv.share_many)
    with Scanner(InProcessBackend(hv), batch_pages=7, round_pages=50) as sc:
        res = sc.scan_pass()
    assert hv.nr_saved_mfns == n - 1 and hv.nr_shared_mfns == 1
    assert res.batches == -(-(n - 1) // 50)         # rounds
    # no share request carries more than batch_pages pairs, no nominate
    # more than NOMINATE_FACTOR times as many gfns
    assert max(sizes["share"]) == 7
    assert max(sizes["nominate"]) == dedup.NOMINATE_FACTOR * 7
    assert sum(sizes["share"]) == n - 1
    assert res.requests == len(sizes["nominate"]) + len(sizes["share"])
    check(hv, {d: mem})


def test_domid_selection_only_touches_those_domains(hv, scanner):
    mem = stack(page(1), page(1), page(2), page(3))
    d1 = hv.create_domain(4, content=mem).domid
    d2 = hv.create_domain(4, content=mem).domid
    scanner.scan_pass([d1])
    assert hv.nr_saved_mfns == 1                       # d1's two 1-pages
    assert (hv.domain(d2).p2m.type == RAM_RW).all()
    scanner.scan_pass([d2])                             # into d1's shared frame
    t2 = hv.domain(d2).p2m.type
    assert (t2[:2] == RAM_SHARED).all() and (t2[2:] == RAM_RW).all()
    assert hv.nr_saved_mfns == 3 and hv.nr_shared_mfns == 1
    check(hv, {d1: mem, d2: mem})


def test_duplicate_shared_frames_are_merged(hv, scanner):
    mem = stack(page(5), page(5), page(5), page(6))
    d = hv.create_domain(4, content=mem).domid
    h0 = hv.nominate(d, 0)
    h1 = hv.nominate(d, 1)
    hv.nominate(d, 2)
    hv.share(d, 0, h0, d, 1, h1)        # frame A: gfns 0, 1; frame B: gfn 2
    assert hv.nr_shared_mfns == 2
    res = scanner.scan_pass()
    assert hv.nr_shared_mfns == 1 and hv.nr_saved_mfns == 2
    assert res.merged == 1
    # the bigger frame survived: gfns 0 and 1 did not move
    assert hv.domain(d).p2m.mfn[2] == hv.domain(d).p2m.mfn[0]
    check(hv, {d: mem})


def test_pages_that_cannot_be_nominated_are_skipped(hv, scanner):
    mem = stack(page(4), page(4), page(4))
    d = hv.create_domain(3, content=mem).domid
    hv.map_foreign(d, 1)                      # an extra reference: E2BIG
    res = scanner.scan_pass()
    assert res.skipped == 1 and res.merged == 1
    assert hv.domain(d).p2m.type[1] == RAM_RW
    hv.unmap_foreign(d, 1)
    check(hv, {d: mem})


# ----------------------------------------------------------------------
# content is verified, never trusted

def test_hash_collision_never_merges_different_content(hv, scanner, monkeypatch):
    monkeypatch.setattr(dedup.pages, "page_hashes",
                        lambda frames, mfns: np.full(len(mfns), 12345, dtype=np.uint64))
    mem = stack(page(1), page(2), page(1), page(3), page(2), page(1, tag=9),
                page(0), page(0), page(4))
    d = hv.create_domain(len(mem), content=mem).domid
    e = hv.create_domain(3, content=stack(page(3), page(9), page(2))).domid
    res = scanner.scan_pass()
    assert res.mismatched > 0                 # verification caught the collision
    # exact groups: 1 x2, 2 x3, 3 x2, 0 x2 -> 5 frames saved
    assert hv.nr_saved_mfns == 5
    check(hv, {d: mem, e: stack(page(3), page(9), page(2))})
    # every shared frame holds one content for all its gfns
    for dom, m in ((d, mem),):
        p2m = hv.domain(dom).p2m
        for frame in np.unique(p2m.mfn[p2m.type == RAM_SHARED]):
            gs = np.nonzero((p2m.mfn == frame) & (p2m.type == RAM_SHARED))[0]
            assert (m[gs] == m[gs[0]]).all()


def test_write_between_hashing_and_nominate_is_not_merged(hv, scanner):
    mem = stack(page(1), page(1), page(1), page(2))
    d = hv.create_domain(4, content=mem).domid
    plan = scanner.plan()
    assert sum(len(b) for b in plan.batches) == 2
    hv.write(d, 1, 100, b"changed")           # still private: a plain write
    res = scanner.execute(plan)
    assert res.mismatched == 1 and res.merged == 1
    mem[1, 100:107] = np.frombuffer(b"changed", dtype=np.uint8)
    p2m = hv.domain(d).p2m
    assert p2m.mfn[0] == p2m.mfn[2] != p2m.mfn[1]
    check(hv, {d: mem})


@pytest.mark.parametrize("victim", ["client", "source"])
def test_write_after_nominate_is_not_merged(hv, scanner, victim):
    mem = stack(page(1), page(1), page(2))
    d = hv.create_domain(3, content=mem).domid
    gfn = 1 if victim == "client" else 0
    faults = []
    scanner.after_nominate = lambda batch: faults.append(hv.write(d, gfn, 0, b"\xff" * 16))
    res = scanner.scan_pass()
    assert faults == [True]                   # the write was a CoW fault
    assert res.merged == 0 and res.skipped == 1
    assert hv.nr_saved_mfns == 0
    assert hv.domain(d).p2m.type[gfn] == RAM_RW
    mem[gfn, :16] = 0xFF
    check(hv, {d: mem})


@pytest.mark.parametrize("victim", ["client", "source"])
def test_write_after_verify_fails_the_share(hv, scanner, victim):
    mem = stack(page(1), page(1), page(1), page(2))
    d = hv.create_domain(4, content=mem).domid
    gfn = 2 if victim == "client" else 0
    scanner.before_share = lambda batch: hv.write(d, gfn, 8, b"late")
    res = scanner.scan_pass()
    mem[gfn, 8:12] = np.frombuffer(b"late", dtype=np.uint8)
    if victim == "client":                  # the other client still merges
        assert res.merged == 1 and res.skipped == 1
    else:                                    # every pair of that source fails
        assert res.merged == 0 and res.skipped == 2
    assert res.counters["pages_volatile"] == 1   # the written page
    check(hv, {d: mem})


# ----------------------------------------------------------------------
# rescans and volatility

def test_rescan_after_writes_merges_only_what_is_identical_again(hv, scanner):
    n = 300
    mems = [ksm_clone_pages(n, seed=s, image_pages=40) for s in (1, 2, 3)]
    doms = [hv.create_domain(n, content=m).domid for m in mems]
    scanner.scan_pass()
    shared = [np.nonzero(hv.domain(d).p2m.type == RAM_SHARED)[0] for d in doms]
    g = int(np.intersect1d(np.intersect1d(shared[0], shared[1]), shared[2])[0])
    new = page(0xAB, tag=1)
    hv.write_pages(doms[0], [g], new[None])         # identical again in 0 and 1
    hv.write_pages(doms[1], [g], new[None])
    hv.write_pages(doms[2], [g], page(0xCD)[None])  # unique now
    g_back = int(shared[0][shared[0] != g][0])       # rewritten with the same bytes
    hv.write_pages(doms[0], [g_back], mems[0][g_back][None])
    for m in mems[:2]:
        m[g] = new
    mems[2][g] = page(0xCD)
    saved = hv.nr_saved_mfns

    r2 = scanner.scan_pass()              # the changed pages are volatile
    assert r2.volatile == 3 and r2.counters["pages_volatile"] == 3
    assert r2.merged == 1                 # the page whose bytes did not change
    assert hv.domain(doms[0]).p2m.type[g_back] == RAM_SHARED
    r3 = scanner.scan_pass()              # they held still: merge what matches
    assert r3.volatile == 0 and r3.counters["pages_volatile"] == 0
    assert r3.merged == 1
    p = [hv.domain(d).p2m for d in doms]
    assert p[0].type[g] == p[1].type[g] == RAM_SHARED and p[0].mfn[g] == p[1].mfn[g]
    assert p[2].type[g] == RAM_RW
    assert hv.nr_saved_mfns == saved_from_content(*mems)
    assert hv.nr_saved_mfns == saved + 2       # g_back again, then the new twins
    check(hv, dict(zip(doms, mems)))


def test_pages_written_every_pass_stay_volatile(hv, scanner):
    mem = stack(page(1), page(2), page(3), page(3))
    d = hv.create_domain(4, content=mem).domid
    r = scanner.scan_pass()
    assert r.merged == 1
    for i in range(3):                        # gfns 0, 1 get identical new bytes each pass
        hv.write_pages(d, [0, 1], np.stack([page(10 + i)] * 2))
        r = scanner.scan_pass()
        assert r.volatile == 2 and r.merged == 0
        assert scanner.counters["pages_volatile"] == 2
    r = scanner.scan_pass()                   # quiet for a pass: merged
    assert r.volatile == 0 and r.merged == 1
    assert scanner.counters["pages_volatile"] == 0
    mem[0] = mem[1] = page(12)
    check(hv, {d: mem})


def test_skip_volatile_off_merges_at_once(hv):
    mem = stack(page(1), page(2))
    d = hv.create_domain(2, content=mem).domid
    with Scanner(InProcessBackend(hv), skip_volatile=False) as sc:
        sc.scan_pass()
        hv.write_pages(d, [0, 1], np.stack([page(9)] * 2))
        r = sc.scan_pass()
    assert r.volatile == 0 and r.merged == 1
    check(hv, {d: np.stack([page(9)] * 2)})


def test_domain_destroyed_mid_pass(hv, scanner):
    mem = stack(page(1), page(1), page(2), page(2))
    d1 = hv.create_domain(4, content=mem).domid
    d2 = hv.create_domain(4, content=mem).domid
    plan = scanner.plan()
    hv.destroy_domain(d2)
    res = scanner.execute(plan)
    assert res.skipped > 0
    assert hv.nr_saved_mfns == 2
    check(hv, {d1: mem})


# ----------------------------------------------------------------------
# watch mode

def test_watch_scans_at_the_rate_limit_and_matches_across_windows(hv, scanner):
    n = 250
    # twins far apart: gfn i of domain 1 equals gfn n-1-i of domain 2
    a = ksm_clone_pages(n, seed=1, image_pages=30)
    b = a[::-1].copy()
    b[:10] = np.random.default_rng(5).integers(0, 256, (10, PAGE_SIZE), dtype=np.uint8)
    da = hv.create_domain(n, content=a).domid
    db = hv.create_domain(n, content=b).domid
    stop = threading.Event()
    ticks = []

    def on_pass(res):
        ticks.append(res)
        if res.full_scan and sum(t.full_scan for t in ticks) == 2:
            stop.set()
    totals = dedup.Watcher(scanner).watch(dedup.Knobs(pages_to_scan=60, sleep_millisecs=1),
                                          stop_event=stop, on_pass=on_pass)
    budget = 60                                 # gfns per tick
    assert all(t.scanned <= budget for t in ticks)
    assert totals["full_scans"] == 2 == scanner.counters["full_scans"]
    assert totals["passes"] >= 2 * (2 * n) // budget
    assert hv.nr_saved_mfns == saved_from_content(a, b)
    check(hv, {da: a, db: b})


# ----------------------------------------------------------------------
# property: whatever the contents, batch size and interleaved writes

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_contents_and_racing_writes(data):
    sizes = data.draw(st.lists(st.integers(1, 10), min_size=1, max_size=3), label="sizes")
    mems = [np.stack([page(b) for b in data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))])
            for n in sizes]
    batch_pages = data.draw(st.integers(1, 5), label="batch_pages")
    collide = data.draw(st.booleans(), label="collide")
    # writes to do right after the nominates of batch i: (i, dom index, gfn, byte)
    writes = data.draw(st.lists(st.tuples(st.integers(0, 4), st.integers(0, len(sizes) - 1),
                                          st.integers(0, 9), st.integers(0, 4)), max_size=4))
    const = (lambda frames, mfns: np.full(len(mfns), 1, dtype=np.uint64))
    with Hypervisor(64) as hv, Scanner(InProcessBackend(hv), batch_pages=batch_pages) as sc, \
            mock.patch.object(dedup.pages, "page_hashes", const if collide else dedup.page_hashes):
        doms = [hv.create_domain(len(m), content=m).domid for m in mems]
        seen = [0]

        def racing(batch):
            for i, k, g, b in writes:
                if i == seen[0] and g < sizes[k]:
                    hv.write_pages(doms[k], [g], page(b)[None])
                    mems[k][g] = page(b)
            seen[0] += 1
        sc.after_nominate = racing
        sc.scan_pass()
        sc.after_nominate = None
        check(hv, dict(zip(doms, mems)))
        if not writes and not collide:
            assert hv.nr_saved_mfns == saved_from_content(*mems)
        for _ in range(2):                # writes are volatile once, then merge
            sc.scan_pass()
        check(hv, dict(zip(doms, mems)))
        if not collide:
            assert hv.nr_saved_mfns == saved_from_content(*mems)
