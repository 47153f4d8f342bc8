"""``hvctl fork``, ``fork-reset``, ``fuzz``: VM forks and the fuzzing loop."""
from __future__ import annotations

import time

from hvshare.hvcore.constants import DEFAULT_FUZZ_READS, DEFAULT_FUZZ_WRITES, WORKLOADS

from .args import client, count, domain, positive


def register(add) -> None:
    f = add("fork", "fork a domain: a child that shares its memory copy-on-write",
            "Fork DOMAIN (Xen's VM fork): a new domain of the parent's size with an empty\n"
            "p2m and a guest of its own; print its domid. Nothing is copied at fork time:\n"
            "the child's first read of a page shares the parent's frame, its first write\n"
            "takes a private copy. The parent stays paused while it has forks (a write of\n"
            "its guest waits) and runs again once its last fork is destroyed; it cannot be\n"
            "destroyed before them ('hvctl destroy --forks' destroys them first). A fork\n"
            "can be forked again.\n\n"
            "--json gives domid, parent, seconds (the fork's own step in the hypervisor)\n"
            "and wall_seconds (until the child's guest runs).\n\n"
            "The fuzz workload writes --fuzz-writes random pages and reads --fuzz-reads\n"
            "each time it is run ('hvctl fuzz').", fork)
    f.add_argument("domid", metavar="PARENT", type=domain, help="the parent's id or name")
    f.add_argument("--name", help="a name for the child (default domN)")
    f.add_argument("--paused", action="store_true", help="leave the child paused")
    f.add_argument("--workload", choices=WORKLOADS,
                   help="what the child's guest does (default: the parent's)")
    f.add_argument("--fuzz-writes", type=count("fuzz-writes", 0), metavar="K",
                   help=f"fuzz: pages written per run (default {DEFAULT_FUZZ_WRITES})")
    f.add_argument("--fuzz-reads", type=count("fuzz-reads", 0), metavar="M",
                   help=f"fuzz: pages read per run (default {DEFAULT_FUZZ_READS})")

    r = add("fork-reset", "reset a fork: drop its private pages",
            "Reset the fork DOMAIN (Xen's fork reset): its private pages go back to the\n"
            "free pool, so its next access takes them from its parent again; pages it\n"
            "shares with its parent stay, and pages dedup merged elsewhere are dropped\n"
            "too, so it reads exactly its parent afterwards. The reset costs what the child holds, not the domain's size, and\n"
            "runs a bounded step at a time. --json gives domid, pages_dropped, seconds.\n"
            "--run: then run one iteration of its fuzz guest (the answer waits for it).", reset)
    r.add_argument("domid", metavar="DOMAIN", type=domain, help="the fork's id or name")
    r.add_argument("--run", dest="then_run", action="store_true", help="then run one fuzz iteration")

    z = add("fuzz", "run the fuzzing loop on a fork: reset, run, again",
            "The fuzzing loop on the fork DOMAIN, whose guest runs the fuzz workload: reset\n"
            "it, then run one iteration (its guest writes K random pages, reads M, and\n"
            "signals done), --iterations times or for --seconds; one request each. Reports\n"
            "iterations per second and the mean time of the reset and of the run.", fuzz)
    z.add_argument("domid", metavar="DOMAIN", type=domain, help="the fork's id or name")
    lim = z.add_mutually_exclusive_group()
    lim.add_argument("--iterations", type=count("iterations"), default=100,
                     help="iterations to run (default 100)")
    lim.add_argument("--seconds", type=positive("seconds", 3600), help="run for this long instead")


def fork(a) -> object:
    r = client(a).fork(a.domid, name=a.name, paused=a.paused, workload=a.workload,
                       fuzz_writes=a.fuzz_writes, fuzz_reads=a.fuzz_reads)
    return r, str(r["domid"])


def reset(a) -> object:
    r = client(a).fork_reset(a.domid, run=a.then_run)
    text = f"domain {r['domid']} reset in {r['seconds'] * 1e3:.3f} ms: {r['pages_dropped']} pages dropped"
    if a.then_run:
        text += f"; fuzz iteration {r['iteration']} in {r['run_seconds'] * 1e3:.3f} ms"
    return r, text


def fuzz(a) -> object:
    with client(a) as c:
        n, dropped, reset_s, run_s, last = 0, 0, 0.0, 0.0, {}
        t0 = time.perf_counter()
        end = None if a.seconds is None else t0 + a.seconds
        while (n < a.iterations) if end is None else (n == 0 or time.perf_counter() < end):
            last = c.fork_reset(a.domid, run=True)
            n += 1
            dropped += last["pages_dropped"]
            reset_s += last["seconds"]
            run_s += last["run_seconds"]
        wall = time.perf_counter() - t0
    out = {"domid": a.domid, "iterations": n, "seconds": round(wall, 6),
           "iterations_per_second": round(n / wall, 1), "pages_written": last["pages_written"],
           "pages_read": last["pages_read"], "pages_dropped": dropped,
           "reset_mean_ms": round(reset_s / n * 1e3, 3), "run_mean_ms": round(run_s / n * 1e3, 3)}
    return out, (f"{n} iterations in {wall:.3f} s: {out['iterations_per_second']} per second "
                 f"(reset {out['reset_mean_ms']} ms, run {out['run_mean_ms']} ms; "
                 f"{out['pages_written']} pages written and {out['pages_read']} read per run)")
