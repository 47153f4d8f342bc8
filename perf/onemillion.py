"""A dedup pass and a teardown at 1,000,000 pages: ``python -m hvshare.perf onemillion``.

Two clone domains of 500,000 pages each (50,000 with ``--quick``) on one
hypervisor process: one scanner pass over the socket merges them, then the
kill controller destroys one of them. Figures: the pass's seconds and
longest step, the teardown's seconds and longest step; beside them the
entries and steps of the teardown and the audit.
"""
from __future__ import annotations

import time

from .common import table
from .figure import Figures, text_of

PAGES = 500_000


def run(quick: bool = False, rmap: str = "buckets") -> dict:
    from hvshare.tools import killctl
    from hvshare.tools.api import HypervisorClient, hvshare_session
    from hvshare.tools.dedup import Scanner, SocketBackend
    pages = PAGES // 10 if quick else PAGES
    figs = Figures()
    out: dict = {"rmap": rmap, "pages": 2 * pages}
    with hvshare_session(frames=2 * pages + 100_000, rmap=rmap) as hv:
        hv.create(pages, "clone", seed=1)
        b = hv.create(pages, "clone", seed=1)
        t0 = time.perf_counter()
        with Scanner(SocketBackend(hv)) as sc:
            r = sc.scan_pass()
        figs.add("dedup_seconds", [time.perf_counter() - t0], "s", rmap=rmap, pages=2 * pages)
        steps = r.hv_steps or {}
        longest = [v.get("max_ms") for k, v in steps.items() if k != "all" and v.get("max_ms") is not None]
        figs.add("dedup_max_step", [max(longest)] if longest else [], "ms", rmap=rmap, pages=2 * pages)
        out.update(dedup_merged=r.merged, dedup_over_1ms=steps.get("all", {}).get("over_1ms"))
        with HypervisorClient(hv.socket_path, timeout=None) as c:
            d = killctl.destroy(c, b)
        figs.add("teardown_seconds", [d["seconds"]], "s", rmap=rmap, pages=2 * pages)
        figs.add("teardown_max_step", [d["max_pause_ms"]], "ms", rmap=rmap, pages=2 * pages)
        out.update(teardown_entries=d["entries"], teardown_steps=d["steps"], audit_errors=hv.audit())
    out["figures"] = figs.dicts()
    return out


def report(result: dict) -> str:
    rows = [[name, text_of(result, name)] for name in ("dedup_seconds", "dedup_max_step", "teardown_seconds",
                                                        "teardown_max_step")]
    return (f"{result['pages']:,} pages, rmap {result['rmap']}: {result['dedup_merged']:,} merged, "
            f"{result['teardown_entries']:,} entries torn down in {result['teardown_steps']} steps, "
            f"audit {result['audit_errors']}\n" + table(["figure", "value"], rows, "l"))
