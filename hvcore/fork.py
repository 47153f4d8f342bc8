"""VM fork: lazy copy-on-write children of a paused parent, and fork reset.

As Xen's ``mem_sharing_fork`` (4.14+): a fork gets its parent's size and an
empty p2m; nothing is copied at fork time. The parent is paused for as long
as it has forks. The child is filled lazily (Xen's
``mem_sharing_fork_page``): a read of a gfn it does not have nominates that
gfn in the nearest ancestor that has it and maps the frame in with the
effect of add_to_physmap; a write, or a read whose sharing failed (the
ancestor's page has extra references), takes a private frame with a copy of
the ancestor's page. :meth:`Forks.fork_reset_chunk` is Xen's
``mem_sharing_fork_reset``: the child's private pages go back to holes, so
the next access takes them from the parent again; so do its shared entries
that are not the parent's frame (pages dedup merged elsewhere), where Xen
keeps them (docs/semantics.md, "VM fork").

Every fork keeps a record of its populated gfns (``Domain.fork_gfns``,
the first ``fork_n`` entries): each gfn it holds, once. A gfn enters the
record when a hole of the fork is filled (here, or by add_to_physmap) and
leaves it when a reset drops it, so a reset costs O(pages the child has),
never O(pages of the domain). The audit checks the record against the p2m.

Invariants this module keeps (checked by :mod:`hvshare.hvcore.audit`):

- a fork's parent exists, is not dying, lists the fork, and does not run;
- a fork has its parent's size; each of its gfns is a hole, a shared
  entry or a private page, and the non-holes are exactly its record;
- a fill allocates (and can fail with ENOMEM) before it changes anything.
"""
from __future__ import annotations

import numpy as np

from .constants import DOMID_FIRST_RESERVED, PAGE_SIZE
from .domains import Domain
from .errors import EBUSY, EINVAL, ENOMEM, HVError
from .p2m import HOLE, INVALID_MFN, RAM_RW, RAM_SHARED, P2M

#: first size of a fork's record of populated gfns (it doubles as needed)
FORK_RECORD_FIRST = 64


class Forks:
    """Forks of a domain (a part of :class:`hvshare.hvcore.core.Hypervisor`).

    Uses the core's ``pool``, ``rmap``, ``domains``, the domid and handle
    counters and the frame counters; and the nominate and CoW machinery of
    :mod:`.sharing` and :mod:`.cow`.
    """

    # -- fork ------------------------------------------------------------
    def fork(self, parent: int, name: str | None = None, paused: bool = False) -> Domain:
        """A new domain forked from ``parent``: its size, an empty p2m.

        O(1) in the parent's size: the p2m segment starts as the kernel
        gives it (every entry a hole, read as zeros). The parent pauses (if
        it ran) until its last fork is gone. ``EBUSY``: the parent is dying
        or still being created; ``ESRCH``: no such domain."""
        p = self.domain(parent)
        if p.dying:
            raise HVError(EBUSY, f"domain {parent} is dying")
        if name is not None:
            self._check_name(name)
        domid = self._next_domid
        if domid >= DOMID_FIRST_RESERVED:
            raise HVError(ENOMEM, "no domid left")
        p2m = P2M(self.token, domid, p.npages, filled=False)
        self._next_domid += 1
        d = Domain(domid, name or self._default_name(domid), p.npages, p2m,
                   state="paused" if paused else "running", parent=parent)
        d.fork_gfns = np.empty(FORK_RECORD_FIRST, dtype=np.int64)
        self.domains[domid] = d
        self.rmap.domain_created(domid, p.npages)
        if not p.forks and p.state == "running":
            p.state = "paused"
            p.fork_paused = True
        p.forks.add(domid)
        return d

    def _fork_released(self, child: Domain) -> None:
        """A fork is gone: drop its reference on its parent, which runs
        again once its last fork is gone (if the fork paused it)."""
        p = self.domains.get(child.parent)
        if p is None:
            return
        p.forks.discard(child.domid)
        if not p.forks and p.fork_paused:
            p.fork_paused = False
            if p.state == "paused":
                p.state = "running"

    def descendants(self, domid: int) -> list[int]:
        """The forks of ``domid``, their forks and so on, deepest first
        (the order they can be destroyed in)."""
        out: list[int] = []
        # A post-order walk with an explicit stack: a chain of forks may be
        # deeper than Python's recursion limit.
        stack = [(domid, iter(sorted(self.domains[domid].forks)))]
        while stack:
            x, children = stack[-1]
            c = next(children, None)
            if c is None:
                stack.pop()
                if stack:
                    out.append(x)
            else:
                stack.append((c, iter(sorted(self.domains[c].forks))))
        return out

    # -- filling a fork --------------------------------------------------
    def _sources(self, d: Domain, gfns: np.ndarray) -> list[tuple[Domain, np.ndarray]]:
        """For distinct gfns of fork ``d``, the nearest ancestor holding
        each: ``[(ancestor, its gfns), ...]``. EINVAL, before anything
        changes, for a gfn no ancestor has."""
        out, left = [], gfns
        a = self.domains[d.parent]
        while len(left):
            have = a.p2m.type[left] != HOLE
            if have.all():
                out.append((a, left))
                break
            if have.any():
                out.append((a, left[have]))
                left = left[~have]
            if a.parent is None:
                raise HVError(EINVAL, f"gfn {int(left[0])} of domain {d.domid} is a hole "
                                      f"in every ancestor")
            a = self.domains[a.parent]
        return out

    def _record(self, d: Domain, gfns: np.ndarray) -> None:
        """Add newly filled gfns to the fork's record."""
        n, k = d.fork_n, len(gfns)
        if n + k > len(d.fork_gfns):
            grown = np.empty(max(2 * len(d.fork_gfns), n + k), dtype=np.int64)
            grown[:n] = d.fork_gfns[:n]
            d.fork_gfns = grown
        d.fork_gfns[n:n + k] = gfns
        d.fork_n = n + k

    def _fork_holes(self, d: Domain, gfns) -> np.ndarray:
        """The distinct holes among ``gfns`` of fork ``d`` (checked inside it)."""
        gfns = self._gfns(d, gfns)
        if d.dying:
            raise HVError(EBUSY, f"domain {d.domid} is dying")
        t = d.p2m.type[gfns]
        holes = gfns[t == HOLE]
        if len(holes) > 1:
            holes = np.unique(holes)
        return holes

    def fork_populate(self, domid: int, gfns, private: bool = False, copy: bool = True) -> int:
        """Fill the holes among ``gfns`` of fork ``domid`` from its
        ancestors; returns how many were filled (gfns already there are
        left alone).

        A read (``private=False``) shares: each gfn is nominated in its
        nearest ancestor (a no-op if shared already) and mapped into the
        fork, no frame taken; one whose nomination fails (extra references)
        gets a private copy. A write (``private=True``) takes a private
        frame per gfn, with the ancestor's bytes unless ``copy=False`` (the
        caller overwrites whole pages). Frames are taken before anything
        changes: ENOMEM leaves everything as it was."""
        d = self.domain(domid)
        if d.parent is None:
            raise HVError(EINVAL, f"domain {domid} is not a fork")
        holes = self._fork_holes(d, gfns)
        if len(holes):
            self._fill(d, holes, private, copy)
        return len(holes)

    def _fill(self, d: Domain, holes: np.ndarray, private: bool, copy: bool) -> None:
        """:meth:`fork_populate` of distinct holes of fork ``d``."""
        groups = self._sources(d, holes)
        shares, copies = [], []
        for a, g in groups:
            if private:
                copies.append((a, g))
                continue
            codes, fresh = self._classify(a, g)
            ok = codes == 0
            shares.append((a, g[ok], fresh[ok]))
            if not ok.all():
                copies.append((a, g[~ok]))
        ncopy = sum(len(g) for _, g in copies)
        new = self.pool.alloc_many(ncopy, owner=d.domid) if ncopy else None   # ENOMEM first
        p2m = d.p2m
        with p2m.changing():
            at = 0
            for a, g in copies:
                k = len(g)
                mine = new[at:at + k]
                at += k
                if copy:
                    self._copy_frames(mine, a.p2m.mfn[g])
                p2m.mfn[g] = mine
                p2m.type[g] = RAM_RW
            d.tot_pages += ncopy
            for a, g, fresh in shares:
                if not len(g):
                    continue
                self._make_shared(a, g[fresh], self._next_handles(int(fresh.sum())))
                ms = a.p2m.mfn[g]
                np.add.at(self.pool.type_count, ms, 1)     # the count before the rmap
                self.rmap.add_many(ms, np.full(len(g), d.domid, dtype=np.int64), g)
                p2m.mfn[g] = ms
                p2m.type[g] = RAM_SHARED
                d.shr_pages += len(g)
                self.nr_saved_mfns += len(g)
        self._record(d, holes)

    def _fork_write(self, d: Domain, gfn: int, offset: int, data) -> bool:
        """A guest write to a hole of fork ``d`` (the hook of
        :meth:`CopyOnWrite.write`): the gfn gets a private copy of its
        ancestor's page and the write lands on it; True (a fault)."""
        whole = offset == 0 and len(data) == PAGE_SIZE
        with d.p2m.changing():
            self._fill(d, np.array([gfn], dtype=np.int64), True, not whole)
            at = d.p2m.mfn.item(gfn) * PAGE_SIZE + offset
            (self._pool_bytes or self._bytes())[at:at + len(data)] = data
        return True

    def _fork_fill_written(self, d: Domain, gfns: np.ndarray) -> int:
        """The holes among the distinct gfns a batched write to fork ``d``
        names, filled with private copies (the hook of the batched writes,
        before their CoW faults); their number. Always copies: should the
        write's CoW faults then find no frame, the fork reads as before."""
        holes = d.p2m.type[gfns] == HOLE
        if not holes.any():
            return 0
        h = gfns[holes]
        self._fill(d, h, True, True)
        return len(h)

    def add_to_physmap(self, sd: int, sgfn: int, sh: int, cd: int, cgfn: int) -> None:
        """As :meth:`Sharing.add_to_physmap`; a fork's filled hole joins its record."""
        super().add_to_physmap(sd, sgfn, sh, cd, cgfn)
        client = self.domains[cd]
        if client.parent is not None:
            self._record(client, np.array([cgfn], dtype=np.int64))

    # -- fork reset ------------------------------------------------------
    def begin_fork_reset(self, domid: int) -> Domain:
        """Start resetting fork ``domid``: EINVAL if it is not a fork,
        EBUSY if it is dying, has forks of its own, or a reset of it is
        under way."""
        d = self.domain(domid)
        if d.parent is None:
            raise HVError(EINVAL, f"domain {domid} is not a fork")
        if d.dying:
            raise HVError(EBUSY, f"domain {domid} is dying")
        if d.forks:
            raise HVError(EBUSY, f"domain {domid} has forks of its own: a reset would change "
                                 f"what they read")
        if d.reset_cursor is not None:
            raise HVError(EBUSY, f"domain {domid} is being reset already")
        d.reset_cursor = d.reset_kept = d.reset_dropped = 0
        return d

    def fork_reset_chunk(self, d: Domain, k: int) -> bool:
        """Reset the next ``k`` entries of the fork's record, so the fork
        reads its nearest ancestor's page at each of them again:

        - a private page (no extra references) becomes a hole and its
          frame is freed;
        - a shared entry that is not the ancestor's frame (a private page
          of the fork that dedup merged with another domain's) is dropped
          from its frame's rmap and becomes a hole: it read the fork's
          old content, not the ancestor's;
        - a shared entry of the ancestor's own frame stays.

        Only gfns an ancestor holds are reset. Every other entry stays and
        is kept in the record, which is compacted in place. True once the
        whole record is done."""
        r, w = d.reset_cursor, d.reset_kept
        hi = min(d.fork_n, r + k)
        rec = d.fork_gfns
        g = rec[r:hi]
        t = d.p2m.type[g]
        has, theirs = self._ancestor_frames(d, g)
        mine = d.p2m.mfn[g]
        private = (t == RAM_RW) & has
        private[private] = self.pool.extra_refs[mine[private]] == 0
        merged = (t == RAM_SHARED) & has & (mine != theirs)
        gd, md = g[private], mine[private]
        if len(gd):
            with d.p2m.changing():
                d.p2m.mfn[gd] = INVALID_MFN
                d.p2m.type[gd] = HOLE
            self.pool.free_many(md)
            d.tot_pages -= len(gd)
        if merged.any():
            self.drop_shared(d.domid, g[merged])
        drop = private | merged
        d.reset_dropped += int(np.count_nonzero(drop))
        keep = g[~drop]
        rec[w:w + len(keep)] = keep
        d.reset_kept = w + len(keep)
        d.reset_cursor = hi
        if hi < d.fork_n:
            return False
        d.fork_n = d.reset_kept
        d.reset_cursor = None
        return True

    def _ancestor_frames(self, d: Domain, gfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each gfn of fork ``d``: whether an ancestor holds it, and the
        frame of the nearest one that does (INVALID_MFN where none)."""
        has = np.zeros(len(gfns), dtype=bool)
        frames = np.full(len(gfns), INVALID_MFN, dtype=np.int64)
        a = d
        while a.parent is not None and not has.all():
            a = self.domains[a.parent]
            new = ~has & (a.p2m.type[gfns] != HOLE)
            frames[new] = a.p2m.mfn[gfns[new]]
            has |= new
        return has, frames

    def fork_reset(self, domid: int) -> int:
        """Reset fork ``domid`` in one call; the private pages dropped."""
        d = self.begin_fork_reset(domid)
        while not self.fork_reset_chunk(d, 1 << 16):
            pass
        return d.reset_dropped

    # -- audit -----------------------------------------------------------
    def audit_forks(self) -> list[str]:
        """The fork invariants, one sentence per finding."""
        errs: list[str] = []
        for d in self.domains.values():
            for c in sorted(d.forks):
                f = self.domains.get(c)
                if f is None or f.parent != d.domid:
                    errs.append(f"domain {d.domid} lists fork {c}, which is not its fork")
            if d.forks and d.state == "running":
                errs.append(f"domain {d.domid} has forks but runs")
            if d.parent is None:
                continue
            p = self.domains.get(d.parent)
            if p is None or d.domid not in p.forks:
                errs.append(f"fork {d.domid}: its parent {d.parent} does not hold it")
                continue
            if p.dying:
                errs.append(f"fork {d.domid}: its parent {d.parent} is dying")
            if p.npages != d.npages:
                errs.append(f"fork {d.domid} has {d.npages} pages, its parent {p.npages}")
            typ = d.p2m.type
            if (typ > RAM_SHARED).any():
                errs.append(f"fork {d.domid}: a gfn is neither a hole, shared nor private")
            if d.reset_cursor is not None or d.dying:
                continue            # mid-reset (being compacted) or torn down: no record
            rec = np.sort(d.fork_gfns[:d.fork_n])
            filled = np.flatnonzero(typ != HOLE)
            if len(rec) != len(filled) or (rec != filled).any():
                errs.append(f"fork {d.domid}: its record of populated gfns ({len(rec)}) is not "
                            f"its {len(filled)} non-hole gfns")
        return errs
