"""Where a bench's processes run: every thread pinned, checked and recorded.

``os.sched_setaffinity(pid, cpus)`` sets the mask of one thread only, the
one whose id is ``pid``. A hypervisor or a guest serves its pipes and
sockets from other threads too (a guest's control channel, which runs
``time_writes``, is one), and those stay free to run on any core: a "same
core" fault would then be a cross-core one. :class:`Placement` pins every
thread of a process (``/proc/PID/task``), walks the tasks again until no
new thread shows up (a thread started later inherits its creator's mask,
which is by then the pinned one), and :meth:`Placement.check` reads back,
per thread, the mask the kernel holds (``Cpus_allowed_list``) and the CPU
the thread last ran on (field 39 of ``/proc/PID/task/TID/stat``). That
last CPU only says something about the placement once the thread has run
since it was pinned, so a thread whose context switches did not grow
since then is recorded as not having run, and its last CPU is not held
against the placement. :meth:`Placement.restore` puts the old masks back.
A process pinned with ``tree=True`` takes the processes below it along (a
hypervisor's guests, or whatever it starts guests from), and a check
records those started since (they inherited the mask).

A placement's record (the bench puts it into its result's ``placements``,
docs/schema/perf/result.schema.json)::

    {"labels": {...the case...}, "held": bool, "processes": [
        {"role": "hypervisor", "pid": 123, "cpus": [0], "held": bool, "threads": [
            {"tid": 123, "name": "python", "allowed": [0], "last_cpu": 0, "ran": true, "held": true}]}]}

A thread that is gone by the check is left out, and so is a process found
below a ``tree`` one; any other process with no thread left is recorded
with ``"gone": true`` and does not hold.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

#: where a round trip's two processes run: one core, or two
PLACEMENTS = ("same", "cross")

#: the field of /proc/PID/task/TID/stat that is the CPU the task last ran on (1-based, man 5 proc)
STAT_PROCESSOR_FIELD = 39
#: walks of a process's tasks that pin before giving up on threads still appearing
MAX_WALKS = 8


def placement_cpus(placement: str) -> tuple[int, int] | str:
    """(this process's CPU, the other process's) for a round-trip
    placement, or a one-line reason it is impossible here."""
    allowed = sorted(os.sched_getaffinity(0))
    if placement == "same":
        return allowed[0], allowed[0]
    if placement != "cross":
        raise ValueError(f"placement must be one of {PLACEMENTS}, not {placement!r}")
    if len(allowed) < 2:
        return f"cross-core placement needs 2 CPUs, this process may use {len(allowed)}"
    return allowed[0], allowed[1]


def alone_and_rest() -> tuple[set[int], set[int]]:
    """(a core for the hypervisor alone, the cores for everything else of
    the bench) from this process's allowed CPUs: our own processes then
    never preempt a hypervisor step. With one CPU both are that CPU."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return set(allowed), set(allowed)
    return {allowed[0]}, set(allowed[1:])


def parse_cpu_list(text: str) -> list[int]:
    """``"0-2,5"`` (a kernel CPU list) as ``[0, 1, 2, 5]``."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def tids(pid: int) -> list[int]:
    """The thread ids of a process (empty when it is gone)."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except (FileNotFoundError, ProcessLookupError):
        return []


def children(pid: int) -> list[int]:
    """The processes ``pid`` started that are still its children (every
    thread's ``children`` in /proc; where the kernel has no such file, the
    processes whose parent is ``pid``)."""
    out: set[int] = set()
    for tid in tids(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.update(int(x) for x in f.read().split())
        except FileNotFoundError:
            return _children_by_parent(pid)
        except ProcessLookupError:
            continue
    return sorted(out)


def _children_by_parent(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    return sorted(out)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree, now."""
    out, todo = [], children(pid)
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(children(c))
    return sorted(out)


def thread_state(pid: int, tid: int) -> dict | None:
    """``{"tid", "name", "allowed", "last_cpu", "switches"}`` of one thread
    as the kernel has it now, or None when it is gone."""
    base = f"/proc/{pid}/task/{tid}"
    try:
        with open(f"{base}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        with open(f"{base}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the name (field 2) is in parentheses and may hold spaces: count fields after its ')'
    rest = stat[stat.rindex(")") + 2:].split()
    return {"tid": tid, "name": status["Name"].strip(), "allowed": parse_cpu_list(status["Cpus_allowed_list"]),
            "last_cpu": int(rest[STAT_PROCESSOR_FIELD - 3]),
            "switches": int(status["voluntary_ctxt_switches"]) + int(status["nonvoluntary_ctxt_switches"])}


@dataclass
class _Placed:
    role: str
    pid: int
    cpus: frozenset
    #: tid -> the mask it had before it was pinned (None: it already had the pinned one)
    old: dict = field(default_factory=dict)
    #: the mask the process had: what a thread that inherited the pinned one gets back
    first: set | None = None
    #: checked only, never pinned: it should be there already (see :meth:`Placement.watch`)
    watched: bool = False
    #: its descendants go where it goes (see :meth:`Placement.pin`)
    tree: bool = False
    #: the ``tree`` process it was found below: left out of the record once
    #: it is gone, and given the mask that one had when restored
    root: "_Placed | None" = None
    #: tid -> its context switches when it was pinned
    switches: dict = field(default_factory=dict)


class Placement:
    """Pins every thread of the processes a bench places, each to its set
    of CPUs; checks and records where they are; restores the old masks
    (also as a context manager: ``with Placement() as p: p.pin(...)``)."""

    def __init__(self):
        self._placed: list[_Placed] = []

    def pin(self, role: str, pid: int, cpus, tree: bool = False) -> None:
        """Pin every thread of ``pid`` (0: this process) to ``cpus``, now
        and again at :meth:`repin`. ``role`` names the process in the record
        (``hypervisor``, ``guest``, ``driver``...). With ``tree``, so are the
        processes below it not placed otherwise (a hypervisor's guest
        zygote, its stock of guests): what they start later inherits the
        mask, and :meth:`check` records the ones it finds then."""
        cpus = frozenset(cpus)
        if not cpus:
            raise ValueError(f"no CPU to pin the {role} to")
        p = _Placed(role, pid or os.getpid(), cpus, tree=tree)
        if not tids(p.pid):
            raise ProcessLookupError(f"the {role} (pid {p.pid}) is not running")
        self._placed.append(p)
        self._pin(p)

    def _below(self, p: _Placed, watched: bool) -> None:
        """Place the processes below ``p`` that are not placed yet."""
        known = {x.pid for x in self._placed}
        for c in descendants(p.pid):
            if c not in known:
                q = _Placed(f"{p.role}'s child", c, p.cpus, watched=watched, root=p)
                self._placed.append(q)
                if watched:
                    self._baseline(q)
                else:
                    self._pin(q)

    def watch(self, role: str, pid: int, cpus) -> None:
        """Check ``pid`` with the others without pinning it: a process that
        should already be on ``cpus`` (a guest a pinned hypervisor started
        inherits its mask). From now on :meth:`check` records it."""
        p = _Placed(role, pid, frozenset(cpus), watched=True)
        self._baseline(p)
        self._placed.append(p)

    @staticmethod
    def _baseline(p: _Placed) -> None:
        for tid in tids(p.pid):
            st = thread_state(p.pid, tid)
            if st is not None:
                p.switches.setdefault(tid, st["switches"])

    def _pin(self, p: _Placed) -> None:
        """Walk the tasks until a walk finds no thread it had not pinned:
        a thread started meanwhile by an unpinned one is caught next walk."""
        if p.watched:
            return
        if p.tree:
            self._below(p, watched=False)
        for _ in range(MAX_WALKS):
            fresh = False
            for tid in tids(p.pid):
                st = thread_state(p.pid, tid)
                if st is None:
                    continue
                if tid not in p.old:
                    mask = set(st["allowed"])
                    if p.first is None:
                        p.first = mask
                    p.old[tid] = None if mask == p.cpus else mask
                    fresh = True
                if set(st["allowed"]) != p.cpus:
                    try:
                        os.sched_setaffinity(tid, p.cpus)
                    except ProcessLookupError:
                        continue
                    p.switches[tid] = st["switches"]
                p.switches.setdefault(tid, st["switches"])
            if not fresh:
                return

    def repin(self) -> None:
        """Pin again every thread of every placed process: threads started
        since :meth:`pin` by a thread we could not pin are caught here."""
        for p in list(self._placed):
            self._pin(p)

    def check(self, **labels) -> dict:
        """The record of where every thread of every placed process is
        (see the module's docstring), labelled with the case ``labels``;
        a process found below a ``tree`` one since is checked, not pinned."""
        for p in [x for x in self._placed if x.tree]:
            self._below(p, watched=True)
        procs = []
        for p in self._placed:
            threads = []
            for tid in tids(p.pid):
                st = thread_state(p.pid, tid)
                if st is None:
                    continue
                ran = tid not in p.switches or st["switches"] != p.switches[tid]
                held = set(st["allowed"]) <= p.cpus and (not ran or st["last_cpu"] in p.cpus)
                threads.append({"tid": tid, "name": st["name"], "allowed": st["allowed"],
                                "last_cpu": st["last_cpu"], "ran": ran, "held": held})
            if not threads and p.root is not None:
                continue
            proc = {"role": p.role, "pid": p.pid, "cpus": sorted(p.cpus), "threads": threads,
                    "held": bool(threads) and all(t["held"] for t in threads)}
            if not threads:
                proc["gone"] = True
            procs.append(proc)
        return {"labels": labels, "held": all(x["held"] for x in procs), "processes": procs}

    def restore(self) -> None:
        """Every thread still there gets its old mask back; one started
        after the pin gets the mask its process had, and a process found
        below a ``tree`` one the mask that one had. Forgets them all."""
        for p in reversed(self._placed):
            if p.watched and p.root is None:
                continue
            for tid in tids(p.pid):
                old = p.old.get(tid) or p.first or (p.root.first if p.root else None)
                if old:
                    try:
                        os.sched_setaffinity(tid, old)
                    except (ProcessLookupError, OSError):
                        pass
        self._placed.clear()

    def __enter__(self) -> "Placement":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def held(records) -> bool:
    """Whether every placement record of a bench held (True when none)."""
    return all(r.get("held", True) for r in records or ())


def describe(record: dict) -> str:
    """One record in a line: per process, its threads' masks and last CPUs."""
    def cpus(xs):
        return ",".join(map(str, sorted(set(xs))))
    parts = []
    for p in record["processes"]:
        ts = p["threads"]
        ran = [t["last_cpu"] for t in ts if t["ran"]]
        parts.append(f"{p['role']} {len(ts)} thread(s) allowed {cpus(c for t in ts for c in t['allowed'])}"
                     + (f", last ran on {cpus(ran)}" if ran else "") + ("" if p["held"] else " (NOT held)"))
    return "; ".join(parts)


def summary(records) -> str:
    """One line of a bench's placements: the roles and their CPUs, and
    how many records did not hold."""
    records = list(records or ())
    if not records:
        return "not placed"
    roles: dict[str, set] = {}
    for r in records:
        for p in r["processes"]:
            roles.setdefault(p["role"], set()).update(p["cpus"])
    bad = sum(not r["held"] for r in records)
    where = ", ".join(f"{role} on {','.join(map(str, sorted(c)))}" for role, c in roles.items())
    threads = max((len(p["threads"]) for r in records for p in r["processes"]), default=0)
    return (f"{len(records)} placement(s), every thread (up to {threads} a process): {where}; "
            + ("all held" if not bad else f"{bad} did NOT hold"))
