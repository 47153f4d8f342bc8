"""``hvctl``: the command line of hvshare's toolstack.

Each subcommand is a thin layer over :mod:`tools.api`: parse and check the
arguments, make one or a few requests on the control socket, print a short
human answer or, with ``--json``, one JSON object (a list for ``list``) whose
keys are the contract of ARCHITECTURE.md. Every failure is one sentence on
stderr and a non-zero exit status: 1 for a failed operation (and for an
audit that found errors), 2 for a mistake on the command line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

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


def _rate(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0 <= v <= 1e6:
        raise argparse.ArgumentTypeError(f"must be a number of pages per second (0 to 1e6), not {text!r}")
    return v


def _common() -> argparse.ArgumentParser:
    # SUPPRESS: a subcommand's copy must not overwrite the same option given
    # before the subcommand.
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                   help="the hypervisor's control socket (default: see 'hvctl --help')")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print one JSON object (a list for 'list') instead of text")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    p = _Parser(prog="hvctl", parents=[common], epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Control an hvshare hypervisor: an emulation of Xen's memory sharing "
                            "with real processes and real shared memory.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def cmd(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    s = cmd("start", "start a hypervisor in the background",
            "Start a hypervisor and return once it serves (it detaches unless --foreground).\n"
            "A second start on a live socket fails; a start that finds a dead hypervisor's\n"
            "leftovers (socket, state directory, shared-memory segments) removes them.")
    s.add_argument("--frames", type=_count("frames"), default=api.DEFAULT_FRAMES,
                   help=f"machine frames of 4 KiB in the pool (default {api.DEFAULT_FRAMES}, "
                        f"{api.DEFAULT_FRAMES * 4 >> 10} MiB)")
    s.add_argument("--rmap", choices=("buckets", "list", "index"), default="buckets",
                   help="reverse-map policy: buckets (Xen 4.2's list<->hash, default), list (before "
                        "it), index (O(1))")
    s.add_argument("--teardown", choices=api.TEARDOWN_MODES, default="preemptible",
                   help="domain teardown: preemptible (default, Xen 4.2) or monolithic (before it)")
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
            "guest writes --rate random pages per second, --batch pages per message).")
    c.add_argument("--pages", type=_count("pages"), required=True, help="pages of 4 KiB")
    c.add_argument("--workload", default="zero", choices=("zero", "clone", "writer"),
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
    for name, what in (("destroy", "destroy a domain: stop its guest and free its memory"),
                       ("pause", "pause a domain's guest (its workload stops writing)"),
                       ("unpause", "let a paused domain's guest run")):
        d = cmd(name, what, what[0].upper() + what[1:] + ".")
        d.add_argument("domid", type=_count("domid"), help="the domain's id (see 'hvctl list')")
    m = cmd("demo", "run the whole story on a private hypervisor",
            "Start a private hypervisor, boot clone guests from one image, share their\n"
            "common pages with range_share, let a writer guest take CoW faults, destroy one\n"
            "domain under load, audit, clean up, and report.")
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
        from hvcore.server import serve

        def announce(srv, cleaned):
            print(_started_line(srv.socket_path, os.getpid(), a, cleaned), flush=True)
        pid = api.running_pid(path)
        if pid is not None:
            raise api.HVCtlError(f"a hypervisor (pid {pid}) is already running on {path}")
        if serve(path, a.frames, a.rmap, a.teardown, announce=announce):
            raise api.HVCtlError(f"the hypervisor could not start on {path}")
        return None
    proc = api.start_hypervisor(path, a.frames, a.rmap, a.teardown)
    out = {"pid": proc.pid, "socket": path, "frames": a.frames, "rmap": a.rmap,
           "teardown": a.teardown, "leftovers_removed": proc.cleaned}
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
    r = _client(a).create_domain(a.pages, a.workload, a.seed, a.name, a.paused, a.rate, a.batch)
    return r, str(r["domid"])


def cmd_list(a) -> object:
    doms = _client(a).list()
    rows = [("DOMID", "NAME", "STATE", "PAGES", "SHARED", "PID", "WORKLOAD", "WRITES", "COW",
             "FAULT p50/p99 us")]
    for d in doms:
        lat = "-" if d.get("fault_p50_us") is None else f"{d['fault_p50_us']:.0f}/{d['fault_p99_us']:.0f}"
        state = d["state"] + (f" ({d['exit']})" if d["state"] == "crashed" and d.get("exit") else "")
        rows.append((d["domid"], d["name"], state, d["pages"], d["shr_pages"], d["pid"] or "-",
                     d.get("workload", "-"), d.get("pages_written", 0), d.get("cow_faults", 0), lat))
    return doms, _table(rows) if doms else "no domains"


def cmd_info(a) -> object:
    i = _client(a).info()
    lines = [f"{k:<16}{i[k]}" for k in ("frames_total", "frames_free", "nr_shared_mfns",
                                        "nr_saved_mfns", "rmap", "teardown")]
    lines.append(f"{'max_pause_ms':<16}{i['max_pause_ms']} ({i.get('max_pause_op', '?')})")
    lines.append(f"{'cow_faults':<16}{i.get('cow_faults', 0)}")
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
    text = f"audit: {r['errors']} errors" + "".join(f"\n  {x}" for x in r.get("report", []))
    return r, text, (1 if r["errors"] else 0)


def cmd_destroy(a) -> object:
    r = _client(a).destroy(a.domid)
    return r, (f"domain {r['domid']} destroyed in {r['seconds']:.3f} s: {r['entries']} shared entries "
               f"relinquished, {r['continuations']} continuations, longest pause {r['max_pause_ms']} ms")


def cmd_pause(a) -> object:
    r = _client(a).pause(a.domid)
    return r, f"domain {r['domid']} paused"


def cmd_unpause(a) -> object:
    r = _client(a).unpause(a.domid)
    return r, f"domain {r['domid']} running"


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
            "unpause": cmd_unpause, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    a.socket = getattr(a, "socket", None)
    a.json = getattr(a, "json", False)
    try:
        result = COMMANDS[a.command](a)
    except api.HVCtlError as e:
        msg = str(e).rstrip(".")
        if isinstance(e, api.NoHypervisor) and a.command != "start":
            msg += " (start one with 'hvctl start')"
        print(f"hvctl {a.command}: {msg}.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hvctl {a.command}: interrupted.", file=sys.stderr)
        return 130
    except OSError as e:                # a path we cannot create or reach
        where = f"cannot use {e.filename}: " if e.filename else ""
        print(f"hvctl {a.command}: {where}{e.strerror or e}.", file=sys.stderr)
        return 1
    if result is None:
        return 0
    obj, text, *status = result
    print(json.dumps(obj, indent=None if a.command == "list" else 2) if a.json else text)
    return status[0] if status else 0


if __name__ == "__main__":
    sys.exit(main())
