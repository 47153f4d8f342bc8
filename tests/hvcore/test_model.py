"""The core against a plain reference model, on every rmap policy.

The model knows nothing of frames: per domain a dict gfn -> bytes, and the
sharing groups as sets of (domid, gfn) with their handle. Hypothesis drives
random sequences of create / nominate / share / add_to_physmap / range_share
/ unshare / write / destroy, and VM forks: fork (of a fork too), the read
and write faults that fill a fork from its nearest ancestor, dedup between
a fork and any domain, fork reset (after which a fork reads exactly its
nearest ancestor), and
destroy of a child or of a parent (refused, or with its forks first); after
every step the audit finds nothing, every gfn reads what the model says, a
fork's other gfns are holes, and the counters equal the model's.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition,
                                 rule)

from hvshare.hvcore import Hypervisor, HVError
from hvshare.hvcore.errors import (C_HANDLE_INVALID, EBUSY, EINVAL, ENOMEM,
                           S_HANDLE_INVALID)
from hvshare.hvcore.constants import RMAP_POLICIES as POLICIES

PAGES = 6
FRAMES = 48


class Model:
    """Domains as dicts of page contents; sharing as groups of pairs."""

    def __init__(self):
        self.pages: dict[int, dict[int, bytes]] = {}   # domid -> gfn -> content
        self.group_of: dict[tuple[int, int], int] = {}  # (d, gfn) -> group id
        self.groups: dict[int, set] = {}
        self.handle: dict[int, int] = {}                # group -> handle
        self.counter = 1
        self.next_group = 0
        self.parent: dict[int, int] = {}                # fork -> the domain it was forked from

    def forks(self, d):
        return sorted(c for c, p in self.parent.items() if p == d)

    def source(self, d, g):
        """The nearest ancestor of fork ``d`` holding ``g`` (None: none, or not a fork)."""
        a = self.parent.get(d)
        while a is not None and g not in self.pages[a]:
            a = self.parent.get(a)
        return a

    def populate(self, d, g):
        """A read fault: share the nearest ancestor's page into the fork."""
        a = self.source(d, g)
        h = self.nominate(a, g)
        self.add_to_physmap(a, g, h, d, g)

    def reset(self, d):
        """Drop every page of the fork that is not its nearest ancestor's
        (where an ancestor holds the gfn): its private pages, and shared
        entries outside the ancestor's group (dedup merged them elsewhere)."""
        drop = []
        for g in self.pages[d]:
            a = self.source(d, g)
            gid = self.group_of.get((d, g))
            if a is not None and (gid is None or gid != self.group_of.get((a, g))):
                drop.append(g)
        for g in drop:
            if (d, g) in self.group_of:
                self.unshare(d, g)
            del self.pages[d][g]
        return len(drop)

    def nominate(self, d, g):
        if g not in self.pages[d]:
            raise HVError(EINVAL)
        if (d, g) in self.group_of:
            return self.handle[self.group_of[(d, g)]]
        self.counter += 1
        gid = self.next_group
        self.next_group += 1
        self.groups[gid] = {(d, g)}
        self.group_of[(d, g)] = gid
        self.handle[gid] = self.counter
        return self.counter

    def _group(self, d, g, h, code):
        gid = self.group_of.get((d, g))
        if gid is None or self.handle[gid] != h:
            raise HVError(code)
        return gid

    def share(self, sd, sg, sh, cd, cg, ch):
        s = self._group(sd, sg, sh, S_HANDLE_INVALID)
        c = self._group(cd, cg, ch, C_HANDLE_INVALID)
        if s == c:
            return
        content = self.pages[sd][sg]
        for pair in self.groups.pop(c):
            self.groups[s].add(pair)
            self.group_of[pair] = s
            self.pages[pair[0]][pair[1]] = content
        del self.handle[c]

    def add_to_physmap(self, sd, sg, sh, cd, cg):
        s = self._group(sd, sg, sh, S_HANDLE_INVALID)
        if not 0 <= cg < PAGES or cg in self.pages[cd]:
            raise HVError(C_HANDLE_INVALID)
        self.groups[s].add((cd, cg))
        self.group_of[(cd, cg)] = s
        self.pages[cd][cg] = self.pages[sd][sg]

    def unshare(self, d, g):
        gid = self.group_of.pop((d, g))
        self.groups[gid].discard((d, g))
        if not self.groups[gid]:
            del self.groups[gid]
            del self.handle[gid]

    def write(self, d, g, off, data):
        if (d, g) in self.group_of:
            self.unshare(d, g)
        old = self.pages[d][g]
        self.pages[d][g] = old[:off] + data + old[off + len(data):]

    def destroy(self, d):
        for g in list(self.pages[d]):
            if (d, g) in self.group_of:
                self.unshare(d, g)
        del self.pages[d]
        self.parent.pop(d, None)

    def frames_used(self):
        private = sum(1 for d, pg in self.pages.items() for g in pg if (d, g) not in self.group_of)
        return private + len(self.groups)


def page(byte: int) -> bytes:
    return bytes([byte]) * 4096


def pages_array(values) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.uint8)[:, None], 4096, axis=1)


class CoreMachine(RuleBasedStateMachine):
    policy = "buckets"

    def __init__(self):
        super().__init__()
        self.hv = Hypervisor(FRAMES, rmap=self.policy)
        self.m = Model()

    def teardown(self):
        self.hv.close()

    def _live(self):
        return sorted(self.m.pages)

    # -- rules ---------------------------------------------------------
    @rule(fill=st.lists(st.integers(0, 3), min_size=PAGES, max_size=PAGES),
          holes=st.sets(st.integers(0, PAGES - 1), max_size=2))
    def create(self, fill, holes):
        content = pages_array(fill)
        need = PAGES - len(holes)
        if need > self.hv.pool.nfree:
            with pytest.raises(HVError) as e:
                self.hv.create_domain(PAGES, content=content, holes=sorted(holes))
            assert e.value.code == ENOMEM
            return
        d = self.hv.create_domain(PAGES, content=content, holes=sorted(holes))
        self.m.pages[d.domid] = {g: page(b) for g, b in enumerate(fill) if g not in holes}

    def _expect(self, fn_real, fn_model):
        try:
            want = fn_model()
        except HVError as e:
            with pytest.raises(HVError) as got:
                fn_real()
            assert got.value.code == e.code, (got.value, e)
            return None
        got = fn_real()
        return want, got

    @precondition(lambda self: self.m.pages)
    @rule(data=st.data(), g=st.integers(-1, PAGES))
    def nominate(self, data, g):
        d = data.draw(st.sampled_from(self._live()))
        if not 0 <= g < PAGES:
            with pytest.raises(HVError) as e:
                self.hv.nominate(d, g)
            assert e.value.code == EINVAL
            return
        r = self._expect(lambda: self.hv.nominate(d, g), lambda: self.m.nominate(d, g))
        if r:
            assert r[0] == r[1]

    @precondition(lambda self: self.m.pages)
    @rule(data=st.data(), stale_s=st.booleans(), stale_c=st.booleans())
    def share(self, data, stale_s, stale_c):
        sd = data.draw(st.sampled_from(self._live()))
        cd = data.draw(st.sampled_from(self._live()))
        sg = data.draw(st.integers(0, PAGES - 1))
        cg = data.draw(st.integers(0, PAGES - 1))
        sh = self._handle_guess(sd, sg, stale_s)
        ch = self._handle_guess(cd, cg, stale_c)
        self._expect(lambda: self.hv.share(sd, sg, sh, cd, cg, ch),
                     lambda: self.m.share(sd, sg, sh, cd, cg, ch))

    def _handle_guess(self, d, g, stale):
        gid = self.m.group_of.get((d, g))
        if gid is None or stale:
            return self.m.counter + 7 if not stale or gid is None else self.m.handle[gid] - 1
        return self.m.handle[gid]

    @precondition(lambda self: self.m.pages)
    @rule(data=st.data())
    def add_to_physmap(self, data):
        sd = data.draw(st.sampled_from(self._live()))
        cd = data.draw(st.sampled_from(self._live()))
        sg = data.draw(st.integers(0, PAGES - 1))
        cg = data.draw(st.integers(0, PAGES - 1))
        sh = self._handle_guess(sd, sg, False)
        self._expect(lambda: self.hv.add_to_physmap(sd, sg, sh, cd, cg),
                     lambda: self.m.add_to_physmap(sd, sg, sh, cd, cg))

    @precondition(lambda self: len(self.m.pages) >= 1)
    @rule(data=st.data(), first=st.integers(0, PAGES - 1), span=st.integers(0, PAGES))
    def range_share(self, data, first, span):
        sd = data.draw(st.sampled_from(self._live()))
        cd = data.draw(st.sampled_from(self._live()))
        last = first + span
        if sd == cd or last >= PAGES:          # Xen: EINVAL, nothing done
            with pytest.raises(HVError) as e:
                self.hv.range_share(sd, cd, first, last)
            assert e.value.code == EINVAL
            return
        want = 0
        for g in range(first, last + 1):
            try:
                sh = self.m.nominate(sd, g)
                ch = self.m.nominate(cd, g)
                self.m.share(sd, g, sh, cd, g, ch)
                want += 1
            except HVError:
                pass
        assert self.hv.range_share(sd, cd, first, last) == want

    @precondition(lambda self: self.m.group_of)
    @rule(data=st.data())
    def unshare(self, data):
        d, g = data.draw(st.sampled_from(sorted(self.m.group_of)))
        private = self.m.frames_used()
        last = len(self.m.groups[self.m.group_of[(d, g)]]) == 1
        if not last and self.hv.pool.nfree == 0:
            with pytest.raises(HVError) as e:
                self.hv.unshare(d, g)
            assert e.value.code == ENOMEM
            return
        copied = self.hv.unshare(d, g)
        assert copied == (not last)
        self.m.unshare(d, g)
        assert self.m.frames_used() == private + (0 if last else 1)

    @precondition(lambda self: self.m.pages)
    @rule(data=st.data(), off=st.integers(0, 4090), val=st.binary(min_size=1, max_size=6))
    def write(self, data, off, val):
        d = data.draw(st.sampled_from(self._live()))
        g = data.draw(st.integers(0, PAGES - 1))
        if self.m.forks(d):
            with pytest.raises(HVError) as e:
                self.hv.write(d, g, off, val)
            assert e.value.code == EBUSY                # a parent does not run
            return
        if g not in self.m.pages[d]:
            src = self.m.source(d, g)
            want = EINVAL if src is None else ENOMEM if self.hv.pool.nfree == 0 else 0
            if want:
                with pytest.raises(HVError) as e:
                    self.hv.write(d, g, off, val)
                assert e.value.code == want
                return
            assert self.hv.write(d, g, off, val)        # a fork's write fault: a private copy
            self.m.pages[d][g] = self.m.pages[src][g]
            self.m.write(d, g, off, val)
            return
        shared = (d, g) in self.m.group_of
        last = shared and len(self.m.groups[self.m.group_of[(d, g)]]) == 1
        if shared and not last and self.hv.pool.nfree == 0:
            with pytest.raises(HVError) as e:
                self.hv.write(d, g, off, val)
            assert e.value.code == ENOMEM
            return
        assert self.hv.write(d, g, off, val) == shared
        self.m.write(d, g, off, val)

    @precondition(lambda self: self.m.pages)
    @rule(data=st.data(), n=st.integers(1, PAGES))
    def write_pages(self, data, n):
        d = data.draw(st.sampled_from(self._live()))
        gfns = data.draw(st.lists(st.sampled_from(sorted(self.m.pages[d]) or [0]),
                                  min_size=1, max_size=n)) if self.m.pages[d] else []
        if not gfns:
            return
        if self.m.forks(d):
            with pytest.raises(HVError) as e:
                self.hv.write_pages(d, np.array(gfns), pages_array([0] * len(gfns)))
            assert e.value.code == EBUSY
            return
        vals = data.draw(st.lists(st.integers(0, 255), min_size=len(gfns), max_size=len(gfns)))
        need = 0
        distinct = sorted(set(gfns))
        left = {}
        for g in distinct:
            gid = self.m.group_of.get((d, g))
            if gid is not None:
                left.setdefault(gid, len(self.m.groups[gid]))
                left[gid] -= 1
                need += 1 if left[gid] > 0 else 0
        if need > self.hv.pool.nfree:
            with pytest.raises(HVError) as e:
                self.hv.write_pages(d, gfns, pages_array(vals))
            assert e.value.code == ENOMEM
            return
        faults = self.hv.write_pages(d, np.array(gfns), pages_array(vals))
        assert faults == sum(1 for g in distinct if (d, g) in self.m.group_of)
        for g, v in zip(gfns, vals):
            self.m.write(d, g, 0, page(v))

    # -- VM fork -------------------------------------------------------
    def _fork_ids(self):
        return sorted(self.m.parent)

    @precondition(lambda self: self.m.pages)
    @rule(data=st.data(), paused=st.booleans())
    def fork(self, data, paused):
        p = data.draw(st.sampled_from(self._live()))
        c = self.hv.fork(p, paused=paused)
        assert self.hv.domains[p].state == "paused"
        assert c.state == ("paused" if paused else "running")
        self.m.pages[c.domid] = {}
        self.m.parent[c.domid] = p

    @precondition(lambda self: self.m.parent)
    @rule(data=st.data())
    def read_fault(self, data):
        d = data.draw(st.sampled_from(self._fork_ids()))
        gfns = data.draw(st.lists(st.integers(0, PAGES - 1), min_size=1, max_size=4))
        holes = sorted({g for g in gfns if g not in self.m.pages[d]})
        if any(self.m.source(d, g) is None for g in holes):
            with pytest.raises(HVError) as e:
                self.hv.fork_populate(d, gfns)
            assert e.value.code == EINVAL
            return
        assert self.hv.fork_populate(d, gfns) == len(holes)
        # the core nominates ancestor by ancestor, nearest first (handles in that order)
        depth = {}
        for g in holes:
            a, k = self.m.parent[d], 0
            while g not in self.m.pages[a]:
                a, k = self.m.parent[a], k + 1
            depth[g] = k
        for g in sorted(holes, key=lambda g: (depth[g], g)):
            self.m.populate(d, g)

    @precondition(lambda self: self.m.parent)
    @rule(data=st.data())
    def fork_write_pages(self, data):
        d = data.draw(st.sampled_from(self._fork_ids()))
        gfns = data.draw(st.lists(st.integers(0, PAGES - 1), min_size=1, max_size=4))
        vals = data.draw(st.lists(st.integers(0, 255), min_size=len(gfns), max_size=len(gfns)))
        distinct = sorted(set(gfns))
        holes = [g for g in distinct if g not in self.m.pages[d]]
        if self.m.forks(d):
            want = EBUSY
        elif any(self.m.source(d, g) is None for g in holes):
            want = EINVAL
        else:
            left, need = {}, 0
            for g in distinct:
                gid = self.m.group_of.get((d, g))
                if gid is not None:
                    left.setdefault(gid, len(self.m.groups[gid]))
                    left[gid] -= 1
                    need += left[gid] > 0
            want = ENOMEM if len(holes) + need > self.hv.pool.nfree else 0
            if want and len(holes) <= self.hv.pool.nfree:
                # the holes are filled (copies of the ancestor), then the CoW faults fail
                for g in holes:
                    self.m.pages[d][g] = self.m.pages[self.m.source(d, g)][g]
        if want:
            with pytest.raises(HVError) as e:
                self.hv.write_pages(d, np.array(gfns), pages_array(vals))
            assert e.value.code == want
            return
        shared = sum(1 for g in distinct if (d, g) in self.m.group_of)
        assert self.hv.write_pages(d, np.array(gfns), pages_array(vals)) == shared + len(holes)
        for g in holes:
            self.m.pages[d][g] = self.m.pages[self.m.source(d, g)][g]
        for g, v in zip(gfns, vals):
            self.m.write(d, g, 0, page(v))

    @precondition(lambda self: self.m.pages)
    @rule(data=st.data(), chunk=st.integers(1, PAGES), dedup=st.integers(0, 2))
    def fork_reset(self, data, chunk, dedup):
        # mostly a fork (the rest: refusals), often just after dedup on it
        forks = self._fork_ids()
        d = data.draw(st.one_of(st.sampled_from(forks), st.sampled_from(forks), st.sampled_from(self._live()))
                      if forks else st.sampled_from(self._live()))
        for _ in range(dedup if d in self.m.parent else 0):
            self._dedup(data, d)
        want = EINVAL if d not in self.m.parent else EBUSY if self.m.forks(d) else 0
        if want:
            with pytest.raises(HVError) as e:
                self.hv.fork_reset(d)
            assert e.value.code == want
            return
        dd = self.hv.begin_fork_reset(d)
        while not self.hv.fork_reset_chunk(dd, chunk):
            assert self.hv.audit_report() == []
        assert dd.reset_dropped == self.m.reset(d)
        # whatever dedup did, the fork reads exactly its nearest ancestor
        for g in range(PAGES):
            a = self.m.source(d, g)
            if a is not None and g in self.m.pages[d]:
                assert self.hv.read(d, g) == self.hv.read(a, g), (d, g)

    @precondition(lambda self: self.m.parent)
    @rule(data=st.data())
    def dedup_with_a_fork(self, data):
        """Sharing as the dedup scanner does it, between a page a fork
        holds and a page of any domain (a sibling, its parent, a stranger):
        nominate both, share."""
        self._dedup(data, data.draw(st.sampled_from(self._fork_ids())))

    def _dedup(self, data, d):
        o = data.draw(st.sampled_from(self._live()))
        if not self.m.pages[d] or not self.m.pages[o]:
            return
        g = data.draw(st.sampled_from(sorted(self.m.pages[d])))
        og = data.draw(st.sampled_from(sorted(self.m.pages[o])))
        handles = []
        for dom, gfn in ((o, og), (d, g)):
            r = self._expect(lambda dom=dom, gfn=gfn: self.hv.nominate(dom, gfn),
                             lambda dom=dom, gfn=gfn: self.m.nominate(dom, gfn))
            if r is None:
                return
            handles.append(r[0])
        sh, ch = handles
        self._expect(lambda: self.hv.share(o, og, sh, d, g, ch),
                     lambda: self.m.share(o, og, sh, d, g, ch))

    @precondition(lambda self: self.m.parent)
    @rule(data=st.data())
    def destroy_with_forks(self, data):
        root = data.draw(st.sampled_from(sorted(set(self.m.parent.values()))))
        tree = self.hv.descendants(root)
        assert sorted(tree) == sorted(self._model_descendants(root))
        for d in tree + [root]:
            self.hv.destroy_domain(d)
            self.m.destroy(d)

    def _model_descendants(self, d):
        out = []
        for c in self.m.forks(d):
            out += self._model_descendants(c) + [c]
        return out

    @precondition(lambda self: self.m.pages)
    @rule(data=st.data(), steps=st.booleans())
    def destroy(self, data, steps):
        d = data.draw(st.sampled_from(self._live()))
        shared = sum(1 for (dd, _g) in self.m.group_of if dd == d)
        if self.m.forks(d):
            with pytest.raises(HVError) as e:
                self.hv.destroy_domain(d)
            assert e.value.code == EBUSY
            assert self.hv.domains[d].state == "paused"
            return
        if steps:
            # preemptible: yield after every chunk, resume until done
            self.hv.kill(d)
            with pytest.raises(HVError) as e:
                self.hv.nominate(d, 0)
            assert e.value.code == EBUSY
            while not self.hv.relinquish(d, should_yield=lambda: True):
                assert self.hv.audit() == 0
            assert d not in self.hv.domains
        else:
            assert self.hv.destroy_domain(d) == shared
        self.m.destroy(d)

    # -- invariants ----------------------------------------------------
    @invariant()
    def audit_clean(self):
        assert self.hv.audit_report() == []

    @invariant()
    def contents_match(self):
        for d, pages in self.m.pages.items():
            for g, want in pages.items():
                assert self.hv.read(d, g) == want, (d, g)
            if d in self.m.parent:
                typ = self.hv.domains[d].p2m.type
                assert sorted(np.flatnonzero(typ != 0).tolist()) == sorted(pages), d

    @invariant()
    def forks_match(self):
        for d in self.m.pages:
            dom = self.hv.domains[d]
            assert dom.parent == self.m.parent.get(d)
            assert sorted(dom.forks) == self.m.forks(d)
            if dom.forks:
                assert dom.state == "paused"

    @invariant()
    def counters_match(self):
        entries = sum(len(s) for s in self.m.groups.values())
        assert self.hv.nr_shared_mfns == len(self.m.groups)
        assert self.hv.nr_saved_mfns == entries - len(self.m.groups)
        assert self.hv.pool.nframes - self.hv.pool.nfree == self.m.frames_used()
        for d in self.m.pages:
            assert self.hv.domains[d].shr_pages == sum(1 for (dd, _g) in self.m.group_of if dd == d)


def _machine(policy: str):
    cls = type(f"CoreMachine_{policy}", (CoreMachine,), {"policy": policy})
    cls.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])
    return cls


@pytest.mark.parametrize("policy", POLICIES)
def test_core_matches_model(policy):
    _machine(policy).TestCase().runTest()
