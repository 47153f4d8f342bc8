"""The step-tail recorder: the hypervisor keeps its slowest steps with what
they did (items, chunks) and what happened meanwhile (page faults,
collections), and ``info`` shows them."""
from __future__ import annotations

import gc
import json
import mmap
import random
import subprocess
import sys

import numpy as np
import pytest

from hvshare.hvcore.process.steps import SLOW_STEPS_KEPT, TAIL_FIELDS, StepMeter, StepTail
from hvshare.tools.cli.counters import step_line

#: every key of a kept step
ENTRY_KEYS = {"kind", "what", "detail", "wall_ms", "seq", "unknown", *TAIL_FIELDS}


def _key(e: dict) -> float:
    return e["cpu_ms"] if e["cpu_ms"] is not None else e["wall_ms"]


def test_the_tail_keeps_the_n_slowest_slowest_first():
    rng = random.Random(3)
    tail = StepTail(8)
    times = [rng.random() for _ in range(500)]
    for i, t in enumerate(times):
        tail.add(t, {"i": i})
    kept = tail.entries()
    assert [e["i"] for e in kept] == sorted(range(500), key=lambda i: -times[i])[:8]
    assert tail.floor == sorted(times)[-8]


def test_a_step_begun_and_ended_has_its_faults_collections_and_work():
    m = StepMeter(tail=4)
    step = m.begin()
    mm = mmap.mmap(-1, 64 * mmap.PAGESIZE)
    np.frombuffer(mm, np.uint8)[::mmap.PAGESIZE] = 1     # 64 fresh pages, first touched here
    gc.collect()
    m.note(items=40, chunk=40, chunk_s=0.001)
    m.note(items=2, chunk=2)
    m.note(detail=lambda: "work of the step")
    m.end(step, "create", "create")
    (e,) = m.slowest()
    assert set(e) == ENTRY_KEYS and e["unknown"] == []
    assert e["kind"] == "create" and e["detail"] == "work of the step"
    assert (e["items"], e["chunks"], e["chunk"], e["chunk_ms"]) == (42, 2, 40, 1.0)
    assert e["minflt"] >= 64
    assert e["gcs"] >= 1 and e["gc_full"] >= 1
    assert 0 < e["cpu_ms"] and e["seq"] == 1
    del mm


def test_nested_steps_keep_their_own_notes():
    m = StepMeter()
    outer = m.begin()
    m.note(items=5)
    inner = m.begin()
    m.note(items=7)
    m.end(inner, "ping")
    m.note(items=1)
    m.end(outer, "destroy")
    by_kind = {e["kind"]: e for e in m.slowest()}
    assert by_kind["ping"]["items"] == 7
    assert by_kind["destroy"]["items"] == 6


def test_guest_steps_enter_at_fold_time_with_their_wall_time_only():
    m = StepMeter(tail=3)
    m.record(0.002, "destroy", cpu=0.002)
    log = m.log("guest", "guest 4")
    log.extend([1e-5, 0.004, 2e-5, 0.003, 0.0001])
    kept = m.slowest()
    assert [(e["kind"], e["wall_ms"]) for e in kept] == [("guest", 4.0), ("guest", 3.0), ("destroy", 2.0)]
    g = kept[0]
    assert g["what"] == "guest 4" and g["cpu_ms"] is None
    assert {"cpu_ms", "minflt", "majflt", "gcs", "items"} <= set(g["unknown"])
    assert "nothing else known" in step_line(g)
    # a recorded step with its CPU time, its faults unknown
    d = kept[2]
    assert d["cpu_ms"] == 2.0 and "minflt" in d["unknown"] and "cpu_ms" not in d["unknown"]
    # steps over the goal's bound, per kind (guest steps by their wall time)
    ops = m.by_op()
    assert (ops["guest"]["over_1ms_cpu"], ops["destroy"]["over_1ms_cpu"]) == (2, 1)


@pytest.mark.hvshare(frames=1 << 18)
def test_info_shows_the_slowest_steps_of_a_real_hypervisor(hvs):
    """The audit, one step over every frame of a 262,144-frame pool, is
    slower than every bounded step: it is kept, with its page faults and
    collections; a create's job steps are kept with their items."""
    hvs.create(4096, "clone", seed=1)
    assert hvs.audit() == 0
    kept = hvs.info()["slowest_steps"]
    assert 0 < len(kept) <= SLOW_STEPS_KEPT
    assert all(set(e) == ENTRY_KEYS for e in kept)
    keys = [_key(e) for e in kept]
    assert keys == sorted(keys, reverse=True)
    audit = next((e for e in kept if e["kind"] == "audit"), None)
    if audit is None:
        # a loaded machine made SLOW_STEPS_KEPT other steps slower: each is
        # then at least as slow as the audit was
        slowest_audit = hvs.info()["pause_by_op"]["audit"]["max_cpu_ms"]
        assert len(kept) == SLOW_STEPS_KEPT and min(keys) >= slowest_audit, kept
    else:
        assert audit["minflt"] is not None and audit["gcs"] is not None and audit["cpu_ms"] > 0
    creates = [e for e in kept if e["kind"] == "create"]
    assert all(e["items"] is not None and e["detail"].startswith("the create of domain") for e in creates)


def test_hvctl_info_prints_the_slowest_steps(hvs):
    hvs.create(256)
    r = subprocess.run([sys.executable, "-m", "hvshare.tools.hvctl", "--socket", hvs.socket_path, "info"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("slowest steps"))
    assert "ms CPU" in lines[i + 1] and "ms wall" in lines[i + 1]



def _rss_shmem_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssShmem:"))


@pytest.mark.parametrize("lazy", [False, True])
def test_hvctl_start_backs_the_pool_unless_lazy(tmp_path, lazy):
    sock = str(tmp_path / "hv.sock")
    frames = 4096                                       # 16 MiB
    args = ["--lazy-pool"] if lazy else []
    hvctl = [sys.executable, "-m", "hvshare.tools.hvctl", "--socket", sock]
    r = subprocess.run(hvctl + ["start", "--frames", str(frames), *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    try:
        pid = json.loads(subprocess.run(hvctl + ["--json", "info"], capture_output=True, text=True,
                                        timeout=60).stdout)["pid"]
        backed = _rss_shmem_kib(pid) >= frames * 4
        assert backed != lazy
    finally:
        assert subprocess.run(hvctl + ["stop"], capture_output=True, timeout=60).returncode == 0
