"""How loaded the machine was while a bench ran: recorded, and flagged.

A bench's figures are only worth comparing when nothing else ran beside
it. :class:`LoadMeter` is started before a bench and read after it; its
record (a bench result's ``load``, docs/schema/perf/result.schema.json)
keeps the load average (``os.getloadavg``: 1, 5 and 15 minutes) before and
after, and the load that was not the bench's own: the CPU time the whole
machine spent busy during the bench (``/proc/stat``: user, nice, system,
irq, softirq and steal, the host's share of a virtual machine) less the
CPU time of the bench's own processes (this one and every child it reaped:
the hypervisors, their guests, the peers; and the kernel's ``ksmd``, which
the KSM peers drive), in cores. The load average
alone cannot say that: the bench's own processes count in it, and in a
suite so does the bench before it, for a minute after it ended.
"""
from __future__ import annotations

import os
import time

#: The part of the machine's cores that other work may use, on average,
#: while a bench runs before the run is flagged as loaded. A quarter: on
#: 2 cores, half a core of others' work is already a context switch or a
#: cross-core wake-up in many of a latency bench's round trips.
LOADED_FRACTION = 0.25

#: the busy columns of /proc/stat's first line after "cpu": user, nice, system, (idle, iowait), irq, softirq, steal
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)


def machine_busy_seconds() -> float | None:
    """CPU seconds every core of the machine spent busy since boot, or
    None where /proc/stat cannot be read."""
    try:
        with open("/proc/stat") as f:
            cols = f.readline().split()[1:]
        return sum(int(cols[i]) for i in _BUSY_COLUMNS if i < len(cols)) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _ksmd_pid() -> int | None:
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/comm") as f:
                    if f.read().strip() == "ksmd":
                        return int(name)
            except OSError:
                continue
    return None


def _task_seconds(pid: int | None) -> float:
    """User and system CPU seconds of a process (0 when it cannot be read)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")     # fields 14, 15
    except (OSError, IndexError, ValueError):
        return 0.0


def own_seconds(ksmd: int | None = None) -> float:
    """CPU seconds of this process, of its children it reaped and of the
    process ``ksmd`` (the kernel's KSM thread) when given."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system + _task_seconds(ksmd)


def loaded(others_cores: float | None, cores: int) -> bool | None:
    """Whether others' load (cores) is above :data:`LOADED_FRACTION` of the machine."""
    return None if others_cores is None else others_cores > LOADED_FRACTION * cores


class LoadMeter:
    """Started when made; :meth:`record` after the bench."""

    def __init__(self):
        self.cores = os.cpu_count() or 1
        self.before = os.getloadavg()
        self._ksmd = _ksmd_pid()
        self._t0, self._busy0, self._own0 = time.monotonic(), machine_busy_seconds(), own_seconds(self._ksmd)

    def record(self) -> dict:
        """``{"loadavg_before", "loadavg_after"}`` (1, 5, 15 min),
        ``own_cores`` and ``others_cores`` (CPU seconds per second of the
        bench), ``cores``, ``threshold_cores`` and ``loaded``."""
        wall = max(time.monotonic() - self._t0, 1e-9)
        busy = machine_busy_seconds()
        own = (own_seconds(self._ksmd) - self._own0) / wall
        others = None if busy is None or self._busy0 is None else max((busy - self._busy0) / wall - own, 0.0)
        return {"loadavg_before": [round(x, 2) for x in self.before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                "own_cores": round(own, 3), "others_cores": None if others is None else round(others, 3),
                "cores": self.cores, "threshold_cores": LOADED_FRACTION * self.cores,
                "loaded": loaded(others, self.cores)}


def summary(load: dict | None) -> str:
    """One line of a bench's ``load`` record."""
    if not load:
        return "load not recorded"
    b, a = load["loadavg_before"][0], load["loadavg_after"][0]
    others = load.get("others_cores")
    flag = {True: "LOADED", False: "quiet", None: "unknown"}[load.get("loaded")]
    return (f"load average {b:.2f} -> {a:.2f} on {load['cores']} cores; others used "
            + ("?" if others is None else f"{others:.2f}") + f" cores beside the bench's own "
            f"{load['own_cores']:.2f} (loaded above {load['threshold_cores']:.2f}): {flag}")
