"""``hvctl sharing [DOMAIN]``: where each domain's sharing lies, like ``xl sharing``."""
from __future__ import annotations

from .. import api
from .args import client, domain, table


def register(add) -> None:
    s = add("sharing", "show each domain's shared pages, the frames they save, and its CoW faults",
            "Like 'xl sharing': one line per domain (or for DOMAIN only) with its pages\n"
            "backed by shared frames (shr_pages, and in MiB), the frames sharing saves\n"
            "attributed to it (each gfn on a frame of k references carries (k-1)/k of a\n"
            "frame, so the domains' shares add up to nr_saved_mfns), and the CoW faults its\n"
            "guest has taken. The hypervisor computes it as a bounded job over every p2m and\n"
            "the frame table ('hvctl info' shows the host-wide report).\n\n"
            "--json: {\"domains\": [...]}, one object per domain; with DOMAIN, that domain's\n"
            "object alone (as 'xl sharing DOMAIN' prints one line).", sharing)
    s.add_argument("domid", metavar="DOMAIN", nargs="?", type=domain,
                   help="one domain's id or name (default: every domain)")


def sharing(a) -> object:
    doms = client(a).sharing_report()["domains"]
    if a.domid is not None:
        doms = [d for d in doms if d["domid"] == a.domid]
        if not doms:
            raise api.HVCtlError(f"no domain with id {a.domid}", 3, "ESRCH")
    rows = [("Name", "ID", "Shared", "Shared MiB", "Saved", "Saved MiB", "CoW faults")]
    rows += [(d["name"], d["domid"], d["shr_pages"], f"{d['shared_mib']:.1f}", f"{d['saved']:.1f}",
              f"{d['saved_mib']:.1f}", "-" if d["cow_faults"] is None else d["cow_faults"])
             for d in doms]
    obj = doms[0] if a.domid is not None else {"domains": doms}
    return obj, table(rows)
