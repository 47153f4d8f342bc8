"""``hvctl create``, ``list``, ``destroy``, ``pause``, ``unpause``: domains."""
from __future__ import annotations

import argparse
import importlib.util
import sys

from hvshare.hvcore.constants import DEFAULT_WORKLOAD, PAGE_SIZE, WORKLOADS

from .. import api
from .args import client, count, domain, rate, table


def register(add) -> None:
    c = add("create", "create a domain and start its guest",
            "Create a domain of --pages pages, fill its memory from the workload, start its\n"
            "guest process, and print the new domid.\n\n"
            "Workloads: zero (every page zero), clone (a common image chosen by --seed, some\n"
            "zero and some private pages: VMs booted from one image), writer (a clone whose\n"
            "guest writes --write-rate random pages per second, --write-batch pages per\n"
            "message).\n\n"
            "The hypervisor populates the domain a bounded step at a time, serving guests and\n"
            "other requests in between, and answers once the guest runs; meanwhile 'hvctl\n"
            "list' shows it as creating. On a terminal a bar shows the pages populated. If the\n"
            "hypervisor stops first, the create fails (ECANCELED) and nothing of it is left.\n\n"
            "Snapshots: --from-pid PID fills the domain with that process's present pages of\n"
            "its anonymous private mappings (--all-mappings: of every readable mapping, file-\n"
            "backed and shared too), in address order, read by the hypervisor from\n"
            "/proc/PID/mem; swapped-out pages are counted, not read; regions it cannot read\n"
            "are skipped and counted; a page unmapped before it was read is zeroed and\n"
            "counted (lost). --image FILE fills it with a file's bytes (padded to a page), or\n"
            "with an ELF core file's PT_LOAD segments (gcore, QEMU dump-guest-memory). --pages\n"
            "is then optional: the source's size, or a cut of it (more pages than the source\n"
            "has are zero). The workload then only picks what the guest does (zero and clone:\n"
            "idle; writer: dirties it). Stop the process (SIGSTOP) for a consistent snapshot.",
            create)
    c.add_argument("--pages", type=count("pages"), help="pages of 4 KiB (required without --from-pid or --image)")
    src = c.add_mutually_exclusive_group()
    src.add_argument("--from-pid", type=count("pid"), metavar="PID",
                     help="a snapshot of that process's memory")
    src.add_argument("--image", metavar="FILE", help="a raw memory dump or disk image, or an ELF core file")
    c.add_argument("--all-mappings", action="store_true",
                   help="--from-pid: also file-backed and shared mappings")
    c.set_defaults(parser=c)
    c.add_argument("--workload", default=DEFAULT_WORKLOAD, choices=WORKLOADS,
                   help="what the memory holds and what the guest does (default zero)")
    c.add_argument("--seed", type=count("seed", 0), default=0,
                   help="selects the common image of clone and writer (default 0)")
    c.add_argument("--name", help="a name for the domain (default domN)")
    c.add_argument("--paused", action="store_true", help="create it paused (see 'hvctl unpause')")
    c.add_argument("--write-rate", type=rate, default=200.0, metavar="PAGES_PER_SECOND",
                   help="writer: pages written per second (default 200)")
    c.add_argument("--write-batch", type=count("write-batch"), default=1, metavar="PAGES",
                   help="writer: pages per write message (default 1)")
    # the names before --write-rate/--write-batch, kept working, not shown
    c.add_argument("--rate", dest="write_rate", type=rate, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    c.add_argument("--batch", dest="write_batch", type=count("batch"), default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)

    add("list", "list domains", "One line per domain: domid, name, state, pages and their MiB, shared\n"
        "pages, the parent it was forked from and its number of forks, guest pid,\n"
        "workload, writes and CoW faults (with the guest's own fault latency).\n"
        "With --json, an array of one object per domain.", list_)
    d = add("destroy", "destroy a domain: stop its guest and free its memory",
            "The kill controller: stop the domain's guest, mark the domain dying, and call\n"
            "the hypervisor's preemptible teardown again while it answers \"restart\" (each\n"
            "call relinquishes shared entries from a saved cursor and yields to waiting\n"
            "guests and requests). A progress bar shows on a terminal. Reports seconds,\n"
            "shared entries relinquished, continuations and the hypervisor's longest\n"
            "teardown step (max_pause_ms).\n\n"
            "Interrupted, it leaves the domain dying with its cursor ('hvctl list' shows\n"
            "it); running it again finishes the teardown.\n\n"
            "A domain with forks is refused unless --forks: then its forks, and theirs,\n"
            "are destroyed first, deepest first.", destroy)
    d.add_argument("domid", metavar="DOMAIN", type=domain, help="the domain's id or name (see 'hvctl list')")
    d.add_argument("--forks", action="store_true", help="destroy the domain's forks first")
    for name, what, run in (("pause", "pause a domain's guest (its workload stops writing)", pause),
                            ("unpause", "let a paused domain's guest run", unpause)):
        d = add(name, what, what[0].upper() + what[1:] + ".", run)
        d.add_argument("domid", metavar="DOMAIN", type=domain,
                       help="the domain's id or name (see 'hvctl list')")


def create(a) -> object:
    if a.pages is None and a.from_pid is None and a.image is None:
        a.parser.error("the following arguments are required: --pages (or --from-pid or --image)")
    if a.all_mappings and a.from_pid is None:
        a.parser.error("--all-mappings goes with --from-pid")
    bar = None if a.json else _CreateBar.on_terminal()
    try:
        r = client(a).create_domain(a.pages, a.workload, a.seed, a.name, a.paused, a.write_rate,
                                    a.write_batch, progress=bar, from_pid=a.from_pid,
                                    all_mappings=a.all_mappings, image=a.image)
    finally:
        if bar is not None:
            bar.close()
    if "source" not in r:
        return r, str(r["domid"])
    return r, (f"{r['domid']}\n{r['source_pages']} pages from {r['source']}: regions read "
               f"{r['regions']}, skipped {r['skipped_regions']} ({r['skipped_pages']} pages); pages "
               f"swapped out {r['swapped_pages']}, lost {r['lost_pages']}")


class _CreateBar:
    """A tqdm bar of pages populated while a create runs (stderr, a terminal only)."""

    @classmethod
    def on_terminal(cls):
        if not sys.stderr.isatty() or importlib.util.find_spec("tqdm") is None:
            return None
        return cls()

    def __init__(self):
        self.pages, self.bar = None, None

    def __call__(self, entry: dict) -> None:
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=None, desc=f"create dom{entry['domid']}", unit="page",
                            unit_scale=True, file=sys.stderr, leave=False, dynamic_ncols=True)
        if "listed" in entry:               # a process's pages, still being listed
            self.bar.set_postfix_str(f"listing: {entry['listed']} pages found")
            return
        if self.pages != entry["pages"]:
            self.pages = entry["pages"]
            self.bar.reset(total=self.pages)
            self.bar.set_postfix_str("")
        self.bar.update(entry["populated"] - self.bar.n)
        if entry["populated"] >= self.pages:
            self.bar.set_postfix_str("starting the guest")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def list_(a) -> object:
    doms = client(a).list()
    rows = [("DOMID", "NAME", "STATE", "PAGES", "MiB", "SHARED", "PARENT", "FORKS", "PID", "WORKLOAD",
             "WRITES", "COW", "FAULT p50/p99 us")]
    for d in doms:
        d["mib"] = d["pages"] * PAGE_SIZE / 2 ** 20
        lat = "-" if d.get("fault_p50_us") is None else f"{d['fault_p50_us']:.0f}/{d['fault_p99_us']:.0f}"
        state = d["state"] + (f" ({d['exit']})" if d["state"] == "crashed" and d.get("exit") else "")
        if d["state"] == "dying":
            state += f" (gfn {d['cursor']}/{d['pages']}, {d['phase']})"
        if d["state"] == "creating":
            listing = "listed" in d
            state += f" (listing, {d['listed']} found)" if listing else f" ({d['populated']}/{d['pages']})"
        if d.get("waiting_for_memory"):
            state += f" (waiting for memory {d['waiting_ms'] / 1e3:.1f} s)"
        parent = "-" if d.get("parent") is None else d["parent"]
        rows.append((d["domid"], d["name"], state, d["pages"], f"{d['mib']:.2f}", d["shr_pages"],
                     parent, d.get("forks", 0), d["pid"] or "-", d.get("workload", "-"),
                     d.get("pages_written", 0), d.get("cow_faults", 0), lat))
    return doms, table(rows) if doms else "no domains"


def destroy(a) -> object:
    from .. import killctl
    # No reply timeout: a monolithic teardown of a long list rmap is one
    # request that may take minutes (that freeze is what it demonstrates).
    with api.HypervisorClient(a.socket, timeout=None) as c:
        progress = None if a.json else killctl.terminal_progress()
        if a.forks:
            r = c.destroy(a.domid, progress=progress, forks=True)
        elif c.descendants(a.domid):
            raise api.HVCtlError(f"domain {a.domid} has forks ({', '.join(map(str, c.descendants(a.domid)))}); "
                                 f"destroy them first, or add --forks", 16, "EBUSY")
        else:
            r = killctl.destroy(c, a.domid, progress=progress)
    resumed = " (resumed a teardown left dying)" if r["resumed"] else ""
    return r, (f"domain {r['domid']} destroyed in {r['seconds']:.3f} s{resumed}: {r['entries']} shared "
               f"entries relinquished, {r['continuations']} continuations, longest pause "
               f"{r['max_pause_ms']} ms" +
               (f"; forks destroyed first: {', '.join(map(str, r['forks_destroyed']))}"
                if r.get("forks_destroyed") else ""))


def pause(a) -> object:
    r = client(a).pause(a.domid)
    return r, f"domain {r['domid']} paused"


def unpause(a) -> object:
    r = client(a).unpause(a.domid)
    return r, f"domain {r['domid']} running"
