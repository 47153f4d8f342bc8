"""Domains: the per-domain record, creation, lookup and gfn checks.

A domain is a p2m table (:mod:`hvshare.hvcore.p2m`) plus the counters Xen keeps
for it. :class:`DomainTable` is the part of the core that makes domains
and finds them: :meth:`~DomainTable.create_domain` takes frames from the
pool and fills them from a content image (in bounded chunks, through
:class:`DomainBuild`, when the hypervisor process creates a domain), :meth:`~DomainTable.domain`
turns a domid into its record (``ESRCH`` otherwise), and the gfn checks
every operation starts with live here.

Invariants (checked by :mod:`hvshare.hvcore.audit`): ``tot_pages`` is the number
of the domain's ``ram_rw`` entries, each on a frame the domain owns;
``shr_pages`` is the number of its ``ram_shared`` entries.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .budget import MIN_CHUNK_ITEMS, ChunkCost
from .constants import DOMID_FIRST_RESERVED, MAX_NAME_LENGTH, PAGE_SIZE
from .errors import EBUSY, EEXIST, EINVAL, ENOMEM, ESRCH, HVError
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
    #: teardown chunk sizing (a :class:`hvshare.hvcore.budget.ChunkCost`), once adaptive
    chunk_cost: object = None
    teardown_phase: str = ""    # "", "shared", "private"
    info: dict = field(default_factory=dict)   # runtime extras (guest pid, counters)
    #: the domain this one was forked from (None: not a fork; hvcore.fork)
    parent: int | None = None
    #: domids of this domain's forks (while any exist it does not run)
    forks: set = field(default_factory=set)
    #: the first fork paused it: it runs again once its last fork is gone
    fork_paused: bool = False
    #: a fork's populated gfns, each once: ``fork_gfns[:fork_n]``
    fork_gfns: object = None
    fork_n: int = 0
    #: a fork reset under way: entries of the record done, and kept so far
    reset_cursor: int | None = None
    reset_kept: int = 0
    reset_dropped: int = 0

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


@dataclass(eq=False)
class DomainBuild:
    """A domain being created, as Xen's ``XENMEM_populate_physmap`` fills
    one: gfns ``[0, cursor)`` are populated (frames taken, content written,
    p2m entries set) and the rest wait. The frames still to take are
    reserved in the pool, so a create that began populating always
    completes. A content that must list what it holds first (a process
    snapshot, whose present pages are known only once its pagemap is
    walked) does so in the create's first steps (``listing``); a domain
    sized by it is sized, and its frames reserved, when the listing ends
    (``ENOMEM`` then if too few are free).

    Until :meth:`DomainTable.build_step` finishes it, the domain is not in
    the domain table: every operation on its domid is ``EBUSY``.
    """

    domid: int
    name: str
    npages: int
    p2m: P2M | None             # None while its size is unknown
    paused: bool
    content: object
    #: populated gfns as a mask over the domain (None: every gfn)
    mask: object
    #: frames taken so far, in gfn order (``mfns[:populated]``)
    mfns: np.ndarray
    reserved: int               # frames still reserved for it in the pool
    #: the content lists what it holds first (a process snapshot): the
    #: create's first phase, after which its frames are reserved
    listing: bool = False
    cursor: int = 0             # next gfn to populate
    populated: int = 0          # frames taken
    chunk_cost: object = None   # chunk sizing (a ChunkCost), once preemptible
    info: dict = field(default_factory=dict)   # the process's extras (its request)

    @property
    def done(self) -> bool:
        return self.cursor >= self.npages


#: gfns per chunk of a create that nothing preempts (bounds its scratch)
BUILD_SLAB = 4096
#: the first chunk of a preemptible create, in gfns (later ones follow the rate)
BUILD_FIRST_CHUNK = 16


def _release(content) -> None:
    """Close a content source that holds something open (a file, a process)."""
    close = getattr(content, "close", None)
    if close is not None:
        close()


class DomainTable:
    """Creation and lookup of domains (a part of :class:`hvshare.hvcore.core.Hypervisor`).

    Uses the core's ``pool``, ``rmap``, ``domains``, ``building`` and ``_next_domid``.
    """

    def create_domain(self, pages: int, content=None, name: str | None = None,
                      paused: bool = False, holes=None) -> Domain:
        """A new domain of ``pages`` gfns, private pages filled from ``content``,
        made in one call (:meth:`begin_domain` and :meth:`build_step`).

        ``content``: None (zero pages), an array ``(pages, 4096)`` uint8, or
        ``callable(start_gfn, count) -> array (count, 4096)`` called in
        chunks (with an ``into(dst, start_gfn)`` method, it writes straight
        into the frames). ``holes``: gfns left unpopulated (their content is
        ignored).
        """
        b = self.begin_domain(pages, content, name, paused, holes)
        self.build_step(b)
        return self.domains[b.domid]

    def begin_domain(self, pages: int | None, content=None, name: str | None = None,
                     paused: bool = False, holes=None) -> DomainBuild:
        """Start creating a domain (arguments as :meth:`create_domain`):
        check everything, take a domid, reserve its frames and map its p2m.
        O(1) in ``pages`` but for the holes; :meth:`build_step` does the rest.

        A content with ``list_step`` (a :class:`hvshare.hvcore.snapshot.ProcessSnapshot`
        not yet listed) is listed in the first steps; with ``pages`` None
        it sizes the domain then, and the frames are reserved then."""
        listing = content is not None and not getattr(content, "listed", True)
        if (pages is None and not listing) or (pages is not None and pages <= 0):
            raise HVError(EINVAL, "a domain needs at least one page")
        if name is not None:
            self._check_name(name)
        if pages is None:
            domid = self._free_domid()
            self._next_domid += 1
            b = DomainBuild(domid, name or self._default_name(domid), 0, None, paused, content,
                            None, np.empty(0, dtype=np.int64), 0, listing=True)
            self.building[domid] = b
            return b
        if holes is None and pages > self.pool.nfree:
            # before any array is sized by an untrusted page count
            raise HVError(ENOMEM, f"{pages} frames asked, {self.pool.nfree} free")
        domid = self._free_domid()
        mask, want = None, pages
        if holes is not None:
            holes = np.asarray(holes, dtype=np.int64)
            if len(holes) and (holes.min() < 0 or holes.max() >= pages):
                raise HVError(EINVAL, "a hole outside the domain")
            mask = np.ones(pages, dtype=bool)
            mask[holes] = False
            want = int(np.count_nonzero(mask))
        if content is not None and not callable(content):
            content = np.asarray(content)
            if content.shape != (pages, PAGE_SIZE):
                raise HVError(EINVAL, f"content must have shape ({pages}, {PAGE_SIZE}), "
                                      f"not {content.shape}")
        self.pool.reserve(want)
        try:
            p2m = P2M(self.token, domid, pages, filled=False)
        except BaseException:
            self.pool.unreserve(want)
            raise
        self._next_domid += 1
        b = DomainBuild(domid, name or self._default_name(domid), pages, p2m, paused, content,
                        mask, np.empty(want, dtype=np.int64), want, listing=listing)
        self.building[domid] = b
        return b

    def _free_domid(self) -> int:
        """The next domid (domids are never reused), if any is left."""
        if self._next_domid >= DOMID_FIRST_RESERVED:
            raise HVError(ENOMEM, "no domid left")
        return self._next_domid

    def _end_listing(self, b: DomainBuild) -> None:
        """The content is listed: size a domain it sizes, reserve its
        frames (``ENOMEM`` if too few are free) and map its p2m."""
        if b.p2m is None:
            pages = b.content.npages
            if pages > self.pool.nfree:
                b.npages = pages
                raise HVError(ENOMEM, f"{pages} frames asked, {self.pool.nfree} free")
            self.pool.reserve(pages)
            b.reserved = pages
            b.p2m = P2M(self.token, b.domid, pages, filled=False)
            b.npages, b.mfns = pages, np.empty(pages, dtype=np.int64)
        b.listing = False

    def build_step(self, b: DomainBuild, should_yield=None, chunk_seconds: float | None = None) -> bool:
        """Populate more of ``b``; True once the domain exists (in ``domains``).

        Without ``should_yield``, everything at once. Otherwise chunk by
        chunk, each sized to take about ``chunk_seconds`` (see
        :meth:`hvshare.hvcore.budget.ChunkCost.rate`), asking ``should_yield()``
        after each; the first chunk always runs, so every step progresses.
        A content error cancels the create (nothing of it is left) and is
        raised.
        """
        try:
            if b.listing:
                if not b.content.list_step(should_yield, chunk_seconds):
                    return False
                self._end_listing(b)
                if should_yield is not None and should_yield():
                    return False
            if should_yield is None:
                while not b.done:
                    self._populate(b, min(b.npages, b.cursor + BUILD_SLAB))
            else:
                if b.chunk_cost is None:
                    b.chunk_cost = ChunkCost.rate(BUILD_FIRST_CHUNK)
                cost, clock = b.chunk_cost, time.perf_counter
                while not b.done:
                    t0 = clock()
                    k = max(MIN_CHUNK_ITEMS, cost.items(chunk_seconds, chunk_seconds))
                    self._populate(b, min(b.npages, b.cursor + k))
                    cost.learn(k, clock() - t0)
                    if not b.done and should_yield():
                        return False
        except BaseException:
            self.cancel_build(b)
            raise
        self._finish_build(b)
        return True

    def _populate(self, b: DomainBuild, hi: int) -> None:
        """Populate gfns ``[b.cursor, hi)``: take their frames, write their
        content, then set their p2m entries."""
        lo, p2m = b.cursor, b.p2m
        if b.mask is None:
            k, gfns = hi - lo, slice(lo, hi)
        else:
            gfns = np.flatnonzero(b.mask[lo:hi]) + lo
            k = len(gfns)
        mfns = self.pool.alloc_many(k, owner=b.domid, reserved=True)
        b.reserved -= k
        b.mfns[b.populated:b.populated + k] = mfns
        b.populated += k
        self._write_content(b, lo, hi, mfns, k == hi - lo)
        if k != hi - lo:
            p2m.mfn[lo:hi] = INVALID_MFN
        p2m.mfn[gfns] = mfns
        p2m.type[gfns] = RAM_RW
        b.cursor = hi

    def _write_content(self, b: DomainBuild, lo: int, hi: int, mfns: np.ndarray, whole: bool) -> None:
        """The content of gfns ``[lo, hi)`` into their frames ``mfns``
        (``whole``: no hole among them)."""
        if not len(mfns):
            return
        data, content = self.pool.data, b.content
        m0 = int(mfns[0])
        # frames come off the free list in order, mostly: then the chunk's
        # frames are one slice of the pool, written in place
        run = whole and int(mfns[-1]) - m0 == len(mfns) - 1 and bool((np.diff(mfns) == 1).all())
        if content is None:
            if run:
                data[m0:m0 + len(mfns)] = 0
            else:
                data[mfns] = 0
            return
        if run and hasattr(content, "into"):
            content.into(data[m0:m0 + len(mfns)], lo)
            return
        pages = content(lo, hi - lo) if callable(content) else content[lo:hi]
        pages = np.asarray(pages, dtype=np.uint8)
        if pages.shape != (hi - lo, PAGE_SIZE):
            raise HVError(EINVAL, f"content for gfns {lo}.. must have shape "
                                  f"({hi - lo}, {PAGE_SIZE}), not {pages.shape}")
        if not whole:
            pages = pages[b.mask[lo:hi]]
        if run:
            data[m0:m0 + len(mfns)] = pages
        else:
            data[mfns] = pages

    def _finish_build(self, b: DomainBuild) -> None:
        del self.building[b.domid]
        _release(b.content)
        d = Domain(b.domid, b.name, b.npages, b.p2m,
                   state="paused" if b.paused else "running", tot_pages=b.populated)
        self.domains[b.domid] = d
        self.rmap.domain_created(b.domid, b.npages)

    def cancel_build(self, b: DomainBuild) -> None:
        """Give up a create: its frames go back, its p2m is unlinked, its
        domid stays used (domids are never reused)."""
        if self.building.pop(b.domid, None) is None:
            return
        _release(b.content)
        self.pool.free_many(b.mfns[:b.populated])
        self.pool.unreserve(b.reserved)
        b.reserved = b.populated = 0
        if b.p2m is not None:
            b.p2m.close()

    def _check_name(self, name) -> None:
        """A domain name, as ``xl`` wants it: text of 1 to MAX_NAME_LENGTH
        printable characters, used by no other domain. A name is printed
        by every listing, so a control character could draw fake rows."""
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH:
            raise HVError(EINVAL, f"a domain name has 1 to {MAX_NAME_LENGTH} characters")
        if not name.isprintable() or name != name.strip():
            raise HVError(EINVAL, f"domain name {ascii(name)} has characters that cannot be "
                                  f"printed, or spaces at an end")
        for d in [*self.domains.values(), *self.building.values()]:
            if d.name == name:
                raise HVError(EEXIST, f"domain {d.domid} is already called {name}")

    def _default_name(self, domid: int) -> str:
        """``dom<domid>``, or, if a user took that name, the first free
        ``dom<domid>-<n>``."""
        taken = {d.name for d in [*self.domains.values(), *self.building.values()]}
        name, n = f"dom{domid}", 1
        while name in taken:
            name, n = f"dom{domid}-{n}", n + 1
        return name

    def domain(self, domid: int) -> Domain:
        try:
            return self.domains[domid]
        except (KeyError, TypeError):
            b = self.building.get(domid) if isinstance(domid, int) else None
            if b is not None:
                at = "listing its pages" if b.listing else f"{b.cursor} of {b.npages} pages"
                raise HVError(EBUSY, f"domain {domid} is still being created ({at})") from None
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
