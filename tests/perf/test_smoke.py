"""The whole benchmark suite, small: ``python -m perf all --quick`` as a
user runs it. A smoke test: every bench must run to the end and give its
headline figures, audits 0; no timing is judged here (shared machines)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from hvcore.statedir import child_env

BENCHES = ("rmap", "cow", "teardown", "dedup", "density", "scale", "fork")


def test_perf_all_quick_runs_every_bench(tmp_path):
    out, plots = tmp_path / "run.json", tmp_path / "plots"
    args = [sys.executable, "-m", "perf", "all", "--quick", "--json", str(out)]
    with_plots = importlib.util.find_spec("matplotlib") is not None
    if with_plots:
        args += ["--plots", str(plots)]
    p = subprocess.run(args, capture_output=True, text=True, timeout=600, env=child_env())
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["quick"] is True and doc["machine"]["cores"] >= 1
    assert not doc["skipped"], doc["skipped"]
    for name in BENCHES:
        bench = doc["benches"][name]
        assert "error" not in bench and "results" in bench, (name, bench.get("skipped"))
    # the figures every headline row is made of are there
    assert len(doc["headlines"]) >= 10
    assert all(h["value"] is not None for h in doc["headlines"] if "teardown" not in h["figure"])
    # nothing was broken by any of them
    assert doc["benches"]["cow"]["results"]["hvshare"]["audit_errors"] == 0
    assert all(r["audit_errors"] == 0 and r["frames_back"] for r in doc["benches"]["teardown"]["results"])
    if with_plots:
        assert sorted(f.name for f in plots.glob("*.png")) == sorted(
            ["rmap_cost.png", "teardown_time.png", "teardown_steps.png", "cow_latency.png",
             "dedup_merge.png", "density.png", "scale_steps.png"])
