"""Control operations: the op table of the control socket.

Each ``_op_NAME`` serves one operation of :data:`hvshare.hvcore.wire.schema.CONTROL_OPS`
with its checked arguments, calls the core, and answers. The clients
(:mod:`.clients`) read, parse and check the requests before anything acts
on them and hand them to :meth:`ControlOps.serve`.
"""
from __future__ import annotations

import errno
import os
import select
import time
import traceback

import numpy as np

from ..wire import control, pipe, schema
from .. import errors, images, snapshot
from ..constants import DEFAULT_FUZZ_READS, DEFAULT_FUZZ_WRITES, WORKLOADS
from ..errors import EBUSY, ECANCELED, EINVAL, ENOMEM, ESRCH, HVError, sentence
from ..sharing_stats import SharingScan
from .endpoints import ControlConnection
from ..budget import ChunkCost
from .jobs import FIRST_RESET_CHUNK, BatchJob, CreateJob, ForkJob, ResetJob, ScanJob, reset_steps
from .steps import TEARDOWN_CHUNK_SECONDS

#: A brief destroy "restart" (see ControlOps._op_destroy): the keys of the
#: full answer that change between steps; the values are ints, floats and
#: a phase name, which %d, %r and %s write as JSON does.
_RESTART_JSON = ('{"ok":true,"domid":%d,"done":false,"phase":"%s","cursor":%d,"entries":%d,'
                 '"steps":%d,"continuations":%d,"step_ms":%r,"max_pause_ms":%r,'
                 '"max_pause_cpu_ms":%r,"hv_seconds":%r}')
#: bytes an event subscriber may fall behind before it is dropped
EVENTS_MAX_QUEUE = 1 << 20


class ControlOps:
    """The op table: one ``_op_NAME`` per control operation.

    Its context is explicit: the core (``hv``), the parts it drives (the
    guest table, the write path and its parking lot, the job queue, the
    budget, the step meter, the clients it answers through) and the
    process's settings; ``stop`` closes the whole process (the ``stop``
    op). It is the one part that sees most others, as an op of Xen's
    toolstack interface reaches most of the hypervisor.
    """

    def __init__(self, hv, *, guests, writes, lot, jobs, budget, meter, clients,
                 teardown: str, sched: str, socket_path: str, started: float, pacer, stop):
        self.hv, self.guests, self.writes, self.lot, self.jobs = hv, guests, writes, lot, jobs
        self.budget, self.meter, self.clients, self.pacer, self.stop = budget, meter, clients, pacer, stop
        self.teardown, self.sched, self.socket_path, self.started = teardown, sched, socket_path, started
        self.requests = 0
        #: domains created or forked so far (each gets the next as its instance)
        self.instances = 0
        #: final teardown record of every domain destroy finished (domids
        #: are never reused, so a second destroy can say "already destroyed")
        self.destroyed: dict[int, dict] = {}

    def serve(self, c: ControlConnection, op: str, args: dict, payload) -> None:
        """Serve one checked request (arguments are passed as a copy)."""
        self.requests += 1
        try:
            result = getattr(self, "_op_" + op)(c, payload=payload, **args)
        except HVError as e:
            c.reply(schema.error(sentence(e), e.code, e.name))
            return
        except errors.ProtocolError as e:    # a payload that does not match its arguments
            c.reply(schema.error(f"{op}: {e}"))
            return
        except Exception as e:          # a bug must not take every guest down
            traceback.print_exc()
            c.reply(schema.error(f"internal error in {op}: {e!r}", errno.EIO, "EIO"))
            return
        if result is None:          # answered later (create) or already (stop)
            return
        obj, data = result if isinstance(result, tuple) else (result, b"")
        c.reply(schema.ok(**obj), data)

    def _op_ping(self, c, payload):
        return {"pid": os.getpid()}

    def _op_info(self, c, payload):
        st = self.hv.stats()
        st.update(teardown=self.teardown, sched=self.sched, max_pause_ms=round(self.meter.max_s * 1e3, 3),
                  max_pause_cpu_ms=round(self.meter.max_cpu_s * 1e3, 3),
                  max_pause_op=self.meter.max_what, pause_histogram=self.meter.histogram(),
                  steps=self.meter.steps, requests=self.requests, pid=os.getpid(),
                  socket=self.socket_path, uptime_s=round(time.time() - self.started, 3),
                  pool=self.hv.pool.name, pause_by_op=self.meter.by_op(),
                  slowest_steps=self.meter.slowest(),
                  cow_faults=self.writes.cow_faults,
                  jobs=[j.describe() for j in self.jobs], unbounded=self._unbounded(),
                  warm_guests=self.guests.stock.info())
        paced = self.pacer.paced
        st.update(paced=paced[0], paced_ms=round(paced[1] * 1e3, 3))
        ring = self.lot.ring
        st.update(enomem_waits=self.lot.enomem_waits, parked=sorted(self.lot.parked),
                  events_posted=ring.posted, event_subscribers=ring.live())
        return st

    def _unbounded(self) -> dict:
        """The operations that run as one step however large, and why:
        every other grows a bounded step at a time."""
        out = {"audit": "one step over every frame, rmap entry and p2m entry: it checks one "
                        "consistent state"}
        if self.teardown == "monolithic":
            out["destroy"] = "--teardown monolithic: a domain's whole teardown in one step, " \
                             "as before Xen 4.2"
        return out

    def _op_list(self, c, payload):
        """Every domain, and those still being created (state ``creating``,
        ``populated`` of ``pages`` done)."""
        return {"domains": [self._describe(d) for d in self.hv.domains.values()] +
                [j.progress() for j in self.jobs if isinstance(j, CreateJob)]}

    def _describe(self, d) -> dict:
        g = self.guests.get(d.domid)
        out = {"domid": d.domid, "name": d.name, "state": d.state, "pages": d.npages,
               "tot_pages": d.tot_pages, "shr_pages": d.shr_pages,
               "parent": d.parent, "forks": len(d.forks),
               "pid": g.proc.pid if g and not g.closed else None, "p2m": d.p2m.name}
        if d.dying:
            # where an interrupted teardown stands: 'hvctl destroy' resumes here
            out.update(phase=d.teardown_phase, cursor=d.relinquish_cursor,
                       relinquished=d.relinquished)
        if d.domid in self.lot.parked:
            out.update(self.lot.describe(d.domid))
        if g is not None:
            out.update(workload=g.config["workload"], seed=g.config["seed"],
                       source=g.config.get("snapshot", {}).get("source"),
                       guest_socket=g.sock_path if g.exit is None else None,
                       exit=g.exit, **g.counters,
                       fault_p50_us=g.reported.get("fault_p50_us"),
                       fault_p99_us=g.reported.get("fault_p99_us"))
        return out

    def _op_audit(self, c, payload):
        t0 = time.perf_counter()
        report = self.hv.audit_report()
        seconds = round(time.perf_counter() - t0, 6)
        return {"errors": len(report), "report": report[:20], "seconds": seconds}

    def _op_sharing_report(self, c, payload):
        """The sharing report (:mod:`hvshare.hvcore.sharing_stats`): a job over
        every p2m and the frame table, answered when done, each domain
        with its guest's CoW faults."""
        def answer(scan):
            r = scan.report()
            for d in r["domains"]:
                g = self.guests.get(d["domid"])
                d["cow_faults"] = g.cow_faults if g is not None else None
            return r
        self.jobs.start(ScanJob(c, "sharing_report", SharingScan(self.hv), answer))
        return None

    def _op_stop(self, c, payload):
        # Keep the asking connection out of the clean-up: it gets the answer.
        self.clients.detach(c)
        summary = self.stop()
        try:
            c.sock.setblocking(True)
            control.send_frame(c.sock, schema.ok(stopped=True, **summary))
        except OSError:
            pass
        c.sock.close()
        return None

    def _op_create(self, c, payload, pages, workload, seed, name, paused, rate, batch,
                   from_pid, all_mappings, image):
        """Start creating a domain: a job (:class:`.jobs.CreateJob`) that
        populates it a bounded step at a time, then starts its guest; the
        request is answered once the guest said hello.

        With ``from_pid`` or ``image`` the memory is read from that process
        or file (:mod:`hvshare.hvcore.snapshot`; ``pages``: its size, or a cut) and
        the workload only picks what the guest does."""
        if workload not in WORKLOADS:
            raise HVError(EINVAL, f"unknown workload {workload!r} (choose from {', '.join(WORKLOADS)})")
        if pages is not None and pages > self.hv.pool.nfree:
            # refused before anything is sized by ``pages`` (up to 2**31)
            raise HVError(ENOMEM, f"cannot create a domain of {pages} pages: "
                                  f"{pages} frames asked, {self.hv.pool.nfree} free")
        instance = self.instances + 1
        source = None
        if from_pid is not None or image is not None or all_mappings:
            try:
                source = snapshot.open_source(from_pid, image, all_mappings, pages)
            except HVError as e:
                raise HVError(e.code, f"cannot create a domain: {sentence(e)}") from None
            pages, content = pages or source.npages, source
        elif pages is None:
            raise HVError(EINVAL, "a create needs pages unless it reads a process or a file")
        else:
            content = images.content_for(workload, seed, instance, pages)
        try:
            b = self.hv.begin_domain(pages, content=content, name=name, paused=paused)
        except HVError as e:
            if source is not None:
                source.close()
            size = "" if pages is None else f" of {pages} pages"     # (a snapshot sizes it later)
            raise HVError(e.code, f"cannot create a domain{size}: {sentence(e)}") from None
        self.instances = instance
        config = dict(workload=workload, seed=seed, instance=instance, paused=paused, rate=rate,
                      batch=batch, name=b.name)
        self.jobs.start(CreateJob(c, b, config, source))
        return None

    def _op_destroy(self, c, payload, domid, brief):
        """One step of a domain's teardown (Xen's preemptible domain_kill).

        The first step stops the guest and marks the domain dying (nominate
        on it fails with EBUSY from then on); every step relinquishes from
        the saved cursor. Preemptible mode stops as soon as other work is
        pending or the step's budget is spent and answers ``done: false``
        ("restart"): the kill controller asks again. Monolithic mode does
        the whole teardown in this one step. Each answer carries the
        progress and the teardown's totals so far; a ``brief`` restart only
        what changes from step to step (:data:`_RESTART_JSON`, encoded
        without the JSON encoder: a restart is answered thousands of times
        a second while guests wait behind it).
        """
        t0, cpu0 = time.perf_counter(), time.thread_time()
        if domid in self.hv.building:
            return self._destroy_creating(domid, t0)
        d = self.hv.domains.get(domid)
        if d is None and domid in self.destroyed:
            raise HVError(ESRCH, f"domain {domid} is already destroyed")
        d = self.hv.domain(domid)
        resumed = d.dying
        if d.forks:
            raise HVError(EBUSY, f"domain {domid} has forks ({', '.join(map(str, sorted(d.forks)))}): "
                                 f"destroy them first, or destroy it with its forks")
        if not resumed:
            self.guests.stop(domid)
            self.hv.kill(domid)
        td = d.info.get("teardown")
        if td is None:
            td = d.info["teardown"] = {
                "started": time.monotonic(), "entries_total": d.shr_pages,
                "steps": 0, "continuations": 0, "max_step_s": 0.0, "max_step_cpu_s": 0.0, "busy_s": 0.0,
                "owner": None}
        # One controller drives a teardown and reports its entries. Another
        # takes over only once the first has stopped asking: its connection
        # is closed, or holds no further request.
        owner = td["owner"]
        if owner is not None and owner is not c and _still_asking(owner):
            raise HVError(EBUSY, f"domain {domid} is being destroyed by another controller "
                                 f"({td['steps']} steps so far); it finishes on its own")
        td["owner"] = c
        before = d.relinquished
        if self.teardown == "monolithic":
            done = self.hv.relinquish(domid)
        else:
            done = self.hv.relinquish(domid, self.budget.other_work(c, t0),
                                      chunk_seconds=TEARDOWN_CHUNK_SECONDS)
        step = time.perf_counter() - t0
        self.meter.note(items=d.relinquished - before, detail=lambda: f"domain {domid}: {d.teardown_phase}")
        td["steps"] += 1
        td["continuations"] += not done
        td["busy_s"] += step
        td["max_step_s"] = max(td["max_step_s"], step)
        # CPU time too: on a busy machine a step's wall time includes the
        # time other processes held our CPU, which is not the step's work
        td["max_step_cpu_s"] = max(td["max_step_cpu_s"], time.thread_time() - cpu0)
        if brief and not done:
            js = (_RESTART_JSON % (
                domid, d.teardown_phase, d.relinquish_cursor, d.relinquished, td["steps"],
                td["continuations"], round(step * 1e3, 3), round(td["max_step_s"] * 1e3, 3),
                round(td["max_step_cpu_s"] * 1e3, 3), round(td["busy_s"], 6))).encode()
            if self.budget.preempted or c.deferred_answer:      # (answers keep their order)
                c.deferred_answer += (control.FRAME_HDR.pack(len(js), 0), js)
            else:
                c.queue((control.FRAME_HDR.pack(len(js), 0), js))
            return None
        out = {"domid": domid, "done": done, "state": "destroyed" if done else "dying",
               "phase": "gone" if done else d.teardown_phase, "cursor": d.relinquish_cursor,
               "npages": d.npages, "entries": d.relinquished, "entries_total": td["entries_total"],
               "resumed": resumed, "steps": td["steps"], "continuations": td["continuations"],
               "step_ms": round(step * 1e3, 3), "max_pause_ms": round(td["max_step_s"] * 1e3, 3),
               "max_pause_cpu_ms": round(td["max_step_cpu_s"] * 1e3, 3),
               "hv_seconds": round(td["busy_s"], 6),
               "seconds": round(time.monotonic() - td["started"], 6)}
        if done:
            self.destroyed[domid] = out
            self.guests.fork_gone(d.parent)
        return out

    def _destroy_creating(self, domid: int, t0: float) -> dict:
        """Destroy a domain still being created: its create is cancelled
        (its client is answered ECANCELED) and what it populated goes back."""
        job = self.jobs.take_create(domid)
        b = job.build
        populated = b.cursor
        self.hv.cancel_build(b)
        self.jobs.failed(job, schema.error(f"domain {domid} was destroyed while being created "
                                           f"({populated} of {b.npages} pages populated)",
                                           ECANCELED, "ECANCELED"))
        step = time.perf_counter() - t0
        out = {"domid": domid, "done": True, "state": "destroyed", "phase": "gone", "cursor": 0,
               "npages": b.npages, "entries": 0, "entries_total": 0, "resumed": False, "steps": 1,
               "continuations": 0, "step_ms": round(step * 1e3, 3), "max_pause_ms": round(step * 1e3, 3),
               "max_pause_cpu_ms": round(step * 1e3, 3), "hv_seconds": round(step, 6),
               "seconds": round(step, 6), "was_creating": True}
        self.destroyed[domid] = out
        return out

    def _op_pause(self, c, payload, domid):
        return self._set_paused(domid, True)

    def _op_unpause(self, c, payload, domid):
        return self._set_paused(domid, False)

    def _set_paused(self, domid: int, paused: bool) -> dict:
        d = self.hv.domain(domid)
        if domid in self.lot.parked and d.state == "paused":
            return self.writes.pause_parked(domid, paused)
        if d.state not in ("running", "paused"):
            raise HVError(EINVAL, f"domain {domid} is {d.state}")
        if d.forks:
            if not paused:
                raise HVError(EBUSY, f"domain {domid} has forks: it stays paused until they "
                                     f"are destroyed")
            d.fork_paused = False          # paused by its user too: it stays paused
        d.state = "paused" if paused else "running"
        g = self.guests.get(domid)
        if g is not None:
            g.notify(pipe.H_PAUSE if paused else pipe.H_UNPAUSE)
        if not paused:
            self.writes.release_held(domid)
        return {"domid": domid, "state": d.state}

    # -- VM fork ---------------------------------------------------------
    def _op_fork(self, c, payload, parent, name, paused, workload, fuzz_writes, fuzz_reads):
        """Fork ``parent``: a job (:class:`.jobs.ForkJob`) that makes the
        child, then starts its guest; answered once the guest said hello.
        The child's guest runs ``workload`` (default: the parent's)."""
        p = self.hv.domain(parent)
        if p.dying:
            raise HVError(EBUSY, f"domain {parent} is dying")
        if parent in self.lot.parked:
            raise HVError(EBUSY, f"domain {parent} waits for free memory; it cannot be forked now")
        pg = self.guests.get(parent)
        pcfg = pg.config if pg is not None else {}
        workload = workload or pcfg.get("workload", "zero")
        if workload not in WORKLOADS:
            raise HVError(EINVAL, f"unknown workload {workload!r} (choose from {', '.join(WORKLOADS)})")
        instance = self.instances + 1
        self.instances = instance
        config = dict(workload=workload, seed=pcfg.get("seed", 0), instance=instance, paused=paused,
                      rate=pcfg.get("rate", 200.0), batch=pcfg.get("batch", 1), fork=True,
                      fuzz_writes=DEFAULT_FUZZ_WRITES if fuzz_writes is None else fuzz_writes,
                      fuzz_reads=DEFAULT_FUZZ_READS if fuzz_reads is None else fuzz_reads)
        self.jobs.start(ForkJob(c, parent, name, paused, config))
        return None

    def _op_fork_reset(self, c, payload, domid, run):
        """Reset a fork: its private pages go back to holes. The first
        chunks run in this step; if the record is long the rest is a job
        (:class:`.jobs.ResetJob`). With ``run``, the fuzz guest then runs one
        iteration and the answer waits for its G_DONE."""
        t0 = time.perf_counter()
        if run:
            self.guests.fuzz_target(domid)
        d = self.hv.begin_fork_reset(domid)
        cost = self.budget.chunk_cost.setdefault("fork_reset", ChunkCost.rate(FIRST_RESET_CHUNK))
        if reset_steps(self.hv, d, cost, self.budget.other_work(c, t0)):
            return self._reset_done(c, d, run, t0, now=True)
        self.jobs.start(ResetJob(c, d, cost, lambda: self._reset_done(c, d, run, t0)))
        return None

    def _reset_done(self, c, d, run: bool, t0: float, now: bool = False):
        """A reset finished: its answer, or (``run``) the fuzz run it starts.
        ``now``: still in the request's own step (return the answer)."""
        answer = {"domid": d.domid, "pages_dropped": d.reset_dropped,
                  "seconds": round(time.perf_counter() - t0, 6)}
        if run:
            self.guests.start_fuzz(c, d.domid, answer)
            return None
        if now:
            return answer
        self.clients.answer(c, schema.ok(**answer))
        return None

    def _op_fuzz_run(self, c, payload, domid):
        """One iteration of a fuzz guest: answered when it signals done."""
        self.guests.fuzz_target(domid)
        self.guests.start_fuzz(c, domid, {"domid": domid})
        return None

    def _op_events(self, c, payload, since):
        """Subscribe this connection to the sharing event ring: an answer,
        the retained events after ``since`` (none if not given), then every
        new event as its own frame, until either side closes. Pushing only
        queues bytes, so a slow subscriber never holds the loop; one that
        falls :data:`EVENTS_MAX_QUEUE` bytes behind is dropped."""
        ring = self.lot.ring
        c.reply(schema.ok(subscribed=True, seq=ring.seq, parked=sorted(self.lot.parked)))
        drop = self.clients.drop

        def push(ev, c=c) -> bool:
            if c.closed:
                return False
            if len(c.out) > EVENTS_MAX_QUEUE:
                drop(c)
                return False
            c.reply(ev)
            return not c.closed
        for ev in (ring.since(since) if since is not None else ()):
            push(ev)
        ring.subscribe(push, lambda c=c: not c.closed)
        return None

    def _op_nominate(self, c, payload, domid, gfn):
        return {"handle": self.hv.nominate(domid, gfn)}

    def _op_share(self, c, payload, sd, sgfn, sh, cd, cgfn, ch):
        self.hv.share(sd, sgfn, sh, cd, cgfn, ch)
        return {}

    def _op_add_to_physmap(self, c, payload, sd, sgfn, sh, cd, cgfn):
        self.hv.add_to_physmap(sd, sgfn, sh, cd, cgfn)
        return {}

    def _op_range_share(self, c, payload, sd, cd, first, last):
        """A job over the range (Xen's range_share continues itself the
        same way): checked whole, then shared a piece per chunk."""
        self.hv.check_range(sd, cd, first, last)
        t0 = time.monotonic()
        self.jobs.start(BatchJob(
            c, "range_share", last - first + 1,
            lambda lo, hi: self.hv.range_share(sd, cd, first + lo, first + hi - 1),
            lambda parts: {"shared": sum(parts), "seconds": round(time.monotonic() - t0, 6)},
            f"gfns {first}..{last} of domains {sd} and {cd}"))
        return None

    def _op_unshare(self, c, payload, domid, gfn):
        return {"copied": bool(self.hv.unshare(domid, gfn))}

    def _op_read(self, c, payload, domid, gfn):
        return {}, self.hv.read(domid, gfn)

    def _op_nominate_many(self, c, payload, domid, count, budget_us):
        gfns = payload_arrays(payload, count, [np.int64])[0]
        if budget_us is None:
            gfns = gfns.copy()      # the payload's buffer is not ours past this step
        t0 = time.perf_counter()

        def work(lo, hi):
            return self.hv.nominate_many(domid, gfns[lo:hi])

        def answer(parts, done=count):
            handles = np.concatenate([h for h, _ in parts]) if parts else np.zeros(0, np.uint64)
            codes = np.concatenate([k for _, k in parts]) if parts else np.zeros(0, np.int64)
            # work_ms: the work's own time, without the framing
            return {"count": count, "done": done, "work_ms": round((time.perf_counter() - t0) * 1e3, 3)}, \
                np.concatenate([handles.astype("<u8").view(np.uint8),
                                codes.astype("<i8").view(np.uint8)]).tobytes()
        if budget_us is None:
            self.jobs.start(BatchJob(c, "nominate_many", count, work, answer, f"{count} gfns of domain {domid}"))
            return None
        parts, done = self.budget.bounded(c, "nominate_many", count, budget_us, work)
        return answer(parts, done)

    def _op_share_many(self, c, payload, sd, cd, count, budget_us):
        if (sd is None) != (cd is None):
            raise HVError(EINVAL, "share_many needs both sd and cd, or a domain per pair for both")
        if sd is None:
            sd, sg, sh, cd, cg, ch = payload_arrays(payload, count, [np.int64, np.int64, np.uint64,
                                                             np.int64, np.int64, np.uint64])
        else:
            sg, sh, cg, ch = payload_arrays(payload, count, [np.int64, np.uint64, np.int64, np.uint64])
        if budget_us is None:       # a job: the payload's buffer is not ours past this step
            sd, sg, sh, cd, cg, ch = (x if np.ndim(x) == 0 else x.copy() for x in (sd, sg, sh, cd, cg, ch))

        def work(lo, hi):
            part = slice(lo, hi)
            return self.hv.share_many(sd if np.ndim(sd) == 0 else sd[part], sg[part], sh[part],
                                      cd if np.ndim(cd) == 0 else cd[part], cg[part], ch[part])
        t0 = time.perf_counter()

        def answer(parts, done=count):
            codes = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            return {"count": count, "done": done, "shared": int((codes == 0).sum()),
                    "work_ms": round((time.perf_counter() - t0) * 1e3, 3)}, codes.astype("<i8").tobytes()
        if budget_us is None:
            self.jobs.start(BatchJob(c, "share_many", count, work, answer, f"{count} pairs"))
            return None
        parts, done = self.budget.bounded(c, "share_many", count, budget_us, work)
        return answer(parts, done)


def payload_arrays(payload, count: int, dtypes) -> list[np.ndarray]:
    """Split a request payload into ``count``-long little-endian arrays."""
    want = 8 * count * len(dtypes)
    if len(payload) != want:
        raise errors.ProtocolError(f"payload of {len(payload)} bytes, expected {want}")
    return [np.frombuffer(payload, dtype=np.dtype(t).newbyteorder("<"), count=count, offset=8 * count * i)
            for i, t in enumerate(dtypes)]


def _still_asking(c: ControlConnection) -> bool:
    """Whether a connection has requests waiting: parsed, deferred, or
    still unread in its socket."""
    if c.closed:
        return False
    if c.backlog or c.deferred_answer:
        return True
    return bool(select.select([c.sock], [], [], 0)[0])
