"""hvcore: the emulated hypervisor's memory-sharing core.

- :mod:`hvcore.pool`: machine frames in POSIX shared memory, frame table, free list;
- :mod:`hvcore.p2m`: per-domain p2m tables in shared memory (seqlock readers);
- :mod:`hvcore.rmap`: reverse maps of shared frames, three policies;
- :mod:`hvcore.core`: the `Hypervisor` state machine, assembled from
  :mod:`hvcore.domains`, :mod:`hvcore.sharing`, :mod:`hvcore.cow`,
  :mod:`hvcore.teardown` and :mod:`hvcore.audit`;
- :mod:`hvcore.process`: the hypervisor process around the core.
"""
from .core import Domain, Hypervisor
from .errors import HVError

__all__ = ["Hypervisor", "Domain", "HVError"]
