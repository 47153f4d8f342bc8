"""Floor of a dedup pass over N identical pages, in one process, CPU time.

    python docs/perf/probes/dedup_floor.py [N] [REPEATS]

The same work as ``python -m hvshare.perf dedup``'s identical case, with
nothing around it: no sockets, no second process, no scanner bookkeeping.

- read: xxh3_64 of every page, in place on the mapping (the hash phase);
- verify: every member compared in place with its source (the compare
  after nominate, ``rows_equal``);
- core: the in-process core's nominate_many and share_many of every page
  into one frame, in requests of 1,000 pairs (the hypervisor's part).

Their sum is what one core spends on a pass when nothing overlaps; the
pass's wall time can only go below it by running the scanner's and the
hypervisor's parts at the same time.
"""
import mmap
import statistics
import sys
import time

import numpy as np
import xxhash

from hvshare.hvcore import kernels
from hvshare.hvcore.core import Hypervisor

N = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
REPEATS = int(sys.argv[2]) if len(sys.argv) > 2 else 5
PAGE = 4096
REQUEST = 1000


def read_and_verify(mm: mmap.mmap) -> tuple[float, float]:
    mv = memoryview(mm)
    h = xxhash.xxh3_64_intdigest
    t = time.thread_time()
    sums = np.fromiter((h(mv[m * PAGE:(m + 1) * PAGE]) for m in range(N)), np.uint64, N)
    t1 = time.thread_time()
    src = mv[:PAGE].tobytes()
    find = mm.find
    same = [find(src, m * PAGE, (m + 1) * PAGE) == m * PAGE for m in range(1, N)]
    t2 = time.thread_time()
    assert (sums == sums[0]).all() and all(same)
    del mv
    return t1 - t, t2 - t1


def core() -> float:
    hv = Hypervisor(N + 1024, rmap="buckets")
    d = hv.create_domain(N).domid
    g = np.arange(N, dtype=np.int64)
    t = time.thread_time()
    hs = np.concatenate([hv.nominate_many(d, g[s:s + 3 * REQUEST])[0] for s in range(0, N, 3 * REQUEST)])
    for s in range(1, N, REQUEST):
        k = len(g[s:s + REQUEST])
        hv.share_many(d, np.zeros(k, np.int64), np.full(k, hs[0], np.uint64), d, g[s:s + REQUEST],
                      hs[s:s + REQUEST])
    dt = time.thread_time() - t
    assert hv.nr_saved_mfns == N - 1
    hv.close()
    return dt


def main() -> None:
    kernels.warm()
    page = np.random.default_rng(0).integers(0, 256, PAGE, dtype=np.uint8).tobytes()
    mm = mmap.mmap(-1, N * PAGE)
    for m in range(N):
        mm[m * PAGE:(m + 1) * PAGE] = page
    out = {"read": [], "verify": [], "core": []}
    for _ in range(REPEATS):
        r, v = read_and_verify(mm)
        out["read"].append(r)
        out["verify"].append(v)
        out["core"].append(core())
    mm.close()
    total = [sum(x) for x in zip(*out.values())]
    for k, v in {**out, "sum": total}.items():
        print(f"{k:7} median {statistics.median(v) * 1e3:6.1f} ms  [{min(v) * 1e3:.1f}-{max(v) * 1e3:.1f}]")
    print(f"pages/s at the sum: {N / statistics.median(total):,.0f}")


if __name__ == "__main__":
    main()
