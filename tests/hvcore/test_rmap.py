"""Reverse-map policies: the shared contract, a model-based state machine,
the node arena of list and buckets, the buckets conversions (256/64,
hysteresis, walks, refused tables) and the index's vectorised batch forms
(exact list order against the element-wise loop, teardown chunks, 100,000
entries, scratch memory independent of the frame's size)."""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hvshare.hvcore.constants import RMAP_POLICIES as POLICIES
from hvshare.hvcore.rmap import make_rmap
from hvshare.hvcore.rmap.buckets import RMAP_HEAVY_SHARED_PAGE, RMAP_LIGHT_SHARED_PAGE

NPAGES = 4096


def make(policy: str, nframes: int = 8, ndom: int = 4, npages: int = NPAGES, **kw):
    r = make_rmap(policy, nframes, **kw)
    for d in range(ndom):
        r.domain_created(d, npages)
    return r


def check(r) -> None:
    """Structural self-check where the policy has one (all three do)."""
    r.check()


def walk(r, mfn: int) -> list:
    return list(r.entries(mfn))


def fill(r, mfn: int, pairs) -> None:
    for d, g in pairs:
        r.add(mfn, d, g)


def arr(*cols):
    return [np.asarray(c, dtype=np.int64) for c in cols]


# -- the contract, for every policy -------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
def test_add_contains_count_remove(policy):
    r = make(policy)
    assert r.count(0) == 0 and walk(r, 0) == []
    fill(r, 0, [(1, 10), (2, 10), (1, 11)])
    r.add(3, 1, 12)
    assert r.count(0) == 3 and r.count(3) == 1
    assert r.contains(0, 1, 10) and r.contains(0, 2, 10) and r.contains(0, 1, 11)
    assert not r.contains(0, 1, 12)  # in frame 3, not 0
    assert not r.contains(0, 3, 10) and not r.contains(5, 1, 10)
    assert sorted(walk(r, 0)) == [(1, 10), (1, 11), (2, 10)]
    r.remove(0, 2, 10)
    assert r.count(0) == 2 and not r.contains(0, 2, 10)
    assert sorted(walk(r, 0)) == [(1, 10), (1, 11)]
    check(r)
    assert r.nbytes() > 0


@pytest.mark.parametrize("policy", POLICIES)
def test_remove_absent_raises_keyerror(policy):
    r = make(policy)
    fill(r, 0, [(1, 10), (1, 11)])
    r.add(1, 2, 5)
    with pytest.raises(KeyError):
        r.remove(0, 1, 12)           # never added
    with pytest.raises(KeyError):
        r.remove(0, 2, 5)            # lives in another frame
    with pytest.raises(KeyError):
        r.remove(4, 1, 10)           # frame with no rmap at all
    r.remove(0, 1, 10)
    with pytest.raises(KeyError):
        r.remove(0, 1, 10)           # already removed
    assert r.count(0) == 1 and r.count(1) == 1
    check(r)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("keep_every", [0, 2, 3])
def test_walk_tolerates_removing_current(policy, keep_every):
    # 300 entries: past the buckets' 256 threshold, so its hash walk is covered.
    r = make(policy)
    pairs = [(i % 4, i) for i in range(300)]
    fill(r, 0, pairs)
    fill(r, 1, [(0, 1000), (1, 1000)])
    seen, kept = [], set()
    for i, (d, g) in enumerate(r.entries(0)):
        seen.append((d, g))
        if keep_every and i % keep_every == 0:
            kept.add((d, g))
        else:
            r.remove(0, d, g)
    assert sorted(seen) == sorted(pairs)  # each entry exactly once
    assert set(walk(r, 0)) == kept and r.count(0) == len(kept)
    assert set(walk(r, 1)) == {(0, 1000), (1, 1000)}
    check(r)


@pytest.mark.parametrize("policy", POLICIES)
def test_move_all(policy):
    r = make(policy)
    src = [(i % 3, i) for i in range(300)]
    fill(r, 2, src)
    fill(r, 5, [(3, i) for i in range(10)])
    ds, gs = r.move_all(2, 5)
    assert sorted(zip(ds.tolist(), gs.tolist())) == sorted(src)
    assert r.count(2) == 0 and walk(r, 2) == []
    assert r.count(5) == 310
    assert set(walk(r, 5)) == set(src) | {(3, i) for i in range(10)}
    assert all(r.contains(5, d, g) and not r.contains(2, d, g) for d, g in src)
    check(r)
    # src is reusable afterwards
    r.add(2, 3, 100)
    assert walk(r, 2) == [(3, 100)]


@pytest.mark.parametrize("policy", POLICIES)
def test_release(policy):
    r = make(policy)
    fill(r, 0, [(0, 1), (1, 1)])
    for d, g in walk(r, 0):
        r.remove(0, d, g)
    r.release(0)
    assert r.count(0) == 0 and walk(r, 0) == []
    r.add(0, 2, 2)
    assert walk(r, 0) == [(2, 2)]
    check(r)
    # Releasing a frame that still has entries forgets them.
    fill(r, 1, [(0, 5), (0, 6)])
    r.release(1)
    assert r.count(1) == 0 and not r.contains(1, 0, 5)
    r.add(3, 0, 5)
    assert r.contains(3, 0, 5)
    check(r)


@pytest.mark.parametrize("policy", POLICIES)
def test_batch_forms(policy):
    r = make(policy)
    m = [0] * 200 + [1] * 100 + [2] * 5
    d = [i % 4 for i in range(305)]
    g = list(range(305))
    r.add_many(*arr(m, d, g))
    assert (r.count(0), r.count(1), r.count(2)) == (200, 100, 5)
    assert set(walk(r, 1)) == {(d[i], g[i]) for i in range(200, 300)}
    sel = list(range(0, 305, 2))
    r.remove_many(*arr([m[i] for i in sel], [d[i] for i in sel], [g[i] for i in sel]))
    assert (r.count(0), r.count(1), r.count(2)) == (100, 50, 2)
    assert set(walk(r, 0)) == {(d[i], g[i]) for i in range(1, 200, 2)}
    r.add_many(*arr([], [], []))
    r.remove_many(*arr([], [], []))
    check(r)


@pytest.mark.parametrize("policy", POLICIES)
def test_keys_out_of_range_are_refused(policy):
    # Every policy stores a domid in 15 bits and a gfn in 31.
    r = make(policy)
    fill(r, 1, [(i % 4, i) for i in range(256)])    # the next add converts (buckets)
    for d, g in [(0x8000, 1), (-1, 1), (1, 2**31), (1, -1)]:
        for mfn in (0, 1):
            with pytest.raises(ValueError):
                r.add(mfn, d, g)
    assert r.count(0) == 0 and r.count(1) == 256    # refused: nothing changed
    assert r.representation(1) == ("list" if policy == "buckets" else policy)
    r.add(0, 0x7FFF, 2**31 - 1)
    assert walk(r, 0) == [(0x7FFF, 2**31 - 1)] and r.count(0) == 1
    check(r)


# -- model-based state machine --------------------------------------------------
NFRAMES, NDOM, MPAGES = 4, 3, 1200
ALL_PAIRS = [(d, g) for d in range(NDOM) for g in range(MPAGES)]


class RmapMachine(RuleBasedStateMachine):
    """Drives one policy and a model dict[mfn] -> set[(domid, gfn)] side by side."""

    policy = "list"

    def __init__(self):
        super().__init__()
        self.r = make(self.policy, NFRAMES, NDOM, MPAGES)
        self.model = {m: set() for m in range(NFRAMES)}
        self.where: dict[tuple[int, int], int] = {}
        self.hashed = [False] * NFRAMES  # expected buckets representation

    # helpers
    def _free_pairs(self, rng, n):
        free = [p for p in ALL_PAIRS if p not in self.where]
        return rng.sample(free, min(n, len(free)))

    def _added(self, mfn, pairs):
        for p in pairs:
            self.model[mfn].add(p)
            self.where[p] = mfn

    def _removed(self, mfn, pairs):
        for p in pairs:
            self.model[mfn].remove(p)
            del self.where[p]

    def _after_add(self, frames):
        # Some add found the count at >= 256 iff the frame now holds >= 257.
        for m in frames:
            if len(self.model[m]) > RMAP_HEAVY_SHARED_PAGE:
                self.hashed[m] = True

    def _after_remove(self, frames):
        for m in frames:
            if len(self.model[m]) <= RMAP_LIGHT_SHARED_PAGE:
                self.hashed[m] = False

    def _busy_frame(self, rng):
        # Half the time the heaviest frame, so the walks and batch removes
        # often take a hash table down through 64.
        busy = [m for m in range(NFRAMES) if self.model[m]]
        if not busy:
            return rng.randrange(NFRAMES)
        return max(busy, key=lambda m: len(self.model[m])) if rng.random() < 0.5 else rng.choice(busy)

    def _expected_repr(self, m):
        if self.policy == "buckets":
            return "hash" if self.hashed[m] else "list"
        return self.policy

    # rules
    @rule(mfn=st.integers(0, NFRAMES - 1), seed=st.integers(0, 2**32 - 1))
    def add(self, mfn, seed):
        for d, g in self._free_pairs(random.Random(seed), 1):
            self.r.add(mfn, d, g)
            self._added(mfn, [(d, g)])
        self._after_add([mfn])

    @rule(seed=st.integers(0, 2**32 - 1), n=st.sampled_from([2, 9, 40, 130, 300]),
          spread=st.booleans())
    def add_many(self, seed, n, spread):
        rng = random.Random(seed)
        pairs = self._free_pairs(rng, n)
        one = rng.randrange(NFRAMES)
        frames = [rng.randrange(NFRAMES) if spread else one for _ in pairs]
        self.r.add_many(*arr(frames, [p[0] for p in pairs], [p[1] for p in pairs]))
        for m, p in zip(frames, pairs):
            self._added(m, [p])
        self._after_add(set(frames))

    @rule(mfn=st.integers(0, NFRAMES - 1), seed=st.integers(0, 2**32 - 1))
    def remove(self, mfn, seed):
        if not self.model[mfn]:
            return
        p = random.Random(seed).choice(sorted(self.model[mfn]))
        self.r.remove(mfn, *p)
        self._removed(mfn, [p])
        self._after_remove([mfn])

    @rule(seed=st.integers(0, 2**32 - 1), frac=st.sampled_from([0.05, 0.5, 0.8, 0.95, 1.0]),
          spread=st.booleans())
    def remove_many(self, seed, frac, spread):
        rng = random.Random(seed)
        mfn = self._busy_frame(rng)
        pool = sorted(self.where.items()) if spread else [(p, mfn) for p in sorted(self.model[mfn])]
        chosen = rng.sample(pool, int(len(pool) * frac))
        self.r.remove_many(*arr([m for _, m in chosen], [p[0] for p, _ in chosen],
                                [p[1] for p, _ in chosen]))
        for p, m in chosen:
            self._removed(m, [p])
        self._after_remove({m for _, m in chosen})

    @rule(mfn=st.integers(0, NFRAMES - 1), seed=st.integers(0, 2**32 - 1))
    def remove_absent(self, mfn, seed):
        rng = random.Random(seed)
        p = rng.choice(ALL_PAIRS)
        if p in self.model[mfn]:
            return
        before = self.r.count(mfn)
        with pytest.raises(KeyError):
            self.r.remove(mfn, *p)
        assert self.r.count(mfn) == before

    @rule(seed=st.integers(0, 2**32 - 1))
    def contains(self, seed):
        rng = random.Random(seed)
        for _ in range(20):
            p, m = rng.choice(ALL_PAIRS), rng.randrange(NFRAMES)
            assert self.r.contains(m, *p) == (self.where.get(p) == m)

    @rule(src=st.integers(0, NFRAMES - 1), dst=st.integers(0, NFRAMES - 1))
    def move_all(self, src, dst):
        if src == dst:
            return
        moved = set(self.model[src])
        ds, gs = self.r.move_all(src, dst)
        assert set(zip(ds.tolist(), gs.tolist())) == moved and len(ds) == len(moved)
        self._removed(src, moved)
        self._added(dst, moved)
        self.hashed[src] = False  # the default walk releases src
        self._after_add([dst])

    @rule(seed=st.integers(0, 2**32 - 1), p_remove=st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    def walk_and_remove(self, seed, p_remove):
        rng = random.Random(seed)
        mfn = self._busy_frame(rng)
        rep = self.r.representation(mfn)
        seen = []
        for d, g in self.r.entries(mfn):
            seen.append((d, g))
            if rng.random() < p_remove:
                self.r.remove(mfn, d, g)  # convert=True, but the walk pins the form
                self._removed(mfn, [(d, g)])
            assert self.r.representation(mfn) == rep
        assert len(seen) == len(set(seen)) and set(seen) >= self.model[mfn]
        assert self.r.representation(mfn) == rep  # skipped, not deferred

    @rule(mfn=st.integers(0, NFRAMES - 1))
    def release_if_empty(self, mfn):
        if not self.model[mfn]:
            self.r.release(mfn)
            self.hashed[mfn] = False

    @invariant()
    def matches_model(self):
        for m in range(NFRAMES):
            got = walk(self.r, m)
            assert len(got) == len(set(got)) == self.r.count(m) == len(self.model[m])
            assert set(got) == self.model[m]
            assert self.r.representation(m) == self._expected_repr(m)
        check(self.r)


_machine_settings = settings(max_examples=40, stateful_step_count=40, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])


def _machine_test(policy):
    cls = type(f"RmapMachine_{policy}", (RmapMachine,), {"policy": policy})
    return _machine_settings(cls).TestCase


TestListMachine = _machine_test("list")
TestBucketsMachine = _machine_test("buckets")
TestIndexMachine = _machine_test("index")


# -- list and buckets: the node arena ----------------------------------------------
@pytest.mark.parametrize("policy", ["list", "buckets"])
def test_arena_recycles_slots_and_shrinks_when_empty(policy):
    from hvshare.hvcore.rmap.arena import _KEEP
    r = make(policy, nframes=8, ndom=4, npages=20_000)
    pairs = [(i % 4, i) for i in range(20_000)]
    for i, (d, g) in enumerate(pairs):
        r.add(i % 3, d, g)           # frame 0 and 1 go hash, all share one arena
    a = r._arena
    assert a.live == a.top == 20_000 and len(a.nxt) >= 20_000
    full = r.nbytes()
    for i, (d, g) in enumerate(pairs[:500]):
        r.remove(i % 3, d, g)
    check(r)
    for i, (d, g) in enumerate(pairs[:500]):
        r.add(i % 3, d, g)           # freed slots are handed out again
    assert a.top == 20_000 and a.live == 20_000 and not a.free
    check(r)
    for i, (d, g) in enumerate(pairs):
        r.remove(i % 3, d, g)
    assert a.live == a.top == 0 and len(a.nxt) <= _KEEP
    assert r.nbytes() < full - 10 * 20_000  # the arrays' memory went back
    r.add(5, 1, 7)
    assert walk(r, 5) == [(1, 7)]
    check(r)


@pytest.mark.parametrize("policy", ["list", "buckets"])
def test_walk_survives_arena_growth(policy):
    # The arena grows in place, so a walk started before an add elsewhere
    # that regrows it carries on over the same arrays.
    r = make(policy)
    fill(r, 0, [(1, g) for g in range(40)])
    it = r.entries(0)
    first = [next(it) for _ in range(5)]
    fill(r, 1, [(2, g) for g in range(5000)])
    assert first + list(it) == walk(r, 0) and len(walk(r, 0)) == 40
    check(r)


# -- buckets: the 2012 series' conversions ----------------------------------------
def test_bucket_thresholds():
    assert (RMAP_HEAVY_SHARED_PAGE, RMAP_LIGHT_SHARED_PAGE) == (256, 64)


def _heavy(r, mfn=0, n=257):
    pairs = [(i % 4, i) for i in range(n)]
    fill(r, mfn, pairs)
    return pairs


def test_buckets_converts_on_the_257th_add():
    r = make("buckets")
    for i in range(256):
        r.add(0, i % 4, i)
        assert r.representation(0) == "list"
    assert r.count(0) == 256
    r.add(0, 0, 5000)  # the add that finds the count at 256
    assert r.representation(0) == "hash" and r.count(0) == 257
    assert r.contains(0, 0, 5000) and r.contains(0, 3, 255)
    check(r)


def test_buckets_converts_back_at_64_not_65():
    r = make("buckets")
    pairs = _heavy(r)
    for d, g in pairs[: 257 - 65]:
        r.remove(0, d, g)
        assert r.representation(0) == "hash"
    assert r.count(0) == 65 and r.representation(0) == "hash"
    r.remove(0, *pairs[257 - 65])
    assert r.count(0) == 64 and r.representation(0) == "list"
    assert set(walk(r, 0)) == set(pairs[257 - 64:])
    check(r)


def test_buckets_hysteresis():
    r = make("buckets")
    present, spare = _heavy(r), []

    def to(n):  # remove or re-add single entries until the count is n
        while r.count(0) > n:
            spare.append(present.pop())
            r.remove(0, *spare[-1])
        while r.count(0) < n:
            present.append(spare.pop())
            r.add(0, *present[-1])

    to(107)
    assert r.representation(0) == "hash"    # 257 -> 107: above 64, stays
    to(256)
    assert r.representation(0) == "hash"    # and back up: still a hash
    to(65)
    assert r.representation(0) == "hash"
    to(64)
    assert r.representation(0) == "list"
    for n in range(65, 257):                # 64 -> 256 as a list, never converting
        to(n)
        assert r.representation(0) == "list"
    to(65)
    assert r.representation(0) == "list"
    to(257)
    assert r.representation(0) == "hash"
    assert set(walk(r, 0)) == set(present)
    check(r)


def test_buckets_remove_without_convert_keeps_hash():
    r = make("buckets")
    pairs = _heavy(r)
    for d, g in pairs[:250]:
        r.remove(0, d, g, convert=False)
    assert r.count(0) == 7 and r.representation(0) == "hash"
    r.remove(0, *pairs[250])
    assert r.representation(0) == "list"
    check(r)


def test_buckets_no_conversion_during_a_walk():
    r = make("buckets")
    pairs = _heavy(r, n=300)
    it = r.entries(0)
    for n, (d, g) in enumerate(it, 1):
        r.remove(0, d, g)  # convert=True: would convert at 64, but the walk pins it
        assert r.representation(0) == "hash", n
    assert r.count(0) == 0 and r.representation(0) == "hash"  # skipped, not deferred
    r.add(0, *pairs[0])
    assert r.representation(0) == "hash"
    r.remove(0, *pairs[0])  # no walk now: converts
    assert r.representation(0) == "list"
    check(r)


def test_buckets_walk_pins_adds_too_and_ends_with_the_walk():
    r = make("buckets")
    pairs = _heavy(r, n=256)
    it = r.entries(0)
    next(it)
    r.add(0, 0, 5000)           # finds 256, but the walk pins the list
    r.add(1, 0, 5001)           # other frames are not pinned (and light anyway)
    assert r.representation(0) == "list" and r.count(0) == 257
    it.close()                  # walk over
    r.add(0, 0, 5002)
    assert r.representation(0) == "hash" and r.count(0) == 258
    # A walk left by ``break`` ends too: the next remove may convert.
    for d, g in pairs[:193]:
        r.remove(0, d, g)
    assert r.count(0) == 65 and r.representation(0) == "hash"
    for _ in r.entries(0):
        break
    r.remove(0, *pairs[193])
    assert r.count(0) == 64 and r.representation(0) == "list"
    check(r)


def test_buckets_refused_table_stays_list():
    calls = []
    allow = [False]

    def table_alloc():
        calls.append(1)
        return allow[0]

    r = make("buckets", table_alloc=table_alloc)
    pairs = _heavy(r, n=300)
    assert r.representation(0) == "list" and r.count(0) == 300
    assert len(calls) == 300 - 256  # asked at every add that found >= 256
    assert all(r.contains(0, d, g) for d, g in pairs)
    assert sorted(walk(r, 0)) == sorted(pairs)
    for d, g in pairs[:10]:
        r.remove(0, d, g)
    assert r.count(0) == 290 and not r.contains(0, *pairs[0])
    r.add(1, 0, 9999)  # light frames never ask
    assert len(calls) == 44
    allow[0] = True
    r.add(0, 0, 5000)
    assert r.representation(0) == "hash" and len(calls) == 45
    assert set(walk(r, 0)) == set(pairs[10:]) | {(0, 5000)}
    check(r)



def _arena_state(r):
    a = r._arena
    if r.name == "buckets":
        heads = {m: (r.heads(m), r.count(m)) for m in range(r.nframes)}
    else:
        heads = {m: ([r._head[m]], r.count(m)) for m in range(r.nframes)}
    return (heads, a.top, a.live, list(a.free), list(a.nxt[:a.top]), list(a.prv[:a.top]),
            list(a.dom[:a.top]), list(a.gfn[:a.top]))


@pytest.mark.parametrize("policy", ["buckets", "list"])
@pytest.mark.parametrize("seed", range(6))
def test_add_many_is_the_elementwise_loop_exactly(policy, seed):
    # Same nodes, links, heads, counts, free stack and table_alloc calls as
    # add() in order, across 256 -> hash conversions and refused tables.
    rng = np.random.default_rng(seed)
    calls = [[], []]

    def alloc(i):
        def table_alloc():
            calls[i].append(len(calls[i]))
            return len(calls[i]) % 3 != 1       # refuse every third
        return table_alloc
    kw = [{"table_alloc": alloc(i)} if policy == "buckets" else {} for i in (0, 1)]
    a, b = make(policy, 8, **kw[0]), make(policy, 8, **kw[1])
    used = set()
    for step in range(12):
        k = int(rng.choice([1, 2, 5, 64, 300]))
        m = rng.choice([0, 1, rng.integers(0, 8)], size=k) if step % 2 else rng.integers(0, 8, k)
        pairs = []
        while len(pairs) < k:
            p = (int(rng.integers(0, 4)), int(rng.integers(0, NPAGES)))
            if p not in used:
                used.add(p)
                pairs.append(p)
        d, g = arr([p[0] for p in pairs], [p[1] for p in pairs])
        a.add_many(np.asarray(m, np.int64), d, g)
        for mm, dd, gg in zip(np.asarray(m).tolist(), d.tolist(), g.tolist()):
            b.add(mm, dd, gg)
        if step % 3 == 2:       # free some slots, so the batch reuses them
            for mm in range(8):
                for dd, gg in walk(b, mm)[::3]:
                    a.remove(mm, dd, gg)
                    b.remove(mm, dd, gg)
                    used.discard((dd, gg))
        assert _arena_state(a) == _arena_state(b)
        assert calls[0] == calls[1]
    check(a)


def test_buckets_add_many_refused_key_keeps_the_prefix():
    r = make("buckets")
    with pytest.raises(ValueError):
        r.add_many(*arr([0, 0, 1, 1], [0, 1, 0x8000, 2], [1, 2, 3, 4]))
    assert sorted(walk(r, 0)) == [(0, 1), (1, 2)] and r.count(1) == 0
    check(r)


def _logical_state(r, nframes):
    """What the contract fixes: each frame's walk (chain order), form, count."""
    return [(walk(r, m), r.representation(m), r.count(m)) for m in range(nframes)]


@pytest.mark.parametrize("seed", range(4))
def test_buckets_move_singles_is_remove_release_add(seed):
    # A batch of shares of one-entry frames into: one list frame that
    # converts mid-batch (a refused table, then one granted), a hashed
    # frame, a walked frame at 256 (pinned: no conversion) and distinct
    # light frames; the same as the element-wise loop, in order.
    rng = np.random.default_rng(seed)
    nframes, calls = 600, [[], []]

    def alloc(i):
        def table_alloc():
            calls[i].append(1)
            return len(calls[i]) != 1           # refuse the first
        return table_alloc
    a, b = (make("buckets", nframes, table_alloc=alloc(i)) for i in (0, 1))
    gfn = iter(range(1, 10**6))
    for r in (a, b):
        fill(r, 0, [(1, g) for g in range(10_000, 10_250)])    # converts in the batch
        fill(r, 1, [(1, g) for g in range(20_000, 20_300)])    # hashed
        fill(r, 2, [(1, g) for g in range(30_000, 30_256)])    # at 256, walked
    srcs = np.arange(100, 100 + 200)
    pairs = [(int(rng.integers(0, 4)), next(gfn)) for _ in srcs]
    d, g = arr([p[0] for p in pairs], [p[1] for p in pairs])
    dsts = rng.choice([0, 0, 0, 1, 2, 3, 4, 5], size=len(srcs))
    dsts[-40:] = np.arange(400, 440)                           # distinct light frames
    for r in (a, b):
        r.add_many(srcs, d, g)
    walks = [iter(a.entries(2)), iter(b.entries(2))]
    for w in walks:
        next(w)
    a.move_singles(srcs, dsts, d, g)
    for s, t, dd, gg in zip(srcs.tolist(), dsts.tolist(), d.tolist(), g.tolist()):
        b.remove(s, dd, gg)
        b.release(s)
        b.add(t, dd, gg)
    assert a.representation(0) == "hash" and a.representation(2) == "list"
    assert _logical_state(a, nframes) == _logical_state(b, nframes)
    assert calls[0] == calls[1] and len(calls[0]) >= 2
    for w in walks:
        w.close()
    check(a)


def test_buckets_move_singles_falls_back_for_other_sources():
    # A one-entry source that is still a hash (emptied without conversion)
    # holds no list head: the batch is done entry by entry, same result.
    r = make("buckets", 16)
    pairs = _heavy(r, 3)
    for d, g in pairs[1:]:
        r.remove(3, d, g, convert=False)
    assert r.count(3) == 1 and r.representation(3) == "hash"
    r.add(4, 1, 7)
    r.move_singles(*arr([3, 4], [5, 5], [pairs[0][0], 1], [pairs[0][1], 7]))
    assert walk(r, 5) == [(1, 7), pairs[0]]
    assert r.count(3) == r.count(4) == 0 and r.representation(3) == "list"
    check(r)


def test_buckets_release_of_a_hashed_frame_and_reuse_of_its_mfn():
    r = make("buckets", 8)
    pairs = _heavy(r, 0, n=300)
    _heavy(r, 1, n=300)                     # two tables in use
    for d, g in pairs:
        r.remove(0, d, g, convert=False)    # the walk-style teardown keeps the table
    assert r.count(0) == 0 and r.representation(0) == "hash"
    r.release(0)
    assert r.representation(0) == "list" and walk(r, 0) == []
    check(r)
    r.add(0, 3, 3)                          # the mfn again: a fresh one-entry list
    assert walk(r, 0) == [(3, 3)] and r.representation(0) == "list"
    # A frame released with entries left gives its nodes back too.
    live = r._arena.live
    r.release_many(np.array([0, 1, 2, 1]))
    assert r._arena.live == live - 301 and r.count(1) == 0 and r.representation(1) == "list"
    check(r)
    _heavy(r, 5, n=257)                     # a released table is handed out again
    assert r.representation(5) == "hash"
    check(r)


def test_buckets_table_pool_gives_memory_back():
    r = make("buckets", 64, npages=40_000)
    for m in range(40):
        fill(r, m, [(0, m * 1000 + i) for i in range(257)])
    full = r.nbytes()
    for m in range(40):
        for i in range(257):
            r.remove(m, 0, m * 1000 + i)
    assert all(r.representation(m) == "list" for m in range(40))
    assert r.nbytes() < full - 20 * 1024    # 40 tables of 1 KiB: 16 kept
    check(r)
    fill(r, 7, [(1, i) for i in range(257)])
    assert r.representation(7) == "hash"
    check(r)


def test_buckets_add_many_into_a_walked_frame_does_not_convert():
    r = make("buckets")
    fill(r, 0, [(0, g) for g in range(250)])
    it = r.entries(0)
    next(it)
    r.add_many(*arr([0] * 20 + [1], [1] * 21, list(range(20)) + [99]))
    assert r.count(0) == 270 and r.representation(0) == "list"
    it.close()
    r.add_many(*arr([1, 0], [2, 2], [5, 6]))  # the walk is over: the add converts
    assert r.representation(0) == "hash" and r.count(0) == 271
    check(r)


# -- index: O(1) structure, vectorised batches -----------------------------------
def _big_frame(n=150_000):
    r = make_rmap("index", 4)
    r.domain_created(1, n)
    r.domain_created(2, n)
    d = np.where(np.arange(n) % 3 == 0, 2, 1)
    g = np.arange(n)
    r.add_many(np.zeros(n, np.int64), d, g)
    r.add_many(np.ones(100, np.int64), np.full(100, 3), np.arange(100))  # lazily indexed domain
    return r, d, g


@pytest.mark.parametrize("pick", ["random", "run", "all"])
def test_index_batch_remove_100k(pick):
    n = 150_000
    r, d, g = _big_frame(n)
    rng = np.random.default_rng(7)
    sel = {"random": rng.choice(n, 100_000, replace=False),
           "run": np.arange(20_000, 120_000),        # one run of 100,000 in list order
           "all": rng.permutation(n)}[pick]
    r.remove_many(np.zeros(sel.shape[0], np.int64), d[sel], g[sel])
    keep = np.ones(n, bool)
    keep[sel] = False
    expect = set(zip(d[keep].tolist(), g[keep].tolist()))
    got = walk(r, 0)
    assert r.count(0) == len(expect) == len(got) and set(got) == expect
    assert r.count(1) == 100
    assert not r.contains(0, int(d[sel[0]]), int(g[sel[0]]))
    r.check()
    # The freed nodes are reused before the arena grows again.
    before = r.nbytes()
    r.add_many(np.full(sel.shape[0], 2, np.int64), d[sel], g[sel])
    assert r.nbytes() <= before + 8 * sel.shape[0] // 10 and r.count(2) == sel.shape[0]
    r.check()


def test_index_batch_remove_across_frames():
    r = make_rmap("index", 64)
    r.domain_created(0, 120_000)
    rng = np.random.default_rng(3)
    m = rng.integers(0, 64, 120_000)
    g = rng.permutation(120_000)
    r.add_many(m, np.zeros_like(g), g)
    sel = rng.choice(120_000, 100_000, replace=False)
    r.remove_many(m[sel], np.zeros(sel.shape[0], np.int64), g[sel])
    keep = np.ones(120_000, bool)
    keep[sel] = False
    for f in range(64):
        assert set(walk(r, f)) == {(0, x) for x in g[keep & (m == f)].tolist()}
    r.check()


def test_index_move_all_long_and_short():
    r = make_rmap("index", 8)
    r.domain_created(0, 300_000)
    r.add_many(np.zeros(200_000, np.int64), np.zeros(200_000, np.int64), np.arange(200_000))
    r.add_many(np.ones(5, np.int64), np.zeros(5, np.int64), np.arange(200_000, 200_005))
    ds, gs = r.move_all(0, 1)              # scans the arena
    assert np.array_equal(np.sort(gs), np.arange(200_000)) and (ds == 0).all()
    ds, gs = r.move_all(1, 2)              # now 200,005 entries
    assert r.count(2) == 200_005 and r.count(0) == r.count(1) == 0
    r.add(3, 0, 250_000)
    ds, gs = r.move_all(3, 2)              # short list: walked
    assert gs.tolist() == [250_000] and r.count(2) == 200_006
    r.check()


def test_index_extreme_keys_and_domain_lifecycle():
    r = make_rmap("index", 4)
    top_d, top_g = 0x7FFF, 2**31 - 1
    r.add(0, top_d, top_g)                 # no domain_created: the sparse index
    r.add(0, top_d, 7)                     # lazily grown dense index
    assert r.contains(0, top_d, top_g) and r.contains(0, top_d, 7)
    assert sorted(walk(r, 0)) == [(top_d, 7), (top_d, top_g)]
    many = np.array([top_g - i for i in range(1, 20)], np.int64)
    r.add_many(np.ones(19, np.int64), np.full(19, top_d), many)
    assert r.count(1) == 19 and r.contains(1, top_d, top_g - 5)
    r.remove_many(np.ones(10, np.int64), np.full(10, top_d), many[:10])
    assert r.count(1) == 9 and not r.contains(1, top_d, int(many[0]))
    r.check()
    with pytest.raises(ValueError):
        r.add(0, 0x8000, 1)
    with pytest.raises(ValueError):
        r.add(0, 1, 2**31)
    with pytest.raises(ValueError):
        r.add(4, 1, 1)
    with pytest.raises(ValueError):
        r.add(2, top_d, 7)                 # already in frame 0: one frame per gfn
    with pytest.raises(KeyError):
        r.remove(0, 5, -1)
    # A destroyed domain's index is freed; any leftovers leave the rmaps.
    r.domain_created(5, 100_000)
    r.add_many(np.full(50, 2, np.int64), np.full(50, 5), np.arange(50))
    before = r.nbytes()
    r.remove_many(np.full(40, 2, np.int64), np.full(40, 5), np.arange(40))
    r.domain_destroyed(5)
    assert r.nbytes() <= before - 4 * 100_000 and r.count(2) == 0
    r.check()


def test_index_batches_are_all_or_nothing():
    r = make_rmap("index", 4)
    r.domain_created(0, 1000)
    r.add_many(np.zeros(100, np.int64), np.zeros(100, np.int64), np.arange(100))
    with pytest.raises(KeyError):           # last pair absent
        r.remove_many(np.zeros(50, np.int64), np.zeros(50, np.int64), np.arange(51)[1:] + 50)
    with pytest.raises(KeyError):           # a pair twice
        r.remove_many(np.zeros(20, np.int64), np.zeros(20, np.int64), np.arange(20) % 10)
    with pytest.raises(ValueError):         # a pair already present
        r.add_many(np.ones(20, np.int64), np.zeros(20, np.int64), np.arange(90, 110))
    with pytest.raises(ValueError):         # a pair twice
        r.add_many(np.ones(20, np.int64), np.zeros(20, np.int64), 200 + np.arange(20) % 10)
    assert r.count(0) == 100 and r.count(1) == 0
    assert set(walk(r, 0)) == {(0, g) for g in range(100)}
    r.check()


def test_index_at_most_32_bytes_per_entry_at_262144():
    n = 262_144
    r = make_rmap("index", 4)
    r.domain_created(0, n // 2)
    r.domain_created(1, n // 2)
    r.add_many(np.zeros(n, np.int64), np.arange(n) % 2, np.arange(n) // 2)
    assert r.count(0) == n
    assert r.nbytes() / n <= 32


def _ref_order_ops(seed: int, nframes: int = 12, ndom: int = 3, npages: int = 3000, steps: int = 60):
    """Random add_many / remove_many batches of every shape the index
    vectorises: one frame, distinct frames, a few interleaved frames, one
    or several domains; removals of whole frames, runs in list order or
    against it, and random picks. Yields (op, mfns, domids, gfns)."""
    rng = random.Random(seed)
    present: dict[tuple[int, int], int] = {}
    order: dict[int, list] = {m: [] for m in range(nframes)}   # list order, head first
    free = [(d, g) for d in range(ndom) for g in range(npages)]
    rng.shuffle(free)
    for _ in range(steps):
        if rng.random() < 0.55 and len(free) > 600:
            k = rng.choice([8, 9, 30, 64, 200, 513])
            if rng.random() < 0.4:                   # one domain, gfns in order
                d = free[-1][0]
                pairs = sorted(p for p in free if p[0] == d)[:k]
                k = len(pairs)
                taken = set(pairs)
                free[:] = [p for p in free if p not in taken]
            else:
                pairs = [free.pop() for _ in range(k)]
            shape = rng.choice(["one", "distinct", "few"])
            if shape == "one":
                ms = [rng.randrange(nframes)] * k
            elif shape == "distinct" and k <= nframes:
                ms = rng.sample(range(nframes), k)
            else:
                ms = [rng.randrange(min(nframes, 3 if shape == "few" else nframes)) for _ in pairs]
            for m, p in zip(ms, pairs):
                present[p] = m
                order[m].insert(0, p)
            yield "add", ms, [p[0] for p in pairs], [p[1] for p in pairs]
        elif present:
            busy = [m for m in order if order[m]]
            m = rng.choice(busy)
            how = rng.choice(["whole", "whole-rev", "run", "run-rev", "random", "spread"])
            lst = order[m]
            if how.startswith("whole"):
                pick = [(m, p) for p in lst]
            elif how.startswith("run"):
                a = rng.randrange(len(lst))
                pick = [(m, p) for p in lst[a:a + rng.choice([8, 40, 300, 1000])]]
            elif how == "random":
                pick = [(m, p) for p in rng.sample(lst, max(1, len(lst) // 2))]
            else:
                items = [(f, p) for p, f in present.items()]
                pick = rng.sample(items, max(1, len(items) // 3))
            if how.endswith("rev"):
                pick.reverse()
            for f, p in pick:
                del present[p]
                order[f].remove(p)
                free.append(p)
            yield "remove", [f for f, _ in pick], [p[0] for _, p in pick], [p[1] for _, p in pick]


@pytest.mark.parametrize("seed", range(6))
def test_index_batches_match_the_elementwise_loop_exactly(seed):
    # The list policy runs the batch forms as element-wise loops: the index
    # must leave every frame's list in exactly the same order.
    nframes, ndom, npages = 12, 3, 3000
    ref, r = make("list", nframes, ndom, npages), make("index", nframes, ndom, npages)
    for op, ms, ds, gs in _ref_order_ops(seed, nframes, ndom, npages):
        for x in (ref, r):
            getattr(x, op + "_many")(*arr(ms, ds, gs))
        for m in range(nframes):
            assert walk(r, m) == walk(ref, m) and r.count(m) == ref.count(m), (op, m)
        r.check()


@pytest.mark.parametrize("direction", [1, -1])
def test_index_teardown_chunks(direction):
    # A dying domain's gfns leave one heavily shared frame in chunks, in gfn
    # order: runs that are contiguous in the batch, either way round.
    n, k = 100_000, 512
    r = make_rmap("index", 4)
    r.domain_created(0, 1)
    r.domain_created(1, n)
    r.add(0, 0, 0)
    r.add_many(np.zeros(n, np.int64), np.ones(n, np.int64), np.arange(n))
    gfns = np.arange(n)[::direction]
    gone = 117 * k + 100
    for s in range(0, gone, k):
        g = gfns[s:min(s + k, gone)]
        r.remove_many(np.zeros(g.shape[0], np.int64), np.ones(g.shape[0], np.int64), g)
    left = np.sort(gfns[gone:])[::-1].tolist()         # head insertion: newest first
    assert walk(r, 0) == [(1, x) for x in left] + [(0, 0)]
    r.check()


def test_index_remove_many_scratch_does_not_grow_with_the_frame():
    # A teardown chunk of 512 entries from a 1,000,000-entry frame allocates
    # O(512) scratch, not O(arena) (the arena here is ~18 MB).
    import tracemalloc
    n = 1_000_000
    r = make_rmap("index", 4)
    r.domain_created(1, n)
    r.add_many(np.zeros(n, np.int64), np.ones(n, np.int64), np.arange(n))
    m, d = np.zeros(512, np.int64), np.ones(512, np.int64)
    r.remove_many(m, d, np.arange(512))            # warm up (free stack grows once)
    tracemalloc.start()
    try:
        for s in range(512, 512 * 9, 512):
            r.remove_many(m, d, np.arange(s, s + 512))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200_000, peak
    assert r.count(0) == n - 512 * 9
    r.check()


def test_index_general_path_all_or_nothing():
    # Batches over several domains, or past a domain's index, take the
    # general path: the same checks, before anything changes.
    r = make_rmap("index", 6)
    r.domain_created(0, 100)
    r.domain_created(1, 100)
    m, d, g = arr([0] * 40, [i % 2 for i in range(40)], [i // 2 for i in range(40)])
    r.add_many(m, d, g)
    before = {f: walk(r, f) for f in range(6)}
    with pytest.raises(ValueError):             # a pair twice, two domains
        r.add_many(*arr([1] * 10, [0, 1] * 5, [50, 50, 51, 51, 52, 52, 53, 53, 50, 54]))
    with pytest.raises(ValueError):             # one already present
        r.add_many(*arr([1] * 10, [0, 1] * 5, [60, 60, 61, 61, 62, 62, 63, 63, 64, 19]))
    with pytest.raises(KeyError):               # one absent (past the index, lazily indexed)
        r.remove_many(*arr([0] * 10, [0, 1] * 5, [0, 0, 1, 1, 2, 2, 3, 3, 4, 5000]))
    with pytest.raises(KeyError):               # one in another frame
        r.remove_many(*arr([0] * 9 + [2], [0, 1] * 5, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]))
    with pytest.raises(KeyError):               # a pair twice
        r.remove_many(*arr([0] * 10, [0, 1] * 5, [0, 0, 1, 1, 2, 2, 3, 3, 4, 0]))
    assert {f: walk(r, f) for f in range(6)} == before
    r.check()
    r.add_many(*arr([1] * 10, [0, 1] * 5, [70, 70, 71, 71, 72, 72, 73, 73, 5000, 5001]))
    r.remove_many(*arr([0] * 10 + [1] * 10, [0, 1] * 10,
                       [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 70, 70, 71, 71, 72, 72, 73, 73, 5000, 5001]))
    assert r.count(0) == 30 and r.count(1) == 0
    r.check()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("heavy", [False, True])
def test_move_singles_is_remove_release_add(policy, heavy):
    # The share of private pages: one-entry frames moved into others, across
    # the buckets' 256 -> hash conversion when ``heavy``.
    def build():
        r = make(policy, 1200)
        r.add_many(np.zeros(250 if heavy else 3, np.int64), np.zeros(250 if heavy else 3, np.int64),
                   np.arange(250 if heavy else 3))
        r.add_many(np.arange(10, 1010), np.ones(1000, np.int64), np.arange(1000))
        return r
    a, b = build(), build()
    src = np.arange(10, 1010)
    dst = np.where(np.arange(1000) % 3 == 0, 0, 1 + np.arange(1000) % 5)
    d, g = np.ones(1000, np.int64), np.arange(1000)
    a.move_singles(src, dst, d, g)
    b.remove_many(src, d, g)
    b.release_many(src)
    b.add_many(dst, d, g)
    for m in range(1200):
        assert sorted(walk(a, m)) == sorted(walk(b, m)) and a.count(m) == b.count(m)
        assert a.representation(m) == b.representation(m)
    check(a)


@pytest.mark.parametrize("direction", [1, -1])
def test_index_run_removal_checks_every_pair_first(direction):
    # A batch that looks like a teardown run (one domain, one frame, in list
    # order) but holds an absent pair, a pair of another frame or a pair
    # twice raises and changes nothing; a true run leaves the rest in order.
    r = make_rmap("index", 3)
    r.domain_created(1, 1000)
    r.add_many(np.zeros(600, np.int64), np.ones(600, np.int64), np.arange(600))
    r.add_many(np.ones(10, np.int64), np.ones(10, np.int64), np.arange(600, 610))
    before = {f: walk(r, f) for f in range(3)}
    run = np.arange(100, 200)[::direction]
    for g in (np.concatenate([run[:-1], [700]]),        # absent
              np.concatenate([run[:-1], [605]]),        # in frame 1
              np.concatenate([run[:-1], run[:1]])):     # a pair twice
        with pytest.raises(KeyError):
            r.remove_many(np.zeros(g.shape[0], np.int64), np.ones(g.shape[0], np.int64), g)
        assert {f: walk(r, f) for f in range(3)} == before
        r.check()
    r.remove_many(np.zeros(100, np.int64), np.ones(100, np.int64), run)
    assert walk(r, 0) == [(1, x) for x in range(599, -1, -1) if not 100 <= x < 200]
    r.check()


def test_buckets_add_many_during_a_walk_does_not_convert():
    r = make("buckets")
    _heavy(r, n=250)
    it = r.entries(0)
    next(it)
    r.add_many(*arr([0] * 20, [1] * 20, range(5000, 5020)))     # crosses 256, pinned
    assert r.representation(0) == "list" and r.count(0) == 270
    it.close()
    r.add_many(*arr([0, 1], [1, 1], [6000, 6001]))               # the walk is over
    assert r.representation(0) == "hash" and r.count(0) == 271
    check(r)


# -- the audit's bulk views ----------------------------------------------------
def _bulk_equals_walks(r) -> None:
    m, d, g = r.all_entries()
    assert m.dtype == d.dtype == g.dtype == np.int64
    got = sorted(zip(m.tolist(), d.tolist(), g.tolist()))
    want = sorted((mfn, dd, gg) for mfn in range(r.nframes) for dd, gg in r.entries(mfn))
    assert got == want
    frames = np.arange(r.nframes)
    assert r.counts_of(frames).tolist() == [r.count(x) for x in range(r.nframes)]
    assert r.counts_of(frames).dtype == np.int64


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seed", range(4))
def test_all_entries_is_every_frames_walk(policy, seed):
    # Random adds and removes, with frames crossing 256 up and 64 down (the
    # buckets' list <-> hash conversions), single and batched.
    rng = random.Random(seed)
    r = make(policy, nframes=6, ndom=3, npages=2_000)
    present: dict[tuple[int, int], int] = {}
    reps = set()
    free = [(d, g) for d in range(3) for g in range(2_000)]
    rng.shuffle(free)
    _bulk_equals_walks(r)
    for step in range(12):
        grow = step % 4 != 3
        if grow:
            k = rng.randrange(50, 400)
            batch, free = free[:k], free[k:]
            ms = [rng.choice([0, 0, 1, 2, 3, 5]) for _ in batch]
            if step % 2:
                r.add_many(*arr(ms, [p[0] for p in batch], [p[1] for p in batch]))
            else:
                for mm, (d, g) in zip(ms, batch):
                    r.add(mm, d, g)
            present.update(zip(batch, ms))
        else:
            gone = rng.sample(sorted(present), len(present) * 3 // 4)
            for p in gone:
                r.remove(present.pop(p), *p)
                free.append(p)
        check(r)
        _bulk_equals_walks(r)
        reps |= {r.representation(x) for x in range(6)}
    if policy == "buckets":
        assert reps == {"list", "hash"}      # converted both ways
    for mfn in range(6):
        for d, g in list(r.entries(mfn)):
            r.remove(mfn, d, g)
        r.release(mfn)
    _bulk_equals_walks(r)
    assert r.all_entries()[0].shape == (0,)


@pytest.mark.parametrize("policy", ["list", "buckets"])
def test_all_entries_follows_a_damaged_walk(policy):
    # A cut link, a cycle, a link into a free slot: all_entries gives what
    # the walks give, so the audit sees the walk differ from the count.
    r = make(policy, nframes=4, ndom=2, npages=1_000)
    for g in range(300):
        r.add(g % 3, g % 2, g)
    r.remove(0, 0, 0)                    # one free slot
    _bulk_equals_walks(r)
    a = r._arena
    nodes = [n for n in range(a.top) if n not in set(a.free.tolist())]
    a.nxt[nodes[10]] = -1                # cut a chain short
    _bulk_equals_walks(r)
    a.nxt[nodes[20]] = a.free[0]         # into a free slot (its stale link)
    _bulk_equals_walks(r)
    a.nxt[nodes[20]] = nodes[20]         # a cycle: the walk is cut at top + 1 nodes
    m, _, _ = r.all_entries()
    assert len(m) > a.top
    m, _, _ = r.all_entries()
    assert len(m) != sum(r.count(x) for x in range(4))


def test_index_arena_grows_inside_its_reservation_without_losing_a_node(monkeypatch):
    """A big index arena lives in reserved address space: growing takes a
    longer view of it (no copy), outgrowing it copies into a larger one;
    every invariant holds across both, and the memory figure is the view's."""
    import random
    import hvshare.hvcore.rmap.index as ix
    monkeypatch.setattr(ix, "_RESERVE_FROM", 64)
    monkeypatch.setattr(ix, "_RESERVE_MIN_ROWS", 256)
    monkeypatch.setattr(ix, "_RESERVE_FACTOR", 2)
    r = ix.IndexRmap(4096)
    r.domain_created(1, 5000)
    rng = random.Random(1)
    live, reservations = set(), set()
    for step in range(3000):
        g = rng.randrange(5000)
        if (1, g) in live:
            r.remove(g % 4096, 1, g)
            live.discard((1, g))
        else:
            r.add(g % 4096, 1, g)
            live.add((1, g))
        if r._reserved is not None:
            reservations.add(id(r._reserved[0]))
            assert np.shares_memory(r._arena, r._reserved[0])
        if step % 250 == 0:
            r.check()
    r.check()
    assert len(reservations) >= 2          # grew within one, then into a larger one
    assert sorted((d, g) for _, d, g in zip(*r.all_entries())) == sorted(live)
    assert r._arena.nbytes == 16 * (r._cap + 1)


@pytest.mark.parametrize("policy", ["list", "buckets", "index"])
def test_reserved_nodes_are_there_at_once_and_kept_when_the_rmap_empties(policy):
    from hvshare.hvcore.rmap import make_rmap
    r = make_rmap(policy, 1024)
    r.domain_created(1, 20_000)

    def room():
        return len(r._arena.nxt) if policy != "index" else r._cap
    r.reserve_nodes(10_000)
    assert room() >= 10_000
    for g in range(5000):
        r.add(g % 1024, 1, g)
    assert room() >= 10_000
    for g in range(5000):
        r.remove(g % 1024, 1, g)
    assert room() >= 10_000 and not any(r.counts_of(np.arange(1024)))
    r.check()
