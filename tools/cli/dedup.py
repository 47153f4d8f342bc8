"""``hvctl dedup``: the content-based dedup scanner, one pass or ksmd-like."""
from __future__ import annotations

import signal
import sys
import threading
import time

from .. import api
from .. import dedup as scanner
from .args import count, domain, positive, print_line


def register(add) -> None:
    x = add("dedup", "share pages with identical content: one pass, or a daemon with --watch",
            "The content-based dedup scanner. Xen shares only the pages the toolstack names\n"
            "and never looks at contents; this finds them. It maps the frame pool and each\n"
            "running domain's p2m read-only, hashes private pages (zero pages are found\n"
            "without hashing), groups equal hashes, nominates the candidates, compares their\n"
            "bytes once nominate has made them read-only, and shares the identical ones. A\n"
            "page written meanwhile is skipped: its handle went stale with the write.\n\n"
            "One pass by default; it reports pages scanned, pages merged, frames saved,\n"
            "seconds, and the hypervisor's longest step while it ran.\n\n"
            "--watch runs like Linux's ksmd: every --interval seconds it scans the next\n"
            "rate x interval gfns (a cursor over the running domains; each wrap is a full\n"
            "scan), skips pages that changed since their last scan, and prints one line per\n"
            "pass (one JSON object per line with --json). It stops on Ctrl-C or SIGTERM,\n"
            "and when the hypervisor goes away (exit status 1).", dedup)
    x.add_argument("domids", metavar="DOMAIN", nargs="*", type=domain,
                   help="scan these running domains only (default: all); pages already shared "
                        "by any domain are merge targets either way")
    x.add_argument("--watch", action="store_true", help="keep scanning, like ksmd, until stopped")
    x.add_argument("--rate", type=positive("rate", 1e8), metavar="PAGES_PER_SECOND",
                   help=f"--watch: gfns scanned per second at most (default "
                        f"{scanner.WATCH_PAGES_PER_SECOND:,}; ksmd's default is 5,000)")
    x.add_argument("--interval", type=positive("interval", 3600), metavar="SECONDS",
                   help=f"--watch: seconds between passes (default {scanner.WATCH_INTERVAL:g}; "
                        f"ksmd's is 0.02)")
    x.add_argument("--batch", type=count("batch"), default=scanner.BATCH_PAGES, metavar="PAGES",
                   help=f"most page pairs per share request, {scanner.NOMINATE_FACTOR}x as many pages "
                        f"per nominate request (default {scanner.BATCH_PAGES}); the hypervisor ends "
                        f"each step when its budget ({scanner.STEP_BUDGET_MS:g} ms of work) is spent "
                        f"and the scanner sends the rest, so this only caps a request's size")


def dedup(a) -> object:
    if not a.watch and (a.rate is not None or a.interval is not None):
        opt = "--rate" if a.rate is not None else "--interval"
        print(f"hvctl dedup: {opt} only applies with --watch (see 'hvctl dedup --help').",
              file=sys.stderr)
        return None, None, 2         # a command-line mistake, like argparse's
    with api.HypervisorClient(a.socket) as c:
        states = {d["domid"]: d["state"] for d in c.list()}
        for x in a.domids:
            if x not in states:
                raise api.HVCtlError(f"no domain with id {x}", 3, "ESRCH")
            if states[x] != "running":
                raise api.HVCtlError(f"domain {x} is {states[x]}; only running domains are scanned")
        backend = scanner.SocketBackend(c)
        with scanner.Scanner(backend, batch_pages=a.batch) as sc:
            if a.watch:
                return _watch(a, sc)
            r = sc.scan_pass(a.domids or None)
    out = _pass_json(r)
    steps = (r.hv_steps or {}).get("all", {})
    ops = ", ".join(f"{r.hv_steps[op]['count']} {op}" for op in scanner.SCANNER_OPS
                    if op in (r.hv_steps or {}))
    text = (f"dedup: scanned {r.scanned:,} pages ({r.zero:,} zero) in {r.seconds:.3f} s: merged "
            f"{r.merged:,}, frames saved {r.saved_delta:+,} (now {r.nr_saved_mfns:,}, "
            f"{r.nr_saved_mfns * 4 / 1024:.1f} MiB)")
    if steps:
        text += (f"\n  hypervisor: {ops or 'no'} requests; longest step < {steps['max_lt_ms']:g} ms "
                 f"({steps['over_1ms']} of {steps['count']} steps over 1 ms)")
    return out, text


def _pass_json(r) -> dict:
    """One pass as JSON: the contract keys, the KSM-like counters at the top
    level, and the rest of the pass's record."""
    out = r.to_dict()
    out.update(r.counters)
    return out


def _pass_line(r) -> str:
    steps = (r.hv_steps or {}).get("all")
    line = (f"{time.strftime('%H:%M:%S')} scanned {r.scanned:,} merged {r.merged:,} in "
            f"{r.seconds:.3f} s; saved {r.nr_saved_mfns:,} frames; shared {r.counters['pages_shared']:,} "
            f"sharing {r.counters['pages_sharing']:,} unshared {r.counters['pages_unshared']:,} "
            f"volatile {r.counters['pages_volatile']:,}; full scans {r.counters['full_scans']}")
    if steps and steps["count"]:
        line += f"; longest step < {steps['max_lt_ms']:g} ms"
    return line


def _watch(a, sc) -> object:
    """ksmd: passes until SIGINT/SIGTERM (status 0) or the hypervisor goes
    away (status 1); one line (or JSON object) per pass, then a summary."""
    stop = threading.Event()
    caught = []

    def on_signal(signum, frame):
        caught.append(signal.Signals(signum).name)
        stop.set()

    def on_pass(r):
        print_line(_pass_json(r)) if a.json else print(_pass_line(r), flush=True)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    gone = None
    totals = {}
    try:
        totals = sc.watch(a.interval or scanner.WATCH_INTERVAL, a.rate or scanner.WATCH_PAGES_PER_SECOND,
                          stop_event=stop, on_pass=on_pass, domids=a.domids or None)
    except api.NoHypervisor as e:
        gone = str(e).rstrip(".")
        totals = {k: sc.counters[k] for k in ("passes", "pages_scanned", "pages_merged", "full_scans")}
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    reason = f"{caught[0]}" if caught else "hypervisor gone"
    summary = {"stopped": reason, **totals}
    if a.json:
        print_line(summary)
    else:
        print(f"dedup --watch stopped ({reason}): " + ", ".join(f"{k} {v:,}" if isinstance(v, int)
                                                                else f"{k} {v:.1f}"
                                                                for k, v in totals.items()), flush=True)
    if gone:
        print(f"hvctl dedup: {gone}; stopping.", file=sys.stderr)
        return None, None, 1
    return None
