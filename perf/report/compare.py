"""What changed between two benchmark runs: ``python -m perf compare A.json B.json``.

A change to a hot path is judged by its numbers, and on these shared, noisy
machines that means the same benchmark run before and after, field by field.
Both files may be one bench's JSON (``python -m perf rmap --json``) or the
suite's combined JSON (``python -m perf all --json``), in any mix: benches
are paired by name.

Each result is flattened to ``path -> number``. Lists of per-case dicts are
keyed by the case's identity (``policy=list,degree=4096``) rather than by
position, so a case added or dropped does not shift every row after it.
Lists of numbers (raw repeats, samples), the repeats' summaries
(``..._stats``) and latency histograms are left out: their medians are the
figures. A field moving by more than the threshold (10 % by default) is
flagged, and named ``slower``/``faster``/``larger``/``smaller`` where its
name says which way is better (times, rates, bytes); settings (sizes,
repeats) that differ are flagged ``setting`` because they make the other
rows incomparable.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from typing import Any

from ..common import fmt_value
from .headlines import benches_of, num

#: fields that name a case rather than measure it
ID_KEYS = ("bench", "policy", "rmap", "mode", "placement", "content", "workload", "case", "name",
           "size", "degree", "entries", "guests", "pages", "n_pages", "batch")
#: subtrees that are context, not figures
SKIP_KEYS = {"machine", "cpus", "foreign_pids", "error", "started", "headlines", "skipped",
             "seed", "pid", "pids"}
#: subtrees that hold the repeats behind a figure, not figures of their own
SKIP_SUFFIXES = ("_stats", "histogram")
#: numeric fields that are settings of the run: a difference is not a result
SETTING_KEYS = {"repeats", "k", "n", "pages", "n_pages", "batch", "size", "degree", "entries",
                "min_ops", "sample", "domains", "max_page_sharing", "expected_shared",
                "expected_sharing", "budget_seconds", "guests", "frames"}

_LOWER_BETTER = re.compile(r"(_ns|_us|_ms|_s|seconds|_sec|latency|pause)$|^seconds|^time")
_HIGHER_BETTER = re.compile(r"per_second|_per_s$|rate$|_rate_|throughput")
_BYTES = re.compile(r"bytes")


def _ident(d: dict) -> str:
    parts = [f"{k}={d[k]}" for k in ID_KEYS
             if k in d and isinstance(d[k], (str, int, float)) and not isinstance(d[k], bool)]
    return ",".join(parts)


def flatten(obj: Any, prefix: str = "") -> dict[str, float]:
    """``{dotted path: number}`` of every numeric leaf worth comparing."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in SKIP_KEYS or str(k).endswith(SKIP_SUFFIXES):
                continue
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list):
        if not any(isinstance(x, dict) for x in obj):
            return out           # raw repeats or samples: the medians are elsewhere
        seen: dict[str, int] = {}
        for i, x in enumerate(obj):
            if not isinstance(x, dict):
                continue
            ident = _ident(x) or str(i)
            if ident in seen:     # two cases with the same identity: tell them apart by order
                seen[ident] += 1
                ident = f"{ident}#{seen[ident]}"
            else:
                seen[ident] = 0
            ids = {k for k in ID_KEYS if k in x}
            out.update(flatten({k: v for k, v in x.items() if k not in ids}, f"{prefix}[{ident}]"))
    else:
        v = num(obj)
        if v is not None:
            out[prefix] = v
        elif isinstance(obj, float) and math.isnan(obj):
            out[prefix] = math.nan
    return out


def _leaf(path: str) -> str:
    return re.split(r"[.\]]", path)[-1]


def verdict(path: str, a: float | None, b: float | None, threshold: float) -> str:
    """How a field moved: '' (within the threshold), 'slower', 'faster',
    'larger', 'smaller', 'up', 'down', 'setting', 'only in A', 'only in B'."""
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return "only in B" if b is not None else ""
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "only in A"
    if a == b:
        return ""
    q = b / a if a else math.inf
    if abs(q - 1) <= threshold and a:
        return ""
    leaf = _leaf(path)
    if leaf in SETTING_KEYS or path.startswith("config.") or ".config." in path:
        return "setting"
    up = q > 1
    if _BYTES.search(leaf):
        return "larger" if up else "smaller"
    if _HIGHER_BETTER.search(leaf):
        return "faster" if up else "slower"
    if _LOWER_BETTER.search(leaf):
        return "slower" if up else "faster"
    return "up" if up else "down"


def compare(a: dict, b: dict, threshold: float = 0.10) -> dict:
    """The comparison as data: per bench the rows ``{"path", "a", "b",
    "ratio", "flag"}`` and notes (settings or machines that differ)."""
    ba, bb = benches_of(a), benches_of(b)
    out: dict = {"threshold": threshold, "benches": {}, "notes": []}
    ma, mb = _machine(a, ba), _machine(b, bb)
    diff = {k: (ma.get(k), mb.get(k)) for k in sorted(set(ma) | set(mb)) if ma.get(k) != mb.get(k)}
    if ma and mb and diff:
        out["notes"].append("machines differ: " + ", ".join(f"{k} {x} -> {y}" for k, (x, y) in diff.items()))
    names = [n for n in ba if n in bb] + [n for n in ba if n not in bb] + [n for n in bb if n not in ba]
    for name in names:
        ra, rb = ba.get(name), bb.get(name)
        entry: dict = {"rows": [], "notes": []}
        if not isinstance(ra, dict) or not isinstance(rb, dict):
            side, r = ("A", ra) if isinstance(ra, dict) else ("B", rb)
            entry["notes"].append(f"only in {side}" + (f" (and skipped there: {r['skipped']})"
                                                        if "skipped" in r else ""))
            out["benches"][name] = entry
            continue
        for side, r in (("A", ra), ("B", rb)):
            if "skipped" in r and "results" not in r:
                entry["notes"].append(f"skipped in {side}: {r['skipped']}")
        if bool(ra.get("quick")) != bool(rb.get("quick")):
            entry["notes"].append(f"quick in A: {bool(ra.get('quick'))}, in B: {bool(rb.get('quick'))} "
                                  "(different sizes: compare like with like)")
        fa, fb = flatten(ra), flatten(rb)
        for path in list(fa) + [p for p in fb if p not in fa]:
            x, y = fa.get(path), fb.get(path)
            q = (y / x) if (x not in (None, 0) and y is not None
                            and not math.isnan(x) and not math.isnan(y)) else None
            entry["rows"].append({"path": path, "a": x, "b": y, "ratio": q,
                                  "flag": verdict(path, x, y, threshold)})
        out["benches"][name] = entry
    return out


def _machine(doc: dict, benches: dict) -> dict:
    m = doc.get("machine")
    if not isinstance(m, dict):
        m = next((r.get("machine") for r in benches.values() if isinstance(r, dict)
                  and isinstance(r.get("machine"), dict)), {})
    return {k: v for k, v in m.items() if k != "memory_bytes"} | (
        {"memory_gib": round(m["memory_bytes"] / 2**30)} if num(m.get("memory_bytes")) else {})


def report(cmp: dict, changed_only: bool = False) -> str:
    lines = [f"note: {n}" for n in cmp["notes"]]
    flagged = total = 0
    counts: dict[str, int] = {}
    for name, entry in cmp["benches"].items():
        lines.append(f"\n== {name} ==")
        lines += [f"note: {n}" for n in entry["notes"]]
        rows = []
        for r in entry["rows"]:
            total += 1
            if r["flag"]:
                flagged += 1
                counts[r["flag"]] = counts.get(r["flag"], 0) + 1
            if changed_only and not r["flag"]:
                continue
            rows.append([r["path"], _cell(r["a"]), _cell(r["b"]),
                         f"{r['ratio']:.3f}" if r["ratio"] is not None else "-",
                         ("<< " + r["flag"]) if r["flag"] else ""])
        if rows:
            lines.append(_table(["field", "A", "B", "B/A", f"beyond {cmp['threshold']:.0%}"], rows))
        elif entry["rows"]:
            lines.append(f"no field moved beyond {cmp['threshold']:.0%}")
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    lines.append(f"\n{total} fields compared, {flagged} beyond {cmp['threshold']:.0%}"
                 + (f" ({summary})" if summary else ""))
    return "\n".join(lines).lstrip("\n")


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """Field names left, numbers right: long dotted paths read from the left."""
    cells = [headers] + rows
    w = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = [str.ljust] + [str.rjust] * (len(headers) - 2) + [str.ljust]
    out = ["  ".join(f(c, n) for f, c, n in zip(fmt, r, w)).rstrip() for r in cells]
    out.insert(1, "  ".join("-" * n for n in w))
    return "\n".join(out)


def _cell(v: float | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return fmt_value(float(v)) if not float(v).is_integer() or abs(v) >= 1e15 else f"{int(v):,}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m perf compare",
        description="Show what changed between two benchmark runs (one bench's JSON or "
                    "'python -m perf all' JSON): every numeric field side by side with B/A.")
    p.add_argument("a", metavar="A.json", help="the earlier run (the baseline)")
    p.add_argument("b", metavar="B.json", help="the later run")
    p.add_argument("--threshold", type=float, default=0.10, metavar="F",
                   help="flag fields whose B/A is off 1 by more than F (default 0.10 = 10%%)")
    p.add_argument("--changed", action="store_true", help="list only the flagged fields")
    p.add_argument("--json", metavar="PATH", help="also write the comparison as JSON")
    a = p.parse_args(argv)
    docs = []
    for path in (a.a, a.b):
        try:
            with open(path) as f:
                docs.append(json.load(f))
        except (OSError, ValueError) as e:
            print(f"python -m perf compare: cannot read {path}: {e}", file=sys.stderr)
            return 2
    cmp = compare(docs[0], docs[1], a.threshold)
    if not cmp["benches"]:
        print("python -m perf compare: no bench results in these files", file=sys.stderr)
        return 2
    print(report(cmp, a.changed))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(cmp, f, indent=2)
    return 0
