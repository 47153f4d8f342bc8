"""``hvctl demo``: the main job end to end, on a private hypervisor.

1. start a hypervisor on a private socket (sized for the guests);
2. boot ``guests`` clones of one image and one writer (a clone whose guest
   writes random pages, WRITER_BATCH pages per message), all created in
   parallel;
3. share: one pass of the content-based dedup scanner (``hvctl dedup``)
   over every running domain while the writer writes: image and zero pages
   end up on shared frames, private pages stay private, a page the writer
   writes during the pass is skipped, and the writer's batches that land on
   pages the pass has just shared are CoW faults (its batch latency);
4. single-page CoW faults alone: with the writer paused and no scan
   running, one clone's guest writes one page at a time to pages that are
   shared, timing each write (the latency of one fault, nothing else
   running);
5. the writer goes on, and one clone is destroyed meanwhile (teardown under
   load);
6. audit, stop, and check that no process, segment or socket is left.

Every latency in the report says what it measured; the longest step is
given per operation from the hypervisor's step meters (``hvctl info``).
"""
from __future__ import annotations

import concurrent.futures
import textwrap
import time
from typing import Callable

import numpy as np

from hvshare.hvcore import shm
from hvshare.hvcore.images import KIND_PRIVATE, clone_kinds

from . import api, dedup

#: pages per write message of the demo's writer, and its pages per second
WRITER_BATCH, WRITER_RATE = 8, 2000.0
#: single-page CoW faults taken alone (step 4)
SINGLE_FAULTS = 256


def run_demo(guests: int = 4, pages: int = 4096, seed: int = 1, seconds: float = 1.0,
             progress: Callable[[str], None] | None = None) -> dict:
    say = progress or (lambda s: None)
    frames = (guests + 1) * pages + pages // 2 + 1024
    t_start = time.perf_counter()
    with api.hvshare_session(frames=frames, prefault=True) as hv:
        say(f"hypervisor {hv.pid}: {frames} frames ({frames * 4 >> 10} MiB), rmap {hv.rmap}")
        specs = [dict(workload="clone", name=f"clone{i}") for i in range(guests)]
        specs.append(dict(workload="writer", name="writer", paused=True, rate=WRITER_RATE,
                          batch=WRITER_BATCH))

        def create(spec):
            with api.HypervisorClient(hv.socket_path) as c:
                return c.create_domain(pages, seed=seed, **spec)
        with concurrent.futures.ThreadPoolExecutor(len(specs)) as ex:
            made = list(ex.map(create, specs))
        doms = [m["domid"] for m in made]
        clones, writer = doms[:-1], doms[-1]
        say(f"booted {guests} clones and a writer of {pages} pages each from image {seed}")

        hv.unpause(writer)            # the scanner sees running domains only
        t0 = time.perf_counter()
        with dedup.Scanner(dedup.SocketBackend(hv)) as sc:
            scan = sc.scan_pass()
        share_s = time.perf_counter() - t0
        hv.pause(writer)
        during = hv.guest(writer).stats()
        shared_info = hv.info()
        steps = (scan.hv_steps or {}).get("all", {})
        say(f"dedup scanned {scan.scanned} pages and merged {scan.merged} in {share_s:.3f} s: "
            f"{shared_info['nr_saved_mfns']} frames saved")

        single = _single_faults(hv, clones[0], seed, pages)
        say(f"clone {clones[0]} took {single['cow_faults']} single-page CoW faults alone")

        hv.unpause(writer)
        time.sleep(seconds / 2)
        victim = clones[-1] if len(clones) > 1 else clones[0]
        # under load: the writer keeps faulting between the teardown's steps
        teardown = hv.destroy(victim)
        say(f"destroyed domain {victim} under load in {teardown['seconds']:.4f} s "
            f"({teardown['entries']} shared entries)")
        time.sleep(seconds / 2)
        hv.pause(writer)
        wstats = hv.guest(writer).stats()
        info = hv.info()
        audit = hv.audit()
        guest_pids = hv.guest_pids() | {m["pid"] for m in made}
        hv_pid = hv.pid
    leftovers = {
        "processes": sum(1 for p in guest_pids | {hv_pid} if shm.pid_alive(p)),
        "segments": sum(1 for n in shm.list_segments() if shm.owner_pid(n) == hv_pid),
    }
    by_op = info.get("pause_by_op") or {}
    return {
        "audit_errors": audit,
        "nr_saved_mfns": shared_info["nr_saved_mfns"],
        "cow_faults": info["cow_faults"],
        "teardown": teardown,
        "guests": guests,
        "pages": pages,
        "seed": seed,
        "merged": scan.merged,
        "scanned": scan.scanned,
        "share_seconds": share_s,
        "dedup_longest_step_lt_ms": steps.get("max_lt_ms"),
        "nr_saved_mfns_end": info["nr_saved_mfns"],
        "single_fault": single,
        "writer_during_dedup": {
            "batch_pages": WRITER_BATCH,
            "writes": during["writes"],
            "cow_faults": during["cow_faults"],
            "batch_p50_us": during["fault_p50_us"],
            "batch_p99_us": during["fault_p99_us"],
        },
        "pages_written": wstats["pages_written"],
        "longest_step_by_op": dict(sorted(((op, m["max_ms"]) for op, m in by_op.items()),
                                          key=lambda kv: -kv[1])),
        "max_pause_ms": info["max_pause_ms"],
        "max_pause_op": info["max_pause_op"],
        "max_pause_cpu_ms": info.get("max_pause_cpu_ms"),
        "leftovers": leftovers,
        "seconds": time.perf_counter() - t_start,
    }


def _single_faults(hv, domid: int, seed: int, pages: int) -> dict:
    """One guest writes one byte to each of SINGLE_FAULTS pages of its image
    and zero extents (shared after the dedup pass), one write per message,
    with nothing else running; its own fault latency is then these writes'
    alone (the domain wrote nothing before)."""
    gfns = np.nonzero(clone_kinds(seed, pages) != KIND_PRIVATE)[0][:SINGLE_FAULTS]
    with hv.guest(domid) as g:
        for gfn in gfns.tolist():
            g.time_writes(gfn, 1)
        st = g.stats()
    return {"domid": domid, "writes": st["writes"], "cow_faults": st["cow_faults"],
            "p50_us": st["fault_p50_us"], "p99_us": st["fault_p99_us"]}


def _us(v) -> str:
    return "-" if v is None else f"{v:.0f} us"


def report(r: dict) -> str:
    t = r["teardown"]
    mib = r["nr_saved_mfns"] * 4 / 1024
    one, w = r["single_fault"], r["writer_during_dedup"]
    left = r["leftovers"]
    clean = ("nothing left behind" if not (left["processes"] or left["segments"])
             else f"LEFT BEHIND: {left['processes']} processes, {left['segments']} segments")
    steps = textwrap.fill(", ".join(f"{op} {ms:.3f}" for op, ms in r["longest_step_by_op"].items()),
                          100, initial_indent=" " * 15, subsequent_indent=" " * 15)
    return "\n".join([
        f"hvshare demo: {r['guests']} clones + 1 writer, {r['pages']} pages each, image {r['seed']}",
        f"  sharing      dedup scanned {r['scanned']} pages, merged {r['merged']} in "
        f"{r['share_seconds']:.3f} s: {r['nr_saved_mfns']} frames saved ({mib:.1f} MiB)",
        f"  CoW fault    single-page faults taken alone (clone {one['domid']}, one page per write, "
        f"writer paused, no scan):",
        f"               {one['cow_faults']} faults in {one['writes']} writes, round trip "
        f"p50 {_us(one['p50_us'])}, p99 {_us(one['p99_us'])}",
        f"  writer       batches of {w['batch_pages']} pages during the dedup pass: {w['writes']} "
        f"batches, {w['cow_faults']} CoW faults;",
        f"               round trip of a batch that faulted p50 {_us(w['batch_p50_us'])}, "
        f"p99 {_us(w['batch_p99_us'])}",
        f"  teardown     domain {t['domid']} destroyed under load in {t['seconds'] * 1e3:.2f} ms: "
        f"{t['entries']} shared entries, {t['continuations']} continuations, longest step "
        f"{t['max_pause_ms']} ms",
        f"  CoW in all   {r['cow_faults']} CoW faults (the writer's and the single ones); the writer "
        f"wrote {r['pages_written']} pages",
        f"  longest step {r['max_pause_ms']} ms of wall time ({r['max_pause_op']}); per operation, ms:",
        steps,
        f"  audit        {r['audit_errors']} errors",
        f"  clean-up     hypervisor stopped, {clean} ({r['seconds']:.1f} s in all)",
    ])
