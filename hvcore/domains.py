"""Domains: the per-domain record, creation, lookup and gfn checks.

A domain is a p2m table (:mod:`hvcore.p2m`) plus the counters Xen keeps
for it. :class:`DomainTable` is the part of the core that makes domains
and finds them: :meth:`~DomainTable.create_domain` takes frames from the
pool and fills them from a content image, :meth:`~DomainTable.domain`
turns a domid into its record (``ESRCH`` otherwise), and the gfn checks
every operation starts with live here.

Invariants (checked by :mod:`hvcore.audit`): ``tot_pages`` is the number
of the domain's ``ram_rw`` entries, each on a frame the domain owns;
``shr_pages`` is the number of its ``ram_shared`` entries.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .constants import DOMID_FIRST_RESERVED, MAX_NAME_LENGTH, PAGE_SIZE
from .errors import EEXIST, EINVAL, ENOMEM, ESRCH, HVError
from .p2m import INVALID_MFN, RAM_RW, P2M


@dataclass(eq=False)
class Domain:
    domid: int
    name: str
    npages: int
    p2m: P2M
    state: str = "running"
    tot_pages: int = 0          # private frames owned
    shr_pages: int = 0          # gfns backed by shared frames
    #: teardown cursor: next gfn to relinquish (Xen's next_shared_gfn_to_relinquish)
    relinquish_cursor: int = 0
    relinquished: int = 0       # shared entries dropped so far by teardown
    #: teardown chunk sizing (a :class:`hvcore.budget.ChunkCost`), once adaptive
    chunk_cost: object = None
    teardown_phase: str = ""    # "", "shared", "private"
    info: dict = field(default_factory=dict)   # runtime extras (guest pid, counters)

    @property
    def dying(self) -> bool:
        return self.state == "dying"


def runs_by_domain(domids: np.ndarray) -> tuple[np.ndarray | None, list[tuple[int, int, int]]]:
    """Pairs grouped by domain for per-domain array work: ``(order,
    runs)``, ``runs`` being ``(domid, lo, hi)`` slices of the pairs taken
    in ``order`` (None: the pairs' own order, when they name one domain)."""
    n = len(domids)
    if n == 0:
        return None, []
    first = int(domids[0])
    if (domids == first).all():
        return None, [(first, 0, n)]
    order = np.argsort(domids, kind="stable")
    ds = domids[order]
    cut = (np.flatnonzero(ds[1:] != ds[:-1]) + 1).tolist()
    bounds = [0] + cut + [n]
    return order, [(int(ds[lo]), lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


class DomainTable:
    """Creation and lookup of domains (a part of :class:`hvcore.core.Hypervisor`).

    Uses the core's ``pool``, ``rmap``, ``domains`` and ``_next_domid``.
    """

    def create_domain(self, pages: int, content=None, name: str | None = None,
                      paused: bool = False, holes=None) -> Domain:
        """A new domain of ``pages`` gfns, private pages filled from ``content``.

        ``content``: None (zero pages), an array ``(pages, 4096)`` uint8, or
        ``callable(start_gfn, count) -> array (count, 4096)`` called in chunks.
        ``holes``: gfns left unpopulated (their content is ignored).
        """
        if pages <= 0:
            raise HVError(EINVAL, "a domain needs at least one page")
        if name is not None:
            self._check_name(name)
        if holes is None and pages > self.pool.nfree:
            # before any array is sized by an untrusted page count
            raise HVError(ENOMEM, f"{pages} frames asked, {self.pool.nfree} free")
        domid = self._next_domid
        if domid >= DOMID_FIRST_RESERVED:
            raise HVError(ENOMEM, "no domid left")
        populated = np.ones(pages, dtype=bool)
        if holes is not None:
            holes = np.asarray(holes, dtype=np.int64)
            if len(holes) and (holes.min() < 0 or holes.max() >= pages):
                raise HVError(EINVAL, "a hole outside the domain")
            populated[holes] = False
        gfns = np.nonzero(populated)[0]
        mfns = self.pool.alloc_many(len(gfns), owner=domid)
        try:
            p2m = P2M(self.token, domid, pages)
        except BaseException:
            self.pool.free_many(mfns)
            raise
        full = np.full(pages, INVALID_MFN, dtype=np.int64)
        full[gfns] = mfns
        try:
            self._fill(full, content)
        except BaseException:
            p2m.close()
            self.pool.free_many(mfns)
            raise
        self._next_domid += 1
        p2m.mfn[gfns] = mfns
        p2m.type[gfns] = RAM_RW
        d = Domain(domid, name or self._default_name(domid), pages, p2m,
                   state="paused" if paused else "running", tot_pages=len(gfns))
        self.domains[domid] = d
        self.rmap.domain_created(domid, pages)
        return d

    def _check_name(self, name) -> None:
        """A domain name, as ``xl`` wants it: text of 1 to MAX_NAME_LENGTH
        printable characters, used by no other domain. A name is printed
        by every listing, so a control character could draw fake rows."""
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH:
            raise HVError(EINVAL, f"a domain name has 1 to {MAX_NAME_LENGTH} characters")
        if not name.isprintable() or name != name.strip():
            raise HVError(EINVAL, f"domain name {ascii(name)} has characters that cannot be "
                                  f"printed, or spaces at an end")
        for d in self.domains.values():
            if d.name == name:
                raise HVError(EEXIST, f"domain {d.domid} is already called {name}")

    def _default_name(self, domid: int) -> str:
        """``dom<domid>``, or, if a user took that name, the first free
        ``dom<domid>-<n>``."""
        taken = {d.name for d in self.domains.values()}
        name, n = f"dom{domid}", 1
        while name in taken:
            name, n = f"dom{domid}-{n}", n + 1
        return name

    def _fill(self, mfns: np.ndarray, content) -> None:
        """Fill frames ``mfns`` (one per gfn, -1 for holes) from ``content``."""
        data = self.pool.data
        step = 4096
        for start in range(0, len(mfns), step):
            chunk = mfns[start:start + step]
            keep = chunk >= 0
            if content is None:
                data[chunk[keep]] = 0
                continue
            if callable(content):
                pages = content(start, len(chunk))
            else:
                pages = content[start:start + len(chunk)]
            pages = np.asarray(pages, dtype=np.uint8)
            if pages.shape != (len(chunk), PAGE_SIZE):
                raise HVError(EINVAL, f"content for gfns {start}.. must have shape "
                                      f"({len(chunk)}, {PAGE_SIZE}), not {pages.shape}")
            data[chunk[keep]] = pages[keep]

    def domain(self, domid: int) -> Domain:
        try:
            return self.domains[domid]
        except (KeyError, TypeError):
            raise HVError(ESRCH, f"no domain {domid}") from None

    def _gfn(self, d: Domain, gfn: int) -> int:
        if not 0 <= gfn < d.npages:
            raise HVError(EINVAL, f"gfn {gfn} outside domain {d.domid}'s {d.npages} pages")
        return gfn

    def _gfns(self, d: Domain, gfns) -> np.ndarray:
        gfns = np.asarray(gfns, dtype=np.int64).ravel()
        if len(gfns) and (gfns.min() < 0 or gfns.max() >= d.npages):
            raise HVError(EINVAL, f"gfn outside domain {d.domid}'s {d.npages} pages")
        return gfns

    def _domids(self, domid, n: int) -> tuple[np.ndarray, int | None]:
        """One domid per pair, each checked to exist (ESRCH otherwise), and
        the domid if it is the same for every pair (else None)."""
        if np.ndim(domid) == 0:
            self.domain(int(domid))
            return np.full(n, int(domid), dtype=np.int64), int(domid)
        domids = np.asarray(domid, dtype=np.int64).ravel()
        if len(domids) != n:
            raise HVError(EINVAL, "share_many needs one source, client and handle per pair")
        present = sorted(set(domids.tolist()))
        for x in present:
            self.domain(x)
        return domids, present[0] if len(present) == 1 else None
