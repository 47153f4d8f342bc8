"""Watch mode: the scanner as ksmd, a rate-limited scan that never ends.

A :class:`Watcher` holds a :class:`~tools.dedup.scanner.Scanner` and a
cursor. Each pass of :meth:`Watcher.watch` scans the next ``pages_to_scan``
gfns, then sleeps ``sleep_millisecs`` (:mod:`.knobs`, KSM's names): the
cursor runs over the running domains in domid order, and each wrap of it is
a full scan. The scanner groups a window's candidates with private pages of
earlier windows whose remembered checksums match (KSM's unstable tree). A
stop request is honoured between merge rounds.
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Callable, Iterable

from .knobs import Knobs

if TYPE_CHECKING:
    from .scanner import PassResult, Scanner

__all__ = ["Watcher"]


class Watcher:
    """Watch mode over one scanner: the scanner does the passes, the
    watcher chooses each pass's window and paces them."""

    def __init__(self, scanner: Scanner):
        self.scanner = scanner
        #: (domid, gfn) where the next pass starts; None: a new full scan
        self._cursor: tuple[int, int] | None = None

    def _next_windows(self, budget: int, domids: set[int] | None = None
                      ) -> tuple[dict[int, tuple[int, int]], bool]:
        """The next ``budget`` gfns from the cursor, over the running domains
        (those of ``domids`` only, if given) in domid order; True if they
        reach the end (a full scan is done)."""
        doms = sorted((int(d), int(n)) for d, _, n in self.scanner.backend.domains()
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
        knobs = knobs or Knobs()
        stop = stop_event or threading.Event()
        only = None if domids is None else {int(d) for d in domids}
        sc = self.scanner
        totals = {"passes": 0, "pages_scanned": 0, "pages_merged": 0, "full_scans": 0, "seconds": 0.0}
        t_start = time.monotonic()
        try:
            while not stop.is_set():
                knobs.changed.clear()
                k = knobs.values()
                sc.batch_pages = k["share_batch"]
                sc.round_pages = max(sc.round_pages, sc.batch_pages)
                new_scan = self._cursor is None
                windows, wrapped = self._next_windows(k["pages_to_scan"], only)
                plan = sc.plan(windows=windows, new_scan=new_scan)
                plan.full = wrapped
                res = sc.execute(plan, stop=stop)
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
            totals["seconds"] = round(time.monotonic() - t_start, 4)
        return totals
