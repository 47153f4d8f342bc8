"""``hvctl info`` and ``hvctl audit``: the hypervisor's counters and invariants."""
from __future__ import annotations

from .args import client, micros


def register(add) -> None:
    add("info", "show the hypervisor's counters",
        "Frames, sharing counters (nr_shared_mfns, nr_saved_mfns, and as 'xl info' prints\n"
        "them in MiB: sharing_freed_memory, sharing_used_memory), rmap policy, teardown\n"
        "mode, and the longest step the hypervisor ran without serving anything else\n"
        "(max_pause_ms) with a log2 histogram of step lengths, and its slowest steps\n"
        "with what they did and what happened meanwhile (slowest_steps: all of them\n"
        "with --json).\n\n"
        "Then the sharing report (under \"sharing\" with --json): the frames saved by\n"
        "zero pages and by other pages, how many shared frames have 1, 2, 3-4, 5-8, ...\n"
        "references, and how much of the saving lies within one domain and how much\n"
        "across domains. docs/counters.md defines every counter.", info)
    add("audit", "check every sharing invariant",
        "Run the hypervisor's audit; print its error count. Exit status 1 when it is not 0.", audit)


def info(a) -> object:
    with client(a) as c:
        i = c.info()
        i["sharing"] = c.sharing_report()
    lines = [_row(k, i[k]) for k in ("frames_total", "frames_free", "nr_shared_mfns", "nr_saved_mfns")]
    lines += [_row(k, f"{i[k]} MiB") for k in ("sharing_freed_memory", "sharing_used_memory")]
    lines += [_row(k, i[k]) for k in ("rmap", "teardown")]
    lines.append(_row("sched", i.get("sched", "?")))
    lines.append(_row("max_pause_ms", f"{i['max_pause_ms']} ({i.get('max_pause_op', '?')}; wall time)"))
    if i.get("max_pause_cpu_ms") is not None:
        lines.append(_row("max_pause_cpu_ms", f"{i['max_pause_cpu_ms']} (the longest step in CPU time)"))
    lines.append(_row("cow_faults", i.get("cow_faults", 0)))
    for op, why in (i.get("unbounded") or {}).items():
        lines.append(_row("unbounded", f"{op}: {why}"))
    lines.append(_row("hypervisor", f"pid {i['pid']}, {i['steps']} steps, {i['requests']} requests, "
                                    f"up {i['uptime_s']:.0f} s"))
    slow = i.get("slowest_steps") or []
    if slow:
        lines.append(f"slowest steps ({len(slow)} kept; the first {min(len(slow), SLOWEST_SHOWN)}):")
        lines += ["  " + step_line(e) for e in slow[:SLOWEST_SHOWN]]
    lines += _sharing_lines(i["sharing"])
    hist = i.get("pause_histogram") or []
    if hist:
        top = max(h["count"] for h in hist)
        lines.append("step lengths:")
        for h in hist:
            bar = "#" * max(1, round(30 * h["count"] / top))
            lines.append(f"  < {micros(h['lt_us']):>8}  {h['count']:>8}  {bar}")
    return i, "\n".join(lines)


def audit(a) -> object:
    r = client(a).call("audit")
    took = f" in {r['seconds']:.3f} s" if "seconds" in r else ""
    text = f"audit: {r['errors']} errors{took}" + "".join(f"\n  {x}" for x in r.get("report", []))
    return r, text, (1 if r["errors"] else 0)


#: slowest steps ``hvctl info`` prints (``--json`` has every one kept)
SLOWEST_SHOWN = 5


def step_line(e: dict) -> str:
    """One kept step (an entry of ``info``'s ``slowest_steps``) in a line:
    its time, what it was, and what it did and met, as far as known."""
    cpu = f"{e['cpu_ms']:.3f} ms CPU" if e.get("cpu_ms") is not None else "CPU ?"
    what = e["what"] + (f" ({e['detail']})" if e.get("detail") else "")
    facts = []
    if e.get("items") is not None:
        facts.append(f"{e['items']:,} items")
    if e.get("chunks") is not None:
        longest = f", longest {e['chunk_ms']:.3f} ms" if e.get("chunk_ms") is not None else ""
        facts.append(f"{e['chunks']} chunks{longest}")
    if e.get("minflt") is not None:
        facts.append(f"{e['minflt']:,} page faults" + (f" ({e['majflt']} major)" if e.get("majflt") else ""))
    if e.get("preempted"):
        facts.append(f"preempted {e['preempted']}x")
    if e.get("gcs") is not None:
        facts.append(f"{e['gcs']} collections" + (f" ({e['gc_ms']:.3f} ms)" if e["gcs"] else ""))
    if not facts:
        facts.append("nothing else known (" + ", ".join(e.get("unknown", [])) + ")")
    return f"{cpu}, {e['wall_ms']:.3f} ms wall  {what}: {'; '.join(facts)}"


#: the width of the name column of ``hvctl info``: the longest name's
_LABEL = len("sharing_freed_memory")


def _row(name: str, value: object) -> str:
    """One line of ``hvctl info``: the name, at least one space, the value."""
    return f"{name:<{_LABEL}} {value}"


def _sharing_lines(r: dict) -> list[str]:
    """The sharing report in a few lines (docs/counters.md)."""
    out = [_row("saved", f"{r['saved_frames']:,} frames ({r['saved_mib']:.1f} MiB): zero pages "
                         f"{r['zero']['saved']:,}, other pages {r['other']['saved']:,}"),
           _row("", f"within a domain {r['intra']['saved']:,}, across domains {r['inter']['saved']:,}"
                    + (f", changed while counted {r['unsettled']['saved']:,}"
                       if r["unsettled"]["frames"] else ""))]
    hist = [h for h in r["degree"]["histogram"] if h["frames"]]
    if hist:
        cells = ", ".join(f"{h['min']}" + (f"-{h['max']}" if h["max"] > h["min"] else "")
                          + f": {h['frames']:,}" for h in hist)
        out.append(_row("references", f"{cells} frames (most {r['degree']['max']:,})"))
    return out
