"""``hvctl events``: the sharing event ring, one JSON object per line."""
from __future__ import annotations

import os
import sys

from .. import api
from ..interrupts import INTERRUPTED
from .args import count, print_line


def register(add) -> None:
    e = add("events", "stream the sharing event ring: one JSON object per line",
            "Subscribe to the hypervisor's sharing event ring and print each event as one\n"
            "JSON object per line, until Ctrl-C or the hypervisor's end (exit status 1).\n\n"
            "A guest write that needs a frame for a copy-on-write fault when none is free is\n"
            "not lost: its domain pauses and an 'enomem' event (domid, gfn, pages, needed,\n"
            "frames_free) is posted. Free memory (destroy a domain, run 'hvctl dedup') and\n"
            "the write lands by itself, the domain runs again and a 'resumed' event follows\n"
            "(waited_ms). A domain destroyed or crashed while waiting posts 'cancelled'.\n"
            "The ring keeps the last 1024 events; they are printed first unless --new.", events)
    e.add_argument("--new", action="store_true", help="only events posted from now on")
    e.add_argument("--count", type=count("count"), metavar="N", help="exit after N events")


def events(a) -> object:
    """Print events as they come; Ctrl-C is the normal way out (quietly,
    with the status of an interrupted command)."""
    n = 0
    try:
        with api.HypervisorClient(a.socket).events(since=None if a.new else 0) as stream:
            for ev in stream:
                print_line(ev)
                n += 1
                if a.count and n >= a.count:
                    return None
    except KeyboardInterrupt:
        return None, None, INTERRUPTED
    path = os.path.abspath(a.socket or api.default_socket_path())
    print(f"hvctl events: the hypervisor on {path} stopped.", file=sys.stderr)
    return None, None, 1
