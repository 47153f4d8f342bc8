"""The headline figures of a run: each goal of :data:`hvshare.perf.goals.GOALS`
judged on the figures of its bench's result.

A headline is ``{"bench", "title", "figure", "anchor", "ratio", "goal",
"verdict", "labels"}``: the figure and its anchor as
:meth:`hvshare.perf.figure.Figure.to_dict`, the ratio of their medians, and the
verdict, one of :data:`VERDICTS`; a broken measurement also says ``why``.
They are read from the result contract (docs/schema/perf/result.schema.json)
and nothing else.

A broken measurement is a figure (or the anchor of its ratio) that is
physically impossible: under one of its :data:`hvshare.perf.goals.FLOORS`
in the same run and case, or measured with a placement that did not hold
(a placement record of the same case whose ``held`` is false).
"""
from __future__ import annotations

from .. import load, placement
from ..common import table
from ..figure import LARGEST, Figure, fmt, select
from ..goals import FLOORS, GOALS, Goal
from .conditions import statement

MET, NOT_MET, BROKEN, NOT_JUDGED, NOT_MEASURED = ("met", "not met", "broken measurement",
                                                  "not judged (other size)", "not measured")
VERDICTS = (MET, NOT_MET, BROKEN, NOT_JUDGED, NOT_MEASURED)


def _candidates(result: dict, goal: Goal) -> tuple[list[Figure], bool]:
    """The goal's figures, at the goal's case if the run has it (judged),
    else at the largest case it has (not judged)."""
    figs = select(result, goal.figure.name, **goal.figure.labels, **goal.at)
    if figs or not goal.at:
        return figs, True
    return select(result, goal.figure.name, **goal.figure.labels, **{k: LARGEST for k in goal.at}), False


def _follow(result: dict, ref, labels: dict) -> Figure | None:
    """The figure ``ref`` in the same case as ``labels`` for every label
    both have (the anchor of a ratio is measured where the figure is)."""
    figs = select(result, ref.name, **ref.labels)
    for k, v in labels.items():
        if k not in ref.labels and figs and all(k in f.labels for f in figs):
            figs = [f for f in figs if f.labels[k] == v]
    return max(figs, key=lambda f: f.median) if figs else None


def _same_case(placed: dict, labels: dict) -> bool:
    """A placement's labels and a figure's are the same case: the
    placement's are for the whole bench (none), or the two share names and
    agree on every one (a peer's figure without labels is not a case of it)."""
    shared = placed.keys() & labels.keys()
    return not placed or (bool(shared) and all(placed[k] == labels[k] for k in shared))


def broken(result: dict | None, fig: Figure | None) -> str | None:
    """Why ``fig`` of ``result`` is a broken measurement, or None: a floor
    it is under, or its case's placement that did not hold."""
    if fig is None or fig.median is None:
        return None
    for fl in FLOORS:
        if fl.figure.name == fig.name and _matches_ref(fig, fl.figure):
            low = _follow(result, fl.floor, fig.labels)
            if low is not None and low.median is not None and fig.median < low.median:
                return f"{fig.name} {fmt(fig.median)} {fig.unit} is under {low.name} " \
                       f"{fmt(low.median)} {low.unit}: {fl.why}"
    for rec in (result or {}).get("placements", ()):
        if not rec.get("held", True) and _same_case(rec.get("labels") or {}, fig.labels):
            case = ", ".join(f"{k}={v}" for k, v in (rec.get("labels") or {}).items())
            return f"the placement of {case or 'the bench'} did not hold"
    return None


def _matches_ref(fig: Figure, ref) -> bool:
    return all(fig.labels.get(k) == v for k, v in ref.labels.items())


def sanity(result: dict | None) -> list[str]:
    """Every figure of ``result`` that is a broken measurement, with why."""
    figs = [Figure.from_dict(d) for d in (result or {}).get("figures", ())]
    return [why for why in (broken(result, f) for f in figs) if why]


def _holds(goal: Goal, q: float) -> bool:
    if goal.op == "<=":
        return q <= goal.target
    if goal.op == ">=":
        return q >= goal.target
    if goal.op == "==":
        return q == goal.target
    return abs(q - 1) <= goal.target


def _badness(goal: Goal, q: float) -> float:
    """How far ``q`` is on the wrong side of the goal: the worst of several cases is judged."""
    return {"<=": q, ">=": -q}.get(goal.op, abs(q - 1))


def judge(goal: Goal, result: dict | None) -> dict:
    """One headline: the goal's figure (and anchor, ratio) in ``result``
    and its verdict; of several cases that match, the worst."""
    figs, judged = _candidates(result or {}, goal)
    cases = []
    for f in figs:
        anchor = _follow(result, goal.anchor, f.labels) if goal.anchor else None
        ratio = f.median / anchor.median if anchor and anchor.median else None
        value = ratio if goal.anchor else f.median
        if value is not None:
            cases.append((_badness(goal, value), f, anchor, ratio, value))
    why = None
    if not cases:
        fig = anchor = ratio = None
        verdict = NOT_MEASURED
    else:
        _, fig, anchor, ratio, value = max(cases, key=lambda c: c[0])
        why = broken(result, fig) or broken(result, anchor)
        if why:
            verdict = BROKEN
        elif not judged:
            verdict = NOT_JUDGED
        else:
            verdict = MET if _holds(goal, value) else NOT_MET
    out = {"bench": goal.bench, "title": goal.title, "goal": goal.text, "verdict": verdict,
           "labels": fig.labels if fig else {}, "figure": fig.to_dict() if fig else None,
           "anchor": anchor.to_dict() if anchor else None, "ratio": ratio}
    if why:
        out["why"] = why
    return out


def headlines(doc: dict) -> list[dict]:
    """Every goal's headline, in :data:`GOALS` order; a bench that did not
    run gives rows whose verdict is "not measured"."""
    benches = benches_of(doc)
    return [judge(g, benches.get(g.bench)) for g in GOALS]


def benches_of(doc: dict) -> dict:
    """``{name: result}`` of a suite's JSON, or of one bench's JSON."""
    if isinstance(doc.get("benches"), dict):
        return doc["benches"]
    return {doc["bench"]: doc} if "bench" in doc else {}


def _cells(h: dict) -> list[str]:
    fig = Figure.from_dict(h["figure"]) if h["figure"] else None
    anchor = Figure.from_dict(h["anchor"]) if h["anchor"] else None
    case = ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in h["labels"].items())
    return [f"{h['title']}" + (f" ({case})" if case else ""), fig.text() if fig else "-",
            anchor.text() if anchor else "-", f"{fmt(h['ratio'])}x" if h["ratio"] is not None else "-",
            h["goal"], h["verdict"]]


HEADERS = ["figure", "measured", "anchor", "ratio", "goal", "verdict"]


def headline_table(doc: dict) -> str:
    """The headlines as a plain text table (the end of a suite run)."""
    return table(HEADERS, [_cells(h) for h in doc.get("headlines") or headlines(doc)], align="l")


def markdown(doc: dict) -> str:
    """The README's performance table of a run: each figure is the median
    of its repeats [min–max], n the repeats."""
    m = doc.get("machine") or {}
    mem = m.get("memory_bytes")
    lines = [(f"Measured on {m.get('cores', '?')} cores, {mem / 2**30:.0f} GiB, Linux {m.get('kernel', '?')}, "
              f"Python {m.get('python', '?')}, numpy {m.get('numpy', '?')}." if mem else "Machine not recorded.")
             + " " + statement(benches_of(doc)), "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for h in doc.get("headlines") or headlines(doc):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(h)) + " |")
    return "\n".join(lines)


def report_goals(bench: str, result: dict) -> str:
    """A bench's goals judged on its result, one line each (its report's end)."""
    lines = ["Goals (perf/goals.py):"]
    for g in GOALS:
        if g.bench == bench:
            h = judge(g, result)
            ratio = f"{fmt(h['ratio'])}x, " if h["ratio"] is not None else ""
            fig = Figure.from_dict(h["figure"]).text() if h["figure"] else "-"
            lines.append(f"  [{h['verdict']}] {g.title}: {ratio}{fig} (goal {g.text})"
                         + (f"; {h['why']}" if h.get("why") else ""))
    lines += [f"  broken measurement: {why}" for why in sanity(result)]
    lines.append(f"Placement: {placement.summary(result.get('placements'))}")
    lines.append(f"Load: {load.summary(result.get('load'))}" if result.get("load") else
                 "Load: recorded by the runner (python -m hvshare.perf BENCH, or all)")
    return "\n".join(lines)
