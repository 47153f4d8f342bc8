"""The result contract and what reads it: :mod:`hvshare.perf.figure`, the bench
registry, the goals and headlines, the suite, ``compare`` and the plots.
Synthetic results (a few figures each) and the committed full run
(docs/perf/run.json); one real quick bench at the end."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from hvshare.perf import common, goals, load, registry
from hvshare.perf.__main__ import main as perf_main
from hvshare.perf.figure import LARGEST, Figure, Figures, find, select
from hvshare.perf.report import compare, conditions, headlines, suite

RUN_JSON = Path(__file__).resolve().parents[2] / "docs" / "perf" / "run.json"


def bench(name: str, *figs: Figure, **extra) -> dict:
    return {"bench": name, "quick": False, "figures": [f.to_dict() for f in figs], **extra}


def fig(name: str, values, unit: str = "us", **labels) -> Figure:
    return Figure.of(name, values, unit, **labels)


# -- the Figure

def test_a_figure_is_its_values_median_spread_and_n():
    f = Figure.of("x", [1.62, 1.50, float("nan"), None, 1.81, 1.70, 1.58], "ms", case="a")
    assert (f.n, f.median, f.min, f.max) == (5, 1.62, 1.50, 1.81)
    assert f.text() == "1.62 ms [1.5–1.81], n=5" and Figure.of("y", [3], "s").text() == "3 s, n=1"
    d = f.to_dict()
    assert Figure.from_dict(d) == f and d["values"] == [1.62, 1.50, 1.81, 1.70, 1.58]
    # a converted old run kept only the summary: values null, the summary stands
    old = Figure.from_dict({**d, "values": None, "median": 2.0, "min": 1.0, "max": 4.0, "n": 9})
    assert (old.median, old.min, old.max, old.n) == (2.0, 1.0, 4.0, 9) and old.to_dict()["values"] is None
    figs = Figures()
    figs.add("empty", [None], "s")
    assert figs == []                      # nothing measured: no figure


def test_select_and_find_match_labels_tuples_and_the_largest():
    r = bench("b", fig("t", [1], policy="list", degree=16), fig("t", [5], policy="list", degree=4096),
              fig("t", [2], policy="index", degree=4096), fig("u", [9], policy="list", degree=4096))
    assert find(r, "t", policy="list", degree=LARGEST).median == 5
    assert [f.median for f in select(r, "t", degree=4096)] == [5, 2]
    assert find(r, "t", policy=("index", "buckets")).median == 2
    assert find(r, "t") .median == 5 and find(r, "t", policy="buckets") is None and find({}, "t") is None


# -- the registry

def test_help_lists_every_benchmark_with_a_line():
    p = subprocess.run([sys.executable, "-m", "hvshare.perf", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0
    for name, b in registry.BENCHES.items():
        assert f"  {name}" in p.stdout and b.about in p.stdout.replace("\n", " ")
    assert {"scale", "soak", "firsttouch"} <= set(registry.BENCHES)


def test_every_registered_bench_loads_and_the_suite_is_registered():
    for b in registry.BENCHES.values():
        mod = b.load()
        assert not isinstance(mod, str), mod
        assert mod.__name__ == b.qualname and b.file == b.module.replace(".", "/") + ".py"
    assert set(registry.SUITE) <= set(registry.BENCHES) and "ksm" not in registry.SUITE
    assert {g.bench for g in goals.GOALS} <= set(registry.SUITE)


# -- goals and headlines

def cow(fault: float, floor: float, pipe: float, ksm: float = 2.0) -> dict:
    return bench("cow", fig("fault_p50", [fault] * 3, placement="same"), fig("floor_p50", [floor] * 3, placement="same"),
                 fig("pipe_p50", [pipe] * 3, placement="same"), fig("ksm_cow_p50", [ksm] * 3),
                 fig("batched_rate", [300, 310, 320], "pages/s", write="one byte", batch=1024),
                 fig("ksm_batched_rate", [100, 150, 200], "pages/s"))


def by_title(doc: dict, bench_name: str) -> dict:
    return {h["title"]: h for h in headlines.headlines(doc) if h["bench"] == bench_name}


def test_a_fault_cheaper_than_its_floor_is_a_broken_measurement_never_a_goal_met():
    title = "CoW fault p50, same core, over the floor probe"
    assert by_title(cow(11.0, 10.0, 5.0), "cow")[title]["verdict"] == headlines.MET
    assert by_title(cow(13.0, 10.0, 5.0), "cow")[title]["verdict"] == headlines.NOT_MET
    assert by_title(cow(9.0, 10.0, 5.0), "cow")[title]["verdict"] == headlines.BROKEN      # below the floor probe
    broken = by_title(cow(4.0, 3.0, 5.0), "cow")                                          # below the raw pipe
    assert broken[title]["verdict"] == broken["CoW fault p50, same core, over Linux KSM's CoW break"]["verdict"] \
        == headlines.BROKEN
    h = by_title(cow(11.0, 10.0, 5.0), "cow")["batched CoW pages/s over Linux KSM's batched CoW break"]
    assert h["ratio"] == pytest.approx(310 / 150) and h["verdict"] == headlines.MET and h["goal"] == ">= 2x"


def test_a_floor_under_the_pipe_breaks_the_ratio_it_anchors_and_every_impossible_figure_is_listed():
    title = "CoW fault p50, same core, over the floor probe"
    h = by_title(cow(11.0, 4.0, 5.0), "cow")[title]       # the fault is fine, its anchor is impossible
    assert h["verdict"] == headlines.BROKEN and "floor_p50 4 us is under pipe_p50 5 us" in h["why"]
    assert headlines.sanity(cow(11.0, 4.0, 5.0)) == [h["why"]]
    assert headlines.sanity(cow(11.0, 10.0, 5.0)) == []
    quick = cow(0.265 * 5.0, 10.0, 5.0)                    # the --quick table once called this goal met
    assert {v["verdict"] for v in by_title(quick, "cow").values() if "CoW fault p50" in v["title"]} \
        == {headlines.BROKEN}
    report = headlines.report_goals("cow", quick)
    assert "[broken measurement]" in report and "[met] CoW fault p50" not in report
    assert "broken measurement: fault_p50 1.33 us is under floor_p50 10 us" in report


def placed(held: bool, **labels) -> dict:
    thread = {"tid": 7, "name": "python", "allowed": [0] if held else [0, 1], "last_cpu": 0, "ran": True,
              "held": held}
    return {"labels": labels, "held": held,
            "processes": [{"role": "guest", "pid": 7, "cpus": [0], "held": held, "threads": [thread]}]}


def test_a_placement_that_did_not_hold_breaks_the_figures_of_its_case_only(contract):
    title = "CoW fault p50, same core, over the floor probe"
    r = cow(11.0, 10.0, 5.0)
    r["placements"] = [placed(True, placement="same", repeat=0), placed(False, placement="cross", repeat=0)]
    contract(r)
    assert by_title(r, "cow")[title]["verdict"] == headlines.MET       # the cross case does not touch it
    r["placements"].append(placed(False, placement="same", repeat=1))
    h = by_title(r, "cow")[title]
    assert h["verdict"] == headlines.BROKEN and h["why"] == "the placement of placement=same, repeat=1 did not hold"
    ksm = by_title(r, "cow")["CoW fault p50, same core, over Linux KSM's CoW break"]
    r["placements"] = [placed(False, placement="cross", repeat=0)]
    assert by_title(r, "cow")["CoW fault p50, same core, over Linux KSM's CoW break"]["verdict"] == headlines.NOT_MET
    assert ksm["verdict"] == headlines.BROKEN                  # by its figure's case, not its peer anchor's
    r["placements"] += [placed(True, placement="same", repeat=0), placed(False, placement="same", repeat=1)]
    assert "3 placement(s)" in headlines.report_goals("cow", r) and "2 did NOT hold" in headlines.report_goals("cow", r)


def test_conditions_show_load_and_placement_per_bench():
    meter = load.LoadMeter()
    quiet = {**cow(11.0, 10.0, 5.0), "placements": [placed(True, placement="same")], "load": meter.record()}
    quiet["load"].update(others_cores=0.1, loaded=False)
    busy = {**bench("teardown", fig("seconds", [1.0], "s")), "load": {**quiet["load"], "others_cores": 1.5,
                                                                       "loaded": True}}
    old = bench("rmap", fig("delete", [1.0], "ns"))
    benches = {"cow": quiet, "teardown": busy, "rmap": old}
    text = conditions.conditions_table(benches)
    rows = {line.split()[0]: line for line in text.splitlines()[2:]}
    assert "LOADED" in rows["teardown"] and "1.50 (of" in rows["teardown"] and "not placed" in rows["teardown"]
    assert " no " in rows["cow"] and "guest on 0" in rows["cow"] and "all held" in rows["cow"]
    assert "not recorded" in rows["rmap"]
    said = conditions.statement(benches)
    assert "loaded" in said and "teardown." in said and "pinned and checked" in said and "Not recorded: rmap." in said
    assert conditions.statement({"rmap": old}).startswith("This run recorded neither")
    md = headlines.markdown({"machine": {"cores": 2, "memory_bytes": 2**34}, "benches": benches})
    assert md.splitlines()[0].startswith("Measured on 2 cores") and said in md.splitlines()[0]


def test_goals_are_the_projects_and_judged_at_their_case_only():
    g = {x.title: x for x in goals.GOALS}
    assert g["batched CoW pages/s over Linux KSM's batched CoW break"].target == 2
    assert all(x.target == 2 for x in goals.GOALS if x.bench == "dedup")
    assert g[f"teardown of {goals.SEED_N:,} entries, index over Linux munmap of one KSM page"].target == 1
    assert g["CoW fault p50, same core, over the floor probe"].target == 1.2
    td = lambda n: bench("teardown", fig("seconds", [30.0], "s", rmap="list", mode="preemptible", entries=n),  # noqa: E731
                         fig("seconds", [0.1, 0.12], "s", rmap="buckets", mode="preemptible", entries=n))
    title = f"teardown of {goals.SEED_N:,} entries on one frame: list over buckets"
    assert by_title(td(goals.SEED_N), "teardown")[title]["verdict"] == headlines.MET
    quick = by_title(td(10_000), "teardown")[title]
    assert quick["verdict"] == headlines.NOT_JUDGED and quick["labels"]["entries"] == 10_000
    assert quick["ratio"] == pytest.approx(30 / 0.11)
    assert by_title({}, "teardown")[title]["verdict"] == headlines.NOT_MEASURED


def test_of_several_cases_the_worst_is_judged():
    r = bench("teardown", *(fig(n, v, rmap=rm, mode="preemptible", entries=10)
                            for n, v, rm in (("fault_p99", [100], "buckets"), ("idle_fault_p99", [90], "buckets"),
                                             ("fault_p99", [60], "index"), ("idle_fault_p99", [20], "index"))))
    h = by_title(r, "teardown")["guest CoW fault p99 during a preemptible teardown over idle"]
    assert h["labels"]["rmap"] == "index" and h["ratio"] == 3 and h["verdict"] == headlines.NOT_MET


def test_markdown_and_text_tables_have_one_row_per_goal():
    doc = {"machine": {"cores": 2, "memory_bytes": 2**34}, "benches": {"cow": cow(11.0, 10.0, 5.0)}}
    doc["headlines"] = headlines.headlines(doc)
    md = headlines.markdown(doc)
    assert md.count("\n| ") == len(goals.GOALS) + 1 and "| broken measurement |" not in md
    assert "11 us [11–11], n=3" in md and "| met |" in md and "| not measured |" in md
    assert headlines.headline_table(doc).count("\n") == len(goals.GOALS) + 1
    assert "[met] CoW fault p50, same core, over the floor probe: 1.1x" in headlines.report_goals("cow", cow(11, 10, 5))


# -- the suite and one bench

def _stub(name: str, run) -> tuple:
    mod = types.ModuleType(f"hvshare.perf.{name}")
    mod.run, mod.report = run, lambda r: f"{name} report"
    return mod, registry.Bench(name, f"perf.{name}", "a stub", False)


def test_all_runs_skips_and_writes_the_contract(monkeypatch, tmp_path, capsys, contract):
    def ok(quick):
        print("bench chatter")
        return {"figures": Figures([fig("x", [1, 2, 3])]).dicts(), "detail": 2 if quick else 5}

    def boom(quick):
        raise ValueError("broken on purpose\nsecond line")
    for name, run in (("stub_ok", ok), ("stub_boom", boom)):
        mod, b = _stub(name, run)
        monkeypatch.setitem(sys.modules, b.qualname, mod)
        monkeypatch.setitem(registry.BENCHES, name, b)
    monkeypatch.setitem(registry.BENCHES, "stub_absent", registry.Bench("stub_absent", "perf.stub_absent", "", False))
    out = tmp_path / "all.json"
    doc = suite.run_suite(["stub_ok", "stub_boom", "stub_absent"], quick=True,
                          progress=suite.Progress(3, stream=sys.stderr, live=False))
    common.write_json(doc, str(out))
    doc = json.loads(out.read_text())
    contract(doc)
    good = doc["benches"]["stub_ok"]
    assert good["figures"][0]["values"] == [1, 2, 3] and good["detail"] == 2 and good["quick"] is True
    assert good["load"]["cores"] == load.LoadMeter().cores and len(good["load"]["loadavg_after"]) == 3
    assert doc["benches"]["stub_boom"]["skipped"] == "raised ValueError: broken on purpose"
    assert "Traceback" in doc["benches"]["stub_boom"]["error"]
    assert doc["benches"]["stub_absent"]["skipped"].startswith("perf/stub_absent.py does not import")
    assert set(doc["skipped"]) == {"stub_boom", "stub_absent"}
    assert all(h["verdict"] == headlines.NOT_MEASURED for h in doc["headlines"])      # no real bench ran
    captured = capsys.readouterr()
    assert "bench chatter" in captured.out and "stub_ok report" in captured.out
    assert "[1/3] stub_ok" in captured.err and "SKIPPED: raised ValueError" in captured.err
    one = tmp_path / "one.json"
    assert perf_main(["stub_ok", "--quick", "--json", str(one)]) == 0
    assert contract(json.loads(one.read_text()))[0]["name"] == "x"
    assert "loaded" in json.loads(one.read_text())["load"]
    assert perf_main(["no_such_bench"]) == 2


# -- compare

def test_compare_pairs_figures_and_flags_by_unit(tmp_path, capsys):
    a = {"benches": {"cow": cow(10.0, 9.0, 5.0), "rmap": bench("rmap", fig("delete", [100, 101, 102], "ns", degree=16))}}
    b = {"benches": {"cow": cow(20.0, 9.0, 5.0), "dedup": bench("dedup", fig("merge_rate", [1], "pages/s"))}}
    b["benches"]["cow"]["figures"][4]["values"] = [100.0, 100.0, 100.0]
    b["benches"]["cow"]["figures"][4].update(median=100.0, min=100.0, max=100.0)
    rows = {r["figure"]: r for r in compare.compare(a, b)["rows"]}
    assert rows["cow: fault_p50 [placement=same]"]["flag"] == "slower" and rows["cow: fault_p50 [placement=same]"]["ratio"] == 2
    assert rows["cow: floor_p50 [placement=same]"]["flag"] == ""
    assert rows["cow: batched_rate [write=one byte,batch=1024]"]["flag"] == "slower"
    assert rows["rmap: delete [degree=16]"]["flag"] == "only in A" and rows["dedup: merge_rate"]["flag"] == "only in B"
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    assert perf_main(["compare", str(pa), str(pb), "--changed"]) == 0
    out = capsys.readouterr().out
    assert "slower" in out and "floor_p50" not in out and "8 figures compared, 4 beyond 10%" in out
    pb.write_text(json.dumps({"benches": {"cow": {"results": {}}}}))     # an old run: no figures
    assert perf_main(["compare", str(pb), str(pb)]) == 2


# -- the committed run, its plots

def test_the_committed_run_follows_the_contract_and_gives_every_headline(contract):
    doc = json.loads(RUN_JSON.read_text())
    contract(doc)
    assert doc["quick"] is False and [h["title"] for h in doc["headlines"]] == [g.title for g in goals.GOALS]
    assert all(h["figure"] is not None for h in doc["headlines"])
    assert doc["headlines"] == json.loads(json.dumps(headlines.headlines(doc)))     # by this version's goals


def test_plots_of_the_committed_run(tmp_path):
    pytest.importorskip("matplotlib")
    from hvshare.perf.report import plots
    written = plots.write_all(json.loads(RUN_JSON.read_text()), str(tmp_path))
    assert [(name, note) for name, path, note in written if path is None] == []
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(name for _, name, _ in plots.PLOTS)
    assert plots.write_all({"benches": {"rmap": bench("rmap")}}, str(tmp_path / "x"))[0][1] is None


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


# -- a real bench

def test_a_real_quick_bench_result_follows_the_contract(tmp_path, contract):
    out = tmp_path / "density.json"
    p = subprocess.run([sys.executable, "-m", "hvshare.perf", "density", "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads(out.read_text())
    names = {(f["name"], f["labels"]["dedup"]) for f in contract(doc)}
    assert names == {(n, d) for n in ("guests", "predicted_guests") for d in ("with", "without")}
    assert "Goals (perf/goals.py):" in p.stdout
