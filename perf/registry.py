"""The one list of benchmarks: what ``python -m perf <bench>``, ``python -m
perf all``, ``--help`` and the tests run.

Each bench is a module with ``run(quick: bool) -> dict`` (the result, whose
measured figures are :class:`perf.figure.Figure` s in ``figures``) and
``report(result) -> str`` (the human table). ``suite`` benches run in
``python -m perf all``, in this order; the others are run on their own
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

    def load(self):
        """The module, or a one-line reason why it cannot be used."""
        try:
            mod = importlib.import_module(self.module)
        except Exception as e:
            return f"{self.file} does not import: {type(e).__name__}: {e}"
        if not callable(getattr(mod, "run", None)) or not callable(getattr(mod, "report", None)):
            return f"{self.file} has no run(quick) and report(result)"
        return mod


BENCHES: dict[str, Bench] = {b.name: b for b in (
    Bench("rmap", "perf.rmap", "reverse-map policies: cost per entry and memory against sharing degree", True),
    Bench("cow", "perf.cow", "CoW fault round trip beside the raw pipe, the floor probe and Linux KSM", True),
    Bench("teardown", "perf.teardown", "teardown of N entries on one frame under a faulting writer; Linux munmap",
          True),
    Bench("dedup", "perf.dedup", "dedup merge rate through the hypervisor against Linux KSM", True),
    Bench("density", "perf.density", "clone guests that fit in one pool with and without dedup", True),
    Bench("real", "perf.real", "dedup of snapshots of real programs against Linux KSM on them", True),
    Bench("scale", "perf.scale", "create, dedup, CoW and destroy of big clones: times and longest steps", True),
    Bench("fork", "perf.fork", "VM fork, fork_reset and fuzzing loops against Linux fork()", True),
    Bench("soak", "perf.soak", "writers, dedup passes and a teardown at once: lost writes, longest step", False),
    Bench("firsttouch", "perf.firsttouch", "the kernel's first touch of a page: the floor of a create's steps",
          False),
    Bench("floor", "perf.floor", "the floor of a CoW fault: a bare selectors loop over the core's write", False),
    Bench("audit", "perf.audit", "the audit's cost per entry checked, per rmap policy", False),
    Bench("onemillion", "perf.onemillion", "a dedup pass and a teardown at 1,000,000 pages", False),
    Bench("ksm", "perf.peers.ksm", "Linux KSM alone: merge, CoW break, batched break, munmap", False),
    Bench("pipe", "perf.peers.pipe", "the raw pipe round trip of two Python processes", False),
    Bench("linux_fork", "perf.peers.linux_fork", "Linux fork() and fork loops of a process of N pages", False),
)}

#: the benches of ``python -m perf all``, in running order
SUITE = tuple(name for name, b in BENCHES.items() if b.suite)


def help_text() -> str:
    """One line per benchmark, for ``--help``."""
    w = max(map(len, BENCHES))
    return "\n".join(f"  {name:<{w}}  {b.about}" + ("" if b.suite else " (not in 'all')")
                     for name, b in BENCHES.items())
