"""Guests: spawning, serving and reaping the guest processes.

A guest is a real process (``python -m hvshare.guests.runtime``) with two pipe
ends, taken from the stock of warm guests (:mod:`.stock`) once its domain's
memory is filled and sent its domain; create is answered once it has
mapped its memory and said hello. Its writes and CoW faults
arrive on its pipe; the :class:`GuestTable` decodes them and hands every
write to the one write path (:mod:`.writes`), which applies it, parks it
when no frame is free and answers. A guest that exits leaves its domain
``crashed`` with its memory kept until destroy.
"""
from __future__ import annotations

import functools
import os
import selectors
import signal
import subprocess
import sys
import time
import traceback

from typing import Callable

from ..wire import pipe, schema
from .. import constants, errors
from ..errors import EBUSY, EINVAL, HVError
from ..statedir import guest_socket_path
from .endpoints import ControlConnection, GuestEndpoint
from .parking import ParkingLot
from .steps import StepMeter
from .stock import REAP_SECONDS, GuestStock
from .writes import WRITE_MESSAGES, WritePath

#: how long a new guest may take to map its memory and say hello
GUEST_START_TIMEOUT = 30.0
#: how long EOF on a guest's pipe waits for the guest's exit status
GUEST_EXIT_WAIT = 0.005
WRITE_MSG = pipe.WRITE_MSG
PIPE_HDR = pipe.PIPE_HDR
_clock = time.perf_counter
_WRITE_MSG_UNPACK = WRITE_MSG.unpack_from
_WRITE_SIZE = WRITE_MSG.size
_HDR_SIZE = PIPE_HDR.size
_G_WRITE = pipe.G_WRITE
_PAGE = constants.PAGE_SIZE
_WRITE_MAX = _WRITE_SIZE + _PAGE


class GuestTable:
    """The guest processes of the hypervisor: spawn, read and dispatch
    their messages as timed steps, reap, crash, stop.

    Depends on the core (``hv``), the loop's selector, the step meter, the
    write path (every write message), the parking lot (a gone guest's
    parked writes are cancelled) and ``answer`` (the clients' call that
    answers a waiting client and serves its next requests: a create, a
    fuzz run).
    """

    def __init__(self, hv, sel, meter: StepMeter, writes: WritePath, lot: ParkingLot,
                 answer: Callable, state_dir: str, warm_guests: int = constants.DEFAULT_WARM_GUESTS):
        self.hv, self.sel, self.meter, self.writes, self.lot = hv, sel, meter, writes, lot
        self.answer, self.state_dir = answer, state_dir
        #: guests started before they are needed (filled by :meth:`fill_stock`)
        self.stock = GuestStock(sel, hv.pool.name, warm_guests)
        self._single = writes.single
        #: domid -> the guest of a live domain
        self.by_domid: dict[int, GuestEndpoint] = {}
        #: guests whose process has not been reaped yet
        self.zombies: list[GuestEndpoint] = []
        #: fuzz runs waiting for their guest's G_DONE: domid -> (client, answer, t0)
        self.fuzz_waiters: dict[int, tuple] = {}

    def get(self, domid: int) -> GuestEndpoint | None:
        return self.by_domid.get(domid)

    # -- the endpoints' host ---------------------------------------------
    def want_write(self, g: GuestEndpoint, on: bool) -> None:
        if on and not g.wregistered:
            self.sel.register(g.wfd, selectors.EVENT_WRITE, lambda mask, g=g: g.flush())
            g.wregistered = True
        elif not on and g.wregistered:
            self.sel.unregister(g.wfd)
            g.wregistered = False

    def lost(self, g: GuestEndpoint) -> None:
        self.gone(g)

    # -- spawn -------------------------------------------------------------
    def spawn(self, d, config: dict) -> GuestEndpoint:
        """Give domain ``d`` a guest process: a warm one from the stock
        (:mod:`.stock`), else one started now (OSError if it cannot)."""
        w = self.stock.take()
        sock_path = guest_socket_path(self.state_dir, d.domid)
        config.update(domid=d.domid, p2m=d.p2m.name, socket=sock_path)
        g = GuestEndpoint(self, d.domid, w.proc, w.rfd, w.wfd, sock_path, config,
                          self.meter.log("guest", f"guest {d.domid}"))
        self.by_domid[d.domid] = g
        self.sel.register(w.rfd, selectors.EVENT_READ, functools.partial(self.readable, g))
        g.queue(pipe.encode_config(config))
        return g

    # -- messages ----------------------------------------------------------
    def readable(self, g: GuestEndpoint, mask: int = 0) -> None:
        if g.closed:
            # Destroyed by an earlier event of the same select() batch: its
            # descriptor is closed (and its number may already be reused).
            return
        reader = g.reader
        if reader.partial:
            t0, cpu0 = time.perf_counter(), time.thread_time()
            try:
                msgs, eof = reader.pump(limit=32)
            except errors.ProtocolError as e:
                self.crash(g, f"protocol violation: {e}")
                return
            finally:
                self.meter.record(time.perf_counter() - t0, "read", "read", time.thread_time() - cpu0)
        else:
            # One read; what a waiting guest sends is one message, usually
            # a small G_WRITE, decoded here without the reader's machinery
            # and handed to the write path as it is.
            buf = g.inbuf
            try:
                n = os.readv(g.fd, (buf,))
            except (BlockingIOError, InterruptedError):
                return
            except (ConnectionResetError, BrokenPipeError):
                n = 0
            if n == 0:
                self._eof(g)
                return
            if _WRITE_SIZE < n <= _WRITE_MAX:
                mtype, seq, blen, gfn, offset = _WRITE_MSG_UNPACK(buf)
                if mtype == _G_WRITE and blen == n - _HDR_SIZE and offset + n - _WRITE_SIZE <= _PAGE:
                    # the fault path: _step's timing, without its dispatch
                    t0 = _clock()
                    try:
                        self._single(g, seq, gfn, offset, buf[_WRITE_SIZE:n])
                    except Exception as e:
                        self._failed(g, e, t0)
                        return
                    g.steplog.append(_clock() - t0)
                    return
            try:
                msgs = reader.feed(buf[:n])
                eof = False
                if n == len(buf) or reader.partial:
                    more, eof = reader.pump(limit=32)
                    msgs += more
            except errors.ProtocolError as e:
                self.crash(g, f"protocol violation: {e}")
                return
        for (mtype, seq, _), body in msgs:
            self._step(g, self._message, mtype, seq, body)
            if g.closed:
                return
        if reader.failed is not None:
            self.crash(g, f"protocol violation: {reader.failed}")
        elif eof:
            self._eof(g)

    def _step(self, g: GuestEndpoint, handler, *args) -> None:
        """One guest message, as one timed step. A message the protocol does
        not allow crashes the domain; so does a bug, and the host goes on."""
        t0 = _clock()
        try:
            handler(g, *args)
        except Exception as e:
            self._failed(g, e, t0)
            return
        if g.closed:        # crashed by the message (a bad hello): its log is gone
            self.meter.record(_clock() - t0, g.step_name, "guest")
        else:
            g.steplog.append(_clock() - t0)

    def continue_write(self) -> None:
        """The loop's turn for the writes that continue across steps: one
        step of the oldest domain's write (:meth:`.writes.WritePath.next_continued`),
        timed and guarded as a step of its guest's message."""
        g = self.writes.next_continued()
        if g is not None:
            self._step(g, self.writes.continue_step)

    def _failed(self, g: GuestEndpoint, e: Exception, t0: float) -> None:
        """A guest step that raised: a message the protocol does not allow,
        or a bug. Either crashes the domain (the step is metered with the
        rest, its guest's log being gone)."""
        if isinstance(e, errors.ProtocolError):
            self.crash(g, f"protocol violation: {e}")
        else:
            traceback.print_exc()
            self.crash(g, f"internal error: {e!r}")
        self.meter.record(_clock() - t0, g.step_name, "guest")

    def _message(self, g: GuestEndpoint, mtype: int, seq: int, body) -> None:
        if mtype in WRITE_MESSAGES:
            self.writes.message(g, mtype, seq, body)
        elif mtype == pipe.G_DONE:
            self._fuzz_done(g, *pipe.decode_done(body))
        elif mtype == pipe.G_STATS:
            g.reported = pipe.decode_stats(body)
        elif mtype == pipe.G_HELLO:
            if len(body) != pipe.HELLO.size:
                raise errors.ProtocolError("bad hello message")
            g.ready = True
            self._answer_creator(g, None)

    def _eof(self, g: GuestEndpoint) -> None:
        """EOF on a guest's pipe: a dying process closes its files a moment
        before the kernel has its exit status; wait that moment (bounded,
        once per guest) so that the domain's ``exit`` says how it died."""
        if g.proc.poll() is None:
            try:
                g.proc.wait(timeout=GUEST_EXIT_WAIT)
            except subprocess.TimeoutExpired:
                pass                    # alive without its pipe: reaped later
        self.gone(g)

    # -- fuzz runs -----------------------------------------------------------
    def fuzz_target(self, domid: int) -> GuestEndpoint:
        """The running fuzz guest of ``domid`` with no run in progress."""
        d = self.hv.domain(domid)
        g = self.by_domid.get(domid)
        if g is None or g.closed or not g.ready:
            raise HVError(EINVAL, f"domain {domid} has no running guest ({d.state})")
        if g.config.get("workload") != "fuzz":
            raise HVError(EINVAL, f"domain {domid} runs the {g.config.get('workload')} workload, "
                                  f"not fuzz")
        if domid in self.fuzz_waiters:
            raise HVError(EBUSY, f"domain {domid} is running a fuzz iteration already")
        return g

    def start_fuzz(self, c: ControlConnection | None, domid: int, answer: dict) -> None:
        """Tell the fuzz guest to run once; ``c`` waits for its G_DONE."""
        g = self.by_domid.get(domid)
        if c is None or c.closed:
            return
        if g is None or g.closed:
            self.answer(c, schema.error(f"domain {domid} has no running guest", EINVAL, "EINVAL"))
            return
        c.waiting = True
        self.fuzz_waiters[domid] = (c, answer, time.perf_counter())
        g.notify(pipe.H_RUN)

    def _fuzz_done(self, g: GuestEndpoint, iteration: int, written: int, read: int) -> None:
        """A fuzz guest ended an iteration: the run waiting for it is answered."""
        g.iterations += 1
        waiter = self.fuzz_waiters.pop(g.domid, None)
        if waiter is None:
            return
        c, answer, t0 = waiter
        self.answer(c, schema.ok(**answer, iteration=iteration, pages_written=written, pages_read=read,
                                 run_seconds=round(time.perf_counter() - t0, 6)))

    # -- forks ---------------------------------------------------------------
    def fork_made(self, parent: int) -> None:
        """A fork was made: the parent's guest stops (if the fork paused it)."""
        g = self.by_domid.get(parent)
        if g is not None and self.hv.domains[parent].fork_paused:
            g.notify(pipe.H_PAUSE)

    def fork_gone(self, parent: int | None) -> None:
        """A fork is gone: once its parent has no fork left it runs again
        (if a fork paused it), its held writes going first."""
        p = self.hv.domains.get(parent) if parent is not None else None
        if p is None or p.forks or p.state != "running":
            return
        g = self.by_domid.get(parent)
        if g is not None:
            g.notify(pipe.H_UNPAUSE)
        self.writes.release_held(parent)

    # -- start, exit and stop ------------------------------------------------
    def _answer_creator(self, g: GuestEndpoint, failure: str | None) -> None:
        c, g.creator = g.creator, None
        if c is None:
            return
        if failure is None:
            d = self.hv.domains[g.domid]
            extra = d.info.pop("answer", {})
            if "started" in extra:          # a fork: also the time until its guest ran
                extra["wall_seconds"] = round(time.monotonic() - extra.pop("started"), 6)
            self.answer(c, schema.ok(domid=g.domid, pid=g.proc.pid, name=d.name,
                                     guest_socket=g.sock_path, **g.config.get("snapshot", {}), **extra))
        else:
            self.answer(c, schema.error(failure, EINVAL, "EINVAL"))

    def detach(self, g: GuestEndpoint) -> None:
        """Close our pipe ends and forget the descriptors (idempotent)."""
        if g.closed:
            return
        g.closed = True
        self.lot.held.pop(g.domid, None)
        waiter = self.fuzz_waiters.pop(g.domid, None)
        if waiter is not None:
            self.answer(waiter[0], schema.error(
                f"the guest of domain {g.domid} is gone ({g.exit or 'destroyed'}) "
                f"before its fuzz iteration ended", errors.ECANCELED, "ECANCELED"))
        if g.domid in self.lot.parked:
            self.lot.cancel(g.domid, g.exit or "the guest exited")
        self.meter.drop_log("guest", g.step_name)
        self.sel.unregister(g.fd)
        if g.wregistered:
            self.sel.unregister(g.wfd)
        os.close(g.fd)
        os.close(g.wfd)
        try:
            os.unlink(g.sock_path)
        except FileNotFoundError:
            pass

    def gone(self, g: GuestEndpoint) -> None:
        """The guest's pipe hit EOF: its process is exiting or gone."""
        if g.closed:
            return
        self.detach(g)
        d = self.hv.domains.get(g.domid)
        if d is not None and d.state in ("running", "paused"):
            d.state = "crashed"
        g.exit = g.exit or "exited"
        self._reap(g)
        if g.creator is not None:
            parent = self.hv.domains[g.domid].parent if g.domid in self.hv.domains else None
            self.hv.destroy_domain(g.domid)
            self.fork_gone(parent)
            self.by_domid.pop(g.domid, None)
            self._answer_creator(g, f"the guest process of domain {g.domid} {g.exit} while starting")

    def _reap(self, g: GuestEndpoint) -> None:
        rc = g.proc.poll()
        if rc is None:
            if g not in self.zombies:
                self.zombies.append(g)
            return
        if g in self.zombies:
            self.zombies.remove(g)
        if g.exit in (None, "exited"):
            g.exit = describe_exit(rc)

    def crash(self, g: GuestEndpoint, why: str) -> None:
        """Crash a domain: its guest is killed, its memory kept until destroy."""
        d = self.hv.domains.get(g.domid)
        if d is not None and d.state in ("running", "paused"):
            d.state = "crashed"
        g.exit = why
        if g.proc.poll() is None:
            g.proc.kill()
        self.gone(g)
        print(f"hvshare: domain {g.domid} crashed: {why}", file=sys.stderr, flush=True)

    def stop(self, domid: int) -> None:
        """Stop a domain's guest now and forget its pipes (destroy).

        SIGSTOP stops it at once: from here on it neither reads nor writes.
        Its SIGKILL waits for the next housekeeping tick, because a SIGKILL
        wakes the guest to die and a busy scheduler may run that exit in
        the middle of our step, where the stop costs almost nothing.
        """
        g = self.by_domid.pop(domid, None)
        if g is None:
            return
        self.lot.cancel(domid, "destroyed")
        if g.proc.poll() is None:
            try:
                os.kill(g.proc.pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
            g.kill_pending = True
        self.detach(g)
        if g.creator is not None:
            self._answer_creator(g, f"domain {domid} was destroyed while its guest started")
        self._reap(g)

    def fill_stock(self) -> None:
        """Start the stock of warm guests (before the hypervisor serves)."""
        self.stock.fill()

    def refill_stock(self) -> None:
        """Top up the stock by one guest (after a tick): a step of its own,
        ``warm guest`` in the meters (a request to the zygote, or a cold spawn
        when the zygote is gone)."""
        t0, cpu0 = time.perf_counter(), time.thread_time()
        if self.stock.refill():
            self.meter.record(time.perf_counter() - t0, "warm guest", "warm", time.thread_time() - cpu0)

    def housekeeping(self, now: float) -> None:
        """The tick's share: kill the guests destroy stopped, reap the dead,
        crash the ones that did not start in time."""
        for g in list(self.zombies):
            if g.kill_pending:
                g.kill_pending = False          # stopped by destroy: now it dies
                if g.proc.poll() is None:
                    g.proc.kill()
            self._reap(g)
        for g in list(self.by_domid.values()):
            if g.closed:
                continue
            if g.proc.poll() is not None:
                # Dead without us seeing EOF yet: the pipe will say so too.
                self.readable(g)
            elif not g.ready and now - g.started > GUEST_START_TIMEOUT:
                self.crash(g, f"did not start within {GUEST_START_TIMEOUT:g} s")

    def abandon_starts(self, tell) -> None:
        """The hypervisor stops: each pending create's client is told at
        once, by ``tell(c, answer)``."""
        for g in self.by_domid.values():
            if g.creator is not None and not g.creator.closed:
                c, g.creator = g.creator, None
                tell(c, schema.error(f"the hypervisor stopped before the guest of domain "
                                     f"{g.domid} started", errors.ECANCELED, "ECANCELED"))

    def close(self) -> int:
        """Kill every guest, the stock's too, and wait for them (the
        hypervisor stops); the number of domains' guest processes."""
        procs = []
        for g in list(self.by_domid.values()) + self.zombies:
            self.detach(g)
            if g.proc.poll() is None:
                g.proc.kill()
            procs.append(g.proc)
        stocked = self.stock.close()
        for p in procs + stocked:
            try:
                p.wait(timeout=REAP_SECONDS)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not wait
                pass
        return len(procs)


def describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with status {rc}"
