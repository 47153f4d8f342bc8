"""The step meter: logged guest steps count as recorded ones; CPU time per kind."""
from __future__ import annotations

import os
import random
import selectors

from hvshare.hvcore.process.loop import LoopSelector
from hvshare.hvcore.process.steps import StepMeter


def test_logged_steps_fold_into_the_same_figures_as_recorded_ones():
    rng = random.Random(7)
    rec, logged = StepMeter(), StepMeter()
    log = logged.log("guest", "guest 3")
    for i in range(5000):
        s = rng.choice([0.0, rng.random() * 1e-5, rng.random() * 1e-2, 2 ** rng.randint(0, 20) * 1e-6])
        rec.record(s, "guest 3", "guest")
        log.append(s)
        if i % 997 == 0:
            logged.fold()
        if i % 1500 == 0:
            rec.record(0.5, "destroy", cpu=0.25)
            logged.record(0.5, "destroy", cpu=0.25)
    assert logged.histogram() == rec.histogram()
    assert logged.by_op() == rec.by_op()
    assert (logged.steps, logged.max_s, logged.max_what) == (rec.steps, rec.max_s, rec.max_what)


def test_a_dropped_log_keeps_its_steps():
    m = StepMeter()
    m.log("guest", "guest 9").extend([1e-5, 2e-3])
    m.drop_log("guest", "guest 9")
    assert m.by_op()["guest"]["count"] == 2
    assert m.max_what == "guest 9"
    assert m.log("guest", "guest 9") == []


def test_cpu_time_per_kind_and_overall():
    m = StepMeter()
    m.record(0.010, "destroy", cpu=0.004)
    m.record(0.002, "destroy", cpu=0.002)
    m.record(0.001, "tick", "tick", 0.0005)
    m.log("guest", "guest 1").append(0.003)      # not CPU-timed: its wall time
    ops = m.by_op()
    assert ops["destroy"]["max_cpu_ms"] == 4.0 and ops["destroy"]["max_ms"] == 10.0
    assert ops["tick"]["max_cpu_ms"] == 0.5
    assert ops["guest"]["max_cpu_ms"] == ops["guest"]["max_ms"] == 3.0
    assert m.max_cpu_s == 0.004
    m.record(0.001, "list")                       # no CPU time given: its wall time
    assert m.by_op()["list"]["max_cpu_ms"] == 1.0


def test_info_reports_cpu_times(hvs):
    hvs.list()
    info = hvs.info()
    ops = info["pause_by_op"]
    # the overall figure is the longest of every kind's, in CPU time
    assert info["max_pause_cpu_ms"] == max(k["max_cpu_ms"] for k in ops.values())
    # a request is CPU-timed: some CPU time, no more than its wall time
    assert 0 < ops["list"]["max_cpu_ms"] <= ops["list"]["max_ms"] + 0.01


def test_loop_selector_hands_out_the_data_and_events():
    sel = LoopSelector()
    r, w = os.pipe()
    try:
        sel.register(r, selectors.EVENT_READ, "reader")
        sel.register(w, selectors.EVENT_WRITE, "writer")
        assert sel.ready(0) == [("writer", selectors.EVENT_WRITE)]
        os.write(w, b"x")
        assert sorted(sel.ready(0)) == [("reader", selectors.EVENT_READ), ("writer", selectors.EVENT_WRITE)]
        assert sorted(sel.ready(0)) == sorted((k.data, ev) for k, ev in sel.select(0))
        sel.unregister(w)
        assert sel.ready(0.01) == [("reader", selectors.EVENT_READ)]
    finally:
        sel.close()
        os.close(r)
        os.close(w)
