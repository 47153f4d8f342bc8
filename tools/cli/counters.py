"""``hvctl info`` and ``hvctl audit``: the hypervisor's counters and invariants."""
from __future__ import annotations

from .args import client, micros


def register(add) -> None:
    add("info", "show the hypervisor's counters",
        "Frames, sharing counters (nr_shared_mfns, nr_saved_mfns), rmap policy, teardown\n"
        "mode, and the longest step the hypervisor ran without serving anything else\n"
        "(max_pause_ms) with a log2 histogram of step lengths.", info)
    add("audit", "check every sharing invariant",
        "Run the hypervisor's audit; print its error count. Exit status 1 when it is not 0.", audit)


def info(a) -> object:
    i = client(a).info()
    lines = [f"{k:<16}{i[k]}" for k in ("frames_total", "frames_free", "nr_shared_mfns",
                                        "nr_saved_mfns", "rmap", "teardown")]
    lines.append(f"{'sched':<16}{i.get('sched', '?')}")
    lines.append(f"{'max_pause_ms':<16}{i['max_pause_ms']} ({i.get('max_pause_op', '?')}; wall time)")
    if i.get("max_pause_cpu_ms") is not None:
        lines.append(f"{'max_pause_cpu_ms':<16}{i['max_pause_cpu_ms']} (the longest step in CPU time)")
    lines.append(f"{'cow_faults':<16}{i.get('cow_faults', 0)}")
    for op, why in (i.get("unbounded") or {}).items():
        lines.append(f"{'unbounded':<16}{op}: {why}")
    lines.append(f"{'hypervisor':<16}pid {i['pid']}, {i['steps']} steps, {i['requests']} requests, "
                 f"up {i['uptime_s']:.0f} s")
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
