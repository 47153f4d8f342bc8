"""The audit: every invariant of the core, checked from scratch.

Like Xen's ``audit()`` in ``mem_sharing.c``, it walks every shared frame's
rmap and every domain's p2m and recomputes what the counters claim
(docs/semantics.md, "Audit invariants"). Each finding is one sentence; a
healthy core gives none.
"""
from __future__ import annotations

import numpy as np

from .constants import DOMID_COW
from .p2m import RAM_RW, RAM_SHARED


class Audit:
    """Checking the invariants (a part of :class:`hvcore.core.Hypervisor`)."""

    def audit(self) -> int:
        """Check every invariant of docs/semantics.md, "Audit invariants"; return the error count."""
        return len(self.audit_report())

    def audit_report(self) -> list[str]:
        """The audit's findings, one sentence each (empty when all hold)."""
        errs: list[str] = []
        pool, rmap = self.pool, self.rmap
        shared = np.nonzero(pool.owner == DOMID_COW)[0]
        if len(shared) != self.nr_shared_mfns:
            errs.append(f"{len(shared)} frames owned by dom_cow, nr_shared_mfns says {self.nr_shared_mfns}")
        walked_m, walked_d, walked_g = [], [], []
        for m in shared.tolist():
            n = rmap.count(m)
            if n == 0:
                errs.append(f"shared frame {m} has an empty rmap")
            if n != pool.type_count[m]:
                errs.append(f"frame {m}: rmap has {n} entries, type count is {pool.type_count[m]}")
            if pool.handle[m] == 0:
                errs.append(f"shared frame {m} has no handle")
            walked = list(rmap.entries(m))
            if len(walked) != n:
                errs.append(f"frame {m}: rmap walk gave {len(walked)} entries, count is {n}")
            if walked:
                pairs = np.array(walked, dtype=np.int64)
                walked_m.append(np.full(len(pairs), m, dtype=np.int64))
                walked_d.append(pairs[:, 0])
                walked_g.append(pairs[:, 1])
        empty = [np.empty(0, np.int64)]
        all_m = np.concatenate(walked_m + empty)
        all_d = np.concatenate(walked_d + empty)
        all_g = np.concatenate(walked_g + empty)
        entries = len(all_m)
        seen: dict[int, np.ndarray] = {}
        for domid in np.unique(all_d).tolist():
            sel = all_d == domid
            gfns, ms = all_g[sel], all_m[sel]
            d = self.domains.get(domid)
            if d is None:
                errs.append(f"rmaps name domain {domid}, which does not exist")
                continue
            bad = (gfns < 0) | (gfns >= d.npages)
            if bad.any():
                errs.append(f"rmaps name {int(bad.sum())} gfns outside domain {domid}")
                gfns, ms = gfns[~bad], ms[~bad]
            wrong = (d.p2m.mfn[gfns] != ms) | (d.p2m.type[gfns] != RAM_SHARED)
            if wrong.any():
                errs.append(f"domain {domid} gfn {int(gfns[wrong][0])} is in the rmap of frame "
                            f"{int(ms[wrong][0])} but not mapped ram_shared to it "
                            f"({int(wrong.sum())} such)")
            seen[domid] = np.unique(gfns)
            if len(seen[domid]) != len(gfns):
                errs.append(f"domain {domid}: a gfn is in rmaps more than once")
        total_shr = 0
        for d in self.domains.values():
            typ, mfn = d.p2m.type, d.p2m.mfn
            sh = np.nonzero(typ == RAM_SHARED)[0]
            total_shr += len(sh)
            if len(sh) != d.shr_pages:
                errs.append(f"domain {d.domid}: {len(sh)} shared p2m entries, shr_pages says {d.shr_pages}")
            if len(sh) and (pool.owner[mfn[sh]] != DOMID_COW).any():
                errs.append(f"domain {d.domid}: a ram_shared entry points at a frame dom_cow does not own")
            got = seen.get(d.domid, empty[0])
            if len(got) != len(sh):
                errs.append(f"domain {d.domid}: {len(sh)} shared entries but {len(got)} in rmaps")
            rw = np.nonzero(typ == RAM_RW)[0]
            if len(rw) != d.tot_pages:
                errs.append(f"domain {d.domid}: {len(rw)} private entries, tot_pages says {d.tot_pages}")
            if len(rw) and (pool.owner[mfn[rw]] != d.domid).any():
                errs.append(f"domain {d.domid}: a ram_rw entry points at a frame it does not own")
        if entries != total_shr:
            errs.append(f"rmaps hold {entries} entries, p2ms {total_shr} shared entries")
        if self.nr_saved_mfns != entries - self.nr_shared_mfns:
            errs.append(f"nr_saved_mfns is {self.nr_saved_mfns}, gfns backed by shared frames "
                        f"minus shared frames is {entries - self.nr_shared_mfns}")
        owned = int((pool.owner >= 0).sum())
        if owned != pool.nframes - pool.nfree:
            errs.append(f"{owned} frames owned but {pool.nframes - pool.nfree} off the free list")
        private = sum(d.tot_pages for d in self.domains.values())
        if owned - len(shared) != private:
            errs.append(f"{owned - len(shared)} frames owned by domains, their p2ms map {private}")
        return errs
