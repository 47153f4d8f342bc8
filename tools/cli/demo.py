"""``hvctl demo``: the whole story on a private hypervisor."""
from __future__ import annotations

from .args import count, rate


def register(add) -> None:
    m = add("demo", "run the whole story on a private hypervisor",
            "Start a private hypervisor, boot clone guests from one image, share their\n"
            "common pages with the dedup scanner, let a writer guest take CoW faults, destroy\n"
            "one domain under load, audit, clean up, and report.", demo)
    m.add_argument("--guests", type=count("guests"), default=4, help="clone guests (default 4)")
    m.add_argument("--pages", type=count("pages"), default=4096, help="pages per guest (default 4096)")
    m.add_argument("--seed", type=count("seed", 0), default=1, help="the common image (default 1)")
    m.add_argument("--seconds", type=rate, default=1.0, help="how long the writer runs (default 1)")


def demo(a) -> object:
    from ..demo import report, run_demo
    r = run_demo(guests=a.guests, pages=a.pages, seed=a.seed, seconds=a.seconds,
                 progress=None if a.json else (lambda s: print(s, flush=True)))
    return r, report(r), (1 if r["audit_errors"] else 0)
