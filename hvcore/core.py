"""The memory-sharing core: one emulated host's frames, domains and rmaps.

This is the hypervisor's state machine, with no I/O: the hypervisor process
(:mod:`hvshare.hvcore.process`) calls it one request at a time, which is what makes
it a model of one hypervisor CPU. Semantics follow Xen's
``XENMEM_sharing_op`` (docs/semantics.md).

:class:`Hypervisor` is assembled from one part per concern:

- :mod:`hvshare.hvcore.domains`: create, look up, check gfns;
- :mod:`hvshare.hvcore.sharing`: nominate, share, add_to_physmap, range_share,
  foreign mappings;
- :mod:`hvshare.hvcore.cow`: unshare (the CoW fault) and guest writes;
- :mod:`hvshare.hvcore.teardown`: kill, the preemptible relinquish loop, destroy;
- :mod:`hvshare.hvcore.fork`: fork, filling a fork from its ancestors, fork reset;
- :mod:`hvshare.hvcore.audit`: every invariant, checked from scratch.

The state they share lives here: the frame pool (:mod:`hvshare.hvcore.pool`), the
rmap of the chosen policy (:mod:`hvshare.hvcore.rmap`), the domains, the handle
counter, and the two counters Xen reports:

- ``nr_shared_mfns``: frames currently shared (owned by ``dom_cow``);
- ``nr_saved_mfns``: gfns backed by shared frames minus shared frames, i.e.
  the frames sharing saves;
- per domain ``shr_pages`` (gfns backed by shared frames) and ``tot_pages``
  (private frames it owns).

Every operation has a batch form (``*_many``) with the result of the
element-wise loop, done with numpy over the whole batch: these are the hot
paths.
"""
from __future__ import annotations

import numpy as np

from .audit import Audit
from .constants import DEFAULT_RMAP
from .cow import CopyOnWrite
from .domains import Domain, DomainBuild, DomainTable
from .fork import Forks
from .pool import FramePool
from .rmap import make_rmap
from .sharing import Sharing
from .sharing_stats import memory_counters
from .teardown import Teardown

__all__ = ["Hypervisor", "Domain"]


class Hypervisor(Forks, DomainTable, Sharing, CopyOnWrite, Teardown, Audit):
    """All frames, domains and rmaps of one emulated host."""

    def __init__(self, nframes: int, rmap: str = DEFAULT_RMAP, **rmap_options):
        self.pool = FramePool(nframes)
        self.token = self.pool.token
        self.rmap_policy = rmap
        self.rmap = make_rmap(rmap, nframes, **rmap_options)
        self.domains: dict[int, Domain] = {}
        #: domains being created, by domid (see DomainTable.begin_domain)
        self.building: dict[int, DomainBuild] = {}
        self._mark = np.full(nframes, 0, dtype=np.int64)   # scratch of share_many (see FramePool)
        self._next_domid = 1
        # Xen: the handle counter starts at 1 and is pre-incremented, so the
        # first handle given out is 2.
        self._handle_counter = 1
        self.nr_shared_mfns = 0
        self.nr_saved_mfns = 0

    # ------------------------------------------------------------------
    # domains

    def stats(self) -> dict:
        return {
            "frames_total": self.pool.nframes,
            "frames_free": self.pool.nfree,
            "nr_shared_mfns": self.nr_shared_mfns,
            "nr_saved_mfns": self.nr_saved_mfns,
            **memory_counters(self),
            "rmap": self.rmap_policy,
            "domains": len(self.domains),
        }

    def close(self) -> None:
        """Free every segment (the p2ms and the pool)."""
        self.__dict__.pop("_pool_bytes", None)
        for d in list(self.domains.values()):
            d.p2m.close()
        self.domains.clear()
        for b in list(self.building.values()):
            if b.p2m is not None:       # (a create still listing has none)
                b.p2m.close()
        self.building.clear()
        self.pool.close()

    def __enter__(self) -> "Hypervisor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
