"""A dedup pass and a teardown at 1,000,000 pages: ``python -m perf.onemillion [RMAP]``.

Two clone domains of 500,000 pages each on one hypervisor process: one
scanner pass over the socket merges them, then the kill controller destroys
one of them. Prints one JSON line: the pass's seconds and longest steps, the
teardown's seconds, entries, steps and longest step, and the audit.
"""
from __future__ import annotations

import json
import sys
import time

PAGES = 500_000


def run(rmap: str = "buckets") -> dict:
    from tools import killctl
    from tools.api import HypervisorClient, hvshare_session
    from tools.dedup import Scanner, SocketBackend
    out: dict = {"rmap": rmap, "pages": 2 * PAGES}
    with hvshare_session(frames=2 * PAGES + 100_000, rmap=rmap) as hv:
        hv.create(PAGES, "clone", seed=1)
        b = hv.create(PAGES, "clone", seed=1)
        t0 = time.perf_counter()
        with Scanner(SocketBackend(hv)) as sc:
            r = sc.scan_pass()
        steps = r.hv_steps or {}
        out.update(dedup_s=round(time.perf_counter() - t0, 2), dedup_merged=r.merged,
                   dedup_over_1ms=steps.get("all", {}).get("over_1ms"),
                   dedup_longest_ms={k: v.get("max_ms") for k, v in steps.items() if k != "all"})
        with HypervisorClient(hv.socket_path, timeout=None) as c:
            d = killctl.destroy(c, b)
        out.update(teardown_s=d["seconds"], teardown_entries=d["entries"], teardown_steps=d["steps"],
                   teardown_max_pause_ms=d["max_pause_ms"], audit=hv.audit())
    return out


if __name__ == "__main__":
    print(json.dumps(run(*sys.argv[1:2])))
