"""Pacing: a real-time hypervisor's own duty cycle under the kernel's.

The kernel lets real-time tasks run at most sched_rt_runtime_us of every
sched_rt_period_us (950 ms of 1 s) and then stops them for the rest of the
period: a hypervisor kept busy for a second (a teardown whose controller
pipelines its requests) would freeze for 50 ms in the middle of a step. So
it keeps its own duty cycle under the kernel's: once it has run (CPU time:
the kernel's measure) PACE_DUTY of a PACE_WINDOW, it holds control requests
(a teardown's next step, any toolstack request) for the rest of the window
and serves only guests (``info``: ``paced``), so a CoW fault is not kept
waiting by a teardown's pacing. Only if guest work takes the window past
PACE_DUTY + PACE_GUEST_SLACK does the whole loop idle out the window.
"""
from __future__ import annotations

import os
import time

PACE_WINDOW = 0.1
PACE_DUTY = 0.9
PACE_GUEST_SLACK = 0.03


class Pacer:
    """The pacing windows of the loop. ``duty``: most of a PACE_WINDOW the
    loop may run (None: no pacing); ``cpu``: its CPU clock; ``sleep``: how
    it idles out a window."""

    def __init__(self, duty: float | None = None, cpu=time.thread_time, sleep=time.sleep):
        self.duty, self.cpu, self.sleep = duty, cpu, sleep
        #: the current window: (start, CPU time then, control held in it)
        self._window = (0.0, 0.0, False)
        #: holds of control requests and their seconds (``info``: ``paced``)
        self.paced = [0, 0.0]

    def hold(self, now: float | None = None) -> float:
        """Seconds control requests must still wait in this window (0.0:
        none): the rest of the window once the loop ran ``duty`` of it.
        Guests are served meanwhile; if they take the window past
        ``duty`` + PACE_GUEST_SLACK, this idles out the window. ``now``:
        the monotonic clock at the end of the last loop turn (default: now)."""
        if now is None:
            now = time.monotonic()
        start, cpu0, _ = self._window
        if now - start >= PACE_WINDOW:
            self._window = (now, self.cpu(), False)
            return 0.0
        if now - start <= self.duty * PACE_WINDOW:
            return 0.0      # it cannot have run longer: no CPU clock read
        busy = self.cpu() - cpu0
        if busy <= self.duty * PACE_WINDOW:
            return 0.0
        left = start + PACE_WINDOW - now
        if not self._window[2]:             # the pacing starts: counted once
            self._window = (start, cpu0, True)
            self.paced[0] += 1
            self.paced[1] += left
        if busy > (self.duty + PACE_GUEST_SLACK) * PACE_WINDOW:
            self.sleep(left)
            self._window = (time.monotonic(), self.cpu(), False)
            return 0.0
        return left


def apply_sched(mode: str) -> str:
    """Schedule this process as ``mode`` asks; returns what it got
    (``fifo`` needs CAP_SYS_NICE or an RLIMIT_RTPRIO: without, ``normal``)."""
    if mode != "fifo":
        return "normal"
    try:
        policy = os.SCHED_FIFO | getattr(os, "SCHED_RESET_ON_FORK", 0)
        os.sched_setscheduler(0, policy, os.sched_param(os.sched_get_priority_min(os.SCHED_FIFO)))
    except (OSError, AttributeError):
        return "normal (fifo not permitted)"
    return "fifo"


def pace_duty() -> float | None:
    """The duty cycle a real-time hypervisor keeps under: PACE_DUTY, or
    less if the kernel allows real-time tasks less; None if unlimited."""
    try:
        with open("/proc/sys/kernel/sched_rt_runtime_us") as f:
            runtime = int(f.read())
        with open("/proc/sys/kernel/sched_rt_period_us") as f:
            period = int(f.read())
    except (OSError, ValueError):
        return PACE_DUTY
    if runtime < 0:
        return None
    return min(PACE_DUTY, runtime / period - 0.05)
