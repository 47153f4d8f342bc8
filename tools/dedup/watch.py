"""Watch mode: the scanner as ksmd, a rate-limited scan that never ends.

Every ``interval`` seconds :meth:`Watching.watch` scans the next
``pages_per_second * interval`` gfns: a cursor over the running domains in
domid order, like KSM's ``pages_to_scan`` per ``sleep_millisecs``. Each wrap
of the cursor is a full scan. A window's candidates are also grouped with
private pages of earlier windows whose remembered checksums match (KSM's
unstable tree); those are re-hashed before they are used. A stop request is
honoured between merge rounds.
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:
    from .scanner import PassResult

__all__ = ["Watching", "WATCH_INTERVAL", "WATCH_PAGES_PER_SECOND"]

#: Watch mode: seconds between ticks (KSM's sleep_millisecs is 20 ms).
WATCH_INTERVAL = 0.1
#: Watch mode: gfns scanned per second at most (KSM: pages_to_scan per
#: sleep_millisecs, 100 per 20 ms = 5,000/s by default; ours is cheaper).
WATCH_PAGES_PER_SECOND = 200_000

# page status, as of its last scan (for the gauges)
UNKNOWN, UNSHARED, VOLATILE = 0, 1, 2


class Watching:
    """Watch mode (a part of :class:`tools.dedup.scanner.Scanner`)."""

    def _next_windows(self, budget: int, domids: set[int] | None = None
                      ) -> tuple[dict[int, tuple[int, int]], bool]:
        """The next ``budget`` gfns from the cursor, over the running domains
        (those of ``domids`` only, if given) in domid order; True if they
        reach the end (a full scan is done)."""
        doms = sorted((int(d), int(n)) for d, _, n in self.backend.domains()
                      if domids is None or int(d) in domids)
        domid, gfn = self._cursor or (-1, 0)
        windows = {}
        for d, n in doms:
            if d < domid:
                continue
            lo = gfn if d == domid else 0
            take = min(max(n - lo, 0), budget)
            if take:
                windows[d] = (lo, lo + take)
                budget -= take
            if budget == 0 and lo + take < n:
                self._cursor = (d, lo + take)
                return windows, False
            if budget == 0:
                later = [x for x, _ in doms if x > d]
                if later:
                    self._cursor = (later[0], 0)
                    return windows, False
                break
        self._cursor = None
        return windows, True

    def watch(self, interval: float = WATCH_INTERVAL,
              pages_per_second: float = WATCH_PAGES_PER_SECOND,
              stop_event: threading.Event | None = None,
              on_pass: Callable[[PassResult], None] | None = None,
              domids: Iterable[int] | None = None) -> dict:
        """Scan continuously until ``stop_event`` is set (ksmd).

        Each tick scans the next ``pages_per_second * interval`` gfns (a
        cursor over the running domains, or over ``domids`` only) and then
        sleeps for the rest of the interval, so the rate limit holds however
        fast a tick is; a tick that overruns is followed at once by the
        next. A stop request is honoured between merge rounds, so stopping
        never waits for a whole tick. ``on_pass`` gets each tick's
        :class:`PassResult` (``full_scan`` is True on the tick that
        completes a full scan). Returns totals: ticks, scanned, merged,
        full_scans, seconds. Exceptions of the backend (a hypervisor gone)
        end the watch and propagate.
        """
        stop = stop_event or threading.Event()
        only = None if domids is None else {int(d) for d in domids}
        budget = max(1, int(pages_per_second * interval))
        totals = {"ticks": 0, "scanned": 0, "merged": 0, "full_scans": 0, "seconds": 0.0}
        t_start = time.monotonic()
        self._stop = stop
        try:
            while not stop.is_set():
                t0 = time.monotonic()
                if self._cursor is None:
                    self._fknown[:] = False     # a new full scan re-hashes shared frames
                windows, wrapped = self._next_windows(budget, only)
                plan = self.plan(windows=windows)
                plan.full = wrapped
                res = self.execute(plan)
                totals["ticks"] += 1
                totals["scanned"] += res.scanned
                totals["merged"] += res.merged
                totals["full_scans"] += int(res.full_scan)
                if on_pass:
                    on_pass(res)
                stop.wait(max(0.0, interval - (time.monotonic() - t0)))
        finally:
            self._stop = None
            totals["seconds"] = time.monotonic() - t_start
        return totals
