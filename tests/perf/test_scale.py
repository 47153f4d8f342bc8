"""``python -m hvshare.perf scale`` in a tiny configuration (``HVSHARE_SCALE_PAGES``):
it runs to the end, emits the figures the report, the plot and the
headlines read, and leaves no hypervisor, segment or KSM knob behind. No
timing is judged here (shared machines)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from hvshare.perf import scale
from hvshare.perf.figure import find
from hvshare.perf.goals import GOALS
from hvshare.perf.peers.ksm_sysfs import KSM_DIR
from hvshare.perf.report import headlines


def _knobs() -> dict:
    if not KSM_DIR.exists():
        return {}
    return {p.name: p.read_text() for p in KSM_DIR.iterdir() if p.is_file() and p.stat().st_mode & 0o200}


def _segments() -> set:
    return {n for n in os.listdir("/dev/shm") if n.startswith("hvs")}


def _left_behind(before: set) -> list:
    """New segments whose hypervisor is gone, or orphaned (other users of
    the machine may be running hypervisors of their own meanwhile)."""
    import psutil
    from hvshare.hvcore import shm
    out = []
    for name in _segments() - before:
        pid = shm.owner_pid(name)
        try:
            if pid is None or psutil.Process(pid).ppid() == 1:
                out.append(name)
        except psutil.NoSuchProcess:
            if name in _segments():
                out.append(name)
    return out


def test_scale_runs_tiny_and_emits_its_figures(tmp_path, contract):
    out = tmp_path / "scale.json"
    knobs, segs = _knobs(), _segments()
    env = dict(os.environ, HVSHARE_SCALE_PAGES="1024")
    p = subprocess.run([sys.executable, "-m", "hvshare.perf", "scale", "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "scale: N=1,024" in p.stderr                     # progress goes to stderr
    assert "Peers on the same bytes" in p.stdout and "Goals" in p.stdout
    assert "Slowest hypervisor steps, N=1,024" in p.stdout
    doc = json.loads(out.read_text())
    assert doc["bench"] == "scale" and doc["sizes"] == [1024]
    contract(doc)
    assert {r["rmap"] for r in doc["results"]} == set(scale.POLICIES)
    for r in doc["results"]:
        assert r["pages"] == 1024 and r["audit_errors"] == 0
        assert r["ops"]["destroy"]["entries"] > 0
        # each life's slowest hypervisor steps, slowest first, with what they did
        for kept in r["slowest_steps"]:
            keys = [e["cpu_ms"] if e["cpu_ms"] is not None else e["wall_ms"] for e in kept]
            assert kept and keys == sorted(keys, reverse=True)
            assert all({"kind", "what", "minflt", "gcs", "items", "unknown"} <= set(e) for e in kept)
        for op in scale.OPS:
            for name in ("seconds", "rate", "max_step", "max_step_cpu"):
                f = find(doc, name, rmap=r["rmap"], pages=1024, op=op)
                assert f is not None and f.n == r["repeats"] and f.min > 0, (op, name)
    for name in ("fill_generate_seconds", "fill_copy_seconds"):
        assert find(doc, name, pages=1024).n == 3
    if "ksm_skipped" not in doc:
        assert find(doc, "ksm_merge_rate", pages=1024).median > 0
    # every thread of the hypervisor on its own core, the guests and the driver on the others
    assert len(doc["placements"]) == sum(r["repeats"] for r in doc["results"])
    for rec in doc["placements"]:
        assert rec["held"] and sorted(p["role"] for p in rec["processes"]) == ["driver", "guest", "guest", "hypervisor"]
        for proc in rec["processes"]:
            assert proc["threads"] and all(set(t["allowed"]) <= set(proc["cpus"]) for t in proc["threads"])
    assert "Placement:" in p.stdout and "all held" in p.stdout
    hs = [h for h in headlines.headlines(doc) if h["bench"] == "scale"]
    assert len(hs) == sum(g.bench == "scale" for g in GOALS) == 4 and hs[0]["figure"] is not None and hs[0]["labels"]["pages"] == 1024
    # nothing left behind
    assert not _left_behind(segs)
    assert _knobs() == knobs


def test_step_window_subtracts_cumulative_histograms():
    def info(**kinds):
        return {"pause_by_op": {k: {"count": sum(h.values()), "total_ms": float(sum(h.values())), "max_ms": m,
                                    "histogram": [{"lt_us": lt, "count": n} for lt, n in h.items()]}
                                for k, (m, h) in kinds.items()}}
    before = info(create=(100.0, {131072: 1}), info=(0.2, {256: 1}))
    after = info(create=(100.0, {131072: 1}), share_many=(0.9, {1024: 3}), info=(5.0, {256: 1, 8192: 1}))
    w = scale.step_window(before, after)
    assert w["steps"] == 3 and w["histogram"] == [{"lt_us": 1024, "count": 3}]
    assert w["max_ms"] == 0.9 and w["max_exact"] and w["max_cpu_ms"] is None
    assert set(w["by_op"]) == {"share_many"}             # info steps and an idle create left out
    after["pause_by_op"]["share_many"]["max_cpu_ms"] = 0.7
    before["pause_by_op"]["share_many"] = {"count": 0, "max_ms": 0.0, "max_cpu_ms": 0.0, "histogram": []}
    assert scale.step_window(before, after)["max_cpu_ms"] == 0.7
