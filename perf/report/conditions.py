"""The conditions of a run, per bench: how loaded the machine was
(:mod:`hvshare.perf.load`) and where the bench's processes ran
(:mod:`hvshare.perf.placement`), as a table after the headlines and as the
sentence the README's table states its run's conditions with.
"""
from __future__ import annotations

from .. import load, placement
from ..common import table

HEADERS = ["bench", "load avg before -> after", "others' cores", "loaded", "placement"]


def _row(name: str, result: dict) -> list[str]:
    ld = result.get("load")
    if ld:
        others = ld.get("others_cores")
        cells = [f"{ld['loadavg_before'][0]:.2f} -> {ld['loadavg_after'][0]:.2f}",
                 "?" if others is None else f"{others:.2f} (of {ld['cores']})",
                 {True: "LOADED", False: "no", None: "?"}[ld.get("loaded")]]
    else:
        cells = ["not recorded", "-", "?"]
    return [name, *cells, placement.summary(result.get("placements"))]


def conditions_table(benches: dict) -> str:
    """One row per bench that ran (``benches``: name -> result): its load and its placement."""
    rows = [_row(name, r) for name, r in benches.items() if r.get("figures")]
    return table(HEADERS, rows, align="l")


def statement(benches: dict) -> str:
    """The conditions of a run's ``benches`` (name -> result) in one
    paragraph: those whose run was loaded, whose placement did not hold,
    and those that recorded neither."""
    benches = {n: r for n, r in benches.items() if r.get("figures")}
    unrecorded = [n for n, r in benches.items() if not r.get("load")]
    busy = [n for n, r in benches.items() if (r.get("load") or {}).get("loaded")]
    placed = [n for n, r in benches.items() if r.get("placements")]
    slipped = [n for n in placed if not placement.held(benches[n]["placements"])]
    parts = []
    if unrecorded == list(benches):
        parts.append("This run recorded neither the machine's load nor where each bench's threads ran.")
    else:
        parts.append(f"Load: {len(benches) - len(unrecorded)} of {len(benches)} benches recorded it; "
                     + (f"loaded (others used over {load.LOADED_FRACTION:.0%} of the cores): "
                        f"{', '.join(busy)}." if busy else "none ran loaded."))
        parts.append(f"Placement: every thread of {', '.join(placed) or 'no bench'} pinned and checked; "
                     + (f"did not hold in {', '.join(slipped)}." if slipped else "it held in all."))
    if unrecorded and unrecorded != list(benches):
        parts.append(f"Not recorded: {', '.join(unrecorded)}.")
    return " ".join(parts)
