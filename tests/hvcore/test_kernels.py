"""The compiled kernels against their Python references, the rmaps' compiled
batch removal against removal one by one, and the processes that must not
import numba."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hvshare.hvcore import kernels as K
from hvshare.hvcore.rmap import make_rmap

REF = K.reference()
JIT = K.compiled()
B = K.HASH_BUCKETS


def arena(seed: int, nodes: int, nchains: int):
    """Random disjoint doubly linked chains over ``nodes`` slots, some slots
    left in no chain: (nxt, prv, dom, gfn, heads)."""
    rng = np.random.default_rng(seed)
    nxt = np.full(nodes, -1, np.int32)
    prv = np.full(nodes, -1, np.int32)
    dom = rng.integers(0, 4, nodes).astype(np.uint16)
    gfn = rng.integers(0, 50, nodes).astype(np.int32)
    perm = rng.permutation(nodes)
    used = perm[: rng.integers(0, nodes + 1)]
    cuts = np.sort(rng.integers(0, len(used) + 1, max(nchains - 1, 0)))
    heads = []
    for part in np.split(used, cuts):
        h = -1
        for n in part.tolist():
            nxt[n], prv[n] = h, -1
            if h >= 0:
                prv[h] = n
            h = n
        heads.append(h)
    return nxt, prv, dom, gfn, np.array(heads, np.int64)


def copies(*arrays):
    return [a.copy() for a in arrays]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 200), st.integers(1, 8))
def test_chain_find_and_walk_chains_match_the_reference(seed, nodes, nchains):
    nxt, prv, dom, gfn, heads = arena(seed, nodes, nchains)
    rng = np.random.default_rng(seed)
    for _ in range(10):
        h, d, g = int(rng.choice(heads)), int(rng.integers(0, 4)), int(rng.integers(0, 50))
        assert JIT["chain_find"](nxt, gfn, dom, h, d, g) == REF["chain_find"](nxt, gfn, dom, h, d, g)
    for a, b in zip(JIT["walk_chains"](nxt, heads, nodes), REF["walk_chains"](nxt, heads, nodes)):
        assert (a == b).all()
    # a damaged arena: random links, cycles, links past the end
    bad = rng.integers(-1, nodes + 3, nodes).astype(np.int32)
    heads = rng.integers(-1, nodes, nchains).astype(np.int64)
    for a, b in zip(JIT["walk_chains"](bad, heads, nodes), REF["walk_chains"](bad, heads, nodes)):
        assert (a == b).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 300))
def test_conversions_match_the_reference(seed, nodes):
    nxt, prv, dom, gfn, heads = arena(seed, nodes, 1)
    head = np.array([-1, heads[0]], np.int32)
    pool = np.full(3 * B, -1, np.int32)
    out = []
    for fn in (JIT, REF):
        h, p, x, v = copies(head, pool, nxt, prv)
        fn["to_hash"](h, p, x, v, dom, gfn, 1, 2)
        hashed = copies(h, p, x, v)
        t = fn["to_list"](h, p, x, v, 1)
        out.append((hashed, (h, x, v), t))
    (h1, l1, t1), (h2, l2, t2) = out
    assert t1 == t2 == 2
    for a, b in zip(h1 + list(l1), h2 + list(l2)):
        assert (a == b).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["list", "buckets"]),
       st.integers(1, 700), st.integers(1, 3))
def test_batch_removal_matches_one_by_one(seed, policy, n, nframes):
    """Removals of random entries of random frames, some of them hashed and
    converting back mid-batch, one of them maybe missing: the compiled batch
    leaves exactly the state (and the error) removal one by one leaves."""
    rng = np.random.default_rng(seed)
    m = rng.integers(0, nframes, n)
    d = rng.integers(0, 3, n)
    g = rng.permutation(n)
    rs = [make_rmap(policy, nframes) for _ in range(2)]
    for r in rs:
        r.add_many(m, d, g)
    pick = rng.permutation(n)[: rng.integers(0, n + 1)]
    rm, rd, rg = m[pick], d[pick], g[pick]
    if len(pick) and rng.random() < 0.3:            # a pair in no rmap
        at = int(rng.integers(0, len(pick)))
        rg = rg.copy()
        rg[at] = n + 5
    errors = []
    try:
        rs[0].remove_many(rm, rd, rg)
    except KeyError as e:
        errors.append(e.args)
    try:
        for mm, dd, gg in zip(rm.tolist(), rd.tolist(), rg.tolist()):
            rs[1].remove(mm, dd, gg)
    except KeyError as e:
        errors.append(e.args)
    assert len(errors) in (0, 2) and (not errors or errors[0] == errors[1])
    for r in rs:
        r.check()
    for mfn in range(nframes):
        assert list(rs[0].entries(mfn)) == list(rs[1].entries(mfn))
        assert rs[0].representation(mfn) == rs[1].representation(mfn)
    a, b = rs[0]._arena, rs[1]._arena
    assert (a.top, a.live, a.free.tolist()) == (b.top, b.live, b.free.tolist())
    for x, y in zip(rs[0].all_entries(), rs[1].all_entries()):
        assert sorted(x.tolist()) == sorted(y.tolist())


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 64))
def test_copy_frames_matches_the_reference_and_a_numpy_copy(seed, frames):
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, (frames, 4096), dtype=np.uint8)
    k = int(rng.integers(1, frames // 2 + 1))
    rows = rng.permutation(frames)
    src, dst = rows[:k].astype(np.int64), rows[k:2 * k].astype(np.int64)
    want = pool.copy()
    want[dst] = pool[src]
    for kernel in (JIT["copy_frames"], REF["copy_frames"]):
        got = pool.copy()
        kernel(got.view(np.uint64), dst, src)
        assert np.array_equal(got, want)


def test_warm_stamps_the_cache():
    K.warm()
    assert K.cache_is_warm()


def test_toolstack_and_guests_do_not_import_numba():
    code = ("import sys, hvshare.tools.hvctl, hvshare.tools.cli, hvshare.tools.dedup, hvshare.tools.client, "
            "hvshare.guests.runtime, hvshare.hvcore.kernels as k\n"
            "k.cache_is_warm()\n"
            "assert 'numba' not in sys.modules, 'numba imported'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_batch_removal_of_every_node_of_a_big_arena():
    """The batch that frees the last node of an arena beyond its kept size
    shrinks it (no view of the arrays may pin them then)."""
    for policy in ("list", "buckets"):
        r = make_rmap(policy, 2)
        n = 10_000
        r.add_many(np.zeros(n, np.int64), np.ones(n, np.int64), np.arange(n))
        r.remove(0, 1, 5)
        r.remove_many(np.zeros(n - 1, np.int64), np.ones(n - 1, np.int64),
                      np.delete(np.arange(n), 5))
        assert r._arena.live == 0 and r.count(0) == 0
        r.check()


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(600, 3000), st.integers(0, 40), st.booleans())
def test_side_by_side_bucket_scans_match_one_by_one(seed, n, skip, missing):
    """The seed's teardown shape: runs of consecutive gfns of heavily shared
    (hashed) frames, scanned side by side in distinct buckets, with runs
    cut by a bucket met twice, by the frame nearing its conversion back to
    a list, by a list frame and by a pair in no rmap: the same state and
    the same error as removal one by one."""
    rng = np.random.default_rng(seed)
    frames = 3                       # 0 and 1 hashed, 2 a short list
    m = np.concatenate([np.zeros(n, np.int64), np.ones(n // 2, np.int64), np.full(5, 2)])
    g = np.concatenate([np.arange(n), np.arange(n // 2), np.arange(5)])
    d = np.concatenate([rng.integers(1, 3, n), np.ones(n // 2 + 5, np.int64)])
    rs = [make_rmap("buckets", frames) for _ in range(2)]
    for r in rs:
        r.add_many(m, d, g)
        assert r.representation(0) == r.representation(1) == "hash"
    # mostly in order (consecutive gfns: distinct buckets), a few out of it
    order = np.arange(len(m))
    swaps = rng.integers(0, len(m), (skip, 2))
    for a, b in swaps:
        order[[a, b]] = order[[b, a]]
    rm, rd, rg = m[order], d[order], g[order].copy()
    if missing:
        rg[int(rng.integers(0, len(rg)))] = 10 * n + 7
    errors = []
    for way in ("batch", "one by one"):
        r = rs[0] if way == "batch" else rs[1]
        try:
            if way == "batch":
                r.remove_many(rm, rd, rg)
            else:
                for x, y, z in zip(rm.tolist(), rd.tolist(), rg.tolist()):
                    r.remove(x, y, z)
        except KeyError as e:
            errors.append(e.args)
    assert len(errors) == (2 if missing else 0) and (not errors or errors[0] == errors[1])
    for r in rs:
        r.check()
    for mfn in range(frames):
        assert list(rs[0].entries(mfn)) == list(rs[1].entries(mfn))
        assert rs[0].representation(mfn) == rs[1].representation(mfn)
    a, b = rs[0]._arena, rs[1]._arena
    assert (a.top, a.live, a.free.tolist()) == (b.top, b.live, b.free.tolist())


def test_side_by_side_scans_compiled_and_reference_agree():
    """``chains_remove`` compiled and as Python, on a hashed frame's runs
    (the reference runs the same side-by-side scans)."""
    n = 1500
    out = []
    for fn in (JIT, REF):
        r = make_rmap("buckets", 1)
        r.add_many(np.zeros(n, np.int64), np.ones(n, np.int64), np.arange(n))
        nxt, prv, dom, gfn = r._arena.views()
        head, count, pool = r._headv.copy(), r._countv.copy(), r._pool().copy()
        nxt, prv = nxt.copy(), prv.copy()
        k = n - 10
        freed, tables = np.empty(k, np.int64), np.empty(k, np.int64)
        done = fn["chains_remove"](head, count, r._walkersv, pool, nxt, prv, dom, gfn,
                                   np.zeros(k, np.int64), np.ones(k, np.int64), np.arange(k), 64,
                                   freed, tables)
        out.append((tuple(done), head, count, pool, nxt, prv, freed[:k]))
    (d1, *a1), (d2, *a2) = out
    assert d1 == d2 == (n - 10, 1)
    for x, y in zip(a1, a2):
        assert (x == y).all()
