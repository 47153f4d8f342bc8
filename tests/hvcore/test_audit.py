"""The audit finds every kind of broken invariant it promises to check.

Each case builds a healthy host with sharing in it, breaks one invariant by
hand, and expects the audit to say so in a sentence naming it; repaired,
the audit is silent again.
"""
from __future__ import annotations

import numpy as np
import pytest

from hvshare.hvcore import Hypervisor
from hvshare.hvcore.constants import RMAP_POLICIES


def shared_host(policy: str) -> tuple[Hypervisor, int, int]:
    """Two 8-page domains sharing gfns 0-5; gfns 6-7 stay private."""
    hv = Hypervisor(64, rmap=policy)
    page = np.full((8, 4096), 7, dtype=np.uint8)
    a = hv.create_domain(8, content=page).domid
    b = hv.create_domain(8, content=page).domid
    assert hv.range_share(a, b, 0, 5) == 6
    assert hv.audit_report() == []
    return hv, a, b


def _counter(hv, a, b):
    hv.nr_shared_mfns += 1
    return lambda: setattr(hv, "nr_shared_mfns", hv.nr_shared_mfns - 1)


def _saved(hv, a, b):
    hv.nr_saved_mfns -= 1
    return lambda: setattr(hv, "nr_saved_mfns", hv.nr_saved_mfns + 1)


def _type_count(hv, a, b):
    m = int(hv.domains[a].p2m.mfn[0])
    hv.pool.type_count[m] += 1
    return lambda: hv.pool.type_count.__setitem__(m, hv.pool.type_count[m] - 1)


def _shr_pages(hv, a, b):
    hv.domains[b].shr_pages += 1
    return lambda: setattr(hv.domains[b], "shr_pages", hv.domains[b].shr_pages - 1)


def _tot_pages(hv, a, b):
    hv.domains[a].tot_pages -= 1
    return lambda: setattr(hv.domains[a], "tot_pages", hv.domains[a].tot_pages + 1)


def _handle(hv, a, b):
    m = int(hv.domains[a].p2m.mfn[1])
    h = int(hv.pool.handle[m])
    hv.pool.handle[m] = 0
    return lambda: hv.pool.handle.__setitem__(m, h)


def _owner(hv, a, b):
    m = int(hv.domains[a].p2m.mfn[7])          # a private frame of a
    hv.pool.owner[m] = b
    return lambda: hv.pool.owner.__setitem__(m, a)


def _p2m_entry(hv, a, b):
    p2m = hv.domains[b].p2m
    old = int(p2m.mfn[2])
    p2m.mfn[2] = int(hv.domains[a].p2m.mfn[7])  # shared entry -> a private frame
    return lambda: p2m.mfn.__setitem__(2, old)


def _rmap_walk(hv, a, b):
    # Cut frame's chain after its head: the walk gives fewer entries than
    # the count (the index's walk is its frame column: a node leaves it).
    m = int(hv.domains[a].p2m.mfn[3])
    r = hv.rmap
    if r.name == "index":
        n = int(r._head[m])
        r._frm[n] = -1
        return lambda: r._frm.__setitem__(n, m)
    a_ = r._arena
    h = int(r._head[m])
    old = a_.nxt[h]
    a_.nxt[h] = -1
    return lambda: a_.nxt.__setitem__(h, old)


BREAKS = {
    "rmap walk": (_rmap_walk, "rmap walk gave 1 entries, count is 2"),
    "nr_shared_mfns": (_counter, "nr_shared_mfns"),
    "nr_saved_mfns": (_saved, "nr_saved_mfns"),
    "type count": (_type_count, "type count"),
    "shr_pages": (_shr_pages, "shr_pages"),
    "tot_pages": (_tot_pages, "tot_pages"),
    "handle": (_handle, "no handle"),
    "owner": (_owner, "does not own"),
    "p2m entry": (_p2m_entry, "not mapped ram_shared"),
}


@pytest.mark.parametrize("policy", RMAP_POLICIES)
@pytest.mark.parametrize("what", sorted(BREAKS))
def test_the_audit_names_each_broken_invariant(policy, what):
    hv, a, b = shared_host(policy)
    try:
        breaker, words = BREAKS[what]
        repair = breaker(hv, a, b)
        found = hv.audit_report()
        assert found and any(words in f for f in found), found
        assert hv.audit() == len(found)
        repair()
        assert hv.audit_report() == []
    finally:
        hv.close()
