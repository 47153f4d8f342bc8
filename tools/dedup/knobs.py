"""Watch mode's tunables, as ksmd's sysfs files: read and changed while it runs.

Named as ``/sys/kernel/mm/ksm/`` names them where they mean the same:
``pages_to_scan`` (gfns scanned per pass) and ``sleep_millisecs`` (the
sleep after each pass); ``share_batch`` is ours (most page pairs per share
request, :attr:`Scanner.batch_pages`). The watch loop reads them at the
start of every pass, so a change applies from the next pass on; a change
also ends the current sleep, as a write to KSM's ``sleep_millisecs`` wakes
ksmd.
"""
from __future__ import annotations

import re
import threading

__all__ = ["Knobs", "KNOBS", "check", "BATCH_PAGES", "PAGES_TO_SCAN", "SLEEP_MILLISECS"]

#: Most pairs per share_many request (``share_batch``; and, times the
#: scanner's NOMINATE_FACTOR, gfns per nominate_many). Through a hypervisor
#: process this is only a cap: the hypervisor bounds each step by its
#: budget (:data:`hvshare.hvcore.constants.DEDUP_REQUEST_BUDGET_SECONDS`) and
#: requests are sized by what the last steps did.
BATCH_PAGES = 1024
#: gfns per pass by default (KSM's pages_to_scan is 100; our pass is cheaper)
PAGES_TO_SCAN = 20_000
#: the sleep after each pass by default, in ms (KSM's is 20)
SLEEP_MILLISECS = 100

#: knob -> (least, most, what it is)
KNOBS = {
    "pages_to_scan": (1, 1 << 30, "gfns scanned per pass"),
    "sleep_millisecs": (0, 3_600_000, "milliseconds slept after each pass"),
    "share_batch": (1, 1 << 20, "most page pairs per share request"),
}


#: a value given as text: the digits 0-9 only (``int()`` would also take
#: other scripts' digits and underscores)
_DIGITS = re.compile(r"[0-9]+")


def check(changes: dict) -> tuple[dict, list[str]]:
    """``changes`` (values as integers or as text) parsed: (the values, one
    sentence per unknown knob or bad value)."""
    values, errors = {}, []
    for key, raw in changes.items():
        if key not in KNOBS:
            errors.append(f"{key!r} is not a knob (the knobs are {', '.join(KNOBS)})")
            continue
        lo, hi, what = KNOBS[key]
        v = raw if isinstance(raw, int) and not isinstance(raw, bool) else None
        if isinstance(raw, str) and _DIGITS.fullmatch(raw):
            v = int(raw)
        if v is None or not lo <= v <= hi:
            errors.append(f"{key} ({what}) must be a whole number from {lo:,} to {hi:,} "
                          f"in the digits 0-9, not {raw!r}")
            continue
        values[key] = v
    return values, errors


class Knobs:
    """The tunables of one watch, shared by its loop and its control socket."""

    def __init__(self, pages_to_scan: int = PAGES_TO_SCAN, sleep_millisecs: int = SLEEP_MILLISECS,
                 share_batch: int = BATCH_PAGES):
        values, errors = check({"pages_to_scan": pages_to_scan, "sleep_millisecs": sleep_millisecs,
                                "share_batch": share_batch})
        if errors:
            raise ValueError("; ".join(errors))
        self._values = values
        self._lock = threading.Lock()
        #: set by every change: the watch loop ends its sleep
        self.changed = threading.Event()

    def values(self) -> dict:
        with self._lock:
            return dict(self._values)

    def update(self, changes: dict) -> dict:
        """Apply ``changes`` all or nothing; the values before. Raises
        ValueError (its sentences joined by '; ') if any is bad."""
        values, errors = check(changes)
        if errors:
            raise ValueError("; ".join(errors))
        with self._lock:
            before = dict(self._values)
            self._values.update(values)
        self.changed.set()
        return before
