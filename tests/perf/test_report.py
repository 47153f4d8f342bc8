"""The benchmark suite's plumbing (``perf.report``): headlines, compare,
``perf all``, plots.

Only synthetic results here: the point is that numbers are read, compared
and drawn right, and that a missing or broken bench costs a line, not the
run. No real benchmark runs in the tests (they would be slow and, on these
shared machines, meaningless as tests).
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

try:
    import perf  # noqa: F401
except ImportError:  # run as plain `pytest` without the project on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from perf.report import compare, headlines, suite  # noqa: E402
from perf.__main__ import main as perf_main  # noqa: E402

MACHINE = {"cores": 2, "memory_bytes": 8 << 30, "kernel": "6.1", "python": "3.11.7",
           "numpy": "2.0", "machine": "x86_64"}


def rmap_result() -> dict:
    rows = []
    for policy, slope, bpe in (("list", 1.0, 40.0), ("buckets", 0.0, 48.0), ("index", 0.0, 22.0)):
        for degree in (16, 256, 4096, 65536):
            base = 1000.0 * (degree / 16) ** slope if policy == "list" else 1000.0
            if policy == "buckets" and degree > 256:
                base = 1000.0 * degree / 4096
            rows.append({"policy": policy, "degree": degree, "add_ns": 500.0, "lookup_ns": base,
                         "delete_ns": base * (1.5 if policy == "index" and degree == 65536 else 1),
                         "bytes_per_entry": bpe, "k": 300, "repeats": 3})
    return {"bench": "rmap", "quick": True, "machine": MACHINE, "repeats": 3, "results": rows,
            "ratios": {"list_over_buckets_delete_at_65536": 256.0, "index_delete_flatness": 1.5,
                       "index_bytes_per_entry_at_65536": 22.0, "list_delete_slope": 1.0},
            "config": {"degrees": [16, 256, 4096, 65536], "repeats": 3}}


def cow_result() -> dict:
    return {"bench": "cow", "quick": True, "machine": MACHINE, "repeats": 1, "pages": 2000,
            "results": {
                "hvshare": {"faults": {"same": {"n": 1800, "p50_us": 20.0, "p99_us": 40.0, "mean_us": 22.0,
                                                "cpus": [0, 0]},
                                       "cross": {"n": 1800, "p50_us": 30.0, "p99_us": 60.0, "mean_us": 31.0,
                                                 "cpus": [0, 1], "samples_us": [25.0, 30.0, 35.0, 60.0]}},
                            "batched": {"pages": 2000, "batch": 1024, "pages_per_second": 100_000.0,
                                        "pages_per_second_all": [100_000.0]}},
                "pipe": {"same": {"size": 32, "placement": "same", "p50_us": 10.0, "p99_us": 30.0},
                         "cross": {"size": 32, "placement": "cross", "p50_us": 15.0, "p99_us": 35.0}},
                "ksm_cow": {"pages": 2000, "p50_ns": 4000.0, "p99_ns": 9000.0},
                "ksm_batched": {"pages": 2000, "pages_per_second": 200_000.0}},
            "ratios": {"cow_p50_over_ksm": 5.0, "batched_over_ksm": 0.5,
                       "cow_p50_over_pipe_same": 2.0, "cow_p50_over_pipe_cross": 2.0}}


def teardown_result(steps: bool = True) -> dict:
    """The shape of perf.teardown: rows per (n, rmap, mode), Linux munmap
    peers by N, ratios with the N they were taken at, a list of goals."""
    rows = []
    for rmap, per in (("list", 1e-6), ("buckets", 1e-8), ("index", 5e-9)):
        for mode in ("preemptible", "monolithic"):
            for n in (10_000, 100_000):
                s = per * n * n if rmap == "list" else per * n * 100
                row = {"rmap": rmap, "mode": mode, "n": n, "entries": n, "seconds": s,
                       "continuations": 10 if mode == "preemptible" else 0,
                       # a list removal alone can take ms: judged apart, never the headline
                       "max_pause_ms": (5.0 if rmap == "list" else 0.5) if mode == "preemptible" else s * 1e3,
                       "p99_step_ms": 0.4,
                       "steps": 10, "fault_p99_us": 50.0 if mode == "preemptible" else s * 1e6,
                       "idle_fault_p99_us": 40.0 if rmap != "index" else 20.0}
                if steps:
                    row["steps_ms"] = [0.5] * 10 if mode == "preemptible" else [s * 1e3]
                rows.append(row)
    munmap = {str(n): {"n_pages": n, "seconds": n * 5e-7, "baseline_seconds": n * 2e-7, "ratio": 2.5}
              for n in (10_000, 100_000)}
    return {"bench": "teardown", "quick": False, "machine": MACHINE, "results": rows, "munmap": munmap,
            "ratios": {"list_over_buckets": 1e4 / 0.1, "list_over_buckets_n": 100_000,
                       "index_over_ksm": 0.05 / 0.05, "index_over_ksm_n": 100_000},
            "goals": [{"goal": "buckets >= 200x faster than list at N=100,000", "met": True, "detail": ""}]}


def dedup_result() -> dict:
    """The shape of perf.dedup: per content the hvshare run and KSM's merge."""
    def case(hv, k):
        return {"hvshare": {"seconds": 1.0, "pages_per_second": hv, "rmap": "buckets"},
                "ksm": {"n_pages": 10_000, "content": "x", "merge_seconds": 0.1, "full_scans": 2,
                        "pages_per_second": k},
                "savings": {"match": True}}
    return {"bench": "dedup", "quick": True, "machine": MACHINE, "pages": 10_000, "repeats": 1,
            "results": {"identical": case(300_000.0, 100_000.0), "clone": case(150_000.0, 100_000.0)},
            "sweep": [{"content": "clone", "batch_pages": b, "seconds": 1.0, "pages_per_second": 1000.0 * b}
                      for b in (64, 256)],
            "ratios": {"merge_rate_over_ksm": 3.0, "merge_rate_over_ksm_clone": 1.5}}


def density_result() -> dict:
    return {"bench": "density", "quick": True, "machine": MACHINE, "frames": 4096, "pages": 1024,
            "results": {"without": {"guests": 4, "predicted": 4}, "with": {"guests": 9, "predicted": 9}},
            "ratios": {"density": 2.25}}


def combined() -> dict:
    benches = {"rmap": rmap_result(), "cow": cow_result(), "teardown": teardown_result(),
               "dedup": dedup_result(), "density": density_result(),
               "future": {"bench": "future", "skipped": "no benchmark perf/future.py"}}
    doc = {"machine": MACHINE, "quick": True, "benches": benches, "skipped": {"future": "missing"}}
    doc["headlines"] = headlines.headlines(doc)
    return doc


def _by_figure(hs, text):
    found = [h for h in hs if text in h["figure"]]
    assert len(found) == 1, [h["figure"] for h in hs]
    return found[0]


# -- headlines

def test_headlines_read_every_bench():
    hs = combined()["headlines"]
    keys = {"figure", "value", "unit", "anchor", "ratio", "goal", "met", "command"}
    assert all(keys <= set(h) for h in hs)
    h = _by_figure(hs, "rmap delete at degree 65,536")
    assert (h["value"], h["ratio"], h["met"]) == (16000.0, 256.0, True)
    assert h["anchor"] == "list: 4,096,000 ns, n=1" and h["command"] == "python -m perf rmap"
    assert h["stats"] == {"median": 16000.0, "min": 16000.0, "max": 16000.0, "n": 1}     # no repeats kept
    assert _by_figure(hs, "index memory")["value"] == 22.0
    assert _by_figure(hs, "index memory")["met"] is True
    assert _by_figure(hs, "vs 16 (flat)")["met"] is True
    t = _by_figure(hs, "on one frame, buckets")
    assert "100,000" in t["figure"] and t["value"] == pytest.approx(0.1) and t["met"] is True
    lvb = _by_figure(hs, "list vs buckets")
    assert lvb["value"] == pytest.approx(1e4) and lvb["anchor_value"] == pytest.approx(0.1)
    assert lvb["ratio"] == pytest.approx(100_000) and lvb["met"] is True
    ksm = _by_figure(hs, "index vs Linux munmap")
    assert "100,000" in ksm["figure"] and ksm["anchor_value"] == pytest.approx(0.05)
    assert ksm["ratio"] == pytest.approx(1.0) and ksm["met"] is True
    pause = _by_figure(hs, "longest hypervisor step")
    assert "(buckets, N=10,000)" in pause["figure"] and pause["anchor"] == "monolithic, buckets N=10,000: 10 ms, n=1"
    assert pause["value"] == 0.5 and pause["ratio"] == pytest.approx(20.0) and pause["met"] is True
    fault = _by_figure(hs, "fault p99 during")
    assert "(index, N=10,000)" in fault["figure"]           # the worst case against idle
    assert (fault["value"], fault["anchor_value"], fault["ratio"], fault["met"]) == (50.0, 20.0, 2.5, False)
    cow = _by_figure(hs, "vs Linux KSM CoW break")
    assert (cow["value"], cow["anchor_value"], cow["ratio"], cow["met"]) == (20.0, 4.0, 5.0, False)
    assert _by_figure(hs, "batched unshare")["ratio"] == 0.5
    same = _by_figure(hs, "(same core) vs raw pipe")
    assert same["anchor_value"] == 10.0 and same["met"] is True
    ident = _by_figure(hs, "identical pages")
    assert (ident["value"], ident["anchor_value"], ident["ratio"], ident["met"]) == (300_000.0, 100_000.0, 3.0, True)
    assert _by_figure(hs, "clone pages")["ratio"] == 1.5
    dens = _by_figure(hs, "density")
    assert (dens["value"], dens["anchor_value"], dens["ratio"], dens["met"]) == (9.0, 4.0, 2.25, True)
    assert "(9)" in dens["goal"]


def test_teardown_goals_are_judged_at_the_seeds_n_only():
    r = teardown_result()
    r["results"] = [c for c in r["results"] if c["n"] == 10_000]
    r["ratios"] = {"list_over_buckets": 50.0, "list_over_buckets_n": 10_000,
                   "index_over_ksm": 2.0, "index_over_ksm_n": 10_000}
    del r["munmap"]["100000"]
    hs = headlines.headlines({"benches": {"teardown": r}})
    lvb = _by_figure(hs, "list vs buckets")
    assert "10,000" in lvb["figure"] and lvb["ratio"] == 50.0 and lvb["met"] is None
    ksm = _by_figure(hs, "index vs Linux munmap")
    assert "10,000" in ksm["figure"] and ksm["ratio"] == pytest.approx(1.0) and ksm["met"] is None
    assert _by_figure(hs, "longest hypervisor step")["met"] is True      # "at every N": judged
    rows_before = [dict(c) for c in r["results"]]
    headlines.headlines({"benches": {"teardown": r}})
    assert r["results"] == rows_before                                   # the result is not changed


def test_headlines_survive_missing_and_odd_keys():
    doc = combined()
    del doc["benches"]["rmap"]["ratios"]
    doc["benches"]["rmap"]["results"] = "not a list"
    doc["benches"]["cow"]["results"]["hvshare"] = None
    doc["benches"]["cow"]["ratios"]["batched_over_ksm"] = float("nan")
    doc["benches"]["teardown"] = {"results": [{"rmap": "buckets", "n": None}],
                                  "ratios": {"list_over_buckets": "fast"}, "munmap": [1]}
    del doc["benches"]["dedup"]
    doc["benches"]["density"] = {"skipped": "raised OSError: no"}
    hs = headlines.headlines(doc)
    assert _by_figure(hs, "density")["skipped"] == "raised OSError: no"
    assert len(hs) == len(combined()["headlines"])       # same rows, whatever is missing
    for h in hs:
        if h["bench"] in ("rmap", "teardown", "dedup", "density"):
            assert h["value"] is None and h["met"] is None, h
    assert _by_figure(hs, "batched unshare")["ratio"] is None
    assert headlines.headlines({}) and all(h["value"] is None for h in headlines.headlines({}))


def test_goal_stated_by_the_bench_wins_and_goals_can_be_missed():
    doc = combined()
    doc["benches"]["cow"]["ratios"]["cow_p50_over_ksm"] = 50.0
    assert _by_figure(headlines.headlines(doc), "vs Linux KSM CoW break")["met"] is False
    doc["benches"]["cow"]["goals"] = {"cow_p50_over_ksm": {"goal": "<= 100x", "met": True}}
    h = _by_figure(headlines.headlines(doc), "vs Linux KSM CoW break")
    assert (h["goal"], h["met"]) == ("<= 100x", True)


def test_markdown_table_has_one_row_per_headline():
    doc = combined()
    md = headlines.markdown(doc)
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0] == "| figure | hvshare | anchor | ratio | goal met | command |"
    assert len(rows) == 1 + len(doc["headlines"])
    assert all(r.count(" | ") == 5 for r in rows)
    assert ("| 20 us, n=1 | KSM CoW break p50: 4 us, n=1 | 5x (hvshare/KSM) | no: <= 3x | `python -m perf cow` |"
            in md)
    assert "2 cores, 8 GiB" in md and "quick run" in md


def test_single_bench_json_gives_its_headlines():
    hs = headlines.headlines(cow_result())
    assert _by_figure(hs, "vs Linux KSM CoW break")["value"] == 20.0
    assert _by_figure(hs, "rmap delete")["value"] is None


# -- compare

def test_compare_flags_changes_beyond_threshold():
    a, b = rmap_result(), rmap_result()
    b["results"][0]["delete_ns"] *= 1.5            # list at 16: slower
    b["results"][1]["lookup_ns"] *= 0.5            # list at 256: faster
    b["results"][2]["add_ns"] *= 1.05              # within 10 %
    b["results"][3]["bytes_per_entry"] = 80.0      # larger
    b["ratios"]["list_over_buckets_delete_at_65536"] = 128.0
    b["results"].append({"policy": "index", "degree": 262144, "delete_ns": 1.0})
    cmp = compare.compare(a, b)
    rows = {r["path"]: r for r in cmp["benches"]["rmap"]["rows"]}
    r = rows["results[policy=list,degree=16].delete_ns"]
    assert (r["a"], r["b"], r["ratio"], r["flag"]) == (1000.0, 1500.0, 1.5, "slower")
    assert rows["results[policy=list,degree=256].lookup_ns"]["flag"] == "faster"
    assert rows["results[policy=list,degree=4096].add_ns"]["flag"] == ""
    assert rows["results[policy=list,degree=65536].bytes_per_entry"]["flag"] == "larger"
    assert rows["ratios.list_over_buckets_delete_at_65536"]["flag"] == "down"
    assert rows["results[policy=index,degree=262144].delete_ns"]["flag"] == "only in B"
    assert "machine.cores" not in rows and not any("[policy=list,degree=16].degree" in p for p in rows)
    text = compare.report(cmp, changed_only=True)
    assert "<< slower" in text and "add_ns" not in text
    assert "5 beyond 10% (1 slower, 1 faster, 1 larger, 1 down, 1 only in B)" in text


def test_compare_combined_against_single_and_settings():
    a = combined()
    b = cow_result()
    b["quick"] = False
    b["pages"] = 20000
    b["results"]["hvshare"]["batched"]["pages_per_second"] = 50_000.0
    b["machine"] = dict(MACHINE, cores=4)
    cmp = compare.compare(a, b)
    assert list(cmp["benches"]) == ["cow", "rmap", "teardown", "dedup", "density", "future"]
    cow = {r["path"]: r for r in cmp["benches"]["cow"]["rows"]}
    assert cow["pages"]["flag"] == "setting"
    assert cow["results.hvshare.batched.pages_per_second"]["flag"] == "slower"
    assert cow["results.hvshare.faults.same.p50_us"]["ratio"] == 1.0
    assert any("quick" in n for n in cmp["benches"]["cow"]["notes"])
    assert any("cores 2 -> 4" in n for n in cmp["notes"])
    assert cmp["benches"]["rmap"]["notes"] == ["only in A"]


def test_compare_cli(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(combined()))
    doc = combined()
    doc["benches"]["teardown"]["results"][0]["seconds"] *= 3
    b.write_text(json.dumps(doc))
    assert perf_main(["compare", str(a), str(b), "--changed", "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "results[rmap=list,mode=preemptible,entries=10000].seconds" in out and "3.000" in out
    assert json.loads((tmp_path / "c.json").read_text())["threshold"] == 0.1
    assert perf_main(["compare", str(a), str(tmp_path / "missing.json")]) == 2


# -- perf all

def _stub(name, run):
    mod = types.ModuleType(f"perf.{name}")
    mod.run = run
    mod.report = lambda result: f"{name} report: {result['results']}"
    return mod


def test_all_runs_skips_and_writes_json(monkeypatch, tmp_path, capsys):
    def ok(quick):
        print("bench chatter")
        return {"results": [{"x": 1}], "repeats": 2 if quick else 5}

    def boom(quick):
        raise ValueError("broken on purpose\nsecond line")

    monkeypatch.setitem(sys.modules, "perf.stub_ok", _stub("stub_ok", ok))
    monkeypatch.setitem(sys.modules, "perf.stub_boom", _stub("stub_boom", boom))
    monkeypatch.setitem(sys.modules, "perf.stub_notrun", types.ModuleType("perf.stub_notrun"))
    monkeypatch.setattr(suite, "SUITE", ("stub_ok", "stub_boom", "stub_absent", "stub_notrun"))
    out = tmp_path / "all.json"
    assert perf_main(["all", "--quick", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc) >= {"machine", "quick", "benches", "headlines", "skipped", "wall_seconds"}
    assert doc["quick"] is True and doc["machine"]["cores"] >= 1
    assert list(doc["benches"]) == ["stub_ok", "stub_boom", "stub_absent", "stub_notrun"]
    good = doc["benches"]["stub_ok"]
    assert good["results"] == [{"x": 1}] and good["repeats"] == 2 and good["quick"] is True
    assert good["machine"] == doc["machine"] and good["wall_seconds"] >= 0
    boom_r = doc["benches"]["stub_boom"]
    assert boom_r["skipped"] == "raised ValueError: broken on purpose" and "Traceback" in boom_r["error"]
    assert doc["benches"]["stub_absent"]["skipped"] == "no benchmark perf/stub_absent.py"
    assert "no run(quick)" in doc["benches"]["stub_notrun"]["skipped"]
    assert set(doc["skipped"]) == {"stub_boom", "stub_absent", "stub_notrun"}
    assert all(h["value"] is None for h in doc["headlines"])      # no real bench ran
    captured = capsys.readouterr()
    assert "bench chatter" in captured.out and "stub_ok report" in captured.out
    assert "[1/4] stub_ok" in captured.err and "SKIPPED: raised ValueError" in captured.err
    assert "[3/4] stub_absent" in captured.err and captured.err.count("\n") == 4


def test_all_only_and_from(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "perf.stub_ok", _stub("stub_ok", lambda quick: {"results": []}))
    doc = suite.run_suite(["stub_ok"], quick=False, echo=None,
                          progress=suite.Progress(1, stream=open(tmp_path / "p", "w"), live=True))
    assert doc["benches"]["stub_ok"]["quick"] is False and not doc["skipped"]
    assert doc["budget_seconds"] == 1800 and doc["over_budget"] is False
    assert "[1/1] stub_ok" in (tmp_path / "p").read_text()
    path = tmp_path / "run.json"
    path.write_text(json.dumps(combined()))
    assert perf_main(["all", "--from", str(path), "--markdown"]) == 0
    md = capsys.readouterr().out
    assert md.count("\n| ") == len(combined()["headlines"]) + 1


def test_bench_command_still_runs_one_bench(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "perf.stub_ok", _stub("stub_ok", lambda quick: {"results": [1]}))
    out = tmp_path / "one.json"
    assert perf_main(["stub_ok", "--quick", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["bench"] == "stub_ok" and r["quick"] is True and "machine" in r and "repeats" in r
    assert perf_main(["no_such_bench"]) == 2


def test_peers_load_as_benches():
    for name in ("ksm", "pipe"):
        mod = suite.load_bench(name)
        assert mod.__name__ == f"perf.peers.{name}" and callable(mod.run) and callable(mod.report)
    assert suite.bench_file("ksm") == "perf/peers/ksm.py" and suite.bench_file("rmap") == "perf/rmap.py"


# -- plots

def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from perf.report import plots
    written = {path: note for _, path, note in plots.write_all(combined(), str(tmp_path))}
    names = {"rmap_cost.png", "teardown_time.png", "teardown_steps.png", "cow_latency.png",
             "dedup_merge.png", "density.png"}
    for name in names:
        p = tmp_path / name
        assert str(p) in written, written
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert written[str(tmp_path / "cow_latency.png")] == "percentiles only where the JSON keeps no distribution"


def test_plots_draw_what_is_there_and_skip_the_rest(tmp_path):
    pytest.importorskip("matplotlib")
    from perf.report import plots
    doc = combined()
    doc["benches"]["teardown"] = teardown_result(steps=False)
    doc["benches"]["dedup"]["results"] = {}
    doc["benches"]["rmap"]["results"] = []
    doc["benches"]["cow"] = {"bench": "cow", "skipped": "raised OSError: no"}
    del doc["benches"]["density"]                      # drawn above; keeps this test short
    out = plots.write_all(doc, str(tmp_path))
    written = {name: (path, note) for name, path, note in out}
    path, note = written["teardown_steps.png"]
    assert path == str(tmp_path / "teardown_steps.png") and "steps_ms" in note     # drawn, with a note
    assert written["dedup_merge.png"][1] == "rates not in the JSON: ratios only"
    assert written["rmap_cost.png"][0] is None and "no per-degree rows" in written["rmap_cost.png"][1]
    assert written["cow_latency.png"] == (None, "cow did not run: raised OSError: no")
    assert not (tmp_path / "rmap_cost.png").exists()
    assert "plot cow_latency.png: not drawn, cow did not run" in plots.report(out)


def test_plots_say_clearly_when_matplotlib_is_missing(monkeypatch, tmp_path):
    from perf.report import plots
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # import fails
    with pytest.raises(plots.MatplotlibMissing, match="pip install"):
        plots.write_all(combined(), str(tmp_path))
    assert not any(tmp_path.iterdir())



# -- repeats: the statistics behind every figure

from perf import common  # noqa: E402


def test_summary_on_known_samples():
    assert common.summary([3, 1, 2, 5, 4]) == {"median": 3.0, "min": 1.0, "max": 5.0, "n": 5}
    assert common.summary([2.0, None, float("nan"), 4.0]) == {"median": 3.0, "min": 2.0, "max": 4.0, "n": 2}
    assert common.summary([]) is None and common.summary([None]) is None
    ten = common.summary(range(10, 0, -1))
    assert (ten["median"], ten["n"], ten["ci95"]) == (5.5, 10, [2.0, 9.0])      # ranks 2 and 9 of 10


def test_median_interval_ranks_reach_95_percent_and_no_narrower_does():
    from math import comb

    def coverage(n, lo):       # P(X_(lo) <= median <= X_(n+1-lo))
        return 1 - 2 * sum(comb(n, i) for i in range(lo)) / 2 ** n
    assert common.median_ci_ranks(5) is None            # min..max covers 94 % only
    assert common.median_ci_ranks(6) == (1, 6) and common.median_ci_ranks(100) == (40, 61)
    for n in range(6, 80):
        lo, hi = common.median_ci_ranks(n)
        assert hi == n + 1 - lo and coverage(n, lo) >= 0.95 > coverage(n, lo + 1), n


def test_stats_of_reads_every_way_a_bench_keeps_repeats():
    five = {"median": 3.0, "min": 1.0, "max": 5.0, "n": 5}
    assert common.stats_of({"x_ms": 3.0, "x_ms_all": [5, 1, 3, 2, 4]}, "x_ms") == five
    assert common.stats_of({"x_ms": 3.0, "x_ms_each": [5, 1, 3, 2, 4]}, "x_ms") == five
    assert common.stats_of({"x_ms": 3.0, "x_ms_spread": {"all": [5, 1, 3, 2, 4]}}, "x_ms") == five
    assert common.stats_of({"x_ms": 3.0, "all": {"x_ms": [5, 1, 3, 2, 4]}}, "x_ms") == five
    assert common.stats_of({"x_ms": 9.0, "x_ms_stats": five}, "x_ms") == five
    # a rate kept only as the time of each repeat: the same work over each time
    rate = common.stats_of({"pages_per_second": 100.0, "seconds": 2.0, "seconds_all": [1.0, 2.0, 4.0]},
                           "pages_per_second")
    assert (rate["min"], rate["median"], rate["max"], rate["n"]) == (50.0, 100.0, 200.0, 3)
    assert common.stats_of({"x_ms": 3.0}, "x_ms") == {"median": 3.0, "min": 3.0, "max": 3.0, "n": 1}
    assert common.stats_of({"x_ms": None}, "x_ms") is None and common.stats_of(None, "x_ms") is None


def test_log_histogram_keeps_the_whole_distribution():
    import numpy as np
    x = np.random.default_rng(7).lognormal(3.0, 0.6, 50_000)
    h = common.log_histogram(x)
    assert h["n"] == 50_000 and sum(h["count"]) == 50_000 and h["lo"] == sorted(h["lo"])
    assert len(h["lo"]) < 400                     # a few hundred numbers, not 50,000
    xs, fs = common.histogram_cdf(h)
    assert fs[-1] == 1.0 and xs[-1] >= x.max()
    for q in (0.01, 0.5, 0.99, 0.999):            # every percentile within one bucket (1/32)
        edge = xs[next(i for i, f in enumerate(fs) if f >= q)]
        assert np.quantile(x, q) <= edge <= np.quantile(x, q) * (1 + 1 / 16), q
    exact = common.log_histogram([0.0, 1.0, 1.5, 3.0, 3.0])
    assert (exact["lo"], exact["count"]) == ([0.0, 1.0, 1.5, 3.0], [1, 1, 1, 2])
    both = common.merge_histograms([exact, common.log_histogram([1.5, 8.0])])
    assert (both["n"], both["lo"], both["count"]) == (7, [0.0, 1.0, 1.5, 3.0, 8.0], [1, 1, 2, 2, 1])
    assert common.merge_histograms([None, {"n": 0}]) is None


# -- headlines with their repeats

def with_repeats(doc: dict) -> dict:
    """``doc`` as benches that keep their repeats write it (each shape they use)."""
    b = doc["benches"]
    same = b["cow"]["results"]["hvshare"]["faults"]["same"]
    same["p50_us_all"] = [18.0, 20.0, 25.0, 19.0, 21.0]
    b["cow"]["results"]["ksm_cow"]["p50_ns_all"] = [3500.0, 4000.0, 4500.0]
    for c in b["teardown"]["results"]:
        c["repeats"] = 3
        c["all"] = {"seconds": [c["seconds"] * f for f in (0.9, 1.0, 1.2)],
                    "max_pause_ms": [c["max_pause_ms"] * f for f in (0.8, 1.0, 1.2)]}
    for c in b["rmap"]["results"]:
        c["delete_ns_stats"] = common.summary([c["delete_ns"] * f for f in (0.9, 1.0, 1.1, 1.3)])
    for case in b["dedup"]["results"].values():
        case["hvshare"]["pages_per_second_all"] = [case["hvshare"]["pages_per_second"] * f for f in (0.5, 1, 2)]
    doc["headlines"] = headlines.headlines(doc)
    return doc


def test_figure_text_gives_value_spread_and_n():
    s = common.summary([1.50, 1.58, 1.62, 1.70, 1.81])
    assert headlines.figure_text(1.62, "ms", s) == "1.62 ms [1.5–1.81], n=5"
    assert headlines.figure_text(1.62, "ms") == "1.62 ms, n=1"
    assert headlines.figure_text(250_000.0, "pages/s", common.summary([2e5, 2.5e5, 3e5])) == \
        "250,000 pages/s [200,000–300,000], n=3"
    assert headlines.figure_text(None, "ms") == "?"


def test_headlines_carry_the_repeats_and_the_table_shows_them():
    doc = with_repeats(combined())
    hs = doc["headlines"]
    cow = _by_figure(hs, "vs Linux KSM CoW break")
    assert cow["value"] == 20.0 and cow["stats"] == {"median": 20.0, "min": 18.0, "max": 25.0, "n": 5}
    assert cow["anchor"] == "KSM CoW break p50: 4 us [3.5–4.5], n=3"
    pause = _by_figure(hs, "longest hypervisor step")
    assert (pause["stats"]["min"], pause["stats"]["max"], pause["stats"]["n"]) == (0.4, 0.6, 3)
    assert _by_figure(hs, "rmap delete at degree")["stats"]["n"] == 4
    assert _by_figure(hs, "identical pages")["stats"]["min"] == 150_000.0
    md = headlines.markdown(doc)
    assert "| 20 us [18–25], n=5 | KSM CoW break p50: 4 us [3.5–4.5], n=3 |" in md
    assert "| 0.5 ms [0.4–0.6], n=3 |" in md
    assert "min–max of the repeats" in md
    text = headlines.headline_table(doc)
    assert "20 us [18–25], n=5" in text


def test_every_figure_of_the_readme_table_appears_with_n():
    """The table ``python -m perf all --from docs/perf/run.json --markdown``
    prints gives every measured figure with n, and the README's table is
    that table: each of its figures from a bench with headlines is one of
    the run's."""
    root = Path(__file__).resolve().parents[2]
    doc = json.loads((root / "docs" / "perf" / "run.json").read_text())
    doc["headlines"] = headlines.headlines(doc)
    rows = [r.split(" | ") for r in headlines.markdown(doc).splitlines() if r.startswith("| ")][1:]
    assert rows and len(rows) == len(doc["headlines"])
    for figure, value, anchor, *_ in rows:
        assert value == "-" or ", n=" in value, (figure, value)
        assert not any(ch.isdigit() for ch in anchor.split(":")[-1]) or ", n=" in anchor \
            or "seed" in anchor, (figure, anchor)
    ours = {r[0].lstrip("| ") for r in rows}
    readme = (root / "README.md").read_text().split("## Performance", 1)[1].split("\n## ", 1)[0]
    for line in readme.splitlines():
        cells = line.split(" | ")
        if line.startswith("| ") and len(cells) == 6 and cells[-1].startswith("`python -m perf "):
            bench = cells[-1].split()[3].rstrip("`")
            if bench in headlines.HEADLINES:
                assert cells[0].lstrip("| ") in ours, cells[0]


# -- compare leaves the repeats' summaries and histograms out

def test_compare_skips_stats_and_histograms():
    a, b = cow_result(), cow_result()
    for r in (a, b):
        r["results"]["hvshare"]["faults"]["same"]["histogram"] = common.log_histogram([1.0, 2.0, 3.0])
        r["results"]["hvshare"]["faults"]["same"]["p50_us_stats"] = common.summary([19.0, 20.0, 21.0])
    b["results"]["hvshare"]["faults"]["same"]["histogram"] = common.log_histogram([5.0] * 9)
    paths = {r["path"] for r in compare.compare(a, b)["benches"]["cow"]["rows"]}
    assert "results.hvshare.faults.same.p50_us" in paths
    assert not any("histogram" in p or "_stats" in p for p in paths)


# -- plots: drawn from the same JSON as the table, with their repeats

def _drawn(monkeypatch, doc, tmp_path) -> dict:
    """Draw every plot of ``doc``; ``{file name: every text of its figure}``
    (titles, legends, annotations), the figure kept under ``"fig"``."""
    from perf.report import plots
    figs = {}
    save = plots._save

    def keep(fig, path):
        figs[Path(path).name] = fig
        save(fig, path)
    monkeypatch.setattr(plots, "_save", keep)
    plots.write_all(doc, str(tmp_path))
    out = {}
    for name, fig in figs.items():
        texts = [fig.get_suptitle()]
        for a in fig.axes:
            texts += [a.get_title()] + [t.get_text() for t in a.texts]
            if a.get_legend():
                texts += [t.get_text() for t in a.get_legend().get_texts()]
        out[name] = {"text": "\n".join(texts), "fig": fig}
    return out


@pytest.mark.parametrize("repeats", [False, True])
def test_plots_draw_with_and_without_repeats_and_show_n(monkeypatch, tmp_path, repeats):
    pytest.importorskip("matplotlib")
    doc = with_repeats(combined()) if repeats else combined()
    drawn = _drawn(monkeypatch, doc, tmp_path)
    assert set(drawn) == {"rmap_cost.png", "teardown_time.png", "teardown_steps.png", "cow_latency.png",
                          "dedup_merge.png", "density.png"}
    for name, d in drawn.items():
        assert "n=" in d["text"], name                 # every figure says how many repeats
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    if repeats:
        assert "n=5" in drawn["cow_latency.png"]["text"] and "n=4" in drawn["rmap_cost.png"]["text"]
        assert "n=3" in drawn["teardown_time.png"]["text"] and "n=3" in drawn["dedup_merge.png"]["text"]
        # the rmap delete panel has min-max bars: an errorbar container with bar lines
        delete = drawn["rmap_cost.png"]["fig"].axes[2]
        assert any(c.has_yerr for c in delete.containers)
    else:
        assert "n=1" in drawn["cow_latency.png"]["text"] and "n=1" in drawn["rmap_cost.png"]["text"]
        assert not any(getattr(c, "has_yerr", False) for a in drawn["rmap_cost.png"]["fig"].axes
                       for c in a.containers)


def test_teardown_steps_quote_the_tables_figure(monkeypatch, tmp_path):
    """The longest step the plot quotes is the headline's, text for text,
    not the longest of the one repeat whose steps are drawn."""
    pytest.importorskip("matplotlib")
    doc = with_repeats(combined())
    for c in doc["benches"]["teardown"]["results"]:
        if c["mode"] == "preemptible" and c["rmap"] == "buckets":
            c["steps_ms"] = [0.2, 0.3, 0.7]           # the last repeat: longest 0.7, the median is 0.5
    doc["headlines"] = headlines.headlines(doc)
    pause = _by_figure(doc["headlines"], "longest hypervisor step")
    table_text = headlines.figure_text(pause["value"], pause["unit"], pause["stats"])
    assert table_text == "0.5 ms [0.4–0.6], n=3" and table_text in headlines.markdown(doc)
    text = _drawn(monkeypatch, doc, tmp_path)["teardown_steps.png"]["text"]
    assert f"longest step: {table_text}" in text and "0.7 ms" not in text
    assert "buckets, preemptible, 100,000 entries: 3 steps of the last of 3 repeats" in text


def test_cow_latency_from_histograms_legend_outside(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    doc = with_repeats(combined())
    same = doc["benches"]["cow"]["results"]["hvshare"]["faults"]["same"]
    same["histogram"] = common.log_histogram([18.0] * 500 + [20.0] * 1000 + [60.0] * 300)
    d = _drawn(monkeypatch, doc, tmp_path)["cow_latency.png"]
    fig = d["fig"]
    a = fig.axes[0]
    fig.canvas.draw()
    legend, axes = a.get_legend().get_window_extent(), a.get_window_extent()
    assert legend.x0 >= axes.x1                      # beside the data, not over it
    assert "1,800 samples" in d["text"] and "p50 20 us [18–25], n=5" in d["text"]
    cdf = next(line for line in a.get_lines() if line.get_label().startswith("hvshare CoW fault, same core"))
    xs, fs = cdf.get_data()
    assert (xs[0], fs[0], fs[-1]) == (18.0, 0.0, 1.0) and 60.0 < xs[-1] <= 60.0 * (1 + 1 / 32)


def test_dedup_sweep_log2_axis_with_the_runs_ksm_line(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    d = _drawn(monkeypatch, combined(), tmp_path)["dedup_merge.png"]
    sweep = d["fig"].axes[1]
    assert sweep.get_xscale() == "log" and sweep.xaxis.get_transform().base == 2
    ksm = [line for line in sweep.get_lines() if line.get_label().startswith("Linux KSM, clone pages")]
    assert len(ksm) == 1 and set(ksm[0].get_ydata()) == {100_000.0}    # the same run's ksmd rate
    assert "Linux KSM, clone pages: 100,000 pages/s, n=1" in d["text"]


def test_plots_command_defaults_to_the_readmes_run(monkeypatch, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from perf.report import plots
    (tmp_path / "docs" / "perf").mkdir(parents=True)
    (tmp_path / "docs" / "perf" / "run.json").write_text(json.dumps(combined()))
    monkeypatch.chdir(tmp_path)
    assert perf_main(["plots"]) == 0
    assert (tmp_path / "docs" / "perf" / "teardown_steps.png").exists()
    assert plots.RUN_JSON == "docs/perf/run.json" and "plot docs/perf/cow_latency.png" in capsys.readouterr().out
