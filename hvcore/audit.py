"""The audit: every invariant of the core, checked from scratch.

Like Xen's ``audit()`` in ``mem_sharing.c``, it walks every shared frame's
rmap (all at once, through the policy's bulk views) and every domain's p2m and recomputes what the counters claim
(docs/semantics.md, "Audit invariants"). Each finding is one sentence; a
healthy core gives none.
"""
from __future__ import annotations

import numpy as np

from .constants import DOMID_COW
from .p2m import RAM_RW, RAM_SHARED


class Audit:
    """Checking the invariants (a part of :class:`hvshare.hvcore.core.Hypervisor`)."""

    def audit(self) -> int:
        """Check every invariant of docs/semantics.md, "Audit invariants"; return the error count."""
        return len(self.audit_report())

    def audit_report(self) -> list[str]:
        """The audit's findings, one sentence each (empty when all hold).

        Vectorised over the rmap policy's bulk views (``all_entries``,
        ``counts_of``): numpy passes over the frames, the rmap entries and
        the p2m entries, Python only per domain and per finding. Findings
        come in the order of a frame-by-frame walk (frames ascending, the
        four per-frame checks in turn), then per domain.
        """
        errs: list[str] = []
        pool, rmap = self.pool, self.rmap
        is_shared = pool.owner == DOMID_COW
        shared = np.flatnonzero(is_shared)
        if len(shared) != self.nr_shared_mfns:
            errs.append(f"{len(shared)} frames owned by dom_cow, nr_shared_mfns says {self.nr_shared_mfns}")
        all_m, all_d, all_g = rmap.all_entries()
        keep = is_shared[all_m]                 # the walks of shared frames only
        if not keep.all():
            all_m, all_d, all_g = all_m[keep], all_d[keep], all_g[keep]
        counts = rmap.counts_of(shared)
        walked = np.bincount(all_m, minlength=pool.nframes)[shared]
        tc = pool.type_count[shared]
        nohandle = pool.handle[shared] == 0
        bad = (counts == 0) | (counts != tc) | nohandle | (walked != counts)
        for i in np.flatnonzero(bad).tolist():
            m, n = int(shared[i]), int(counts[i])
            if n == 0:
                errs.append(f"shared frame {m} has an empty rmap")
            if n != tc[i]:
                errs.append(f"frame {m}: rmap has {n} entries, type count is {tc[i]}")
            if nohandle[i]:
                errs.append(f"shared frame {m} has no handle")
            if walked[i] != n:
                errs.append(f"frame {m}: rmap walk gave {walked[i]} entries, count is {n}")
        entries = len(all_m)
        present = np.flatnonzero(np.bincount(all_d)) if entries else all_d
        one = len(present) == 1
        seen: dict[int, int] = {}
        for domid in present.tolist():
            if one:
                gfns, ms = all_g, all_m
            else:
                sel = all_d == domid
                gfns, ms = all_g[sel], all_m[sel]
            d = self.domains.get(domid)
            if d is None:
                errs.append(f"rmaps name domain {domid}, which does not exist")
                continue
            out = (gfns < 0) | (gfns >= d.npages)
            if out.any():
                errs.append(f"rmaps name {int(out.sum())} gfns outside domain {domid}")
                gfns, ms = gfns[~out], ms[~out]
            wrong = (d.p2m.mfn[gfns] != ms) | (d.p2m.type[gfns] != RAM_SHARED)
            if wrong.any():
                g0, m0 = self._first_in_walks(domid, gfns[wrong], ms[wrong])
                errs.append(f"domain {domid} gfn {g0} is in the rmap of frame "
                            f"{m0} but not mapped ram_shared to it "
                            f"({int(wrong.sum())} such)")
            times = np.bincount(gfns, minlength=d.npages)
            seen[domid] = int(np.count_nonzero(times))
            if seen[domid] != len(gfns):
                errs.append(f"domain {domid}: a gfn is in rmaps more than once")
        total_shr = 0
        owner = pool.owner
        for d in self.domains.values():
            typ, mfn = d.p2m.type, d.p2m.mfn
            is_sh = typ == RAM_SHARED
            nsh = int(np.count_nonzero(is_sh))
            total_shr += nsh
            if nsh != d.shr_pages:
                errs.append(f"domain {d.domid}: {nsh} shared p2m entries, shr_pages says {d.shr_pages}")
            if nsh and (owner[mfn[is_sh]] != DOMID_COW).any():
                errs.append(f"domain {d.domid}: a ram_shared entry points at a frame dom_cow does not own")
            got = seen.get(d.domid, 0)
            if got != nsh:
                errs.append(f"domain {d.domid}: {nsh} shared entries but {got} in rmaps")
            is_rw = typ == RAM_RW
            nrw = int(np.count_nonzero(is_rw))
            if nrw != d.tot_pages:
                errs.append(f"domain {d.domid}: {nrw} private entries, tot_pages says {d.tot_pages}")
            if nrw and (owner[mfn[is_rw]] != d.domid).any():
                errs.append(f"domain {d.domid}: a ram_rw entry points at a frame it does not own")
        if entries != total_shr:
            errs.append(f"rmaps hold {entries} entries, p2ms {total_shr} shared entries")
        if self.nr_saved_mfns != entries - self.nr_shared_mfns:
            errs.append(f"nr_saved_mfns is {self.nr_saved_mfns}, gfns backed by shared frames "
                        f"minus shared frames is {entries - self.nr_shared_mfns}")
        owned = int(np.count_nonzero(owner >= 0))
        if owned != pool.nframes - pool.listed:
            errs.append(f"{owned} frames owned but {pool.nframes - pool.listed} off the free list")
        building = sum(b.populated for b in self.building.values())
        if pool.reserved != sum(b.reserved for b in self.building.values()):
            errs.append(f"{pool.reserved} frames reserved, creates in progress hold "
                        f"{sum(b.reserved for b in self.building.values())}")
        for b in self.building.values():
            if b.populated and (owner[b.mfns[:b.populated]] != b.domid).any():
                errs.append(f"domain {b.domid} (being created): a frame it took is not its own")
        private = sum(d.tot_pages for d in self.domains.values()) + building
        if owned - len(shared) != private:
            errs.append(f"{owned - len(shared)} frames owned by domains, their p2ms map {private}")
        errs += self.audit_forks()
        return errs

    def _first_in_walks(self, domid: int, gfns: np.ndarray, ms: np.ndarray) -> tuple[int, int]:
        """Of the entries (domid, gfns[i]) of frames ms[i], the one a
        frame-by-frame walk meets first (frames ascending, each walked
        from its head): ``(gfn, mfn)``. Walks one frame, on a finding only."""
        m0 = int(ms.min())
        mine = set(gfns[ms == m0].tolist())
        for d, g in self.rmap.entries(m0):
            if d == domid and g in mine:
                return int(g), m0
        return int(gfns[ms == m0][0]), m0
