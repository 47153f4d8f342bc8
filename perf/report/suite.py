"""The whole benchmark suite in one run: ``python -m perf all``.

Runs every benchmark of :data:`SUITE` in this process, one after the other,
and gathers their results in one JSON document::

    {"machine": {...}, "quick": bool, "started": "...", "wall_seconds": s,
     "budget_seconds": s, "over_budget": bool, "skipped": {name: reason},
     "benches": {name: result}, "headlines": [headline, ...]}

A benchmark that is missing or raises is skipped with a one-line reason
(kept in its result as ``skipped``, with the traceback under ``error``) so
that one broken benchmark cannot cost the numbers of the others.

The headlines are the few figures the README's "Performance" table shows.
They are read defensively from each benchmark's JSON: benchmarks evolve on
their own, and a key that is not (or no longer) there gives a headline whose
value and ``met`` are None rather than a crash. The goals mirror those the
benchmarks check themselves (perf.rmap's, perf.teardown's at N = 100,000);
where a bench states none, the goal here is this suite's. A bench may also
carry ``"goals": {ratio_key: {"goal": text, "met": bool}}``, which then
wins over the goal written here.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import json
import math
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterable

from .common import machine_info

#: benchmarks of ``python -m perf all``, in running order (ksm and pipe are
#: measured inside cow, teardown and dedup, side by side with hvshare)
SUITE = ("rmap", "cow", "teardown", "dedup", "density")
#: wall-time budgets of the suite on a 2-core machine
BUDGET_SECONDS = {True: 180.0, False: 1800.0}


# ---------------------------------------------------------------------------
# running

def stamp(result: dict, name: str, quick: bool, seconds: float) -> dict:
    """What every result records besides its numbers: which bench, the
    settings, the repeats and the machine it ran on."""
    result.setdefault("bench", name)
    result.setdefault("quick", quick)
    result.setdefault("repeats", _repeats(result))
    result["machine"] = machine_info()
    result["wall_seconds"] = round(seconds, 3)
    return result


def _repeats(result: dict) -> Any:
    for path in (("repeats",), ("config", "repeats"), ("settings", "repeats")):
        v = dig(result, *path)
        if v is not None:
            return v
    return None


def load_bench(name: str):
    """The module ``perf.<name>``, or a one-line reason why there is none."""
    try:
        mod = importlib.import_module(f"perf.{name}")
    except ModuleNotFoundError as e:
        if e.name in (f"perf.{name}", "perf"):
            return f"no benchmark perf/{name}.py"
        return f"perf/{name}.py does not import: {e}"
    except Exception as e:  # a syntax error or a failing import-time statement
        return f"perf/{name}.py does not import: {type(e).__name__}: {e}"
    if not callable(getattr(mod, "run", None)):
        return f"perf/{name}.py has no run(quick)"
    return mod


class Progress:
    """One line per benchmark with its elapsed time; on a terminal also a
    live line (bar of benchmarks done, spinner, seconds) redrawn while a
    benchmark runs, so a long bench does not look hung."""

    SPIN = "|/-\\"

    def __init__(self, total: int, stream=None, live: bool | None = None):
        self.total = total
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.t_suite = time.monotonic()

    def start(self, i: int, name: str) -> None:
        self.i, self.name, self.t0 = i, name, time.monotonic()
        if self.live:
            self._stop.clear()
            self._thread = threading.Thread(target=self._redraw, daemon=True)
            self._thread.start()

    def _line(self, tick: int) -> str:
        width = 20
        done = round(width * (self.i - 1) / max(self.total, 1))
        bar = "#" * done + self.SPIN[tick % 4] + "." * (width - done - 1)
        return (f"[{self.i}/{self.total}] {self.name:<10} {time.monotonic() - self.t0:7.1f} s  "
                f"[{bar}]  suite {time.monotonic() - self.t_suite:6.1f} s")

    def _redraw(self) -> None:
        tick = 0
        while not self._stop.wait(0.25):
            self.stream.write("\r" + self._line(tick) + "\x1b[K")
            self.stream.flush()
            tick += 1

    def done(self, status: str) -> float:
        seconds = time.monotonic() - self.t0
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.stream.write("\r\x1b[K")
        self.stream.write(f"[{self.i}/{self.total}] {self.name:<10} {seconds:7.1f} s  {status}\n")
        self.stream.flush()
        return seconds


def run_suite(names: Iterable[str] = SUITE, quick: bool = False, *,
              progress: Progress | None = None,
              echo: Callable[[str], None] | None = print) -> dict:
    """Run each benchmark; a missing or failing one is recorded as skipped.

    ``echo`` receives each benchmark's report (None: no reports). A Ctrl-C
    stops the suite after recording what was done (``interrupted``)."""
    names = list(names)
    progress = progress or Progress(len(names))
    t_suite = time.perf_counter()
    out: dict = {"machine": machine_info(), "quick": quick,
                 "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                 "benches": {}, "skipped": {}}
    for i, name in enumerate(names, 1):
        progress.start(i, name)
        t0 = time.perf_counter()
        mod = load_bench(name)
        text = ""
        if isinstance(mod, str):
            result = {"skipped": mod}
        else:
            captured = io.StringIO()
            try:
                # On a terminal the bench's own prints would break the live line.
                with (contextlib.redirect_stdout(captured) if progress.live else contextlib.nullcontext()):
                    result = mod.run(quick=quick)
                if not isinstance(result, dict):
                    raise TypeError(f"run() returned {type(result).__name__}, not a dict")
            except KeyboardInterrupt:
                result = {"skipped": "interrupted (Ctrl-C)"}
                out["interrupted"] = True
            except Exception as e:
                result = {"skipped": f"raised {type(e).__name__}: {_one_line(e)}",
                          "error": traceback.format_exc()}
            text = captured.getvalue()
        stamp(result, name, quick, time.perf_counter() - t0)
        if "skipped" in result and "results" not in result:
            out["skipped"][name] = result["skipped"]
            status = f"SKIPPED: {result['skipped']}"
        elif "skipped" in result:
            status = f"ok (part skipped: {result['skipped']})"
        else:
            status = "ok"
        progress.done(status)
        out["benches"][name] = result
        if echo is not None:
            if text.strip():
                echo(text.rstrip())
            if "results" in result and hasattr(mod, "report"):
                try:
                    echo(mod.report(result) + "\n")
                except Exception as e:
                    echo(f"({name}: report() raised {type(e).__name__}: {_one_line(e)})\n")
        if out.get("interrupted"):
            break
    out["wall_seconds"] = round(time.perf_counter() - t_suite, 3)
    out["budget_seconds"] = BUDGET_SECONDS[bool(quick)]
    out["over_budget"] = out["wall_seconds"] > out["budget_seconds"]
    out["headlines"] = headlines(out)
    return out


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else repr(e)


# ---------------------------------------------------------------------------
# reading results defensively

def dig(d: Any, *path: Any) -> Any:
    """``d[p0][p1]...``, or None where any step is missing or of the wrong kind."""
    for p in path:
        if isinstance(d, dict):
            d = d.get(p)
        elif isinstance(d, list) and isinstance(p, int) and -len(d) <= p < len(d):
            d = d[p]
        else:
            return None
        if d is None:
            return None
    return d


def num(x: Any) -> float | None:
    """A finite number as float, else None (bools, strings, NaN are not figures)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        try:
            import numpy as np
            if isinstance(x, np.generic) and np.issubdtype(type(x), np.number):
                x = x.item()
            else:
                return None
        except ImportError:  # pragma: no cover - numpy is a dependency
            return None
    x = float(x)
    return x if math.isfinite(x) else None


def cases(result: Any) -> list[dict]:
    """The per-case dicts of a result: ``results`` as a list, or the dict
    values of ``results`` when it is keyed by case name."""
    r = dig(result, "results")
    if isinstance(r, list):
        return [c for c in r if isinstance(c, dict)]
    if isinstance(r, dict):
        return [c for c in r.values() if isinstance(c, dict)]
    return []


def pick(rows: list[dict], size_key: str = "entries", **match) -> dict | None:
    """Of the rows matching ``match`` (a value or a tuple of accepted
    values), the one with the largest ``size_key``."""
    def ok(row):
        for k, v in match.items():
            want = v if isinstance(v, tuple) else (v,)
            if row.get(k) not in want:
                return False
        return True
    found = [r for r in rows if ok(r)]
    if not found:
        return None
    return max(found, key=lambda r: num(r.get(size_key)) or 0)


def _ratio_key(result: Any, prefix: str) -> str | None:
    """The ratio named ``prefix`` + something (e.g. the degree it was taken at)."""
    ratios = dig(result, "ratios")
    if not isinstance(ratios, dict):
        return None
    keys = sorted((k for k in ratios if k.startswith(prefix)),
                  key=lambda k: (len(k), k))
    return keys[-1] if keys else None


def find_dicts(obj: Any, *keys: str) -> list[dict]:
    """Every dict anywhere in ``obj`` that has all of ``keys`` (depth first)."""
    out = []
    if isinstance(obj, dict):
        if all(k in obj for k in keys):
            out.append(obj)
        for v in obj.values():
            out += find_dicts(v, *keys)
    elif isinstance(obj, list):
        for v in obj:
            out += find_dicts(v, *keys)
    return out


# ---------------------------------------------------------------------------
# headlines

SEED_LIST_SECONDS = 7 * 60      # the seed: over 7 minutes with the list...
SEED_BUCKETS_SECONDS = 2.0      # ...under 2 seconds with the hash table


def _h(figure: str, unit: str, command: str, goal: str, *, value=None, anchor=None,
       anchor_value=None, ratio=None, ratio_of: str | None = None,
       met: Callable[[float | None, float | None], bool | None] | None = None,
       bench: str = "", ratio_key: str | None = None, result: Any = None) -> dict:
    value, anchor_value, ratio = num(value), num(anchor_value), num(ratio)
    if isinstance(anchor, tuple):          # (label, unit): "label: value unit" once measured
        label, aunit = anchor
        anchor = (f"{label}: {_fmt(anchor_value)} {aunit}".rstrip() if anchor_value is not None
                  else f"{label}: not measured")
    try:
        ok = met(value, ratio) if met else None
    except TypeError:          # a None in the comparison
        ok = None
    # A goal the bench itself states wins over ours.
    own = dig(result, "goals", ratio_key) if ratio_key else None
    if isinstance(own, dict):
        goal = own.get("goal", goal)
        ok = own.get("met", ok)
    return {"figure": figure, "value": value, "unit": unit, "anchor": anchor,
            "anchor_value": anchor_value, "ratio": ratio, "ratio_of": ratio_of,
            "goal": goal, "met": None if ok is None else bool(ok),
            "command": command, "bench": bench}


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "?"
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def _n(x: Any) -> str:
    v = num(x)
    return f"{int(v):,}" if v else "N"


def _rmap_headlines(r: Any) -> list[dict]:
    cmd = "python -m perf rmap"
    rows = cases(r)
    top = max((num(c.get("degree")) or 0 for c in rows), default=None) or None
    top_s = f"{int(top):,}" if top else "D"

    def at(policy, degree, field):
        return dig(pick(rows, "degree", policy=policy, degree=degree), field)

    lob_key = _ratio_key(r, "list_over_buckets_delete_at_")
    list_ns, buck_ns = at("list", top, "delete_ns"), at("buckets", top, "delete_ns")
    idx_top, idx_lo = at("index", top, "delete_ns"), at("index", 16, "delete_ns")
    idx_b, buck_b = at("index", top, "bytes_per_entry"), at("buckets", top, "bytes_per_entry")
    bpe_key = _ratio_key(r, "index_bytes_per_entry_at_")
    return [
        _h(f"rmap delete at degree {top_s}: buckets vs list", "ns", cmd,
           ">= 200x (seed: ~256x in theory, 7 min -> 2 s = 210x measured)", value=buck_ns,
           anchor=("list", "ns"), anchor_value=list_ns,
           ratio=dig(r, "ratios", lob_key) if lob_key else None, ratio_of="list/buckets",
           met=lambda v, q: q >= 200, bench="rmap", ratio_key=lob_key, result=r),
        _h(f"rmap index delete at degree {top_s} vs 16 (flat)", "ns", cmd,
           "<= 2x, O(1)", value=idx_top, anchor=("index at degree 16", "ns"),
           anchor_value=idx_lo, ratio=dig(r, "ratios", "index_delete_flatness"),
           ratio_of=f"{top_s}/16", met=lambda v, q: q <= 2, bench="rmap",
           ratio_key="index_delete_flatness", result=r),
        _h(f"rmap index memory at degree {top_s}", "B/entry", cmd, "<= 32 B/entry",
           value=idx_b if idx_b is not None else dig(r, "ratios", bpe_key) if bpe_key else None,
           anchor=("buckets", "B/entry"), anchor_value=buck_b,
           ratio=(num(idx_b) / num(buck_b)) if num(idx_b) and num(buck_b) else None,
           ratio_of="index/buckets", met=lambda v, q: v <= 32, bench="rmap",
           ratio_key=bpe_key, result=r),
    ]


SEED_N = 100_000                # the seed's case: 100,000 gfns on one shared frame


def _teardown_headlines(r: Any) -> list[dict]:
    """perf.teardown: ``results`` rows (rmap, mode, n/entries, seconds,
    max_pause_ms, fault_p99_us, idle_fault_p99_us), ``munmap`` (Linux KSM
    peers by N) and ``ratios``. Its goals are for N = 100,000 (the seed's
    case); at other N (``--quick``) the figures are shown, not judged."""
    cmd = "python -m perf teardown"
    # one size key, whichever the bench wrote (copies: the result is not ours to change)
    rows = [dict(c, entries=c.get("entries", c.get("n"))) for c in cases(r)]
    pre = ("preemptible", "preempt", None)

    def at(rmap, n=None, mode=pre):
        match = dict(rmap=rmap, mode=mode)
        if n is not None:
            match["entries"] = n
        return pick(rows, **match)

    def judged(n, test):
        # the goal is stated for the seed's N; a smaller run is shown, not judged
        return lambda v, q: test(v, q) if num(n) == SEED_N else None

    buck = at("buckets", SEED_N) or at("buckets")
    n_b = dig(buck, "entries")
    n_lb = dig(r, "ratios", "list_over_buckets_n") or n_b
    lst, buck_lb = at("list", n_lb), at("buckets", n_lb)
    # index against munmap at the seed's N when both are there, else at the bench's N
    mun = dig(r, "munmap")
    mun = mun if isinstance(mun, dict) else {}
    idx, n_ik, peer = at("index", SEED_N), SEED_N, mun.get(str(SEED_N))
    if not (idx and num(dig(peer, "seconds"))):
        n_ik = dig(r, "ratios", "index_over_ksm_n")
        idx, peer = at("index", n_ik), mun.get(str(n_ik)) if n_ik is not None else None
        if not peer:
            k = _ksm_munmap(r)
            peer, n_ik = ({"seconds": k["seconds"], "n_pages": k["n_pages"]}, k["n_pages"]) if k else (None, n_ik)
    idx_s, mun_s = num(dig(idx, "seconds")), num(dig(peer, "seconds"))
    # freeze: the longest step of any preemptible teardown, the monolithic one beside it
    # (``list`` is judged apart, as perf.teardown does: one removal from a
    # long list takes milliseconds, which no chunking can split)
    pres = [c for c in rows if c.get("mode") in ("preemptible", "preempt") and c.get("rmap") != "list"
            and num(c.get("max_pause_ms")) is not None]
    worst = max(pres, key=lambda c: num(c["max_pause_ms"])) if pres else None
    mono = at("buckets", dig(worst, "entries"), "monolithic") or at("buckets", mode="monolithic")
    # faults: the preemptible case whose writer suffered most against idle
    fr = [c for c in pres if num(c.get("fault_p99_us")) and num(c.get("idle_fault_p99_us"))]
    fworst = max(fr, key=lambda c: num(c["fault_p99_us"]) / num(c["idle_fault_p99_us"])) if fr else None
    return [
        _h(f"teardown of {_n(n_b)} shared entries on one frame, buckets", "s", cmd,
           f"< 2 s at N={SEED_N:,}, as the seed", value=dig(buck, "seconds"),
           anchor="seed (Xen, 2012): under 2 s", anchor_value=SEED_BUCKETS_SECONDS,
           ratio=(num(dig(buck, "seconds")) / SEED_BUCKETS_SECONDS) if num(dig(buck, "seconds")) else None,
           ratio_of="hvshare/seed", met=judged(n_b, lambda v, q: v < SEED_BUCKETS_SECONDS),
           bench="teardown", result=r),
        _h(f"teardown of {_n(n_lb)} shared entries: list vs buckets", "s", cmd,
           f">= 200x at N={SEED_N:,} (seed: 7 min -> 2 s)", value=dig(lst, "seconds"),
           anchor=("buckets", "s"), anchor_value=dig(buck_lb, "seconds"),
           ratio=dig(r, "ratios", "list_over_buckets"), ratio_of="list/buckets",
           met=judged(n_lb, lambda v, q: q >= 200), bench="teardown", ratio_key="list_over_buckets", result=r),
        _h(f"teardown of {_n(n_ik)} shared entries, index vs Linux munmap (one KSM page)", "s", cmd,
           f"<= 3x at N={SEED_N:,}", value=idx_s, anchor=("Linux munmap", "s"), anchor_value=mun_s,
           ratio=(idx_s / mun_s) if idx_s and mun_s else dig(r, "ratios", "index_over_ksm"),
           ratio_of="index/munmap", met=judged(n_ik, lambda v, q: q <= 3), bench="teardown",
           ratio_key="index_over_ksm", result=r),
        _h("longest hypervisor step, preemptible teardown"
           + (f" ({worst.get('rmap')}, N={_n(worst.get('entries'))})" if worst else ""), "ms", cmd,
           "<= 1 ms at every N", value=dig(worst, "max_pause_ms"),
           anchor=("monolithic, buckets" + (f" N={_n(mono.get('entries'))}" if mono else ""), "ms"),
           anchor_value=dig(mono, "max_pause_ms"),
           ratio=(num(dig(mono, "max_pause_ms")) / num(worst["max_pause_ms"]))
           if num(dig(mono, "max_pause_ms")) and worst and num(worst["max_pause_ms"]) else None,
           ratio_of="monolithic/preemptible", met=lambda v, q: v <= 1.0, bench="teardown",
           ratio_key="max_pause_ms", result=r),
        _h("guest CoW fault p99 during a preemptible teardown"
           + (f" ({fworst.get('rmap')}, N={_n(fworst.get('entries'))})" if fworst else ""), "us", cmd,
           "<= 2x idle at every N", value=dig(fworst, "fault_p99_us"), anchor=("idle hypervisor", "us"),
           anchor_value=dig(fworst, "idle_fault_p99_us"),
           ratio=(num(fworst["fault_p99_us"]) / num(fworst["idle_fault_p99_us"])) if fworst else None,
           ratio_of="teardown/idle", met=lambda v, q: q <= 2, bench="teardown",
           ratio_key="fault_p99_us", result=r),
    ]


def _ksm_munmap(r: Any) -> dict:
    """Linux KSM's munmap measure inside a teardown result (the shape of
    ``perf.ksm.measure_munmap``), the largest one, or {}."""
    found = [d for d in find_dicts(r, "n_pages", "seconds", "baseline_seconds") if "skipped" not in d]
    if not found:
        return {}
    best = max(found, key=lambda d: num(d.get("n_pages")) or 0)
    return {"n_pages": best.get("n_pages"), "seconds": best.get("seconds")}


def _cow_headlines(r: Any) -> list[dict]:
    cmd = "python -m perf cow"
    res = dig(r, "results") or {}
    same = dig(res, "hvshare", "faults", "same") or {}
    ksm_p50 = num(dig(res, "ksm_cow", "p50_ns"))
    ksm_us = ksm_p50 / 1e3 if ksm_p50 is not None else None
    out = [
        _h("CoW fault p50 (same core) vs Linux KSM CoW break", "us", cmd, "<= 3x",
           value=same.get("p50_us"), anchor=("KSM CoW break p50", "us"), anchor_value=ksm_us,
           ratio=dig(r, "ratios", "cow_p50_over_ksm"), ratio_of="hvshare/KSM",
           met=lambda v, q: q <= 3, bench="cow", ratio_key="cow_p50_over_ksm", result=r),
    ]
    for p, where in (("same", "same core"), ("cross", "other core")):
        f = dig(res, "hvshare", "faults", p) or {}
        q = dig(res, "pipe", p) or {}
        key = f"cow_p50_over_pipe_{p}"
        out.append(_h(f"CoW fault p50 ({where}) vs raw pipe round trip", "us", cmd, "<= 2x",
                      value=f.get("p50_us"), anchor=("raw pipe round trip p50", "us"),
                      anchor_value=q.get("p50_us"), ratio=dig(r, "ratios", key), ratio_of="fault/pipe",
                      met=lambda v, q: q <= 2, bench="cow", ratio_key=key, result=r))
    b = dig(res, "hvshare", "batched", "pages_per_second")
    kb = dig(res, "ksm_batched", "pages_per_second")
    out.append(_h("batched unshare (CoW) rate vs Linux KSM batched CoW break", "pages/s", cmd, ">= 1x",
                  value=b, anchor=("KSM, one write over all pages", "pages/s"), anchor_value=kb,
                  ratio=dig(r, "ratios", "batched_over_ksm"), ratio_of="hvshare/KSM",
                  met=lambda v, q: q >= 1, bench="cow", ratio_key="batched_over_ksm", result=r))
    return out


def _dedup_headlines(r: Any) -> list[dict]:
    cmd = "python -m perf dedup"
    out = []
    for content, key in (("identical", "merge_rate_over_ksm"), ("clone", "merge_rate_over_ksm_clone")):
        hv, ksm = merge_rates(r, content)[:2]
        out.append(_h(f"dedup merge rate vs Linux KSM ({content} pages)", "pages/s", cmd, ">= 1x",
                      value=hv, anchor=("Linux KSM ksmd, same pages", "pages/s"), anchor_value=ksm,
                      ratio=dig(r, "ratios", key), ratio_of="hvshare/KSM",
                      met=lambda v, q: q >= 1, bench="dedup", ratio_key=key, result=r))
    return out


def merge_rates(r: Any, content: str) -> tuple[float | None, float | None, float | None]:
    """(hvshare, Linux KSM, hvshare with the index rmap) merge rates in
    pages/s for one content: perf.dedup's ``results[content]`` with
    ``hvshare``/``ksm``/``hvshare_index`` dicts carrying ``pages_per_second``."""
    case = dig(r, "results", content)
    return (num(dig(case, "hvshare", "pages_per_second")), num(dig(case, "ksm", "pages_per_second")),
            num(dig(case, "hvshare_index", "pages_per_second")))


def _density_headlines(r: Any) -> list[dict]:
    """perf.density: clone guests that fit in one pool with dedup after
    each boot against without; the content predicts how many must fit."""
    cmd = "python -m perf density"
    w, wo = dig(r, "results", "with"), dig(r, "results", "without")
    pred = num(dig(w, "predicted"))
    return [_h("guest density: clone guests in one pool, dedup after each boot vs none", "guests", cmd,
               f"as many as the content predicts ({_n(pred) if pred else '?'})",
               value=dig(w, "guests"), anchor=("without dedup", "guests"), anchor_value=dig(wo, "guests"),
               ratio=dig(r, "ratios", "density"), ratio_of="with/without",
               met=lambda v, q: v >= pred, bench="density", ratio_key="density", result=r)]


HEADLINES: dict[str, Callable[[Any], list[dict]]] = {
    "rmap": _rmap_headlines,
    "teardown": _teardown_headlines,
    "cow": _cow_headlines,
    "dedup": _dedup_headlines,
    "density": _density_headlines,
}


def benches_of(doc: dict) -> dict:
    """``{name: result}`` of a combined JSON, or of a single bench's JSON."""
    if isinstance(doc.get("benches"), dict):
        return doc["benches"]
    if "bench" in doc:
        return {doc["bench"]: doc}
    return {}


def headlines(doc: dict) -> list[dict]:
    """The headline figures of a combined (or single-bench) result. Every
    figure is listed even where its bench did not run (value None), so the
    table always has the same rows."""
    benches = benches_of(doc)
    out = []
    for name, fn in HEADLINES.items():
        result = benches.get(name)
        try:
            rows = fn(result if isinstance(result, dict) else {})
        except Exception as e:   # a shape no one foresaw: say so, keep going
            rows = [_h(f"{name}: headlines unreadable ({type(e).__name__}: {_one_line(e)})", "",
                       f"python -m perf {name}", "", bench=name)]
        if isinstance(result, dict) and "skipped" in result and "results" not in result:
            for h in rows:
                h["skipped"] = result["skipped"]
        out += rows
    return out


def _value_text(h: dict) -> str:
    v = h.get("value")
    if v is None:
        return "-" if not h.get("skipped") else "skipped"
    return f"{_fmt(v)} {h.get('unit', '')}".strip()


def _ratio_text(h: dict) -> str:
    q = h.get("ratio")
    if q is None:
        return "-"
    return f"{_fmt(q)}x" + (f" ({h['ratio_of']})" if h.get("ratio_of") else "")


def _met_text(h: dict) -> str:
    met = {True: "yes", False: "no", None: "n/a"}[h.get("met")]
    return f"{met}: {h['goal']}" if h.get("goal") else met


def markdown(doc: dict) -> str:
    """The README "Performance" table of a run."""
    hs = doc.get("headlines") or headlines(doc)
    m = doc.get("machine") or next((b.get("machine") for b in benches_of(doc).values()
                                    if isinstance(b, dict) and b.get("machine")), {}) or {}
    mem = num(m.get("memory_bytes"))
    lines = [
        f"Measured on {m.get('cores', '?')} cores, {f'{mem / 2**30:.0f} GiB' if mem else '? GiB'}, "
        f"Linux {m.get('kernel', '?')}, Python {m.get('python', '?')}, numpy {m.get('numpy', '?')}"
        + (" (quick run: small sizes, goals are for the full run)" if doc.get("quick") else "") + ".",
        "",
        "| figure | hvshare | anchor | ratio | goal met | command |",
        "|---|---|---|---|---|---|",
    ]
    for h in hs:
        cells = [h.get("figure", ""), _value_text(h), h.get("anchor") or "-", _ratio_text(h),
                 _met_text(h), f"`{h['command']}`" if h.get("command") else "-"]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def headline_table(doc: dict) -> str:
    """The headlines as a plain text table (the end of a suite run)."""
    rows = [["figure", "hvshare", "ratio", "goal met"]]
    rows += [[h["figure"], _value_text(h), _ratio_text(h), _met_text(h)] for h in doc.get("headlines", [])]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join([r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].ljust(widths[2]), r[3]]).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths + [8]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# JSON and command line

def _json_default(o: Any):
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def write_json(doc: dict, path: str) -> None:
    """Write atomically: an interrupted write never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m perf all",
        description="Run the whole benchmark suite (" + ", ".join(SUITE) + ") with one JSON, "
                    "headline figures, optional plots and the README table.")
    p.add_argument("--quick", action="store_true",
                   help=f"small sizes and few repeats (budget {BUDGET_SECONDS[True]:.0f} s; "
                        f"full run {BUDGET_SECONDS[False]:.0f} s)")
    p.add_argument("--json", metavar="PATH", help="write the combined result to PATH")
    p.add_argument("--plots", metavar="DIR", help="write one PNG per plot into DIR (needs matplotlib)")
    p.add_argument("--markdown", action="store_true", help="print the README Performance table")
    p.add_argument("--from", dest="from_json", metavar="PATH",
                   help="do not run: read a JSON written by 'all --json' or by one bench's --json")
    p.add_argument("--only", metavar="NAMES", help="comma-separated benches to run (default: all)")
    p.add_argument("--skip", metavar="NAMES", default="", help="comma-separated benches not to run")
    p.add_argument("--quiet", action="store_true", help="no per-bench reports, only progress and headlines")
    a = p.parse_args(argv)

    if a.from_json:
        with open(a.from_json) as f:
            doc = json.load(f)
        # from the benches' results, by this version's rules
        doc["headlines"] = headlines(doc)
    else:
        names = [n.strip() for n in a.only.split(",") if n.strip()] if a.only else list(SUITE)
        names = [n for n in names if n not in {s.strip() for s in a.skip.split(",")}]
        doc = run_suite(names, a.quick, echo=None if a.quiet else print)
        print(f"suite: {len(doc['benches'])} bench(es) in {doc['wall_seconds']:.1f} s"
              + (f" (over the {doc['budget_seconds']:.0f} s budget)" if doc["over_budget"] else "")
              + ("".join(f"\n  skipped {k}: {v}" for k, v in doc["skipped"].items())))
    if a.json:
        write_json(doc, a.json)
        print(f"wrote {a.json}")
    if a.markdown:
        print(markdown(doc))
    else:
        print("\nHeadlines" + (" (quick run)" if doc.get("quick") else ""))
        print(headline_table(doc))
    if a.plots:
        from . import plots
        try:
            written = plots.write_all(doc, a.plots)
        except plots.MatplotlibMissing as e:
            print(f"plots: {e}", file=sys.stderr)
            return 1 if a.from_json else 0
        print(plots.report(written))
    return 130 if doc.get("interrupted") else 0
