"""The whole benchmark suite, smallest: ``python -m hvshare.perf all --quick
--smoke`` as a user runs it (every bench at the smallest sizes that still
run each of its parts). A smoke test: every bench of the registry's suite
must run to the end and give its figures in the result contract, audits 0;
no timing is judged here (shared machines)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from hvshare.perf.goals import GOALS
from hvshare.perf.registry import SUITE
from hvshare.perf.report.plots import PLOTS


@pytest.mark.timeout(900)
def test_perf_all_smoke_runs_every_bench(tmp_path, contract):
    out, plots = tmp_path / "run.json", tmp_path / "plots"
    args = [sys.executable, "-m", "hvshare.perf", "all", "--quick", "--smoke", "--json", str(out)]
    with_plots = importlib.util.find_spec("matplotlib") is not None
    if with_plots:
        args += ["--plots", str(plots)]
    p = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads(out.read_text())
    contract(doc)
    assert doc["quick"] is True and doc["smoke"] is True and doc["machine"]["cores"] >= 1
    assert not doc["skipped"], doc["skipped"]
    assert list(doc["benches"]) == list(SUITE)
    for name in SUITE:
        bench = doc["benches"][name]
        assert "error" not in bench and bench["figures"], (name, bench.get("skipped"))
    # every goal is a headline, and every one whose bench measures it in a quick run has its figure
    assert [h["title"] for h in doc["headlines"]] == [g.title for g in GOALS]
    assert all(h["figure"] is not None for h in doc["headlines"] if h["bench"] != "teardown")
    # nothing was broken by any of them
    assert doc["benches"]["cow"]["audit_errors"] == 0
    assert all(r["audit_errors"] == 0 and r["frames_back"] for r in doc["benches"]["teardown"]["results"])
    if with_plots:
        assert sorted(f.name for f in plots.glob("*.png")) == sorted(name for _, name, _ in PLOTS)
