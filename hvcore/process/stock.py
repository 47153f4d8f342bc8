"""Warm guests: guest processes started before a domain needs them.

Starting a guest costs an interpreter start and its imports, a few hundred
milliseconds, which a create or a fork would otherwise wait for. The
hypervisor keeps a small stock of guests that are already up, each with
its two pipe ends and the pool mapped (the same for every guest), waiting
on its pipe for an ``H_CONFIG`` message naming its domain. A create or a
fork takes one (:meth:`GuestStock.take`) and sends it its domain; the
guest then only maps its p2m, opens its control channel and says hello.

The stock guests come from the guest zygote (:mod:`hvshare.guests.zygote`),
a process the hypervisor starts once, with the guest's imports done and the
pool mapped, which forks a guest per request. A request is one
non-blocking message carrying the new guest's pipe ends; the zygote forks
it twice over so that the kernel re-parents it to the hypervisor (a child
subreaper, :mod:`hvshare.hvcore.forking`), and answers with its pid. So a
refill costs the hypervisor a ``sendmsg`` and a ``recv`` (no ``fork``: the
``vfork`` of a spawn waits for the child's ``exec``, which a loaded machine
may delay by tens of milliseconds), and the machine a fork instead of an
interpreter start. The stock is refilled one guest per housekeeping tick,
never in a create's or a fork's step. A guest tells it is warm with one
byte on a third pipe; one taken before that simply reads its domain once
it is. An empty stock (a burst of creates), or a dead zygote, spawns the
guest at once with ``python -m hvshare.guests.runtime``: a cold start.

Stock guests die with the hypervisor like any guest (PR_SET_PDEATHSIG, EOF
on their pipe), the zygote too, and :meth:`GuestStock.close` kills and
reaps all of them when it stops.
"""
from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import time

from ..forking import AdoptedProcess, become_subreaper
from ..wire import pipe

#: how long a stopping hypervisor waits for a killed stock guest
REAP_SECONDS = 5.0


class WarmGuest:
    """A started guest without a domain: its process and our pipe ends."""

    __slots__ = ("proc", "rfd", "wfd", "ready_fd", "warm", "spawned")

    def __init__(self, proc, rfd: int, wfd: int, ready_fd: int):
        #: its process (a Popen, or an AdoptedProcess once the zygote named it)
        self.proc = proc
        self.rfd, self.wfd, self.ready_fd = rfd, wfd, ready_fd
        #: it said its imports are done and the pool is mapped
        self.warm = False
        self.spawned = time.monotonic()


def _pipes() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A new guest's pipes: (its ends: rfd, wfd, ready_fd), (ours: rfd, wfd, ready_fd)."""
    g2h_r, g2h_w = os.pipe()
    h2g_r, h2g_w = os.pipe()
    ready_r, ready_w = os.pipe()
    for fd in (g2h_r, h2g_r):
        pipe.set_pipe_size(fd)
    for fd in (g2h_r, h2g_w, ready_r):
        os.set_blocking(fd, False)
    return (h2g_r, g2h_w, ready_w), (g2h_r, h2g_w, ready_r)


def _close(fds) -> None:
    for fd in fds:
        os.close(fd)


def spawn_guest(pool: str) -> WarmGuest:
    """Start a guest process on its own: a cold start (OSError if it cannot).

    Guests and the zygote get a session of their own: a terminal's Ctrl-C
    is for hvctl and a foreground hypervisor, and a guest ends with its
    hypervisor (PR_SET_PDEATHSIG), not with the terminal's process group."""
    theirs, ours = _pipes()
    boot = {"pool": pool, "rfd": theirs[0], "wfd": theirs[1], "ready_fd": theirs[2], "hv_pid": os.getpid()}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "hvshare.guests.runtime", json.dumps(boot)],
                                pass_fds=theirs, stdin=subprocess.DEVNULL, cwd="/",
                                start_new_session=True)
    except BaseException:
        _close(ours)
        raise
    finally:
        _close(theirs)      # only the guest keeps its ends: ours would hide its death
    return WarmGuest(proc, *ours)


class Zygote:
    """The hypervisor's end of the guest zygote: requests, and the pids it names."""

    def __init__(self, pool: str):
        become_subreaper()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        boot = {"pool": pool, "hv_pid": os.getpid(), "sock": theirs.fileno()}
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "hvshare.guests.zygote", json.dumps(boot)],
                                         pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, cwd="/",
                                         start_new_session=True,
                                         env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        mine.setblocking(False)
        self.sock = mine

    def request(self) -> WarmGuest | None:
        """Ask for a guest; its WarmGuest, whose pid comes later (None if
        the zygote cannot take the request now)."""
        theirs, ours = _pipes()
        try:
            socket.send_fds(self.sock, [b"g"], list(theirs))
        except OSError:
            _close(ours)
            return None
        finally:
            _close(theirs)
        return WarmGuest(None, *ours)

    def answer(self) -> int | None:
        """The next pid it names (0: it could not fork; None: nothing yet,
        or the zygote is gone: see :attr:`alive`)."""
        try:
            got = self.sock.recv(8)
        except BlockingIOError:
            return None
        except OSError:
            got = b""
        if len(got) != 8:
            self.alive = False
            return None
        return int.from_bytes(got, "little")

    alive = True

    def close(self) -> subprocess.Popen:
        self.sock.close()
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc


class GuestStock:
    """Up to ``size`` warm guests, handed out oldest warm first.

    Depends on the loop's selector (the zygote's socket, and each stock
    guest's ready pipe until it says it is warm) and the pool's name.
    """

    def __init__(self, sel, pool: str, size: int):
        self.sel, self.pool, self.size = sel, pool, size
        #: stock guests whose process is known, oldest first
        self.guests: list[WarmGuest] = []
        #: asked of the zygote, their pids not named yet (in order)
        self.asked: list[WarmGuest] = []
        #: stock guests that died or were killed, not reaped yet
        self.dead: list = []
        self.zygote: Zygote | None = None
        #: guests handed out warm, handed out still starting, spawned cold
        self.taken_warm = self.taken_starting = self.cold = 0

    def fill(self) -> None:
        """Start the zygote and ask for the whole stock (at start, before
        the hypervisor serves)."""
        if self.size == 0:
            return
        try:
            self.zygote = Zygote(self.pool)
        except OSError:
            self.zygote = None          # every stock guest starts cold
        else:
            self.sel.register(self.zygote.sock, selectors.EVENT_READ, self._named)
        while len(self.guests) + len(self.asked) < self.size:
            if not self._spawn():
                return

    def refill(self) -> bool:
        """Ask for one guest if the stock is short (a housekeeping tick's
        share; whether it asked); drop and reap the stock guests that died."""
        if self.dead:
            self.dead = [p for p in self.dead if p.poll() is None]
        for w in [w for w in self.guests if w.proc.poll() is not None]:
            self.guests.remove(w)       # died waiting (killed): not one to hand out
            self._drop(w)
        return len(self.guests) + len(self.asked) < self.size and self._spawn()

    def take(self) -> WarmGuest:
        """A guest for a new domain: the oldest warm one, else the oldest
        still starting, else a new one (OSError if none can be spawned)."""
        pick = next((w for w in self.guests if w.warm), None) or (self.guests[0] if self.guests else None)
        if pick is None:
            self.cold += 1
            return spawn_guest(self.pool)
        self.guests.remove(pick)
        if pick.warm:
            self.taken_warm += 1
        else:
            self.taken_starting += 1
            self._forget_ready(pick)
        return pick

    def info(self) -> dict:
        return {"size": self.size, "stocked": len(self.guests), "asked": len(self.asked),
                "warm": sum(w.warm for w in self.guests), "pids": [w.proc.pid for w in self.guests],
                "zygote_pid": self.zygote.proc.pid if self.zygote is not None else None,
                "taken_warm": self.taken_warm, "taken_starting": self.taken_starting,
                "cold": self.cold}

    def close(self) -> list:
        """Kill every stock guest and the zygote, close our ends; the
        processes, for the caller to wait for with the others."""
        for w in self.guests + self.asked:
            self._drop(w)
        if self.zygote is not None:
            self._end_zygote()
        procs, self.dead, self.guests = self.dead, [], []
        return procs

    # -- inside ----------------------------------------------------------
    def _spawn(self) -> bool:
        if self.zygote is not None:
            w = self.zygote.request()
            if w is None:
                return False            # its socket is full: the next tick asks again
            self.asked.append(w)
        else:
            try:
                w = spawn_guest(self.pool)
            except OSError:
                return False            # out of processes: the next tick tries again
            self.guests.append(w)
        self.sel.register(w.ready_fd, selectors.EVENT_READ, lambda mask, w=w: self._said(w))
        return True

    def _named(self, mask: int = 0) -> None:
        """The zygote named the pids of guests it forked (or died)."""
        z = self.zygote
        while True:
            pid = z.answer()
            if pid is None:
                break
            if not self.asked:
                continue                # nothing asked: not an answer of ours
            w = self.asked.pop(0)
            if pid:
                w.proc = AdoptedProcess(pid)
                self.guests.append(w)
                if w.ready_fd < 0 and not w.warm:       # it died before it was named
                    self.guests.remove(w)
                    self._drop(w)
            else:
                self._drop(w)
        if not z.alive:
            self._end_zygote()

    def _end_zygote(self) -> None:
        """The zygote is gone (or we stop): guests start cold from now on."""
        z, self.zygote = self.zygote, None
        self.sel.unregister(z.sock)
        for w in self.asked:
            self._drop(w)
        self.asked = []
        self.dead.append(z.close())

    def _said(self, w: WarmGuest) -> None:
        """Its ready pipe: a byte (warm) or EOF (it died while starting)."""
        try:
            got = os.read(w.ready_fd, 1)
        except BlockingIOError:
            return
        except OSError:
            got = b""
        self._forget_ready(w)
        if got:
            w.warm = True
        elif w in self.guests:
            self.guests.remove(w)
            self._drop(w)

    def _forget_ready(self, w: WarmGuest) -> None:
        if w.ready_fd >= 0:
            self.sel.unregister(w.ready_fd)
            os.close(w.ready_fd)
            w.ready_fd = -1

    def _drop(self, w: WarmGuest) -> None:
        self._forget_ready(w)
        if w.rfd >= 0:
            os.close(w.rfd)
            os.close(w.wfd)
            w.rfd = w.wfd = -1
        if w.proc is not None:
            if w.proc.poll() is None:
                w.proc.kill()
            self.dead.append(w.proc)
