"""Guest workloads: what a domain's guest process does once it runs.

- ``zero`` and ``clone`` guests idle: they serve their control channel
  (reads, writes, checks) and nothing else.
- ``writer``: a guest that writes random stamped pages at a set rate
  (``rate`` pages/s in batches of ``batch``) and records the round trip of
  every write, CoW faults apart.
- ``fuzz``: the child of a fuzzing loop (a VM fork, reset between runs).
  Each time the hypervisor says run (``H_RUN``) it writes ``fuzz_writes``
  distinct random pages (whole pages, batched messages), reads
  ``fuzz_reads`` distinct random pages (read faults fill those the fork
  does not have), then sends ``G_DONE``: that one message is the signal
  the toolstack's ``fuzz_run`` / ``fork_reset --run`` waits for.

What a domain's memory holds at create is its content image
(:mod:`hvshare.hvcore.images`).
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from hvshare.hvcore.constants import MAX_BATCH_PAGES, PAGE_SIZE
from hvshare.hvcore.images import random_pages

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


def run_fuzz(write_pages: Callable[[np.ndarray, np.ndarray], int],
             read_pages: Callable[[np.ndarray], np.ndarray],
             done: Callable[[int, int, int], None], npages: int, seed: int, instance: int,
             writes: int, reads: int, run_requested, running: Callable[[], bool],
             wait_unpaused: Callable[[], None]) -> None:
    """The fuzz loop: wait for ``run_requested`` (an Event), write
    ``writes`` distinct random pages, read ``reads`` distinct random pages,
    ``done(iteration, written, read)``; again, until ``running()`` is false.
    The pages written hold the iteration number, so a test can tell runs
    apart; generating them costs one fill of a reused buffer."""
    rng = np.random.Generator(np.random.SFC64([seed, instance, 0xF022]))
    writes, reads = min(writes, npages), min(reads, npages)
    buf = np.empty((min(max(writes, 1), MAX_BATCH_PAGES), PAGE_SIZE), dtype=np.uint8)
    iteration = 0
    while running():
        if not run_requested.wait(0.5):
            continue
        run_requested.clear()
        wait_unpaused()
        iteration += 1
        buf.fill(iteration & 0xFF)
        if writes:
            gfns = rng.choice(npages, size=writes, replace=False).astype(np.int64)
            for lo in range(0, writes, MAX_BATCH_PAGES):
                part = gfns[lo:lo + MAX_BATCH_PAGES]
                write_pages(part, buf[:len(part)])
        if reads:
            read_pages(rng.choice(npages, size=reads, replace=False).astype(np.int64))
        done(iteration, writes, reads)
