"""Jobs: operations the hypervisor continues on its own, a bounded step at a time.

Xen bounds a long hypercall with a *continuation*: it checks for
preemption after every extent and, if other work waits, arranges to be
called again where it stopped (``XENMEM_populate_physmap`` is the model).
A job is that here: the request that started it waits (its client's
connection is ``waiting``) while the loop runs one step of the job per
turn, between the guests' messages and the other clients' requests, and the
request is answered when the job is done.

Each step is one call into the core with the one step check of
:class:`.steps.Budget` (the step budget, or any other work ready),
metered like any step under the job's kind (``create``, ``range_share``).
Jobs take turns, oldest first, in the :class:`JobQueue`. A stop cancels
every job and tells each waiting client why.

A job sees the process only through a :class:`JobHost`: the core, how to
answer a waiting client, and the guest table's three calls a create or a
fork makes.

A VM fork and a fork reset are jobs too (:class:`ForkJob`,
:class:`ResetJob`); a reset that ends in its first step is answered at
once, without waiting for a loop turn.

Teardown is not a job: its steps are driven by the kill controller's
repeated destroy requests, as Xen's domain_kill is by the toolstack.
"""
from __future__ import annotations

import collections
import time
import traceback
from typing import Protocol

from ..wire import control, schema
from ..errors import ECANCELED, EINVAL, EIO, HVError, sentence
from .endpoints import ControlConnection
from ..budget import MIN_CHUNK_ITEMS, ChunkCost
from .steps import TEARDOWN_CHUNK_SECONDS, Budget, StepMeter

#: a job's chunks are sized to take about this long: half a teardown
#: chunk, as a job's cost per item varies more (the kernel may take long
#: to provide a page the first time it is written)
JOB_CHUNK_SECONDS = TEARDOWN_CHUNK_SECONDS / 2


class JobHost(Protocol):
    """What a job may use of the hypervisor process."""

    #: the core
    hv: object

    def answer(self, c: ControlConnection | None, obj: dict, data=b"") -> None:
        """Answer a waiting client (if still connected), then serve its next requests."""

    def spawn_guest(self, d, config: dict):
        """Start the guest process of domain ``d`` (OSError if it cannot)."""

    def fork_made(self, parent: int) -> None:
        """A fork of ``parent`` was made (its guest stops if the fork paused it)."""

    def fork_gone(self, parent: int | None) -> None:
        """A fork of ``parent`` is gone (it may run again)."""


class Job:
    """One preemptible operation: :meth:`step` until it returns True."""

    #: the step kind it is metered as
    kind = "job"

    def __init__(self, client: ControlConnection | None):
        self.client = client
        self.started = time.monotonic()
        self.steps = 0

    def describe(self) -> str:
        """What the job is, for a sentence ("the create of domain 3 ...")."""
        return self.kind

    def step_name(self) -> str:
        """What its next step does, as ``info``'s ``max_pause_op`` names it."""
        return self.kind

    def step(self, host: JobHost, should_yield) -> bool:
        """Do some work; True when done (then :meth:`finish` answers)."""
        raise NotImplementedError

    def finish(self, host: JobHost) -> None:
        """The job is done: answer its client (or hand it on)."""

    def cancel(self, host: JobHost, reason: str) -> None:
        """The job will not finish (the hypervisor stops): undo it."""

    def progress(self) -> dict:
        return {}

    def items_done(self) -> int | None:
        """Items done so far, if it counts them (a step's tail entry says
        how many it did)."""
        return None

    def failure(self, e: HVError) -> str:
        """The sentence its client gets when ``e`` ends the job."""
        return f"{self.describe()}: {sentence(e)}"


class JobQueue:
    """The jobs of the hypervisor process, oldest first; the loop runs one
    step of the oldest per turn (:meth:`step`)."""

    def __init__(self, host: JobHost, budget: Budget, meter: StepMeter):
        self.host, self.budget, self.meter = host, budget, meter
        self.jobs: collections.deque = collections.deque()

    def __bool__(self) -> bool:
        return bool(self.jobs)

    def __iter__(self):
        return iter(self.jobs)

    def start(self, job: Job) -> None:
        """Run ``job`` from the next loop turn on; its client waits."""
        if job.client is not None:
            job.client.waiting = True
        self.jobs.append(job)

    def step(self) -> None:
        """One step of the oldest job (then it goes to the back of the queue)."""
        job = self.jobs.popleft()
        c = job.client if job.client is not None and not job.client.closed else None
        what = job.step_name()
        meter = self.meter
        step = meter.begin()
        before = job.items_done()
        budget = self.budget
        budget.preempted = False
        try:
            done = job.step(self.host, budget.other_work(c, step[0]))
            if done:
                job.finish(self.host)
        except HVError as e:
            self.failed(job, schema.error(job.failure(e), e.code, e.name))
            done = None
        except Exception as e:           # a bug must not take every guest down
            traceback.print_exc()
            self.failed(job, schema.error(f"internal error in {job.kind}: {e!r}", EIO, "EIO"))
            done = None
        finally:
            after = job.items_done()
            meter.note(detail=job.describe)
            if after is not None and before is not None and after >= before:
                meter.note(items=after - before)
            meter.end(step, what, job.kind)
            job.steps += 1
        budget.preempted = False
        if done is False:
            self.jobs.append(job)

    def failed(self, job: Job, answer: dict) -> None:
        """The job ends with ``answer`` (an error) to its client."""
        self.host.answer(job.client, answer)

    def take_create(self, domid: int) -> "CreateJob":
        """Remove and return the create job of ``domid``."""
        job = next(j for j in self.jobs if isinstance(j, CreateJob) and j.build.domid == domid)
        self.jobs.remove(job)
        return job

    def cancel_all(self, reason: str) -> None:
        """Cancel every job; each waiting client gets ``reason`` at once
        (a blocking send: the hypervisor is about to close their sockets)."""
        while self.jobs:
            job = self.jobs.popleft()
            job.cancel(self.host, reason)
            c = job.client
            if c is None or c.closed:
                continue
            tell_now(c, schema.error(f"{reason}: {job.describe()} was cancelled", ECANCELED, "ECANCELED"))


def tell_now(c: ControlConnection, answer: dict) -> None:
    """Send ``answer`` to ``c`` at once, blocking up to a second: for the
    clients of a hypervisor about to close their sockets."""
    try:
        c.sock.settimeout(1.0)
        control.send_frame(c.sock, answer)
    except OSError:
        pass


class CreateJob(Job):
    """A domain being created: the core's :class:`hvshare.hvcore.domains.DomainBuild`
    populated chunk by chunk, then its guest started. The create request is
    answered once the guest said hello (see :mod:`.guests`)."""

    kind = "create"

    def __init__(self, client, build, config: dict, source=None):
        super().__init__(client)
        self.build, self.config, self.source = build, config, source

    def describe(self) -> str:
        b = self.build
        if b.listing:
            return f"the create of domain {b.domid} (listing {self.source.source}: " \
                   f"{self.source.found} pages found)"
        return f"the create of domain {b.domid} ({b.cursor} of {b.npages} pages populated)"

    def step_name(self) -> str:
        return "create listing" if self.build.listing else "create"

    def failure(self, e: HVError) -> str:
        """A create that fails while it lists its content (or reserves its
        frames then) fails as a create refused at once would."""
        b = self.build
        if not b.listing:
            return super().failure(e)
        size = f" of {b.npages} pages" if b.npages else ""
        return f"cannot create a domain{size}: {sentence(e)}"

    def step(self, host, should_yield) -> bool:
        # the last populating step, then the guest's start: a step of its own
        if self.build.domid in host.hv.building:
            host.hv.build_step(self.build, should_yield, chunk_seconds=JOB_CHUNK_SECONDS)
            return False
        return True

    def finish(self, host) -> None:
        d = host.hv.domains[self.build.domid]
        if self.source is not None:
            # what was read, in the create's answer (see guests._answer_creator)
            report = self.source.report()
            report.update(source_pages=report.pop("pages"), pages=d.npages)
            self.config["snapshot"] = report
        start_guest(self, host, d, self.config)

    def cancel(self, host, reason: str) -> None:
        host.hv.cancel_build(self.build)

    def items_done(self) -> int:
        return self.source.found if self.build.listing else self.build.cursor

    def progress(self) -> dict:
        b = self.build
        listed = {"listed": self.source.found} if b.listing else {}
        return {"domid": b.domid, "name": b.name, "state": "creating", "pages": b.npages,
                **listed, "populated": b.cursor, "tot_pages": b.populated, "shr_pages": 0, "pid": None,
                "p2m": b.p2m.name if b.p2m is not None else None, "steps": self.steps,
                "seconds": round(time.monotonic() - self.started, 3)}


def start_guest(job: Job, host: JobHost, d, config: dict) -> None:
    """The last step of a create or a fork: start the domain's guest; its
    client is answered once the guest says hello (see :mod:`.guests`)."""
    try:
        g = host.spawn_guest(d, config)
    except OSError as e:
        parent = d.parent
        host.hv.destroy_domain(d.domid)
        host.fork_gone(parent)
        host.answer(job.client, schema.error(f"cannot start the guest process: {e.strerror}",
                                             EINVAL, "EINVAL"))
        return
    c = job.client
    g.creator = c if c is not None and not c.closed else None


class ForkJob(Job):
    """A VM fork (:meth:`hvshare.hvcore.fork.Forks.fork`): one step makes the
    child (O(1) in the parent's size), the next starts its guest. The fork
    request is answered once the guest said hello, with ``seconds``: the
    fork's own step in the hypervisor."""

    kind = "fork"

    def __init__(self, client, parent: int, name, paused: bool, config: dict):
        super().__init__(client)
        self.parent, self.name, self.paused, self.config = parent, name, paused, config
        self.domid = None
        self.seconds = 0.0

    def describe(self) -> str:
        child = "" if self.domid is None else f" into domain {self.domid}"
        return f"the fork of domain {self.parent}{child}"

    def step(self, host, should_yield) -> bool:
        if self.domid is None:
            t0 = time.perf_counter()
            d = host.hv.fork(self.parent, self.name, self.paused)
            self.seconds = time.perf_counter() - t0
            self.domid = d.domid
            host.fork_made(self.parent)
            return False
        return True

    def finish(self, host) -> None:
        d = host.hv.domains.get(self.domid)
        if d is None or d.dying:
            host.answer(self.client, schema.error(f"domain {self.domid} was destroyed while being "
                                                  f"forked", ECANCELED, "ECANCELED"))
            return
        d.info["answer"] = {"parent": self.parent, "seconds": round(self.seconds, 6),
                            "started": self.started}
        self.config.update(name=d.name)
        start_guest(self, host, d, self.config)

    def cancel(self, host, reason: str) -> None:
        if self.domid in host.hv.domains:
            host.hv.destroy_domain(self.domid)


class ResetJob(Job):
    """A fork reset (:meth:`hvshare.hvcore.fork.Forks.fork_reset_chunk`) over the
    fork's record of populated gfns, a bounded step at a time; then
    ``done()`` answers (or starts the fuzz run the reset asked for)."""

    kind = "fork_reset"

    def __init__(self, client, d, cost, done):
        super().__init__(client)
        #: the fork, the cost model of its reset chunks, and what answers
        self.d = d
        self.cost, self.done = cost, done

    def describe(self) -> str:
        d = self.d
        return f"the reset of domain {d.domid} ({d.reset_cursor or 0} of {d.fork_n} entries done)"

    def step(self, host, should_yield) -> bool:
        return reset_steps(host.hv, self.d, self.cost, should_yield)

    def finish(self, host) -> None:
        self.done()

    def cancel(self, host, reason: str) -> None:
        self.d.reset_cursor = None


def reset_steps(hv, d, cost: ChunkCost, should_yield) -> bool:
    """Chunks of a fork reset until it is done (True) or ``should_yield()``."""
    clock = time.perf_counter
    if d.domid not in hv.domains or d.dying:
        d.reset_cursor = None
        raise HVError(ECANCELED, f"domain {d.domid} was destroyed during its reset")
    while True:
        t0 = clock()
        k = max(MIN_CHUNK_ITEMS, cost.items(JOB_CHUNK_SECONDS, JOB_CHUNK_SECONDS))
        done = hv.fork_reset_chunk(d, k)
        cost.learn(k, clock() - t0)
        if done:
            return True
        if should_yield():
            return False


#: record entries in the first chunk of a fork reset (later ones follow its rate)
FIRST_RESET_CHUNK = 1024


class BatchJob(Job):
    """A batch request sent without a step budget (``nominate_many``,
    ``share_many``, ``range_share``): its items ``[0, n)`` are worked off
    in chunks, ``work(lo, hi)`` each, a bounded step at a time, and
    ``answer(parts)`` makes the one answer from the chunks' results once
    all are done."""

    def __init__(self, client, kind: str, n: int, work, answer, what: str):
        super().__init__(client)
        self.kind, self.n, self.work, self.answer, self.what = kind, n, work, answer, what
        self.lo, self.parts = 0, []
        self.cost = ChunkCost.rate(FIRST_BATCH_CHUNK)

    def describe(self) -> str:
        return f"the {self.kind} of {self.what} ({self.lo} of {self.n} done)"

    def items_done(self) -> int:
        return self.lo

    def step(self, host, should_yield) -> bool:
        clock, cost = time.perf_counter, self.cost
        while self.lo < self.n:
            t0 = clock()
            k = max(MIN_CHUNK_ITEMS, cost.items(JOB_CHUNK_SECONDS, JOB_CHUNK_SECONDS))
            hi = min(self.n, self.lo + k)
            self.parts.append(self.work(self.lo, hi))
            cost.learn(hi - self.lo, clock() - t0)
            self.lo = hi
            if self.lo < self.n and should_yield():
                return False
        return True

    def finish(self, host) -> None:
        c = self.client
        result = self.answer(self.parts)
        if c is None or c.closed:
            return
        obj, data = result if isinstance(result, tuple) else (result, b"")
        host.answer(c, schema.ok(**obj), data)


#: items in the first chunk of a batch job (later chunks follow its rate)
FIRST_BATCH_CHUNK = 256


class ScanJob(Job):
    """A read-only pass of the core over its state, in chunks (the sharing
    report, :class:`hvshare.hvcore.sharing_stats.SharingScan`): ``scan.step`` each
    turn until it is done, then ``answer(scan)`` is the reply."""

    def __init__(self, client, kind: str, scan, answer):
        super().__init__(client)
        self.kind, self.scan, self.answer = kind, scan, answer

    def describe(self) -> str:
        return f"the {self.kind} ({self.scan.describe()})"

    def step(self, host, should_yield) -> bool:
        return self.scan.step(should_yield, JOB_CHUNK_SECONDS)

    def items_done(self) -> int:
        return self.scan.cursor

    def cancel(self, host, reason: str) -> None:
        self.scan.release()

    def finish(self, host) -> None:
        c = self.client
        if c is None or c.closed:
            return
        host.answer(c, schema.ok(**self.answer(self.scan)))
