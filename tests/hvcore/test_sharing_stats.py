"""The sharing report (hvcore/sharing_stats.py) against a plain Python
reference that visits every gfn and frame one at a time, on random sharing
states of every rmap policy: zero and non-zero frames, sharing within one
domain and across domains, nominated frames of one reference, holes, and
a dying domain."""
from __future__ import annotations

import random
import time
from collections import Counter, defaultdict

import numpy as np
import pytest

from hvshare.hvcore import Hypervisor
from hvshare.hvcore.constants import DOMID_COW, PAGE_SIZE, RMAP_POLICIES, STEP_BUDGET_SECONDS
from hvshare.hvcore.p2m import RAM_SHARED
from hvshare.hvcore.sharing_stats import (PAGES_PER_MIB, SharingScan, bucket_range, degree_buckets,
                                  memory_counters, sharing_report)


def reference(hv) -> dict:
    """The report by definition, one gfn and one frame at a time."""
    refs = defaultdict(list)                     # mfn -> domids of its gfns
    for domid, d in hv.domains.items():
        for g in range(d.npages):
            if d.p2m.type[g] == RAM_SHARED:
                refs[int(d.p2m.mfn[g])].append(domid)
    out = Counter()
    hist = Counter()
    per_domain = Counter()
    for m in range(hv.pool.nframes):
        if hv.pool.owner[m] != DOMID_COW:
            continue
        doms = refs[m]
        k = len(doms)
        assert k == hv.pool.type_count[m]
        zero = not any(hv.pool.data[m].tobytes())
        out["frames"] += 1
        out["gfns"] += k
        out["zero_frames" if zero else "other_frames"] += 1
        out["zero_saved" if zero else "other_saved"] += k - 1
        b = 0
        while not bucket_range(b)[0] <= k <= bucket_range(b)[1]:
            b += 1
        hist[b] += 1
        distinct = len(set(doms))
        out["intra_saved"] += k - distinct
        out["inter_saved"] += distinct - 1
        if k > 1:
            out["intra_frames" if distinct == 1 else "inter_frames"] += 1
        for domid in doms:
            per_domain[domid] += (k - 1) / k
    out["max"] = max((len(v) for v in refs.values()), default=0)
    return {"totals": out, "hist": hist, "per_domain": per_domain}


def check(hv, r: dict) -> None:
    ref = reference(hv)
    t = ref["totals"]
    assert r["shared_frames"] == t["frames"] == hv.nr_shared_mfns
    assert r["shared_gfns"] == t["gfns"]
    assert r["saved_frames"] == t["gfns"] - t["frames"] == hv.nr_saved_mfns
    assert r["zero"] == {"frames": t["zero_frames"], "saved": t["zero_saved"]}
    assert r["other"] == {"frames": t["other_frames"], "saved": t["other_saved"]}
    assert r["intra"] == {"frames": t["intra_frames"], "saved": t["intra_saved"]}
    assert r["inter"] == {"frames": t["inter_frames"], "saved": t["inter_saved"]}
    assert r["unsettled"] == {"frames": 0, "saved": 0}
    assert r["intra"]["saved"] + r["inter"]["saved"] == r["saved_frames"]
    assert r["degree"]["max"] == t["max"]
    got = {i: h["frames"] for i, h in enumerate(r["degree"]["histogram"])}
    assert {b: n for b, n in got.items() if n} == dict(ref["hist"])
    assert len(got) == (max(ref["hist"]) + 1 if ref["hist"] else 0)
    doms = {d["domid"]: d for d in r["domains"]}
    assert set(doms) == set(hv.domains)
    for domid, d in hv.domains.items():
        assert doms[domid]["shr_pages"] == d.shr_pages
        assert doms[domid]["saved"] == pytest.approx(ref["per_domain"][domid], abs=2e-3)
    assert sum(d["saved"] for d in r["domains"]) == pytest.approx(r["saved_frames"], abs=0.01)


def random_state(hv, rng: random.Random) -> None:
    """Domains whose pages take a few values (0 among them); pages of equal
    value are shared in random groups, within and across domains."""
    doms = []
    for _ in range(rng.randint(1, 4)):
        n = rng.randint(1, 24)
        values = [rng.choice([0, 0, 1, 2, 3]) for _ in range(n)]
        content = np.repeat(np.asarray(values, np.uint8)[:, None], PAGE_SIZE, axis=1)
        if rng.random() < 0.3:
            content[:, rng.randrange(PAGE_SIZE)] = 0          # a nonzero page stays nonzero
        holes = [g for g in range(n) if rng.random() < 0.1]
        d = hv.create_domain(n, content=content, holes=holes or None)
        doms.append((d.domid, [g for g in range(n) if g not in holes], values))
    pages = [(domid, g, vals[g]) for domid, gs, vals in doms for g in gs]
    rng.shuffle(pages)
    for domid, g, _ in pages:
        if rng.random() < 0.8:
            hv.nominate(domid, g)
    sources: dict[int, tuple[int, int]] = {}
    for domid, g, v in pages:
        d = hv.domains[domid]
        if d.p2m.type[g] != RAM_SHARED or rng.random() < 0.2:
            continue
        # equal content only: the first shared page of each content and row
        key = hash(hv.read(domid, g))
        if key not in sources:
            sources[key] = (domid, g)
            continue
        sd, sg = sources[key]
        sh = int(hv.pool.handle[int(hv.domains[sd].p2m.mfn[sg])])
        ch = int(hv.pool.handle[int(d.p2m.mfn[g])])
        hv.share(sd, sg, sh, domid, g, ch)
    for domid, g, _ in pages:                  # some CoW faults afterwards
        if hv.domains[domid].p2m.type[g] == RAM_SHARED and rng.random() < 0.1:
            hv.unshare(domid, g)
    if len(doms) > 1 and rng.random() < 0.3:
        hv.kill(doms[0][0])                    # dying: its entries still count


@pytest.mark.parametrize("policy", RMAP_POLICIES)
@pytest.mark.parametrize("seed", range(12))
def test_report_matches_the_reference(policy, seed):
    rng = random.Random(seed * 7 + len(policy))
    with Hypervisor(160, rmap=policy) as hv:
        random_state(hv, rng)
        check(hv, sharing_report(hv))
        # in chunks of every size, the same answer
        scan = SharingScan(hv, first_chunk=16)
        while not scan.step(lambda: True, 1e-9):
            pass
        check(hv, scan.report())
        assert scan.report()["steps"] >= 160 // 16
        assert hv.audit_report() == []


def test_within_and_across_domains_as_barker_splits_them():
    with Hypervisor(64) as hv:
        a = hv.create_domain(4)
        b = hv.create_domain(2)
        for g in range(4):
            hv.nominate(a.domid, g)
        ha = [int(hv.pool.handle[a.p2m.mfn[g]]) for g in range(4)]
        for g in (1, 2):                        # three gfns of a on one frame
            hv.share(a.domid, 0, ha[0], a.domid, g, ha[g])
        hv.nominate(b.domid, 0)
        hb = int(hv.pool.handle[b.p2m.mfn[0]])
        hv.share(a.domid, 0, ha[0], b.domid, 0, hb)   # and one of b: degree 4
        r = sharing_report(hv)
        # a alone saves 2 (its three gfns on one frame); b's join saves 1
        assert r["intra"] == {"frames": 0, "saved": 2}
        assert r["inter"] == {"frames": 1, "saved": 1}
        assert r["zero"] == {"frames": 2, "saved": 3}          # frame 3 of a: degree 1
        assert r["degree"]["max"] == 4
        assert [(h["min"], h["max"], h["frames"]) for h in r["degree"]["histogram"]] == \
            [(1, 1, 1), (2, 2, 0), (3, 4, 1)]
        doms = {d["domid"]: d for d in r["domains"]}
        assert doms[a.domid]["saved"] == pytest.approx(2.25)
        assert doms[b.domid]["saved"] == pytest.approx(0.75)


def test_degree_buckets_are_log2():
    k = np.array([1, 2, 3, 4, 5, 8, 9, 16, 17, 2**31 - 1])
    assert degree_buckets(k).tolist() == [0, 1, 2, 2, 3, 3, 4, 4, 5, 31]
    for b in range(1, 32):
        lo, hi = bucket_range(b)
        assert degree_buckets(np.array([lo, hi])).tolist() == [b, b]


def test_memory_counters_are_xl_infos_whole_mib():
    with Hypervisor(2 * PAGES_PER_MIB + 8) as hv:
        a = hv.create_domain(PAGES_PER_MIB + 4)
        b = hv.create_domain(PAGES_PER_MIB + 4)
        hv.range_share(a.domid, b.domid, 0, PAGES_PER_MIB + 3)
        assert (hv.nr_shared_mfns, hv.nr_saved_mfns) == (PAGES_PER_MIB + 4,) * 2
        assert memory_counters(hv) == {"sharing_freed_memory": 1, "sharing_used_memory": 1}
        assert hv.stats()["sharing_freed_memory"] == 1


def test_a_change_between_the_two_walks_is_unsettled():
    with Hypervisor(64) as hv:
        a = hv.create_domain(3)
        b = hv.create_domain(3)
        hv.range_share(a.domid, b.domid, 0, 2)
        scan = SharingScan(hv, first_chunk=16)
        while scan.phase < 2:                   # the p2ms are walked
            scan.step(lambda: True, 1e-9)
        hv.unshare(a.domid, 1)                  # a CoW fault before the frame walk
        scan.run()
        r = scan.report()
        assert r["unsettled"] == {"frames": 1, "saved": 0}
        assert r["inter"] == {"frames": 2, "saved": 2}
        assert r["saved_frames"] == hv.nr_saved_mfns == 2


def test_steps_stay_bounded_at_a_million_frames():
    """1,048,576 frames, 32,768 of them shared zero frames: each step of the
    scan stays near the step budget (CPU time, so other processes' load
    does not count), where one pass over everything takes far longer."""
    with Hypervisor(1 << 20, rmap="index") as hv:
        a = hv.create_domain(1 << 15)
        b = hv.create_domain(1 << 15)
        hv.range_share(a.domid, b.domid, 0, (1 << 15) - 1)
        scan = SharingScan(hv)
        longest = 0.0
        deadline = [0.0]
        while True:
            t0 = time.thread_time()
            deadline[0] = time.perf_counter() + STEP_BUDGET_SECONDS
            done = scan.step(lambda: time.perf_counter() + 1e-4 >= deadline[0], 1e-4)
            longest = max(longest, time.thread_time() - t0)
            if done:
                break
        r = scan.report()
        assert r["zero"] == {"frames": 1 << 15, "saved": 1 << 15}
        assert r["inter"] == {"frames": 1 << 15, "saved": 1 << 15}
        assert r["steps"] > 10
        t0 = time.thread_time()
        sharing_report(hv)
        whole = time.thread_time() - t0
        assert longest < 4 * STEP_BUDGET_SECONDS < whole, (longest, whole)
