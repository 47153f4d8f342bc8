"""``hvctl top``: a live view of the hypervisor, its domains and the dedup daemon.

rich is imported only when a frame is drawn, so other commands do not pay
for it.
"""
from __future__ import annotations

import json
import os
import select
import sys
import time

from .. import api
from ..dedup import daemon
from ..interrupts import INTERRUPTED
from .args import micros, positive

#: MiB per 4 KiB page
_MIB = 4 / 1024


def register(add) -> None:
    t = add("top", "a live view of domains, sharing, CoW faults, dedup and step lengths",
            "Refreshes every --interval seconds: each domain's state, size and shared\n"
            "pages (shr_pages) with its CoW faults per second over the interval; the\n"
            "frames sharing saves; the dedup daemon's progress when one runs (passes, full\n"
            "scans, pages_sharing); and the hypervisor's log2 histogram of step lengths with\n"
            "its longest step and the operation that ran it. Ends on q or Ctrl-C, and when\n"
            "the hypervisor goes away (exit status 1). --once draws one frame (after one\n"
            "interval, to measure the rates) and exits; --json prints each frame's data as\n"
            "one JSON object per line.", top)
    t.add_argument("--interval", type=positive("interval", 3600), default=1.0, metavar="SECONDS",
                   help="seconds between frames (default 1)")
    t.add_argument("--once", action="store_true", help="draw one frame and exit")


def sample(c: api.HypervisorClient, path: str) -> dict:
    """What one frame shows, read now (monotonic time ``t``)."""
    info, doms = c.info(), c.list()
    try:
        with daemon.DaemonClient(path, timeout=2) as d:
            dd = d.show()
    except api.HVCtlError:
        dd = None
    return {"t": time.monotonic(), "info": info, "domains": doms, "dedup": dd}


def frame_data(prev: dict, now: dict) -> dict:
    """A frame: ``now`` with the rates since ``prev``."""
    dt = max(now["t"] - prev["t"], 1e-9)
    before = {d["domid"]: d.get("cow_faults", 0) for d in prev["domains"]}
    i = now["info"]
    doms = []
    for d in now["domains"]:
        cow = d.get("cow_faults", 0)
        doms.append({"domid": d["domid"], "name": d["name"], "state": d["state"], "pages": d["pages"],
                     "mib": round(d["pages"] * _MIB, 1), "shr_pages": d.get("shr_pages", 0),
                     "cow_faults": cow,
                     "cow_faults_per_s": round((cow - before.get(d["domid"], cow)) / dt, 1),
                     "workload": d.get("workload")})
    dd = now["dedup"]
    return {
        "time": time.strftime("%H:%M:%S"), "interval_s": round(dt, 3),
        "hypervisor": {"pid": i["pid"], "socket": i.get("socket"), "uptime_s": i["uptime_s"],
                       "frames_total": i["frames_total"], "frames_free": i["frames_free"],
                       "nr_shared_mfns": i["nr_shared_mfns"], "nr_saved_mfns": i["nr_saved_mfns"],
                       "cow_faults": i.get("cow_faults", 0),
                       "cow_faults_per_s": round((i.get("cow_faults", 0) -
                                                  prev["info"].get("cow_faults", 0)) / dt, 1),
                       "steps": i["steps"], "max_pause_ms": i["max_pause_ms"],
                       "max_pause_op": i.get("max_pause_op"),
                       "pause_histogram": i.get("pause_histogram") or []},
        "domains": doms,
        "dedup": None if dd is None else {"pid": dd["pid"], "detached": dd["detached"],
                                          "knobs": dd["knobs"], **dd["counters"]},
    }


def render(f: dict):
    """A frame as rich renderables."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    h = f["hypervisor"]
    head = Text.assemble(
        ("hvctl top", "bold"), f"  {f['time']}  hypervisor {h['pid']}, up {h['uptime_s']:.0f} s, "
        f"{h['frames_total']:,} frames ({h['frames_free']:,} free)\n",
        f"sharing: {h['nr_shared_mfns']:,} shared frames, {h['nr_saved_mfns']:,} saved "
        f"({h['nr_saved_mfns'] * _MIB:.1f} MiB); CoW faults {h['cow_faults_per_s']:,.0f}/s "
        f"({h['cow_faults']:,} in all)")
    doms = Table(box=None, header_style="bold", pad_edge=False)
    for col, right in (("DOMID", True), ("NAME", False), ("STATE", False), ("MiB", True),
                       ("SHR_PAGES", True), ("SHR MiB", True), ("COW/s", True), ("WORKLOAD", False)):
        doms.add_column(col, justify="right" if right else "left")
    for d in f["domains"]:
        doms.add_row(str(d["domid"]), d["name"], d["state"], f"{d['mib']:.1f}", f"{d['shr_pages']:,}",
                     f"{d['shr_pages'] * _MIB:.1f}", f"{d['cow_faults_per_s']:,.0f}", d["workload"] or "-")
    dd = f["dedup"]
    if dd is None:
        dedup = Text("dedup: no daemon ('hvctl dedup --watch --detach' starts one)", style="dim")
    else:
        k = dd["knobs"]
        dedup = Text(f"dedup daemon {dd['pid']}: {dd['passes']:,} passes, {dd['full_scans']:,} full "
                     f"scans, pages_sharing {dd['pages_sharing']:,}, pages_shared "
                     f"{dd['pages_shared']:,}, unshared {dd['pages_unshared']:,}, volatile "
                     f"{dd['pages_volatile']:,}; pages_to_scan {k['pages_to_scan']:,} every "
                     f"{k['sleep_millisecs']} ms")
    steps = Text(f"hypervisor steps: {h['steps']:,}; longest {h['max_pause_ms']} ms "
                 f"({h['max_pause_op'] or '-'})", style="bold")
    hist = Table(box=None, show_header=False, pad_edge=False)
    hist.add_column(justify="right")
    hist.add_column(justify="right")
    hist.add_column()
    top = max((b["count"] for b in h["pause_histogram"]), default=0)
    for b in h["pause_histogram"]:
        hist.add_row(f"< {micros(b['lt_us'])}", f"{b['count']:,}",
                     "#" * max(1, round(40 * b["count"] / top)))
    return Group(head, Text(""), doms if f["domains"] else Text("no domains", style="dim"),
                 Text(""), dedup, Text(""), steps, hist)


class _Keys:
    """q on a terminal's stdin, read without waiting for Enter."""

    def __init__(self):
        self.fd, self.saved = None, None
        if sys.stdin.isatty():
            import termios
            import tty
            self.fd = sys.stdin.fileno()
            self.saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)

    def wait_for_q(self, seconds: float) -> bool:
        """Wait ``seconds``; True if q was pressed meanwhile."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.fd is None:
                time.sleep(left)
                return False
            if select.select([self.fd], [], [], left)[0] and os.read(self.fd, 32).lower().startswith(b"q"):
                return True
        return False

    def close(self) -> None:
        if self.saved is not None:
            import termios
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)


def top(a) -> object:
    path = os.path.abspath(a.socket or api.default_socket_path())
    c = api.HypervisorClient(path)
    prev = sample(c, path)
    keys = _Keys()
    live = None
    try:
        if a.once:
            time.sleep(a.interval)
            _show(a, frame_data(prev, sample(c, path)), None)
            return None
        if sys.stdout.isatty() and not a.json:
            from rich.live import Live
            live = Live(render(frame_data(prev, prev)), screen=True, auto_refresh=False)
            live.start()
        while not keys.wait_for_q(a.interval):
            now = sample(c, path)
            _show(a, frame_data(prev, now), live)
            prev = now
    except KeyboardInterrupt:
        return None, None, INTERRUPTED
    except api.NoHypervisor:
        if live is not None:
            live.stop()
            live = None
        print(f"hvctl top: the hypervisor on {path} went away.", file=sys.stderr)
        return None, None, 1
    finally:
        if live is not None:
            live.stop()
        keys.close()
        c.close()
    return None


def _show(a, f: dict, live) -> None:
    if a.json:
        print(json.dumps(f), flush=True)
    elif live is not None:
        live.update(render(f), refresh=True)
    else:
        from rich.console import Console
        Console(highlight=False).print(render(f))
