"""``hvctl start`` and ``hvctl stop``: a hypervisor's life."""
from __future__ import annotations

import os
import signal
import sys

from hvshare.hvcore.constants import (DEFAULT_RMAP, DEFAULT_SCHED, DEFAULT_TEARDOWN, RMAP_POLICIES,
                              SCHED_MODES, TEARDOWN_MODES)
from hvshare.hvcore.statedir import LOG_NAME, crash_note, state_dir_for

from .. import api
from ..interrupts import INTERRUPTED
from .args import client, count, plural


def register(add) -> None:
    s = add("start", "start a hypervisor in the background",
            "Start a hypervisor and return once it serves (it detaches unless --foreground).\n"
            "A second start on a live socket fails; a start that finds a dead hypervisor's\n"
            "leftovers (socket, state directory, shared-memory segments) removes them.\n"
            "The socket's directory must be yours (or root's) and not writable by others\n"
            "unless sticky, as /tmp is; missing directories are made 0700. Set\n"
            "HVSHARE_INSECURE_SOCKET_DIR=1 to accept another. A detached hypervisor logs\n"
            "to NAME.d/hypervisor.log next to its socket NAME.sock.", start)
    s.add_argument("--frames", type=count("frames"), default=api.DEFAULT_FRAMES,
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
    s.add_argument("--prefault", action="store_true", default=True,
                   help="back every frame of the pool with memory before serving, as a real "
                        "host's RAM is, and size the reverse map and the sharing report's "
                        "scratch for as many entries as frames (the default; takes a few seconds "
                        "per million frames): creates, dedup and CoW faults then never wait for "
                        "the kernel to provide a page")
    s.add_argument("--lazy-pool", dest="prefault", action="store_false",
                   help="start at once and leave the pool's pages to be provided when first "
                        "written (a small test hypervisor; steps then wait for the kernel)")
    s.add_argument("--foreground", action="store_true",
                   help="stay attached: serve until Ctrl-C, log to this terminal")

    add("stop", "stop the hypervisor, its guests, and free all its memory",
        "Stop every guest, unlink every shared-memory segment and remove the socket.\n"
        "If the hypervisor is dead, remove what it left behind.", stop)


def start(a) -> object:
    path = os.path.abspath(a.socket or api.default_socket_path())
    if a.foreground:
        return _start_attached(path, a)
    crashed = crash_note(path)
    if crashed and api.running_pid(path) is None:
        print(f"hvctl start: note{crashed}", file=sys.stderr)
    from hvshare.hvcore import kernels
    if not kernels.cache_is_warm():
        print(f"hvctl: compiling the hypervisor's kernels (first start on this machine, "
              f"~{kernels.COLD_COMPILE_SECONDS} s)", file=sys.stderr)
    proc = api.start_hypervisor(path, a.frames, a.rmap, a.teardown, sched=a.sched, prefault=a.prefault)
    log = os.path.join(state_dir_for(path), LOG_NAME)
    out = {"pid": proc.pid, "socket": path, "log": log, "frames": a.frames, "rmap": a.rmap,
           "teardown": a.teardown, "sched": a.sched, "leftovers_removed": proc.cleaned}
    return out, _started_line(path, proc.pid, a, proc.cleaned) + f"\nlog: {log}"


def _start_attached(path: str, a) -> None:
    """``start --foreground``: the hypervisor process on this terminal until
    it stops (Ctrl-C stops it, and it cleans up before this returns)."""
    proc = api.start_hypervisor(path, a.frames, a.rmap, a.teardown, sched=a.sched,
                                prefault=a.prefault, detach=False)
    # the terminal's Ctrl-C reaches the hypervisor too: wait for it to stop
    interrupted = []
    before = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    try:
        print(_started_line(path, proc.pid, a, proc.cleaned), flush=True)
        status = proc.wait()
    finally:
        signal.signal(signal.SIGINT, before)
    if status not in (0, -signal.SIGINT, INTERRUPTED):
        raise api.HVCtlError(f"the hypervisor on {path} exited with status {status}")
    return (None, None, INTERRUPTED) if interrupted else None


def _started_line(path, pid, a, cleaned) -> str:
    line = (f"hypervisor {pid} serving on {path} ({a.frames} frames, rmap {a.rmap}, "
            f"teardown {a.teardown})")
    if cleaned and (cleaned["sockets"] or cleaned["segments"]):
        line += (f"; removed a dead hypervisor's leftovers ({plural(cleaned['sockets'], 'socket')}, "
                 f"{plural(cleaned['segments'], 'segment')})")
    return line


def stop(a) -> object:
    path = os.path.abspath(a.socket or api.default_socket_path())
    try:
        r = client(a).stop()
    except api.NoHypervisor:
        removed = api.cleanup_dead(path)
        if removed and (removed["sockets"] or removed["segments"]):
            out = {"stopped": False, "guests": 0, "leftovers": removed}
            return out, (f"no hypervisor was running; removed its leftovers ("
                         f"{plural(removed['sockets'], 'socket')}, "
                         f"{plural(removed['segments'], 'segment')})")
        raise
    return r, (f"hypervisor stopped: {plural(r['guests'], 'guest')} stopped, "
               f"{plural(r['segments'], 'segment')} unlinked")
