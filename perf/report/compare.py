"""What changed between two benchmark runs: ``python -m hvshare.perf compare A.json B.json``.

A change to a hot path is judged by its numbers, and on these shared, noisy
machines that means the same benchmark run before and after, figure by
figure. Both files may be one bench's JSON (``python -m hvshare.perf rmap --json``)
or the suite's (``python -m hvshare.perf all --json``), in any mix: figures are
paired by bench, name and labels (:mod:`hvshare.perf.figure`), and only figures are
compared. A figure whose median moved by more than the threshold (10 % by
default) is flagged ``slower``/``faster`` by its unit (a time, a rate) or
``up``/``down``; ``overlap`` says the two runs' min–max ranges still
overlap, so the move may be noise.
"""
from __future__ import annotations

import argparse
import json
import sys

from ..common import table, write_json
from ..figure import Figure, fmt
from .headlines import benches_of

#: units where less is better, and where more is
LOWER_BETTER = {"ns", "us", "ms", "s", "B"}
HIGHER_BETTER_SUFFIX = "/s"


def _key(bench: str, f: Figure) -> str:
    labels = ",".join(f"{k}={v}" for k, v in f.labels.items())
    return f"{bench}: {f.name}" + (f" [{labels}]" if labels else "")


def _figures(doc: dict) -> dict[str, Figure]:
    return {_key(b, f): f for b, r in benches_of(doc).items() if isinstance(r, dict)
            for f in map(Figure.from_dict, r.get("figures", ()))}


def verdict(a: Figure | None, b: Figure | None, threshold: float) -> str:
    """How a figure moved: '' (within the threshold), 'slower', 'faster',
    'up', 'down', 'only in A', 'only in B'."""
    if a is None or b is None:
        return "only in B" if a is None else "only in A"
    if not a.median or abs(b.median / a.median - 1) <= threshold:
        return ""
    up = b.median > a.median
    if a.unit in LOWER_BETTER:
        return "slower" if up else "faster"
    if a.unit.endswith(HIGHER_BETTER_SUFFIX):
        return "faster" if up else "slower"
    return "up" if up else "down"


def compare(a: dict, b: dict, threshold: float = 0.10) -> dict:
    """The comparison as data: ``rows`` of ``{"figure", "unit", "a", "b",
    "ratio", "flag", "overlap"}`` (``a``/``b``: the figures as dicts) and
    ``notes`` (quick against full, other machines)."""
    fa, fb = _figures(a), _figures(b)
    notes = []
    if bool(a.get("quick")) != bool(b.get("quick")):
        notes.append(f"quick in A: {bool(a.get('quick'))}, in B: {bool(b.get('quick'))} (other sizes)")
    ma, mb = a.get("machine") or {}, b.get("machine") or {}
    diff = [k for k in ("cores", "kernel", "python", "numpy") if ma.get(k) != mb.get(k)]
    if ma and mb and diff:
        notes.append("machines differ: " + ", ".join(f"{k} {ma.get(k)} -> {mb.get(k)}" for k in diff))
    rows = []
    for key in list(fa) + [k for k in fb if k not in fa]:
        x, y = fa.get(key), fb.get(key)
        rows.append({"figure": key, "unit": (x or y).unit, "a": x.to_dict() if x else None,
                     "b": y.to_dict() if y else None,
                     "ratio": y.median / x.median if x and y and x.median else None,
                     "flag": verdict(x, y, threshold),
                     "overlap": bool(x and y and x.min <= y.max and y.min <= x.max)})
    return {"threshold": threshold, "rows": rows, "notes": notes}


def report(cmp: dict, changed_only: bool = False) -> str:
    rows, counts = [], {}
    for r in cmp["rows"]:
        if r["flag"]:
            counts[r["flag"]] = counts.get(r["flag"], 0) + 1
        if changed_only and not r["flag"]:
            continue
        a, b = (Figure.from_dict(d).text(unit=False) if d else "-" for d in (r["a"], r["b"]))
        flag = r["flag"] + (" (ranges overlap)" if r["flag"] and r["overlap"] else "")
        rows.append([r["figure"], r["unit"], a, b, f"{fmt(r['ratio'])}" if r["ratio"] is not None else "-", flag])
    lines = [f"note: {n}" for n in cmp["notes"]]
    if rows:
        lines.append(table(["figure", "unit", "A", "B", "B/A", f"beyond {cmp['threshold']:.0%}"], rows, "l"))
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    lines.append(f"{len(cmp['rows'])} figures compared, {sum(counts.values())} beyond {cmp['threshold']:.0%}"
                 + (f" ({summary})" if summary else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hvshare.perf compare",
        description="Show what changed between two benchmark runs (one bench's JSON or "
                    "'python -m hvshare.perf all' JSON): every figure's median side by side with B/A.")
    p.add_argument("a", metavar="A.json", help="the earlier run (the baseline)")
    p.add_argument("b", metavar="B.json", help="the later run")
    p.add_argument("--threshold", type=float, default=0.10, metavar="F",
                   help="flag figures whose B/A is off 1 by more than F (default 0.10 = 10%%)")
    p.add_argument("--changed", action="store_true", help="list only the flagged figures")
    p.add_argument("--json", metavar="PATH", help="also write the comparison as JSON")
    a = p.parse_args(argv)
    docs = []
    for path in (a.a, a.b):
        try:
            with open(path) as f:
                docs.append(json.load(f))
        except (OSError, ValueError) as e:
            print(f"python -m hvshare.perf compare: cannot read {path}: {e}", file=sys.stderr)
            return 2
    cmp = compare(docs[0], docs[1], a.threshold)
    if not cmp["rows"]:
        print("python -m hvshare.perf compare: no figures in these files (written by an older perf? "
              "convert them to the result contract first)", file=sys.stderr)
        return 2
    print(report(cmp, a.changed))
    if a.json:
        write_json(cmp, a.json)
    return 0
