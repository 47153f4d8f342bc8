"""``hvctl dedup``: the content-based dedup scanner, one pass or ksmd-like."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from .. import api
from .. import dedup as scanner
from ..dedup import daemon
from ..dedup.knobs import KNOBS, PAGES_TO_SCAN, SLEEP_MILLISECS, Knobs, check
from ..interrupts import INTERRUPTED
from ..launch import launch
from .args import count, domain, plural, positive, print_line


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
            "--watch runs like Linux's ksmd: each pass scans the next pages_to_scan gfns\n"
            "(--scan-rate x --interval; a cursor over the running domains, each wrap a full\n"
            "scan), skips pages that changed since their last scan, then sleeps\n"
            "sleep_millisecs (--interval). It prints a line when a pass changed something\n"
            "(pages merged, counters moved; every pass with -v; one JSON object per line\n"
            "with --json), and stops on Ctrl-C, SIGTERM, 'hvctl dedup --stop', and when the\n"
            "hypervisor goes away (exit status 1). --detach runs it in the background\n"
            "(logging to NAME.d/dedup.log next to the hypervisor's socket NAME.sock). One\n"
            "watch runs per hypervisor; 'hvctl dedup-show' shows its knobs and counters and\n"
            "'hvctl dedup-set' changes the knobs while it runs.", dedup)
    x.add_argument("domids", metavar="DOMAIN", nargs="*", type=domain,
                   help="scan these running domains only (default: all); pages already shared "
                        "by any domain are merge targets either way")
    x.add_argument("--watch", action="store_true", help="keep scanning, like ksmd, until stopped")
    x.add_argument("--detach", action="store_true",
                   help="--watch in the background: return once the daemon serves its control socket")
    x.add_argument("--stop", action="store_true", help="stop the running watch (detached or not)")
    x.add_argument("--scan-rate", type=positive("scan-rate", 1e8), metavar="PAGES_PER_SECOND",
                   help=f"--watch: gfns scanned per second at most, i.e. pages_to_scan = rate x "
                        f"interval (default {_DEFAULT_RATE:,.0f}; ksmd's default is 5,000)")
    x.add_argument("--interval", type=positive("interval", 3600), metavar="SECONDS",
                   help=f"--watch: seconds slept after each pass, sleep_millisecs (default "
                        f"{_DEFAULT_INTERVAL:g}; ksmd's is 0.02)")
    x.add_argument("--share-batch", type=count("share-batch"), default=scanner.BATCH_PAGES,
                   metavar="PAGES",
                   help=f"most page pairs per share request, {scanner.NOMINATE_FACTOR}x as many pages "
                        f"per nominate request (default {scanner.BATCH_PAGES}); the hypervisor ends "
                        f"each request's step when its budget ({scanner.REQUEST_BUDGET_MS:g} ms of work) "
                        f"is spent and the scanner sends the rest, so this only caps a request's size")
    x.add_argument("-v", "--verbose", action="store_true",
                   help="--watch: print every pass, not only those that changed something")
    x.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)    # a detached watch's child

    add("dedup-show", "show the dedup daemon's knobs and counters",
        "The running watch's knobs (pages_to_scan, sleep_millisecs, share_batch) and its\n"
        "KSM-like counters: pages_shared (shared frames in use), pages_sharing (gfns\n"
        "mapping them beyond the first, i.e. frames saved), pages_unshared, pages_volatile,\n"
        "full_scans, passes, and the running totals pages_scanned, pages_merged,\n"
        "pages_skipped.", show)
    s = add("dedup-set", "change the dedup daemon's knobs while it runs",
            "Change knobs of the running watch; they apply from its next pass on, and a\n"
            "change ends its current sleep. Knobs (KSM's names in /sys/kernel/mm/ksm/ where\n"
            "KSM has the knob):\n" +
            "".join(f"  {k:<16} {what} ({lo:,} to {hi:,})\n" for k, (lo, hi, what) in KNOBS.items()) +
            "Nothing changes if any key or value is bad.", set_)
    s.add_argument("settings", metavar="KEY=VALUE", nargs="+", help="a knob and its new value")


_DEFAULT_INTERVAL = SLEEP_MILLISECS / 1e3
_DEFAULT_RATE = PAGES_TO_SCAN / _DEFAULT_INTERVAL
#: seconds a --stop waits for the watch to end its pass and exit
STOP_TIMEOUT = 60.0
#: seconds a --detach waits for the daemon to serve
DETACH_TIMEOUT = 60.0


def dedup(a) -> object:
    mistake = _mistake(a)
    if mistake:
        print(f"hvctl dedup: {mistake} (see 'hvctl dedup --help').", file=sys.stderr)
        return None, None, 2         # a command-line mistake, like argparse's
    if a.stop:
        return _stop(a)
    with api.HypervisorClient(a.socket) as c:
        states = {d["domid"]: d["state"] for d in c.list()}
        for x in a.domids:
            if x not in states:
                raise api.HVCtlError(f"no domain with id {x}", 3, "ESRCH")
            if states[x] != "running":
                raise api.HVCtlError(f"domain {x} is {states[x]}; only running domains are scanned")
        if a.detach:
            return _detach(a)
        backend = scanner.SocketBackend(c)
        with scanner.Scanner(backend, batch_pages=a.share_batch) as sc:
            if a.watch:
                return _watch(a, c, sc)
            r = sc.scan_pass(a.domids or None)
        sharing = c.sharing_report()
    out = _pass_json(r)
    out["sharing"] = sharing            # where the sharing lies now (docs/counters.md)
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


def _mistake(a) -> str | None:
    """An option given where it does not apply, as a sentence."""
    watch = a.watch or a.detach
    if a.stop:
        other = [o for o, on in (("--watch", a.watch), ("--detach", a.detach), ("DOMAIN", a.domids),
                                 ("--scan-rate", a.scan_rate is not None),
                                 ("--interval", a.interval is not None), ("-v", a.verbose)) if on]
        return f"--stop takes no {other[0]}" if other else None
    for opt, given in (("--scan-rate", a.scan_rate is not None), ("--interval", a.interval is not None),
                       ("-v", a.verbose)):
        if given and not watch:
            return f"{opt} only applies with --watch"
    return None


def _knobs(a) -> Knobs:
    interval = a.interval if a.interval is not None else _DEFAULT_INTERVAL
    rate = a.scan_rate if a.scan_rate is not None else _DEFAULT_RATE
    return Knobs(pages_to_scan=min(KNOBS["pages_to_scan"][1], max(1, round(rate * interval))),
                 sleep_millisecs=round(interval * 1e3), share_batch=a.share_batch)


def _pass_json(r) -> dict:
    """One pass as JSON: the contract keys, the KSM-like counters at the top
    level (once), and the rest of the pass's record; seconds to 0.1 ms."""
    out = r.to_dict()
    out.update(out.pop("counters"))
    out["seconds"] = round(out["seconds"], 4)
    out["phase_seconds"] = {k: round(v, 4) for k, v in out["phase_seconds"].items()}
    return out


#: the counters whose change is worth a line in --watch (the others move every pass)
GAUGES = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")


def _pass_line(r) -> str:
    steps = (r.hv_steps or {}).get("all")
    line = (f"{time.strftime('%H:%M:%S')} scanned {r.scanned:,} merged {r.merged:,} in "
            f"{r.seconds:.3f} s; saved {r.nr_saved_mfns:,} frames; shared {r.counters['pages_shared']:,} "
            f"sharing {r.counters['pages_sharing']:,} unshared {r.counters['pages_unshared']:,} "
            f"volatile {r.counters['pages_volatile']:,}; passes {r.counters['passes']:,} "
            f"full scans {r.counters['full_scans']}")
    if r.skipped:
        line += f"; skipped {r.skipped:,} (written meanwhile)"
    if steps and steps["count"]:
        line += f"; longest step < {steps['max_lt_ms']:g} ms"
    return line


def _watch(a, c, sc) -> object:
    """ksmd: passes until SIGTERM or 'dedup --stop' (status 0), Ctrl-C
    (status 130) or the hypervisor goes away (status 1); a line (or JSON object) per pass
    that changed something (every pass with -v), then a summary. Serves
    the control socket (:mod:`hvshare.tools.dedup.daemon`) meanwhile."""
    path = os.path.abspath(a.socket or api.default_socket_path())
    stop = threading.Event()
    caught = []
    knobs = _knobs(a)
    started = time.monotonic()
    last = {"counters": dict(sc.counters)}

    def request_stop(reason: str) -> None:
        caught.append(reason)
        stop.set()
        knobs.changed.set()         # ends the sleep at once

    def on_signal(signum, frame):
        request_stop(signal.Signals(signum).name)

    def status() -> dict:
        out = {"pid": os.getpid(), "detached": a.ready_fd is not None, "socket": path,
               "uptime_s": round(time.monotonic() - started, 3), "domids": a.domids or None,
               "counters": {k: last["counters"][k] for k in scanner.Scanner.COUNTERS}}
        if a.ready_fd is not None:
            out["log"] = daemon.paths(path)["log"]
        return out

    def on_pass(r):
        before, last["counters"] = last["counters"], dict(r.counters)
        moved = r.merged or r.skipped or r.mismatched or \
            any(before[k] != r.counters[k] for k in GAUGES)
        if moved or a.verbose:
            print_line(_pass_json(r)) if a.json else print(_pass_line(r), flush=True)

    server = daemon.ControlServer(path, knobs, status, lambda: request_stop("dedup --stop"))
    try:
        server.open()
    except api.HVCtlError as e:
        if a.ready_fd is None:
            raise
        _tell(a.ready_fd, f"error {e}")
        return None, None, 1
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    gone = None
    totals = {}
    try:
        if a.ready_fd is not None:
            _tell(a.ready_fd, f"ready {os.getpid()}")
        totals = scanner.Watcher(sc).watch(knobs, stop_event=stop, on_pass=on_pass,
                                           domids=a.domids or None, idle=c.ping)
    except api.NoHypervisor as e:
        gone = str(e).rstrip(".")
        totals = {k: sc.counters[k] for k in ("passes", "pages_scanned", "pages_merged", "full_scans")}
        totals["seconds"] = round(time.monotonic() - started, 4)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        server.close()
    reason = caught[0] if caught else "hypervisor gone"
    summary = {"stopped": reason, **totals}
    if a.json:
        print_line(summary)
    else:
        print(f"dedup --watch stopped ({reason}): " + ", ".join(f"{k} {v:,}" if isinstance(v, int)
                                                                else f"{k} {v:.1f}"
                                                                for k, v in totals.items()), flush=True)
    if a.ready_fd is not None:      # a detached watch that ended as asked: its log goes too
        try:
            os.unlink(daemon.paths(path)["log"])
        except FileNotFoundError:
            pass
    if gone:
        print(f"hvctl dedup: {gone}; stopping.", file=sys.stderr)
        return None, None, 1
    return (None, None, INTERRUPTED) if reason == "SIGINT" else None


def _tell(fd: int, line: str) -> None:
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _detach(a) -> object:
    """Start the watch as a daemon of its own; return once it serves."""
    path = os.path.abspath(a.socket or api.default_socket_path())
    files = daemon.paths(path)
    pid = daemon.holder(path)
    if pid is not None:
        raise api.HVCtlError(f"a dedup daemon{f' (pid {pid})' if pid > 0 else ''} is already running "
                             f"for the hypervisor on {path}: 'hvctl dedup-show' shows it, "
                             f"'hvctl dedup --stop' stops it", 16, "EBUSY")
    knobs = _knobs(a).values()
    cmd = [sys.executable, "-m", "hvshare.tools.hvctl", "dedup", "--watch", "--socket", path,
           "--share-batch", str(a.share_batch), *map(str, a.domids)]
    for opt, v in (("--interval", a.interval), ("--scan-rate", a.scan_rate)):
        if v is not None:
            cmd += [opt, repr(v)]
    if a.verbose:
        cmd.append("-v")
    proc, _ = launch(cmd, files["log"], DETACH_TIMEOUT, "the dedup daemon")
    out = {"pid": proc.pid, "socket": path, "control": files["sock"], "log": files["log"],
           "knobs": knobs, "domids": a.domids or None}
    return out, (f"dedup daemon {proc.pid} watching the hypervisor on {path} ("
                 + ", ".join(f"{k} {v}" for k, v in knobs.items()) +
                 f")\nlog: {files['log']}; 'hvctl dedup-show' shows it, 'hvctl dedup --stop' stops it")


def _stop(a) -> object:
    path = os.path.abspath(a.socket or api.default_socket_path())
    with daemon.DaemonClient(path) as d:
        r = d.stop()
    if not daemon.wait_gone(path, STOP_TIMEOUT):
        raise api.HVCtlError(f"the dedup daemon (pid {r['pid']}) did not stop within {STOP_TIMEOUT:g} s")
    c = r["counters"]
    passes = f"{c['passes']:,} pass" + ("" if c["passes"] == 1 else "es")
    return r, (f"dedup daemon {r['pid']} stopped after {passes} "
               f"({plural(c['full_scans'], 'full scan')}, {c['pages_merged']:,} pages merged)")


def show(a) -> object:
    path = os.path.abspath(a.socket or api.default_socket_path())
    with daemon.DaemonClient(path) as d:
        r = d.show()
    how = f"detached, log {r['log']}" if r["detached"] else "in the foreground"
    which = "all running domains" if not r["domids"] else \
        "domains " + ", ".join(map(str, r["domids"]))
    lines = [f"dedup daemon {r['pid']} ({how}), up {r['uptime_s']:.0f} s, scanning {which}"]
    lines += [f"  {k:<16}{v:>12,}  {KNOBS[k][2]}" for k, v in r["knobs"].items()]
    lines += [f"  {k:<16}{v:>12,}" for k, v in r["counters"].items()]
    return r, "\n".join(lines)


def set_(a) -> object:
    changes, errors = {}, []
    for text in a.settings:
        key, eq, value = text.partition("=")
        if not eq or not key:
            errors.append(f"{text!r} is not KEY=VALUE")
        elif key in changes:
            errors.append(f"{key} is given twice")
        else:
            changes[key] = value
    _, bad = check(changes)
    errors += bad
    if errors:
        for e in errors:
            print(f"hvctl dedup-set: {e}; nothing was changed.", file=sys.stderr)
        return None, None, 2
    path = os.path.abspath(a.socket or api.default_socket_path())
    with daemon.DaemonClient(path) as d:
        r = d.call("set", knobs=changes)
    return r, "\n".join(f"{k} {r['before'][k]} -> {r['knobs'][k]}" for k in changes)
