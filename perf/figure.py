"""The one result type of the benchmarks: a :class:`Figure`.

A figure is every repeat's value of one measured quantity, in one unit,
named by what it measures (``name``) and the case it was measured in
(``labels``: policy, placement, N...). Its median is the figure a table
shows, its min and max the spread, ``n`` the repeats. Every bench reports
every figure it measures this way, in its result's ``figures`` list
(docs/schema/perf/result.schema.json); headlines, plots and ``compare``
read nothing else of a bench's figures. A whole latency distribution is a
histogram (:func:`hvshare.perf.common.log_histogram`) in ``histograms``, a
sequence of events (a teardown's steps) a trace in ``traces``; both carry
``name`` and ``labels`` the same way. The conditions a figure was measured
in are beside them: ``placements`` (:mod:`hvshare.perf.placement`: where
every thread of the bench's processes ran, labelled by case) and ``load``
(:mod:`hvshare.perf.load`, recorded by the runner).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable


@dataclass(frozen=True)
class Figure:
    """Every repeat's value of one quantity (NaN and None dropped)."""

    name: str
    unit: str
    values: tuple[float, ...]
    labels: dict = field(default_factory=dict)
    #: (median, min, max, n) of a figure whose values were not kept: a run
    #: of an older version, converted (its ``values`` are null in the JSON)
    summary: tuple | None = None

    @classmethod
    def of(cls, name: str, values: Iterable, unit: str, **labels) -> "Figure":
        vals = tuple(float(v) for v in values if v is not None and v == v)
        return cls(name, unit, vals, labels)

    @classmethod
    def from_dict(cls, d: dict) -> "Figure":
        labels = dict(d.get("labels") or {})
        if d.get("values") is None:
            return cls(d["name"], d["unit"], (), labels, (d["median"], d["min"], d["max"], d["n"]))
        return cls(d["name"], d["unit"], tuple(d["values"]), labels)

    @property
    def n(self) -> int:
        return self.summary[3] if self.summary else len(self.values)

    @property
    def median(self) -> float | None:
        if self.summary:
            return self.summary[0]
        return statistics.median(self.values) if self.values else None

    @property
    def min(self) -> float | None:
        if self.summary:
            return self.summary[1]
        return min(self.values) if self.values else None

    @property
    def max(self) -> float | None:
        if self.summary:
            return self.summary[2]
        return max(self.values) if self.values else None

    def to_dict(self) -> dict:
        return {"name": self.name, "labels": self.labels, "unit": self.unit, "median": self.median,
                "min": self.min, "max": self.max, "n": self.n,
                "values": None if self.summary else list(self.values)}

    def text(self, unit: bool = True) -> str:
        """``1.62 ms [1.50–1.81], n=5`` (``n=1`` alone for one value): the
        table and the plots print a figure this way, so they cannot disagree."""
        if not self.n:
            return "-"
        head = fmt(self.median) + (f" {self.unit}" if unit and self.unit else "")
        if self.n == 1:
            return f"{head}, n=1"
        return f"{head} [{fmt(self.min)}–{fmt(self.max)}], n={self.n}"


def fmt(v: float | None, digits: int = 3) -> str:
    """Three significant digits, thousands separated from 1,000 up."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "?"
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


class Figures(list):
    """The figures of one result as they are measured: ``add`` one."""

    def add(self, name: str, values: Iterable, unit: str, **labels) -> Figure:
        f = Figure.of(name, values, unit, **labels)
        if f.n:
            self.append(f)
        return f

    def dicts(self) -> list[dict]:
        return [f.to_dict() for f in self]


#: a label value meaning "the largest value of this label among the matches"
LARGEST = "<largest>"


def _matches(labels: dict, want: dict) -> bool:
    for k, v in want.items():
        if v == LARGEST:
            if k not in labels:
                return False
            continue
        if labels.get(k) not in (v if isinstance(v, tuple) else (v,)):
            return False
    return True


def select(result: Any, name: str, **labels) -> list[Figure]:
    """The figures ``name`` of a bench result whose labels match ``labels``
    (a value, a tuple of accepted values, or :data:`LARGEST`)."""
    figs = [Figure.from_dict(d) for d in (result or {}).get("figures", ()) if d["name"] == name
            and _matches(d.get("labels") or {}, labels)]
    for k, v in labels.items():
        if v == LARGEST and figs:
            top = max(f.labels[k] for f in figs)
            figs = [f for f in figs if f.labels[k] == top]
    return figs


def find(result: Any, name: str, **labels) -> Figure | None:
    """The one figure :func:`select` finds; of several, the one of largest
    median (the worst of a time); None when there is none."""
    figs = select(result, name, **labels)
    return max(figs, key=lambda f: f.median) if figs else None


def series(result: Any, kind: str, name: str, **labels) -> list[dict]:
    """The histograms (``kind="histograms"``) or traces (``"traces"``) named
    ``name`` whose labels match ``labels``."""
    return [d for d in (result or {}).get(kind, ()) if d["name"] == name
            and _matches(d.get("labels") or {}, labels)]


def text_of(result: Any, name: str, **labels) -> str:
    """:meth:`Figure.text` of the figure :func:`find` finds, or ``-``."""
    f = find(result, name, **labels)
    return f.text() if f else "-"
