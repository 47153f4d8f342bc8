"""Placement (:mod:`hvshare.perf.placement`) against a real child process
with a second thread, and the load record and flag (:mod:`hvshare.perf.load`).
No timing is asserted."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hvshare.perf import load, placement
from hvshare.perf.placement import Placement

#: a child with a second thread that wakes on each line of stdin; "spawn" starts a third,
#: "proc" a process of its own (``cat``, which ends when the child does)
_CHILD = r"""
import subprocess, sys, threading
kids = []
ev = threading.Event()
def spin():
    while True:
        ev.wait(); ev.clear()
        sum(range(20000))
threading.Thread(target=spin, daemon=True).start()
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "spawn":
        threading.Thread(target=spin, daemon=True).start()
    if line.strip() == "proc":
        kids.append(subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL))
    ev.set()
    sum(range(20000))
    print("ok", flush=True)
"""


@pytest.fixture
def child():
    p = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"      # its second thread is running
        yield p
    finally:
        p.kill()
        p.wait()


def poke(p, what: str = "go") -> None:
    """Wake every thread of the child once and wait for its answer."""
    p.stdin.write(what + "\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "ok"


def masks(pid: int) -> dict[int, list[int]]:
    return {t: placement.thread_state(pid, t)["allowed"] for t in placement.tids(pid)}


def test_sched_setaffinity_of_a_pid_pins_its_first_thread_only(child):
    cpu = min(os.sched_getaffinity(0))
    before = masks(child.pid)
    os.sched_setaffinity(child.pid, {cpu})
    after = masks(child.pid)
    assert after[child.pid] == [cpu]
    others = [t for t in after if t != child.pid]
    assert others and all(after[t] == before[t] for t in others)


def test_every_thread_pinned_checked_and_restored(child):
    cpu = max(os.sched_getaffinity(0))
    before = masks(child.pid)
    with Placement() as pl:
        pl.pin("child", child.pid, {cpu})
        assert all(m == [cpu] for m in masks(child.pid).values())
        poke(child)
        rec = pl.check(case="a")
        assert rec["labels"] == {"case": "a"} and rec["held"]
        (proc,) = rec["processes"]
        assert proc["role"] == "child" and proc["pid"] == child.pid and proc["cpus"] == [cpu] and proc["held"]
        assert {t["tid"] for t in proc["threads"]} == set(before) and len(proc["threads"]) == 2
        for t in proc["threads"]:
            assert t["allowed"] == [cpu] and t["held"]
            assert not t["ran"] or t["last_cpu"] == cpu      # a thread that ran since did so on the CPU
        assert any(t["ran"] for t in proc["threads"])
        # a thread started later inherits its creator's (pinned) mask, and is in the record
        poke(child, "spawn")
        rec = pl.check()
        assert len(rec["processes"][0]["threads"]) == 3 and rec["held"]
        assert all(m == [cpu] for m in masks(child.pid).values())
    # restored: the old threads their old masks, the new one its process's old mask
    after = masks(child.pid)
    assert all(after[t] == before[t] for t in before)
    assert all(after[t] == before[child.pid] for t in after if t not in before)


def test_a_thread_moved_off_its_cpus_is_flagged(child):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs")
    with Placement() as pl:
        pl.pin("child", child.pid, {cpus[0]})
        stray = max(placement.tids(child.pid))
        os.sched_setaffinity(stray, {cpus[1]})          # behind the placement's back
        poke(child)
        rec = pl.check()
        assert not rec["held"] and not rec["processes"][0]["held"]
        bad = [t for t in rec["processes"][0]["threads"] if not t["held"]]
        assert [t["tid"] for t in bad] == [stray] and bad[0]["allowed"] == [cpus[1]]
        assert "NOT held" in placement.describe(rec) and "did NOT hold" in placement.summary([rec])
        pl.repin()                                      # pinned again: it holds again
        poke(child)
        assert pl.check()["held"]


def test_a_process_that_is_gone_does_not_hold_and_bad_input_is_refused(child):
    with pytest.raises(ValueError, match="no CPU"):
        Placement().pin("child", child.pid, set())
    with Placement() as pl:
        pl.pin("child", child.pid, os.sched_getaffinity(0))
        child.kill()
        child.wait()
        rec = pl.check()
        assert not rec["held"] and rec["processes"][0].get("gone")
        with pytest.raises(ProcessLookupError, match="not running"):
            pl.pin("again", child.pid, os.sched_getaffinity(0))


def test_a_tree_takes_the_processes_below_it_and_records_those_started_later(child):
    cpu = max(os.sched_getaffinity(0))
    poke(child, "proc")
    (first,) = placement.children(child.pid)
    orig = masks(first)[first]
    with Placement() as pl:
        pl.pin("parent", child.pid, {cpu}, tree=True)
        assert masks(first) == {first: [cpu]}                      # pinned with it
        poke(child, "proc")                                         # started after: inherits
        (later,) = set(placement.descendants(child.pid)) - {first}
        rec = pl.check()
        roles = {p["pid"]: p["role"] for p in rec["processes"]}
        assert rec["held"] and roles == {child.pid: "parent", first: "parent's child", later: "parent's child"}
        assert masks(later) == {later: [cpu]}
    assert masks(first)[first] == masks(later)[later] == orig       # both get the tree's old mask back


def test_cpu_lists_and_the_stat_field_of_the_last_cpu():
    assert placement.parse_cpu_list("0-2,5,7-8\n") == [0, 1, 2, 5, 7, 8]
    st = placement.thread_state(os.getpid(), os.getpid())
    assert st["last_cpu"] in os.sched_getaffinity(0) and st["allowed"] == sorted(os.sched_getaffinity(0))
    assert placement.thread_state(os.getpid(), 2**22 + 7) is None


# -- load

def test_a_run_is_loaded_when_others_use_more_than_the_fraction_of_the_cores():
    cores = 4
    edge = load.LOADED_FRACTION * cores
    assert load.loaded(edge + 0.01, cores) is True
    assert load.loaded(edge, cores) is False and load.loaded(0.0, cores) is False
    assert load.loaded(None, cores) is None


def test_the_load_record_counts_our_own_cpu_apart_from_the_machines():
    meter = load.LoadMeter()
    t = os.times()
    while os.times().user - t.user < 0.2:               # our own work, not others'
        pass
    rec = meter.record()
    assert rec["own_cores"] > 0 and rec["cores"] == os.cpu_count()
    assert len(rec["loadavg_before"]) == len(rec["loadavg_after"]) == 3
    assert rec["threshold_cores"] == load.LOADED_FRACTION * os.cpu_count()
    assert rec["loaded"] == load.loaded(rec["others_cores"], rec["cores"])
    assert "load average" in load.summary(rec) and load.summary(None) == "load not recorded"
