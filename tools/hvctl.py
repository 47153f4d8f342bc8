"""``hvctl``: the command line of hvshare's toolstack.

Each subcommand is a thin layer over :mod:`tools.api`: parse and check the
arguments, make one or a few requests on the control socket, print a short
human answer or, with ``--json``, one JSON object (a list for ``list``) whose
keys are the contract of the README. Every failure is one sentence on
stderr and a non-zero exit status: 1 for a failed operation (and for an
audit that found errors), 2 for a mistake on the command line.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import threading
import time

from hvcore.constants import (DEFAULT_RMAP, DEFAULT_SCHED, DEFAULT_TEARDOWN, DEFAULT_WORKLOAD,
                              RMAP_POLICIES, SCHED_MODES, TEARDOWN_MODES, WORKLOADS)

from hvcore.process.statedir import crash_note

from . import api

EPILOG = """\
The hypervisor is one process serving a Unix control socket; each domain's
guest is a process of its own that maps the frame pool read-only and writes
through its pipe to the hypervisor (a write to a shared page is a CoW fault).

Socket: --socket PATH, else $HVSHARE_SOCKET, else
$XDG_RUNTIME_DIR/hvshare/hvshare.sock, else /tmp/hvshare-UID/hvshare.sock.
--socket and --json work before or after the subcommand.

Examples:
  hvctl start --frames 65536
  hvctl create --pages 4096 --workload clone --seed 1
  hvctl create --pages 4096 --workload clone --seed 1
  hvctl dedup           # share their identical pages (--watch: keep doing so)
  hvctl list
  hvctl info --json
  hvctl stop
  hvctl demo            # everything above, on a private hypervisor
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake in one sentence, without the usage dump."""

    def error(self, message: str):
        if message.startswith("argument "):
            message = message[len("argument "):].replace(": ", " ", 1)
        sys.stderr.write(f"{self.prog}: {message} (see '{self.prog} --help').\n")
        sys.exit(2)


def _count(what: str, minimum: int = 1):
    def parse(text: str) -> int:
        try:
            v = int(text, 0)
        except ValueError:
            v = None
        if v is None or v < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
            raise argparse.ArgumentTypeError(f"must be {kind}, not {text!r}")
        return v
    parse.__name__ = what
    return parse


def _domain(text: str):
    """A domain as ``xl`` takes one: its domid, or its name."""
    if text.isdigit():
        return _count("domid")(text)
    if not text or not text.isprintable():
        raise argparse.ArgumentTypeError(f"must be a domid or a domain name, not {ascii(text)}")
    return text


def _resolve(a) -> None:
    """Domain names given for domids, turned into domids (ESRCH if none has it)."""
    refs = ([a.domid] if isinstance(getattr(a, "domid", None), str) else []) + \
        [x for x in getattr(a, "domids", None) or [] if isinstance(x, str)]
    if not refs:
        return
    with api.HypervisorClient(a.socket) as c:
        by_name = {d["name"]: d["domid"] for d in c.list()}
    for ref in refs:
        if ref not in by_name:
            raise api.HVCtlError(f"no domain is called {ref}", 3, "ESRCH")
    if isinstance(getattr(a, "domid", None), str):
        a.domid = by_name[a.domid]
    if getattr(a, "domids", None):
        a.domids = [by_name[x] if isinstance(x, str) else x for x in a.domids]


def _rate(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0 <= v <= 1e6:
        raise argparse.ArgumentTypeError(f"must be a number of pages per second (0 to 1e6), not {text!r}")
    return v


def _positive(what: str, hi: float):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = -1.0
        if not 0 < v <= hi:
            raise argparse.ArgumentTypeError(f"must be a number above 0 and at most {hi:g}, not {text!r}")
        return v
    parse.__name__ = what
    return parse


def _common() -> argparse.ArgumentParser:
    # SUPPRESS: a subcommand's copy must not overwrite the same option given
    # before the subcommand.
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                   help="the hypervisor's control socket (default: see 'hvctl --help')")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print one JSON object (a list for 'list') instead of text")
    return p


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("hvshare")
    except Exception:                   # run from a source tree that is not installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    p = _Parser(prog="hvctl", parents=[common], epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Control an hvshare hypervisor: an emulation of Xen's memory sharing "
                            "with real processes and real shared memory.")
    p.add_argument("--version", action="version", version=f"hvctl (hvshare) {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def cmd(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    s = cmd("start", "start a hypervisor in the background",
            "Start a hypervisor and return once it serves (it detaches unless --foreground).\n"
            "A second start on a live socket fails; a start that finds a dead hypervisor's\n"
            "leftovers (socket, state directory, shared-memory segments) removes them.\n"
            "The socket's directory must be yours (or root's) and not writable by others\n"
            "unless sticky, as /tmp is; missing directories are made 0700. Set\n"
            "HVSHARE_INSECURE_SOCKET_DIR=1 to accept another. A detached hypervisor logs\n"
            "to NAME.d/hypervisor.log next to its socket NAME.sock.")
    s.add_argument("--frames", type=_count("frames"), default=api.DEFAULT_FRAMES,
                   help=f"machine frames of 4 KiB in the pool (default {api.DEFAULT_FRAMES}, "
                        f"{api.DEFAULT_FRAMES * 4 >> 10} MiB)")
    s.add_argument("--rmap", choices=RMAP_POLICIES, default=DEFAULT_RMAP,
                   help="reverse-map policy: buckets (Xen 4.2's list<->hash, default), list (before "
                        "it), index (O(1))")
    s.add_argument("--teardown", choices=TEARDOWN_MODES, default=DEFAULT_TEARDOWN,
                   help="domain teardown: preemptible (default, Xen 4.2) or monolithic (before it)")
    s.add_argument("--sched", choices=SCHED_MODES, default=DEFAULT_SCHED,
                   help="fifo (default): real-time priority, so guests never preempt a hypervisor "
                        "step, as in Xen (falls back to normal where not permitted); normal: an "
                        "ordinary process")
    s.add_argument("--prefault", action="store_true",
                   help="back every frame of the pool with memory before serving, as a real "
                        "host's RAM is, and size the reverse map for as many entries as frames "
                        "(takes a few seconds per million frames): creates, dedup and CoW faults "
                        "then rarely wait for the kernel to provide a page")
    s.add_argument("--foreground", action="store_true",
                   help="stay attached: serve until Ctrl-C, log to this terminal")

    cmd("stop", "stop the hypervisor, its guests, and free all its memory",
        "Stop every guest, unlink every shared-memory segment and remove the socket.\n"
        "If the hypervisor is dead, remove what it left behind.")

    c = cmd("create", "create a domain and start its guest",
            "Create a domain of --pages pages, fill its memory from the workload, start its\n"
            "guest process, and print the new domid.\n\n"
            "Workloads: zero (every page zero), clone (a common image chosen by --seed, some\n"
            "zero and some private pages: VMs booted from one image), writer (a clone whose\n"
            "guest writes --rate random pages per second, --batch pages per message).\n\n"
            "The hypervisor populates the domain a bounded step at a time, serving guests and\n"
            "other requests in between, and answers once the guest runs; meanwhile 'hvctl\n"
            "list' shows it as creating. On a terminal a bar shows the pages populated. If the\n"
            "hypervisor stops first, the create fails (ECANCELED) and nothing of it is left.")
    c.add_argument("--pages", type=_count("pages"), required=True, help="pages of 4 KiB")
    c.add_argument("--workload", default=DEFAULT_WORKLOAD, choices=WORKLOADS,
                   help="what the memory holds and what the guest does (default zero)")
    c.add_argument("--seed", type=_count("seed", 0), default=0,
                   help="selects the common image of clone and writer (default 0)")
    c.add_argument("--name", help="a name for the domain (default domN)")
    c.add_argument("--paused", action="store_true", help="create it paused (see 'hvctl unpause')")
    c.add_argument("--rate", type=_rate, default=200.0,
                   help="writer: pages written per second (default 200)")
    c.add_argument("--batch", type=_count("batch"), default=1,
                   help="writer: pages per write message (default 1)")

    cmd("list", "list domains", "One line per domain: domid, name, state, pages, shared pages,\n"
        "guest pid, workload, writes and CoW faults (with the guest's own fault latency).")
    cmd("info", "show the hypervisor's counters",
        "Frames, sharing counters (nr_shared_mfns, nr_saved_mfns), rmap policy, teardown\n"
        "mode, and the longest step the hypervisor ran without serving anything else\n"
        "(max_pause_ms) with a log2 histogram of step lengths.")
    cmd("audit", "check every sharing invariant",
        "Run the hypervisor's audit; print its error count. Exit status 1 when it is not 0.")
    d = cmd("destroy", "destroy a domain: stop its guest and free its memory",
            "The kill controller: stop the domain's guest, mark the domain dying, and call\n"
            "the hypervisor's preemptible teardown again while it answers \"restart\" (each\n"
            "call relinquishes shared entries from a saved cursor and yields to waiting\n"
            "guests and requests). A progress bar shows on a terminal. Reports seconds,\n"
            "shared entries relinquished, continuations and the hypervisor's longest\n"
            "teardown step (max_pause_ms).\n\n"
            "Interrupted, it leaves the domain dying with its cursor ('hvctl list' shows\n"
            "it); running it again finishes the teardown.")
    d.add_argument("domid", metavar="DOMAIN", type=_domain, help="the domain's id or name (see 'hvctl list')")
    for name, what in (("pause", "pause a domain's guest (its workload stops writing)"),
                       ("unpause", "let a paused domain's guest run")):
        d = cmd(name, what, what[0].upper() + what[1:] + ".")
        d.add_argument("domid", metavar="DOMAIN", type=_domain,
                       help="the domain's id or name (see 'hvctl list')")
    from . import dedup
    x = cmd("dedup", "share pages with identical content: one pass, or a daemon with --watch",
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
            "and when the hypervisor goes away (exit status 1).")
    x.add_argument("domids", metavar="DOMAIN", nargs="*", type=_domain,
                   help="scan these running domains only (default: all); pages already shared "
                        "by any domain are merge targets either way")
    x.add_argument("--watch", action="store_true", help="keep scanning, like ksmd, until stopped")
    x.add_argument("--rate", type=_positive("rate", 1e8), metavar="PAGES_PER_SECOND",
                   help=f"--watch: gfns scanned per second at most (default "
                        f"{dedup.WATCH_PAGES_PER_SECOND:,}; ksmd's default is 5,000)")
    x.add_argument("--interval", type=_positive("interval", 3600), metavar="SECONDS",
                   help=f"--watch: seconds between passes (default {dedup.WATCH_INTERVAL:g}; "
                        f"ksmd's is 0.02)")
    x.add_argument("--batch", type=_count("batch"), default=dedup.BATCH_PAGES, metavar="PAGES",
                   help=f"most page pairs per share request, {dedup.NOMINATE_FACTOR}x as many pages "
                        f"per nominate request (default {dedup.BATCH_PAGES}); the hypervisor ends "
                        f"each step when its budget ({dedup.STEP_BUDGET_MS:g} ms of work) is spent "
                        f"and the scanner sends the rest, so this only caps a request's size")
    e = cmd("events", "stream the sharing event ring: one JSON object per line",
            "Subscribe to the hypervisor's sharing event ring and print each event as one\n"
            "JSON object per line, until Ctrl-C or the hypervisor's end (exit status 1).\n\n"
            "A guest write that needs a frame for a copy-on-write fault when none is free is\n"
            "not lost: its domain pauses and an 'enomem' event (domid, gfn, pages, needed,\n"
            "frames_free) is posted. Free memory (destroy a domain, run 'hvctl dedup') and\n"
            "the write lands by itself, the domain runs again and a 'resumed' event follows\n"
            "(waited_ms). A domain destroyed or crashed while waiting posts 'cancelled'.\n"
            "The ring keeps the last 1024 events; they are printed first unless --new.")
    e.add_argument("--new", action="store_true", help="only events posted from now on")
    e.add_argument("--count", type=_count("count"), metavar="N", help="exit after N events")
    m = cmd("demo", "run the whole story on a private hypervisor",
            "Start a private hypervisor, boot clone guests from one image, share their\n"
            "common pages with the dedup scanner, let a writer guest take CoW faults, destroy\n"
            "one domain under load, audit, clean up, and report.")
    m.add_argument("--guests", type=_count("guests"), default=4, help="clone guests (default 4)")
    m.add_argument("--pages", type=_count("pages"), default=4096, help="pages per guest (default 4096)")
    m.add_argument("--seed", type=_count("seed", 0), default=1, help="the common image (default 1)")
    m.add_argument("--seconds", type=_rate, default=1.0, help="how long the writer runs (default 1)")
    return p


# ----------------------------------------------------------------------
# commands


def _client(a) -> api.HypervisorClient:
    return api.HypervisorClient(a.socket)


def cmd_start(a) -> object:
    path = os.path.abspath(a.socket or api.default_socket_path())
    if a.foreground:
        from hvcore.process.loop import serve

        def announce(srv, cleaned):
            print(_started_line(srv.socket_path, os.getpid(), a, cleaned), flush=True)
        pid = api.running_pid(path)
        if pid is not None:
            raise api.HVCtlError(f"a hypervisor (pid {pid}) is already running on {path}")
        if serve(path, a.frames, a.rmap, a.teardown, announce=announce, sched=a.sched,
                 prefault=a.prefault):
            raise api.HVCtlError(f"the hypervisor could not start on {path}")
        return None
    crashed = crash_note(path)
    if crashed and api.running_pid(path) is None:
        print(f"hvctl start: note{crashed}", file=sys.stderr)
    from hvcore import kernels
    if not kernels.cache_is_warm():
        print(f"hvctl: compiling the hypervisor's kernels (first start on this machine, "
              f"~{kernels.COLD_COMPILE_SECONDS} s)", file=sys.stderr)
    proc = api.start_hypervisor(path, a.frames, a.rmap, a.teardown, sched=a.sched, prefault=a.prefault)
    out = {"pid": proc.pid, "socket": path, "frames": a.frames, "rmap": a.rmap,
           "teardown": a.teardown, "sched": a.sched, "leftovers_removed": proc.cleaned}
    return out, _started_line(path, proc.pid, a, proc.cleaned)


def _started_line(path, pid, a, cleaned) -> str:
    line = (f"hypervisor {pid} serving on {path} ({a.frames} frames, rmap {a.rmap}, "
            f"teardown {a.teardown})")
    if cleaned and (cleaned["sockets"] or cleaned["segments"]):
        line += (f"; removed a dead hypervisor's leftovers ({_n(cleaned['sockets'], 'socket')}, "
                 f"{_n(cleaned['segments'], 'segment')})")
    return line


def cmd_stop(a) -> object:
    path = os.path.abspath(a.socket or api.default_socket_path())
    try:
        r = _client(a).stop()
    except api.NoHypervisor:
        removed = api.cleanup_dead(path)
        if removed and (removed["sockets"] or removed["segments"]):
            out = {"stopped": False, "guests": 0, "leftovers": removed}
            return out, (f"no hypervisor was running; removed its leftovers ("
                         f"{_n(removed['sockets'], 'socket')}, {_n(removed['segments'], 'segment')})")
        raise
    return r, (f"hypervisor stopped: {_n(r['guests'], 'guest')} stopped, "
               f"{_n(r['segments'], 'segment')} unlinked")


def _n(k: int, what: str) -> str:
    return f"{k} {what}" + ("" if k == 1 else "s")


def cmd_create(a) -> object:
    bar = None if a.json else _CreateBar.on_terminal(a.pages)
    try:
        r = _client(a).create_domain(a.pages, a.workload, a.seed, a.name, a.paused, a.rate, a.batch,
                                     progress=bar)
    finally:
        if bar is not None:
            bar.close()
    return r, str(r["domid"])


class _CreateBar:
    """A tqdm bar of pages populated while a create runs (stderr, a terminal only)."""

    @classmethod
    def on_terminal(cls, pages: int):
        if not sys.stderr.isatty() or importlib.util.find_spec("tqdm") is None:
            return None
        return cls(pages)

    def __init__(self, pages: int):
        self.pages, self.bar = pages, None

    def __call__(self, entry: dict) -> None:
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=self.pages, desc=f"create dom{entry['domid']}", unit="page",
                            unit_scale=True, file=sys.stderr, leave=False, dynamic_ncols=True)
        self.bar.update(entry["populated"] - self.bar.n)
        if entry["populated"] >= self.pages:
            self.bar.set_postfix_str("starting the guest")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_list(a) -> object:
    doms = _client(a).list()
    rows = [("DOMID", "NAME", "STATE", "PAGES", "SHARED", "PID", "WORKLOAD", "WRITES", "COW",
             "FAULT p50/p99 us")]
    for d in doms:
        lat = "-" if d.get("fault_p50_us") is None else f"{d['fault_p50_us']:.0f}/{d['fault_p99_us']:.0f}"
        state = d["state"] + (f" ({d['exit']})" if d["state"] == "crashed" and d.get("exit") else "")
        if d["state"] == "dying":
            state += f" (gfn {d['cursor']}/{d['pages']}, {d['phase']})"
        if d["state"] == "creating":
            state += f" ({d['populated']}/{d['pages']})"
        if d.get("waiting_for_memory"):
            state += f" (waiting for memory {d['waiting_ms'] / 1e3:.1f} s)"
        rows.append((d["domid"], d["name"], state, d["pages"], d["shr_pages"], d["pid"] or "-",
                     d.get("workload", "-"), d.get("pages_written", 0), d.get("cow_faults", 0), lat))
    return doms, _table(rows) if doms else "no domains"


def cmd_info(a) -> object:
    i = _client(a).info()
    lines = [f"{k:<16}{i[k]}" for k in ("frames_total", "frames_free", "nr_shared_mfns",
                                        "nr_saved_mfns", "rmap", "teardown")]
    lines.append(f"{'sched':<16}{i.get('sched', '?')}")
    lines.append(f"{'max_pause_ms':<16}{i['max_pause_ms']} ({i.get('max_pause_op', '?')}; wall time)")
    if i.get("max_pause_cpu_ms") is not None:
        lines.append(f"{'max_pause_cpu_ms':<16}{i['max_pause_cpu_ms']} (the longest step in CPU time)")
    lines.append(f"{'cow_faults':<16}{i.get('cow_faults', 0)}")
    for op, why in (i.get("unbounded") or {}).items():
        lines.append(f"{'unbounded':<16}{op}: {why}")
    lines.append(f"{'hypervisor':<16}pid {i['pid']}, {i['steps']} steps, {i['requests']} requests, "
                 f"up {i['uptime_s']:.0f} s")
    hist = i.get("pause_histogram") or []
    if hist:
        top = max(h["count"] for h in hist)
        lines.append("step lengths:")
        for h in hist:
            bar = "#" * max(1, round(30 * h["count"] / top))
            lines.append(f"  < {_us(h['lt_us']):>8}  {h['count']:>8}  {bar}")
    return i, "\n".join(lines)


def _us(us: int) -> str:
    return f"{us} us" if us < 1000 else f"{us / 1000:g} ms" if us < 10 ** 6 else f"{us / 10 ** 6:g} s"


def cmd_audit(a) -> object:
    r = _client(a).call("audit")
    took = f" in {r['seconds']:.3f} s" if "seconds" in r else ""
    text = f"audit: {r['errors']} errors{took}" + "".join(f"\n  {x}" for x in r.get("report", []))
    return r, text, (1 if r["errors"] else 0)


def cmd_destroy(a) -> object:
    from . import killctl
    # No reply timeout: a monolithic teardown of a long list rmap is one
    # request that may take minutes (that freeze is what it demonstrates).
    with api.HypervisorClient(a.socket, timeout=None) as c:
        r = killctl.destroy(c, a.domid, progress=None if a.json else killctl.terminal_progress())
    resumed = " (resumed a teardown left dying)" if r["resumed"] else ""
    return r, (f"domain {r['domid']} destroyed in {r['seconds']:.3f} s{resumed}: {r['entries']} shared "
               f"entries relinquished, {r['continuations']} continuations, longest pause "
               f"{r['max_pause_ms']} ms")


def cmd_pause(a) -> object:
    r = _client(a).pause(a.domid)
    return r, f"domain {r['domid']} paused"


def cmd_unpause(a) -> object:
    r = _client(a).unpause(a.domid)
    return r, f"domain {r['domid']} running"


def cmd_dedup(a) -> object:
    from . import dedup
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
        backend = dedup.SocketBackend(c)
        with dedup.Scanner(backend, batch_pages=a.batch) as sc:
            if a.watch:
                return _dedup_watch(a, sc)
            r = sc.scan_pass(a.domids or None)
    out = _pass_json(r)
    steps = (r.hv_steps or {}).get("all", {})
    ops = ", ".join(f"{r.hv_steps[op]['count']} {op}" for op in dedup.SCANNER_OPS
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


def _dedup_watch(a, sc) -> object:
    """ksmd: passes until SIGINT/SIGTERM (status 0) or the hypervisor goes
    away (status 1); one line (or JSON object) per pass, then a summary."""
    from . import dedup
    stop = threading.Event()
    caught = []

    def on_signal(signum, frame):
        caught.append(signal.Signals(signum).name)
        stop.set()

    def on_pass(r):
        print(json.dumps(_pass_json(r)) if a.json else _pass_line(r), flush=True)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    gone = None
    totals = {}
    try:
        totals = sc.watch(a.interval or dedup.WATCH_INTERVAL, a.rate or dedup.WATCH_PAGES_PER_SECOND,
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
        print(json.dumps(summary), flush=True)
    else:
        print(f"dedup --watch stopped ({reason}): " + ", ".join(f"{k} {v:,}" if isinstance(v, int)
                                                                else f"{k} {v:.1f}"
                                                                for k, v in totals.items()), flush=True)
    if gone:
        print(f"hvctl dedup: {gone}; stopping.", file=sys.stderr)
        return None, None, 1
    return None


def cmd_events(a) -> object:
    """Print events as they come; Ctrl-C is the normal way out."""
    n = 0
    try:
        with api.HypervisorClient(a.socket).events(since=None if a.new else 0) as stream:
            for ev in stream:
                print(json.dumps(ev), flush=True)
                n += 1
                if a.count and n >= a.count:
                    return None
    except (KeyboardInterrupt, BrokenPipeError):
        return None
    path = os.path.abspath(a.socket or api.default_socket_path())
    print(f"hvctl events: the hypervisor on {path} stopped.", file=sys.stderr)
    return None, None, 1


def cmd_demo(a) -> object:
    from .demo import report, run_demo
    r = run_demo(guests=a.guests, pages=a.pages, seed=a.seed, seconds=a.seconds,
                 progress=None if a.json else (lambda s: print(s, flush=True)))
    return r, report(r), (1 if r["audit_errors"] else 0)


def _table(rows) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


COMMANDS = {"start": cmd_start, "stop": cmd_stop, "create": cmd_create, "list": cmd_list,
            "info": cmd_info, "audit": cmd_audit, "destroy": cmd_destroy, "pause": cmd_pause,
            "unpause": cmd_unpause, "dedup": cmd_dedup, "events": cmd_events, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    a.socket = getattr(a, "socket", None)
    a.json = getattr(a, "json", False)
    try:
        _resolve(a)
        result = COMMANDS[a.command](a)
    except api.HVCtlError as e:
        msg = str(e).rstrip(".")
        if isinstance(e, api.NoHypervisor) and a.command != "start":
            msg += " (start one with 'hvctl start')"
        print(f"hvctl {a.command}: {msg}.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        more = (f"; domain {a.domid} may be left dying: run 'hvctl destroy {a.domid}' again to finish"
                if a.command == "destroy" else
                "; the hypervisor still finishes the create ('hvctl list' shows it)"
                if a.command == "create" else "")
        print(f"hvctl {a.command}: interrupted{more}.", file=sys.stderr)
        return 130
    except OSError as e:                # a path we cannot create or reach
        where = f"cannot use {e.filename}: " if e.filename else ""
        print(f"hvctl {a.command}: {where}{e.strerror or e}.", file=sys.stderr)
        return 1
    if result is None:
        return 0
    obj, text, *status = result
    if text is not None:            # None: the command printed its own output
        print(json.dumps(obj, indent=None if a.command == "list" else 2) if a.json else text)
    return status[0] if status else 0


if __name__ == "__main__":
    sys.exit(main())
