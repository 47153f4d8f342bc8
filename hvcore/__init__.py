"""hvcore: the emulated hypervisor's memory-sharing core.

The state machine:

- :mod:`hvshare.hvcore.core`: the `Hypervisor`, assembled from the parts below;
- :mod:`hvshare.hvcore.domains`: the per-domain record, creation (a bounded build
  step at a time) and lookup;
- :mod:`hvshare.hvcore.sharing`: nominate, share, add_to_physmap, range_share;
- :mod:`hvshare.hvcore.cow`: unshare and the guest writes that fault;
- :mod:`hvshare.hvcore.fork`: VM fork (lazy copy-on-write children) and fork reset;
- :mod:`hvshare.hvcore.teardown`: kill, the preemptible relinquish loop, destroy;
- :mod:`hvshare.hvcore.audit`: every invariant, checked from scratch;
- :mod:`hvshare.hvcore.sharing_stats`: what the shared frames save, and where.

Its memory and data structures:

- :mod:`hvshare.hvcore.pool`: machine frames in POSIX shared memory, frame table,
  free list; :mod:`hvshare.hvcore.shm`: the shared-memory segments themselves;
- :mod:`hvshare.hvcore.p2m`: per-domain p2m tables in shared memory (seqlock readers);
- :mod:`hvshare.hvcore.rmap`: reverse maps of shared frames, three policies;
- :mod:`hvshare.hvcore.kernels`: the compiled per-entry loops;
- :mod:`hvshare.hvcore.budget`: the one model of how long a chunk of work takes.

What a domain is filled with:

- :mod:`hvshare.hvcore.images`: generated content (zero pages, clones of a seed);
- :mod:`hvshare.hvcore.snapshot`: a live process's memory, or a file;
  :mod:`hvshare.hvcore.elfcore`: the ELF core files among those.

Shared with the toolstack and the guests:

- :mod:`hvshare.hvcore.constants`: the numbers and names every part agrees on;
- :mod:`hvshare.hvcore.errors`: errors carrying Xen's return codes;
- :mod:`hvshare.hvcore.wire`: the control socket's and guest pipes' formats;
- :mod:`hvshare.hvcore.statedir`: the hypervisor's socket and state directory.

And :mod:`hvshare.hvcore.process`: the hypervisor process around the core.
"""
from .core import Domain, Hypervisor
from .errors import HVError

__all__ = ["Hypervisor", "Domain", "HVError"]
