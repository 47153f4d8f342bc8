"""The audit's cost per entry checked, for each rmap policy.

Two domains of ``pages / 2`` pages each; all their pages are shared
pairwise (``range_share``) except the last ``heavy / 2`` gfns of each,
which share one frame (``heavy`` gfns on it). So the audit checks
``pages`` p2m entries and ``pages`` rmap entries. Reported: the median
wall time of ``audit_report()`` and the nanoseconds per entry checked
(p2m entries + rmap entries).

    python -m hvshare.perf.audit [--quick] [--pages N] [--heavy N] [--policies list,index]
"""
from __future__ import annotations

import sys
import time

import numpy as np

from .common import repeat_times, standalone, table
from .figure import Figures, text_of


def build(policy: str, pages: int, heavy: int):
    """The host described in the module docstring, audited clean."""
    from hvshare.hvcore import Hypervisor
    half, hh = pages // 2, heavy // 2
    hv = Hypervisor(pages + 16, rmap=policy)
    a = hv.create_domain(half).domid
    b = hv.create_domain(half).domid
    hv.range_share(a, b, 0, half - hh - 1)
    if hh:
        gs = np.arange(half - hh, half, dtype=np.int64)
        ah, _ = hv.nominate_many(a, gs)
        bh, _ = hv.nominate_many(b, gs)
        # every other page of both onto a's first heavy page
        src = np.full(2 * hh - 1, gs[0], dtype=np.int64)
        sh = np.full(2 * hh - 1, ah[0], dtype=np.uint64)
        doms = np.concatenate([np.full(hh - 1, a), np.full(hh, b)])
        codes = hv.share_many(a, src, sh, doms, np.concatenate([gs[1:], gs]),
                              np.concatenate([ah[1:], bh]))
        assert not codes.any()
    return hv


def run(quick: bool = False, pages: int | None = None, heavy: int | None = None,
        policies: str | None = None, repeats: int | None = None) -> dict:
    from hvshare.hvcore.constants import RMAP_POLICIES
    pages = pages or (20_000 if quick else 1_000_000)
    heavy = heavy if heavy is not None else (2_000 if quick else 100_000)
    repeats = repeats or (1 if quick else 5)
    rows, figs = [], Figures()
    for policy in (policies.split(",") if policies else RMAP_POLICIES):
        t0 = time.perf_counter()
        hv = build(policy, pages, heavy)
        setup = time.perf_counter() - t0
        try:
            found = hv.audit_report()
            assert found == [], found
            p2m = sum(d.npages for d in hv.domains.values())
            rmap = hv.nr_shared_mfns + hv.nr_saved_mfns
            times = repeat_times(hv.audit_report, repeats=repeats)
        finally:
            hv.close()
        figs.add("seconds", times, "s", policy=policy)
        figs.add("ns_per_entry", [t * 1e9 / (p2m + rmap) for t in times], "ns", policy=policy)
        rows.append({"policy": policy, "p2m_entries": p2m, "rmap_entries": rmap,
                     "shared_frames": hv.nr_shared_mfns, "setup_seconds": setup})
    return {"figures": figs.dicts(), "pages": pages, "heavy": heavy, "repeats": repeats, "rows": rows}


def report(result: dict) -> str:
    head = (f"audit_report() at {result['pages']:,} p2m entries, one frame of "
            f"{result['heavy']:,} gfns (median of {result['repeats']})")
    rows = [(r["policy"], f"{r['p2m_entries']:,}", f"{r['rmap_entries']:,}",
             text_of(result, "seconds", policy=r["policy"]), text_of(result, "ns_per_entry", policy=r["policy"]))
            for r in result["rows"]]
    return head + "\n" + table(["policy", "p2m entries", "rmap entries", "time", "per entry"], rows)


def main(argv=None) -> int:
    opts = [(("--pages",), {"type": int, "help": "p2m entries in all (default 1,000,000)"}),
            (("--heavy",), {"type": int, "help": "gfns on the one heavy frame (default 100,000)"}),
            (("--policies",), {"help": "comma-separated rmap policies (default all)"})]
    return standalone(sys.argv[1:] if argv is None else argv, "python -m hvshare.perf.audit",
                      __doc__.splitlines()[0], "20,000 pages, one repeat", run, report, opts)


if __name__ == "__main__":
    sys.exit(main())
