"""hvcore: the emulated hypervisor's memory-sharing core.

The state machine:

- :mod:`hvcore.core`: the `Hypervisor`, assembled from the parts below;
- :mod:`hvcore.domains`: the per-domain record, creation (a bounded build
  step at a time) and lookup;
- :mod:`hvcore.sharing`: nominate, share, add_to_physmap, range_share;
- :mod:`hvcore.cow`: unshare and the guest writes that fault;
- :mod:`hvcore.fork`: VM fork (lazy copy-on-write children) and fork reset;
- :mod:`hvcore.teardown`: kill, the preemptible relinquish loop, destroy;
- :mod:`hvcore.audit`: every invariant, checked from scratch;
- :mod:`hvcore.sharing_stats`: what the shared frames save, and where.

Its memory and data structures:

- :mod:`hvcore.pool`: machine frames in POSIX shared memory, frame table,
  free list; :mod:`hvcore.shm`: the shared-memory segments themselves;
- :mod:`hvcore.p2m`: per-domain p2m tables in shared memory (seqlock readers);
- :mod:`hvcore.rmap`: reverse maps of shared frames, three policies;
- :mod:`hvcore.kernels`: the compiled per-entry loops;
- :mod:`hvcore.budget`: the one model of how long a chunk of work takes.

What a domain is filled with:

- :mod:`hvcore.images`: generated content (zero pages, clones of a seed);
- :mod:`hvcore.snapshot`: a live process's memory, or a file;
  :mod:`hvcore.elfcore`: the ELF core files among those.

Shared with the toolstack and the guests:

- :mod:`hvcore.constants`: the numbers and names every part agrees on;
- :mod:`hvcore.errors`: errors carrying Xen's return codes;
- :mod:`hvcore.wire`: the control socket's and guest pipes' formats;
- :mod:`hvcore.statedir`: the hypervisor's socket and state directory.

And :mod:`hvcore.process`: the hypervisor process around the core.
"""
from .core import Domain, Hypervisor
from .errors import HVError

__all__ = ["Hypervisor", "Domain", "HVError"]
