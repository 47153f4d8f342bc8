"""``hvctl demo``: the whole story on a private hypervisor."""
from __future__ import annotations

from .args import count, positive


def register(add) -> None:
    m = add("demo", "run the whole story on a private hypervisor",
            "Start a private hypervisor, boot clone guests from one image, share their\n"
            "common pages with the dedup scanner while a writer guest writes, take single-page\n"
            "CoW faults alone, destroy one domain while the writer writes, audit, clean up,\n"
            "and report. Each latency says what it measured: a single-page CoW fault taken\n"
            "with nothing else running, the writer's batches during the dedup pass, and the\n"
            "hypervisor's longest step per operation.", demo)
    m.add_argument("--guests", type=count("guests"), default=4, help="clone guests (default 4)")
    m.add_argument("--pages", type=count("pages"), default=4096, help="pages per guest (default 4096)")
    m.add_argument("--seed", type=count("seed", 0), default=1, help="the common image (default 1)")
    m.add_argument("--seconds", type=positive("seconds", 60), default=1.0,
                   help="how long the writer runs after the dedup pass (default 1)")


def demo(a) -> object:
    from ..demo import report, run_demo
    r = run_demo(guests=a.guests, pages=a.pages, seed=a.seed, seconds=a.seconds,
                 progress=None if a.json else (lambda s: print(s, flush=True)))
    return r, report(r), (1 if r["audit_errors"] else 0)
