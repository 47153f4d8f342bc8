"""The one list of benchmarks: what ``python -m hvshare.perf <bench>``, ``python -m
hvshare.perf all``, ``--help`` and the tests run.

Each bench is a module with ``run(quick: bool) -> dict`` (the result, whose
measured figures are :class:`hvshare.perf.figure.Figure` s in ``figures``) and
``report(result) -> str`` (the human table). ``suite`` benches run in
``python -m hvshare.perf all``, in this order; the others are run on their own
(the peers are measured inside the suite's benches already).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Bench:
    name: str
    module: str
    about: str
    suite: bool

    @property
    def file(self) -> str:
        """The source file, as messages name it (``perf/rmap.py``)."""
        return self.module.replace(".", "/") + ".py"

    @property
    def qualname(self) -> str:
        """The installed module's name (``hvshare.perf.rmap``)."""
        return "hvshare." + self.module

    def load(self):
        """The module, or a one-line reason why it cannot be used."""
        try:
            mod = importlib.import_module(self.qualname)
        except Exception as e:
            return f"{self.file} does not import: {type(e).__name__}: {e}"
        if not callable(getattr(mod, "run", None)) or not callable(getattr(mod, "report", None)):
            return f"{self.file} has no run(quick) and report(result)"
        return mod


#: name, module, "suite" (in ``python -m hvshare.perf all``, in this order) or "alone", one line about it
_TABLE = """\
rmap        perf.rmap              suite  reverse-map policies: cost per entry and memory against sharing degree
cow         perf.cow               suite  CoW fault round trip beside the raw pipe, the floor probe and Linux KSM
teardown    perf.teardown          suite  teardown of N entries on one frame under a faulting writer; Linux munmap
dedup       perf.dedup             suite  dedup merge rate through the hypervisor against Linux KSM
density     perf.density           suite  clone guests that fit in one pool with and without dedup
real        perf.real              suite  dedup of snapshots of real programs against Linux KSM on them
scale       perf.scale             suite  create, dedup, CoW and destroy of big clones: times and longest steps
fork        perf.fork              suite  VM fork, fork_reset and fuzzing loops against Linux fork()
soak        perf.soak              alone  writers, dedup passes and a teardown at once: lost writes, longest step
firsttouch  perf.firsttouch        alone  the kernel's first touch of a page: the floor of a create's steps
floor       perf.floor             alone  the floor of a CoW fault: a bare selectors loop over the core's write
audit       perf.audit             alone  the audit's cost per entry checked, per rmap policy
onemillion  perf.onemillion        alone  a dedup pass and a teardown at 1,000,000 pages
ksm         perf.peers.ksm         alone  Linux KSM alone: merge, CoW break, batched break, munmap
pipe        perf.peers.pipe        alone  the raw pipe round trip of two Python processes
linux_fork  perf.peers.linux_fork  alone  Linux fork() and fork loops of a process of N pages
"""

BENCHES: dict[str, Bench] = {
    name: Bench(name, module, about, where == "suite")
    for name, module, where, about in (line.split(None, 3) for line in _TABLE.splitlines())}

#: the benches of ``python -m hvshare.perf all``, in running order
SUITE = tuple(name for name, b in BENCHES.items() if b.suite)


def help_text() -> str:
    """One line per benchmark, for ``--help``."""
    w = max(map(len, BENCHES))
    return "\n".join(f"  {name:<{w}}  {b.about}" + ("" if b.suite else " (not in 'all')")
                     for name, b in BENCHES.items())
