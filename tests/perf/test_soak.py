"""``python -m hvshare.perf soak``: the report reads a result right (a synthetic one:
the soak itself runs for a minute and belongs to ``perf``, not the tests)."""
from __future__ import annotations

from hvshare.perf import soak


def test_report_shows_the_figures_and_writer_errors():
    r = {"guests": 8, "pages_per_guest": 256, "seconds": 10.0, "writes": 3000, "pages_written": 24000,
         "faults": 10000, "faults_per_s": 1000.0, "dedup_passes": 20, "dedup_merged": 4000,
         "dedup_skipped": None, "teardown": {"seconds": 3.5, "entries": 8192, "continuations": 270,
                                             "max_pause_ms": 25.0},
         "max_pause_ms": 40.8, "max_pause_op": "nominate_many", "checked_pages": 2048,
         "lost_writes": 0, "audit_errors": 0, "writer_errors": [], "sched": "fifo",
         "load": {"loadavg_before": [6.8, 5, 4], "loadavg_after": [7.1, 5, 4], "own_cores": 1.6, "others_cores": 0.3,
                  "cores": 2, "threshold_cores": 0.5, "loaded": False},
         "placements": [{"labels": {}, "held": True, "processes": [
             {"role": "hypervisor", "pid": 5, "cpus": [0], "held": True,
              "threads": [{"tid": 5, "allowed": [0], "last_cpu": 0, "ran": True, "held": True}]}]}],
         "window": {"steps": 9000, "over_1ms": 12, "over_1ms_by_op": {"share_many": 12},
                    "max_lt_ms": 2.048, "max_op": "share_many"}}
    text = soak.report(r)
    assert "8 writer guests" in text and "8,192 shared entries" in text
    assert "scheduled fifo" in text and "9,000 steps, 12 of 1 ms or more, the longest under 2.048 ms" in text
    assert "2,048 pages verified, 0 lost writes" in text and "writer errors" not in text
    assert "Placement: 1 placement(s), every thread (up to 1 a process): hypervisor on 0; all held" in text
    assert "load average 6.80 -> 7.10 on 2 cores; others used 0.30 cores" in text and ": quiet" in text
    r["writer_errors"] = ["GuestGone: gone"]
    assert "writer errors: GuestGone: gone" in soak.report(r)
    assert "clone domains" not in text
    r.update(big_domains=2, big_pages=250_000, big_shared_pages=500_000)
    assert "beside them 2 clone domains of 250,000 pages (500,000 shared entries at the end)" in soak.report(r)


def test_pages_depend_only_on_gfn_and_version():
    assert soak._page(3, 1) == soak._page(3, 1) != soak._page(3, 2) != soak._page(4, 2)
    assert len(soak._page(0, 0)) == soak.PAGE_SIZE


def test_window_counts_only_the_steps_taken_between_two_infos():
    def info(**kinds):
        return {"pause_by_op": {k: {"histogram": [{"lt_us": lt, "count": n} for lt, n in h.items()]}
                                for k, h in kinds.items()}}
    start = info(guest={64: 10, 4096: 1}, share_many={512: 3})
    end = info(guest={64: 30, 4096: 1}, share_many={512: 3, 2048: 2}, nominate_many={1024: 4})
    w = soak._window_steps(start, end)
    # the 4 ms guest step happened before the window: not counted
    assert w == {"steps": 26, "over_1ms": 2, "over_1ms_by_op": {"share_many": 2},
                 "max_lt_ms": 2.048, "max_op": "share_many"}
