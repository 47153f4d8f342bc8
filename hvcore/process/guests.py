"""Guests: spawning, serving and reaping the guest processes.

A guest is a real process (``python -m guests.runtime``) spawned at create
with two pipe ends after its domain's memory is filled; create is answered
once it has mapped its memory and said hello. Its writes and CoW faults
arrive on its pipe and are applied through the core; a write that finds no
free frame is parked (:mod:`.parking`). A guest that exits leaves its
domain ``crashed`` with its memory kept until destroy.
"""
from __future__ import annotations

import functools
import json
import os
import selectors
import signal
import subprocess
import sys
import time
import traceback

from ..wire import pipe, schema
from .. import constants, errors
from ..errors import EINVAL, ENOMEM, HVError
from ..statedir import child_env, guest_socket_path
from .endpoints import GuestEndpoint

#: how long a new guest may take to map its memory and say hello
GUEST_START_TIMEOUT = 30.0
#: how long EOF on a guest's pipe waits for the guest's exit status
GUEST_EXIT_WAIT = 0.005
WRITE_MSG = pipe.WRITE_MSG
PIPE_HDR = pipe.PIPE_HDR
_clock = time.perf_counter
_WRITE_MSG_UNPACK = WRITE_MSG.unpack_from
_WRITE_SIZE = WRITE_MSG.size
_WRITE_MAX = WRITE_MSG.size + constants.PAGE_SIZE
_HDR_SIZE = PIPE_HDR.size
_G_WRITE = pipe.G_WRITE
_PAGE = constants.PAGE_SIZE


class GuestLifecycle:
    """The guests of the hypervisor process: spawn, writes, exit."""

    # -- guests --------------------------------------------------------
    def _spawn_guest(self, d, config: dict) -> GuestEndpoint:
        g2h_r, g2h_w = os.pipe()
        h2g_r, h2g_w = os.pipe()
        for fd in (g2h_r, h2g_r):
            pipe.set_pipe_size(fd)
        sock_path = guest_socket_path(self.state_dir, d.domid)
        config.update(domid=d.domid, pool=self.hv.pool.name, p2m=d.p2m.name, rfd=h2g_r,
                      wfd=g2h_w, socket=sock_path, hv_pid=os.getpid())
        try:
            proc = subprocess.Popen([sys.executable, "-m", "guests.runtime", json.dumps(config)],
                                    pass_fds=(h2g_r, g2h_w), stdin=subprocess.DEVNULL,
                                    env=child_env(), cwd="/")
        finally:
            # Only the guest keeps its ends: our copies would hide its death.
            os.close(g2h_w)
            os.close(h2g_r)
            if "proc" not in locals():
                os.close(g2h_r)
                os.close(h2g_w)
        os.set_blocking(g2h_r, False)
        os.set_blocking(h2g_w, False)
        g = GuestEndpoint(self, d.domid, proc, g2h_r, h2g_w, sock_path, config)
        #: a fork's read faults (gfns filled by G_POPULATE), fuzz iterations done
        g.read_faults = g.iterations = 0
        self.guests[d.domid] = g
        self.sel.register(g2h_r, selectors.EVENT_READ, functools.partial(self._guest_readable, g))
        return g

    def _guest_readable(self, g: GuestEndpoint, mask: int = 0) -> None:
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
                self._crash(g, f"protocol violation: {e}")
                return
            finally:
                self.meter.record(time.perf_counter() - t0, "read", "read", time.thread_time() - cpu0)
        else:
            # One read; what a waiting guest sends is one message, usually
            # a small G_WRITE, served here without the reader's machinery.
            buf = g.inbuf
            try:
                n = os.readv(g.fd, (buf,))
            except (BlockingIOError, InterruptedError):
                return
            except (ConnectionResetError, BrokenPipeError):
                n = 0
            if n == 0:
                self._guest_eof(g)
                return
            if _WRITE_SIZE < n <= _WRITE_MAX:
                mtype, seq, blen, gfn, offset = _WRITE_MSG_UNPACK(buf)
                if mtype == _G_WRITE and blen == n - _HDR_SIZE:
                    # the common case, one small write in one read
                    self._fast_write(g, seq, gfn, offset, buf, n)
                    return
            try:
                msgs = reader.feed(buf[:n])
                eof = False
                if n == len(buf) or reader.partial:
                    more, eof = reader.pump(limit=32)
                    msgs += more
            except errors.ProtocolError as e:
                self._crash(g, f"protocol violation: {e}")
                return
        for (mtype, seq, _), body in msgs:
            self._guest_step(g, mtype, seq, body)
            if g.closed:
                return
        if reader.failed is not None:
            self._crash(g, f"protocol violation: {reader.failed}")
        elif eof:
            self._guest_eof(g)

    def _fast_write(self, g: GuestEndpoint, seq: int, gfn: int, offset: int, buf, n: int) -> None:
        """One ``G_WRITE`` that came alone in one read (``buf[:n]``): the
        CoW fault path, as one guest step. What :meth:`_guest_step` would
        do, without its general dispatch: a write of a domain that is
        paused or has parked writes, or one that does not fit in its page
        (a protocol violation), goes the general way."""
        t0 = _clock()
        domid = g.domid
        if offset + n - _WRITE_SIZE > _PAGE or domid in self.parked or self.hv.domains[domid].state == "paused":
            self._guest_step(g, _G_WRITE, seq, buf[_HDR_SIZE:n])
            return
        status = value = 0
        try:
            cow = self.hv.write(domid, gfn, offset, buf[_WRITE_SIZE:n])
            g.writes += 1
            if cow:
                value = 1
                g.cow_faults += 1
                self.cow_faults += 1
        except HVError as e:
            if e.code == ENOMEM:
                try:
                    self._park(g, _G_WRITE, seq, buf[_HDR_SIZE:n])
                finally:
                    g.steplog.append(_clock() - t0)
                return
            status = e.code
        except Exception as e:
            traceback.print_exc()
            self._crash(g, f"internal error: {e!r}")
            self.meter.record(_clock() - t0, g.step_name, "guest")
            return
        g.reply(seq, status, value)
        g.steplog.append(_clock() - t0)

    def _guest_step(self, g: GuestEndpoint, mtype: int, seq: int, body) -> None:
        """One guest message, as one timed step. A message the protocol does
        not allow crashes the domain; so does a bug, and the host goes on."""
        t0 = _clock()
        try:
            self._guest_message(g, mtype, seq, body)
        except errors.ProtocolError as e:
            self._crash(g, f"protocol violation: {e}")
        except Exception as e:
            traceback.print_exc()
            self._crash(g, f"internal error: {e!r}")
        finally:
            if g.closed:        # crashed: its log is folded in and gone
                self.meter.record(_clock() - t0, g.step_name, "guest")
            else:
                g.steplog.append(_clock() - t0)

    def _guest_eof(self, g: GuestEndpoint) -> None:
        """EOF on a guest's pipe: a dying process closes its files a moment
        before the kernel has its exit status; wait that moment (bounded,
        once per guest) so that the domain's ``exit`` says how it died."""
        if g.proc.poll() is None:
            try:
                g.proc.wait(timeout=GUEST_EXIT_WAIT)
            except subprocess.TimeoutExpired:
                pass                    # alive without its pipe: reaped later
        self._guest_gone(g)

    def _guest_message(self, g: GuestEndpoint, mtype: int, seq: int, body) -> None:
        if (mtype == pipe.G_WRITE or mtype == pipe.G_WRITE_PAGES or mtype == pipe.G_WRITE_MANY
                or mtype == pipe.G_POPULATE):
            self._guest_write(g, mtype, seq, body)
        elif mtype == pipe.G_DONE:
            self._fuzz_done(g, *pipe.decode_done(body))
        elif mtype == pipe.G_STATS:
            g.reported = pipe.decode_stats(body)
        elif mtype == pipe.G_HELLO:
            if len(body) != pipe.HELLO.size:
                raise errors.ProtocolError("bad hello message")
            g.ready = True
            self._answer_creator(g, None)

    def _guest_write(self, g: GuestEndpoint, mtype: int, seq: int, body) -> None:
        """The one path of a guest's write message, answered on its pipe.

        A domain with parked writes queues this one behind them, in order;
        a paused domain's write waits until the domain is unpaused.
        A write that finds no free frame is parked (:mod:`.parking`): the
        vCPU pauses, the sharing ring says why, and the write is answered
        once frames are free again. ``body`` may be a view of the read
        buffer: it is copied only when the write is parked.
        """
        if g.domid in self.parked:
            self._park(g, mtype, seq, body)
            return
        if self.hv.domains[g.domid].state == "paused":
            self._hold_until_unpause(g, mtype, seq, body)
            return
        status = value = 0
        try:
            value = self._apply_write(g, mtype, body)
        except HVError as e:
            if e.code == ENOMEM:
                self._park(g, mtype, seq, body)
                return
            status = e.code
        g.reply(seq, status, value)

    def _apply_write(self, g: GuestEndpoint, mtype: int, body) -> int:
        """Decode and apply one guest write message; the CoW faults it took.
        Raises HVError (ENOMEM: nothing changed) or ProtocolError."""
        if mtype == pipe.G_WRITE:
            gfn, offset, data = pipe.decode_write(body)
            value = 1 if self.hv.write(g.domid, gfn, offset, data) else 0
        elif mtype == pipe.G_POPULATE:
            # a read fault: not a write, and not a CoW fault
            value = self.hv.fork_populate(g.domid, pipe.decode_populate(body))
            g.read_faults += value
            return value
        elif mtype == pipe.G_WRITE_MANY:
            gfns, offsets, lengths, data = pipe.decode_write_many(body)
            value = int(self.hv.write_many(g.domid, gfns, offsets, lengths, data))
            g.batch_pages += len(gfns)
            g.batch_writes += 1
        else:
            gfns, pages = pipe.decode_write_pages(body)
            value = int(self.hv.write_pages(g.domid, gfns, pages))
            g.batch_pages += len(gfns)
            g.batch_writes += 1
        g.writes += 1
        if value:
            g.cow_faults += value
            self.cow_faults += value
        return value

    def _fuzz_done(self, g: GuestEndpoint, iteration: int, written: int, read: int) -> None:
        """A fuzz guest ended an iteration: the run waiting for it is answered."""
        g.iterations += 1
        waiter = self.fuzz_waiters.pop(g.domid, None)
        if waiter is None:
            return
        c, answer, t0 = waiter
        if c.closed:
            return
        c.waiting = False
        c.reply(schema.ok(**answer, iteration=iteration, pages_written=written, pages_read=read,
                          run_seconds=round(time.perf_counter() - t0, 6)))
        self._serve_backlog(c)

    def _answer_creator(self, g: GuestEndpoint, failure: str | None) -> None:
        c, g.creator = g.creator, None
        if c is None:
            return
        c.waiting = False
        if failure is None:
            d = self.hv.domains[g.domid]
            extra = d.info.pop("answer", {})
            if "started" in extra:          # a fork: also the time until its guest ran
                extra["wall_seconds"] = round(time.monotonic() - extra.pop("started"), 6)
            c.reply(schema.ok(domid=g.domid, pid=g.proc.pid, name=d.name,
                         guest_socket=g.sock_path, **g.config.get("snapshot", {}), **extra))
        else:
            c.reply(schema.error(failure, EINVAL, "EINVAL"))
        self._serve_backlog(c)

    def _detach_guest(self, g: GuestEndpoint) -> None:
        """Close our pipe ends and forget the descriptors (idempotent)."""
        if g.closed:
            return
        g.closed = True
        self.paused_writes.pop(g.domid, None)
        waiter = self.fuzz_waiters.pop(g.domid, None)
        if waiter is not None and not waiter[0].closed:
            c = waiter[0]
            c.waiting = False
            c.reply(schema.error(f"the guest of domain {g.domid} is gone ({g.exit or 'destroyed'}) "
                                 f"before its fuzz iteration ended", errors.ECANCELED, "ECANCELED"))
            self._serve_backlog(c)
        if g.domid in self.parked:
            self._cancel_parked(g.domid, g.exit or "the guest exited")
        self.meter.drop_log("guest", g.step_name)
        self.sel.unregister(g.fd)
        if getattr(g, "_wregistered", False):
            self.sel.unregister(g.wfd)
        os.close(g.fd)
        os.close(g.wfd)
        try:
            os.unlink(g.sock_path)
        except FileNotFoundError:
            pass

    def _guest_gone(self, g: GuestEndpoint) -> None:
        """The guest's pipe hit EOF: its process is exiting or gone."""
        if g.closed:
            return
        self._detach_guest(g)
        d = self.hv.domains.get(g.domid)
        if d is not None and d.state in ("running", "paused"):
            d.state = "crashed"
        g.exit = g.exit or "exited"
        self._reap(g)
        if g.creator is not None:
            parent = self.hv.domains[g.domid].parent if g.domid in self.hv.domains else None
            self.hv.destroy_domain(g.domid)
            self._fork_parent_check(parent)
            self.guests.pop(g.domid, None)
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

    def _crash(self, g: GuestEndpoint, why: str) -> None:
        """Crash a domain: its guest is killed, its memory kept until destroy."""
        d = self.hv.domains.get(g.domid)
        if d is not None and d.state in ("running", "paused"):
            d.state = "crashed"
        g.exit = why
        if g.proc.poll() is None:
            g.proc.kill()
        self._guest_gone(g)
        print(f"hvshare: domain {g.domid} crashed: {why}", file=sys.stderr, flush=True)

    def _stop_guest(self, domid: int) -> None:
        """Stop a domain's guest now and forget its pipes (destroy).

        SIGSTOP stops it at once: from here on it neither reads nor writes.
        Its SIGKILL waits for the next housekeeping tick, because a SIGKILL
        wakes the guest to die and a busy scheduler may run that exit in
        the middle of our step, where the stop costs almost nothing.
        """
        g = self.guests.pop(domid, None)
        if g is None:
            return
        self._cancel_parked(domid, "destroyed")
        if g.proc.poll() is None:
            try:
                os.kill(g.proc.pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
            g.kill_pending = True
        self._detach_guest(g)
        if g.creator is not None:
            self._answer_creator(g, f"domain {domid} was destroyed while its guest started")
        self._reap(g)


def describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with status {rc}"
