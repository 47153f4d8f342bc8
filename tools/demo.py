"""``hvctl demo``: the main job end to end, on a private hypervisor.

1. start a hypervisor on a private socket (sized for the guests);
2. boot ``guests`` clones of one image and one writer (a clone whose guest
   writes random pages), all created in parallel;
3. let the writer run, and share: one pass of the content-based dedup
   scanner (``hvctl dedup``) over every running domain, the writer's
   included: image and zero pages end up on shared frames, private pages
   stay private, and a page the writer writes during the pass is skipped;
4. the writer goes on: its writes to shared pages are CoW faults;
5. destroy one clone while the writer keeps faulting (teardown under load);
6. audit, stop, and check that no process, segment or socket is left.
"""
from __future__ import annotations

import concurrent.futures
import time
from typing import Callable

from hvcore import shm

from . import api, dedup


def run_demo(guests: int = 4, pages: int = 4096, seed: int = 1, seconds: float = 1.0,
             progress: Callable[[str], None] | None = None) -> dict:
    say = progress or (lambda s: None)
    frames = (guests + 1) * pages + pages // 2 + 1024
    t_start = time.perf_counter()
    with api.hvshare_session(frames=frames, prefault=True) as hv:
        say(f"hypervisor {hv.pid}: {frames} frames ({frames * 4 >> 10} MiB), rmap {hv.rmap}")
        specs = [dict(workload="clone", name=f"clone{i}") for i in range(guests)]
        specs.append(dict(workload="writer", name="writer", paused=True, rate=2000.0, batch=8))

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
        merged = scan.merged
        shared_info = hv.info()
        steps = (scan.hv_steps or {}).get("all", {})
        say(f"dedup scanned {scan.scanned} pages and merged {merged} in {share_s:.3f} s: "
            f"{shared_info['nr_saved_mfns']} frames saved")

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
    return {
        "audit_errors": audit,
        "nr_saved_mfns": shared_info["nr_saved_mfns"],
        "cow_faults": info["cow_faults"],
        "teardown": teardown,
        "guests": guests,
        "pages": pages,
        "seed": seed,
        "merged": merged,
        "scanned": scan.scanned,
        "share_seconds": round(share_s, 4),
        "dedup_longest_step_lt_ms": steps.get("max_lt_ms"),
        "nr_saved_mfns_end": info["nr_saved_mfns"],
        "pages_written": wstats["pages_written"],
        "fault_p50_us": wstats["fault_p50_us"],
        "fault_p99_us": wstats["fault_p99_us"],
        "max_pause_ms": info["max_pause_ms"],
        "max_pause_op": info["max_pause_op"],
        "max_pause_cpu_ms": info.get("max_pause_cpu_ms"),
        "leftovers": leftovers,
        "seconds": round(time.perf_counter() - t_start, 3),
    }



def report(r: dict) -> str:
    t = r["teardown"]
    mib = r["nr_saved_mfns"] * 4 / 1024
    lat = ("-" if r["fault_p50_us"] is None
           else f"p50 {r['fault_p50_us']:.0f} us, p99 {r['fault_p99_us']:.0f} us")
    left = r["leftovers"]
    clean = ("nothing left behind" if not (left["processes"] or left["segments"])
             else f"LEFT BEHIND: {left['processes']} processes, {left['segments']} segments")
    return "\n".join([
        f"hvshare demo: {r['guests']} clones + 1 writer, {r['pages']} pages each, image {r['seed']}",
        f"  sharing    dedup scanned {r['scanned']} pages, merged {r['merged']} in "
        f"{r['share_seconds']:.3f} s: {r['nr_saved_mfns']} frames saved ({mib:.1f} MiB)",
        f"  CoW        the writer wrote {r['pages_written']} pages: {r['cow_faults']} CoW faults, "
        f"fault round trip {lat}",
        f"  teardown   domain {t['domid']} destroyed under load in {t['seconds'] * 1e3:.2f} ms: "
        f"{t['entries']} shared entries, {t['continuations']} continuations, longest step "
        f"{t['max_pause_ms']} ms",
        f"  hypervisor longest step {r['max_pause_ms']} ms of wall time ({r['max_pause_op']}); "
        f"longest in CPU time {r['max_pause_cpu_ms']} ms",
        f"  audit      {r['audit_errors']} errors",
        f"  clean-up   hypervisor stopped, {clean} ({r['seconds']:.1f} s in all)",
    ])
