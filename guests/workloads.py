"""Guest workloads: what a domain's guest process does once it runs.

- ``zero`` and ``clone`` guests idle: they serve their control channel
  (reads, writes, checks) and nothing else.
- ``writer``: a guest that writes random stamped pages at a set rate
  (``rate`` pages/s in batches of ``batch``) and records the round trip of
  every write, CoW faults apart.

What a domain's memory holds at create is its content image
(:mod:`hvcore.images`).
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from hvcore.images import random_pages

class Latencies:
    """The last ``keep`` round trips (seconds) of one kind, for p50/p99."""

    def __init__(self, keep: int = 8192):
        self._ring = np.zeros(keep, dtype=np.float64)
        self._n = 0

    def add(self, seconds: float) -> None:
        self._ring[self._n % len(self._ring)] = seconds
        self._n += 1

    def percentile_us(self, q: float) -> float | None:
        """The ``q``-th percentile in microseconds (None before any sample)."""
        n = min(self._n, len(self._ring))
        return round(float(np.percentile(self._ring[:n], q) * 1e6), 1) if n else None


def run_writer(write_pages: Callable[[np.ndarray, np.ndarray], int], npages: int, seed: int,
               instance: int, rate: float, batch: int, running: Callable[[], bool],
               wait_unpaused: Callable[[], None]) -> None:
    """The writer loop: ``batch`` random stamped pages every ``batch/rate``
    seconds through ``write_pages`` (the guest's pipe call, which does the
    bookkeeping), until ``running()`` turns false. A rate of 0 never writes."""
    rng = np.random.Generator(np.random.SFC64([seed, instance, 0x3717E]))
    if rate <= 0:
        while running():
            time.sleep(0.2)
        return
    interval = batch / rate
    due = time.monotonic()
    while running():
        wait_unpaused()
        gfns = rng.choice(npages, size=min(batch, npages), replace=False).astype(np.int64)
        write_pages(gfns, random_pages(rng, len(gfns)))
        due += interval
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        elif delay < -1.0:
            due = time.monotonic()      # far behind (paused, slow host): do not burst
