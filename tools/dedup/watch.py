"""Watch mode: the scanner as ksmd, a rate-limited scan that never ends.

Each pass of :meth:`Watching.watch` scans the next ``pages_to_scan`` gfns,
then sleeps ``sleep_millisecs`` (:mod:`.knobs`, KSM's names): a cursor over
the running domains in domid order. Each wrap of the cursor is a full
scan. A window's candidates are also grouped with private pages of earlier
windows whose remembered checksums match (KSM's unstable tree); those are
re-hashed before they are used. A stop request is honoured between merge
rounds.
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:
    from .knobs import Knobs
    from .scanner import PassResult

__all__ = ["Watching"]

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

    def watch(self, knobs: Knobs | None = None, stop_event: threading.Event | None = None,
              on_pass: Callable[[PassResult], None] | None = None,
              domids: Iterable[int] | None = None, idle: Callable[[], None] | None = None,
              idle_every: float = 1.0) -> dict:
        """Scan continuously until ``stop_event`` is set (ksmd).

        Each pass scans the next ``pages_to_scan`` gfns of ``knobs`` (a
        cursor over the running domains, or over ``domids`` only), in share
        requests of at most ``share_batch`` pairs, then sleeps
        ``sleep_millisecs``. The knobs are read at the start of every pass;
        a change ends the sleep (the next pass starts at once with the new
        values). While it sleeps, ``idle`` (if given) is called every
        ``idle_every`` seconds: the caller's check that the hypervisor is
        still there. A stop request is honoured between merge rounds, and
        during a sleep when ``knobs.changed`` is set with it (else within
        ``idle_every``). ``on_pass`` gets each pass's :class:`PassResult`
        (``full_scan`` is True on the pass that completes a full scan).
        Returns totals: passes, pages_scanned, pages_merged, full_scans,
        seconds. Exceptions of the backend or of ``idle`` (a hypervisor
        gone) end the watch and propagate.
        """
        from .knobs import Knobs
        knobs = knobs or Knobs()
        stop = stop_event or threading.Event()
        only = None if domids is None else {int(d) for d in domids}
        totals = {"passes": 0, "pages_scanned": 0, "pages_merged": 0, "full_scans": 0, "seconds": 0.0}
        t_start = time.monotonic()
        self._stop = stop
        try:
            while not stop.is_set():
                knobs.changed.clear()
                k = knobs.values()
                self.batch_pages = k["share_batch"]
                self.round_pages = max(self.round_pages, self.batch_pages)
                if self._cursor is None:
                    self._fknown[:] = False     # a new full scan re-hashes shared frames
                windows, wrapped = self._next_windows(k["pages_to_scan"], only)
                plan = self.plan(windows=windows)
                plan.full = wrapped
                res = self.execute(plan)
                totals["passes"] += 1
                totals["pages_scanned"] += res.scanned
                totals["pages_merged"] += res.merged
                totals["full_scans"] += int(res.full_scan)
                if on_pass:
                    on_pass(res)
                end = time.monotonic() + k["sleep_millisecs"] / 1e3
                while not stop.is_set():
                    left = end - time.monotonic()
                    if left <= 0 or knobs.changed.wait(min(left, idle_every)):
                        break
                    if idle is not None:
                        idle()
        finally:
            self._stop = None
            totals["seconds"] = round(time.monotonic() - t_start, 4)
        return totals
