"""The numbers and names every part of hvshare agrees on.

One place for each: the page size, the domid space, the rmap policies, the
workloads a domain can run, the hypervisor process's modes, and the one
step budget that bounds every preemptible operation (with the share of it
a dedup request may take). The hypervisor, the guests, the toolstack and
the benchmarks import them from here; nothing defines them again.
``docs/semantics.md`` explains where each comes from.
"""
from __future__ import annotations

#: bytes in a guest page and a machine frame (x86's 4 KiB)
PAGE_SIZE = 4096

#: domids from this one up are reserved (Xen's DOMID_FIRST_RESERVED)
DOMID_FIRST_RESERVED = 0x7FF0
#: the highest domid a guest domain can have
DOMID_MAX = DOMID_FIRST_RESERVED - 1
#: owner of a shared frame (Xen's dom_cow)
DOMID_COW = 0x7FF3
#: owner recorded for a frame in the free list
OWNER_FREE = -1

#: longest domain name, in characters (a name is also printable and unique)
MAX_NAME_LENGTH = 64

#: the reverse-map policies, oldest first (``docs/semantics.md``, "Reverse map")
RMAP_POLICIES = ("list", "buckets", "index")
DEFAULT_RMAP = "buckets"

#: what a domain's guest process does once it runs, and what its memory
#: is filled with at create: ``zero`` pages, a ``clone`` image (most
#: pages shared with other domains of the same seed), a ``writer``
#: that dirties its ``clone`` image at a set rate, or ``fuzz``: a
#: ``clone`` image, and on each run (a VM fork's fuzzing loop) it writes
#: FUZZ_WRITES random pages, reads FUZZ_READS and says it is done
WORKLOADS = ("zero", "clone", "writer", "fuzz")
DEFAULT_WORKLOAD = "zero"
#: pages a fuzz iteration writes and reads unless told otherwise
DEFAULT_FUZZ_WRITES = 64
DEFAULT_FUZZ_READS = 64

#: most pages one batched guest write may carry (16 MiB of page data)
MAX_BATCH_PAGES = 4096

#: frames in a hypervisor's pool unless told otherwise (256 MiB)
DEFAULT_FRAMES = 65536
#: guest processes the hypervisor keeps started and waiting (interpreter
#: up, imports done, pool mapped), so that a create or a fork hands one a
#: domain instead of starting an interpreter; 0 starts every guest cold
DEFAULT_WARM_GUESTS = 2

#: how a domain's shared entries are dropped: ``preemptible`` steps that
#: answer "restart" whenever other work waits, or one ``monolithic`` step
TEARDOWN_MODES = ("preemptible", "monolithic")
DEFAULT_TEARDOWN = "preemptible"
#: how the hypervisor process is scheduled: ``fifo`` (real-time SCHED_FIFO
#: at the lowest priority, where the kernel allows it: as in Xen, a guest
#: never preempts the hypervisor in the middle of a step) or ``normal``
SCHED_MODES = ("fifo", "normal")
DEFAULT_SCHED = "fifo"

#: The step budget (default 0.8 ms): the hypervisor's bound on one step.
#: A preemptible operation (a teardown step, a create or range_share
#: chunk, a budgeted nominate_many or share_many) stops and answers once
#: this much work time is spent, or sooner when other work waits; between
#: steps it serves guests and other clients. ``docs/design.md``, "Steps".
STEP_BUDGET_SECONDS = 0.0008
#: The share of a step one dedup request may ask for (default 5/8): a
#: request's ``budget_us`` stays below the step budget so that its framing
#: (0.1-0.2 ms) and the fixed cost of a chunk started just before the
#: budget is spent still end inside the step.
DEDUP_REQUEST_SHARE = 0.625
#: The dedup request budget (default 0.5 ms = 0.8 ms x 5/8): the work time
#: the hypervisor may spend on one of the scanner's nominate_many or
#: share_many requests before it answers with what it did.
DEDUP_REQUEST_BUDGET_SECONDS = STEP_BUDGET_SECONDS * DEDUP_REQUEST_SHARE
