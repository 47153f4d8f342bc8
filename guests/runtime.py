"""The guest process: one per running domain (``python -m hvshare.guests.runtime BOOT``).

The hypervisor starts it ahead of need, as a *warm guest*, with two pipe
ends (``rfd`` from the hypervisor, ``wfd`` to it), a third (``ready_fd``)
and a JSON boot config naming the frame pool. It does its imports, maps
the pool, writes one byte on ``ready_fd`` and waits on ``rfd`` for an
``H_CONFIG`` message: the domain it runs (domid, p2m segment, workload,
control socket). Then it

- maps the pool and its own p2m **read-only**: reads come straight from the
  mapping through :class:`hvshare.hvcore.p2m.P2MView`, whose sequence counter makes
  every read consistent while the hypervisor changes the p2m under it; a
  store through the mapping is refused by the kernel (SIGSEGV);
- **writes by message**: ``G_WRITE`` / ``G_WRITE_PAGES`` on its pipe, and
  waits for the answer (a write to a shared page is a CoW fault the
  hypervisor resolves before answering). One request is in flight at a time;
  the thread that sent it reads its answer itself (no hand-off between
  threads, nobody else woken: the fault round trip stays a pipe round trip);
- reads the hypervisor's **asynchronous messages** (pause, unpause,
  shutdown) when the hypervisor rings it with SIGUSR1 (whichever thread the
  kernel picks, the signal's wake-up byte lands on a pipe the main thread
  polls), or on its half-second watch round; a request in flight handles
  any it meets;
- a **fork** reads a gfn it does not have yet through a *read fault*: a
  ``G_POPULATE`` on its pipe (the hypervisor fills the gfn from the fork's
  ancestors), then the read from the mapping again;
- runs its **workload** (``writer``: random pages at a set rate; ``fuzz``:
  one write-and-read iteration per ``H_RUN``) in a thread,
  and sends its counters (writes, CoW faults, fault latency p50/p99) every
  half second when they changed;
- serves a small **control channel** on a Unix socket in the hypervisor's
  0700 state directory, for tests and tools (write, read, checksum, verify,
  stats, ...; see ``hvshare.hvcore.wire.schema.GUEST_OPS``; :mod:`hvshare.guests.channel`);
- **dies with its hypervisor**: the kernel sends it SIGKILL when its parent
  dies (PR_SET_PDEATHSIG), and, should that be missed, EOF on its pipe or a
  changed parent pid ends it within half a second (a warm guest waiting
  for its domain: EOF on its pipe).
"""
from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import sys
import threading
import time

import numpy as np

from hvshare.hvcore import constants
from hvshare.hvcore.forking import die_with_parent
from hvshare.hvcore.errors import EBUSY, EINVAL, NAMES, HVError
from hvshare.hvcore.p2m import HOLE, P2MView
from hvshare.hvcore.shm import attach_readonly
from hvshare.hvcore.wire import pipe

from . import workloads
from .channel import ControlChannel
from .link import HypervisorGone, HypervisorLink, WriteError

_clock = time.perf_counter


class Guest:
    """A domain's guest: its mappings, its link to the hypervisor, counters."""

    def __init__(self, cfg: dict, pool_mm):
        self.cfg = cfg
        self.domid = cfg["domid"]
        self.hv_pid = cfg["hv_pid"]
        self.pool_mm = pool_mm
        self.pool = np.frombuffer(self.pool_mm, dtype=np.uint8).reshape(-1, constants.PAGE_SIZE)
        self.p2m = P2MView(cfg["p2m"])
        self.npages = self.p2m.npages
        self.link = HypervisorLink(cfg["rfd"], cfg["wfd"], self)
        #: a fork reads gfns it does not have yet through read faults
        self.is_fork = bool(cfg.get("fork"))
        #: set by H_RUN: the fuzz workload runs one iteration
        self.run_requested = threading.Event()
        self.read_faults = 0
        self.unpaused = threading.Event()
        if not cfg.get("paused"):
            self.unpaused.set()
        self.alive = True
        self.counters = {"writes": 0, "pages_written": 0, "cow_faults": 0}
        self.fault_lat = workloads.Latencies()
        self.write_lat = workloads.Latencies()
        self._reported: tuple = ()

    # -- the hypervisor's asynchronous messages --------------------------
    def on_async(self, mtype: int) -> None:
        if mtype == pipe.H_PAUSE:
            self.unpaused.clear()
        elif mtype == pipe.H_UNPAUSE:
            self.unpaused.set()
        elif mtype == pipe.H_RUN:
            self.run_requested.set()
        elif mtype == pipe.H_SHUTDOWN:
            _exit(self, 0)

    # -- writes (through the hypervisor) ---------------------------------
    def write(self, gfn: int, offset: int, data: bytes) -> bool:
        """Write ``data`` at ``offset`` of ``gfn``; True if it was a CoW fault."""
        if not 0 <= gfn < self.npages:
            self._check_gfns(gfn, gfn)
        t0 = _clock()
        status, value = self.link.call_write(gfn, offset, data)
        dt = _clock() - t0
        if status:
            self._account(status, value, 1, dt)
        c = self.counters
        c["writes"] += 1
        c["pages_written"] += 1
        self.write_lat.add(dt)
        if value:
            c["cow_faults"] += 1
            self.fault_lat.add(dt)
            return True
        return False

    def write_pages(self, gfns: np.ndarray, pages: np.ndarray) -> int:
        """Write whole pages in one message; returns the CoW faults taken."""
        if len(gfns):
            self._check_gfns(int(np.min(gfns)), int(np.max(gfns)))
        parts = pipe.encode_write_pages(gfns, pages)
        t0 = time.perf_counter()
        status, value = self.link.call(pipe.G_WRITE_PAGES, *parts)
        self._account(status, value, len(gfns), time.perf_counter() - t0)
        return value

    def write_many(self, gfns, offsets, lengths, data) -> int:
        """Many small writes in one message (write ``i``: the next
        ``lengths[i]`` bytes of ``data`` at ``offsets[i]`` of ``gfns[i]``);
        returns the CoW faults taken."""
        if len(gfns):
            self._check_gfns(int(np.min(gfns)), int(np.max(gfns)))
        parts = pipe.encode_write_many(gfns, offsets, lengths, data)
        t0 = time.perf_counter()
        status, value = self.link.call(pipe.G_WRITE_MANY, *parts)
        self._account(status, value, len(gfns), time.perf_counter() - t0)
        return value

    def _check_gfns(self, lo: int, hi: int) -> None:
        # The hypervisor checks too; this only gives the caller a clear sentence.
        if lo < 0 or hi >= self.npages:
            bad = lo if lo < 0 else hi
            raise WriteError(EINVAL, f"gfn {bad} is outside domain {self.domid}'s {self.npages} pages")

    def _account(self, status: int, value: int, pages: int, seconds: float) -> None:
        if status:
            name = NAMES.get(status, str(status))
            why = "is paused" if status == EBUSY else "refused the write"
            raise WriteError(status, f"domain {self.domid} {why} ({name})")
        c = self.counters
        c["writes"] += 1
        c["pages_written"] += pages
        c["cow_faults"] += value
        self.write_lat.add(seconds)
        if value:
            self.fault_lat.add(seconds)

    # -- reads (straight from the mapping) -------------------------------
    def read(self, gfn: int) -> bytes:
        while True:
            try:
                return self.p2m.read_page(self.pool, gfn)
            except HVError:
                if not self._read_fault(np.array([gfn], dtype=np.int64)):
                    raise

    def read_pages(self, gfns) -> np.ndarray:
        gfns = np.asarray(gfns, dtype=np.int64)
        while True:
            try:
                return self.p2m.read_pages(self.pool, gfns)
            except HVError:
                if not self._read_fault(gfns):
                    raise

    def _read_fault(self, gfns: np.ndarray) -> bool:
        """A fork read gfns it does not have: ask the hypervisor to fill
        them from the fork's ancestors (a ``G_POPULATE``, waiting for the
        answer), then the read is tried again; the p2m's change counter
        keeps it consistent. False if there is nothing to ask for (not a
        fork, or a gfn outside the domain): the read's own error stands."""
        if not self.is_fork or not len(gfns) or gfns.min() < 0 or gfns.max() >= self.npages:
            return False
        holes = np.unique(gfns[self.p2m.type[gfns] == HOLE])
        for lo in range(0, len(holes), constants.MAX_BATCH_PAGES):
            part = holes[lo:lo + constants.MAX_BATCH_PAGES]
            status, value = self.link.call(pipe.G_POPULATE, *pipe.encode_populate(part))
            if status:
                raise WriteError(status, f"domain {self.domid} could not read gfn {int(part[0])} "
                                         f"({NAMES.get(status, status)})")
            self.read_faults += value
        return True

    def stats(self) -> dict:
        return {"domid": self.domid, "pid": os.getpid(), "workload": self.cfg["workload"],
                "pages": self.npages, "paused": not self.unpaused.is_set(), **self.counters,
                "fault_p50_us": self.fault_lat.percentile_us(50),
                "fault_p99_us": self.fault_lat.percentile_us(99),
                "write_p50_us": self.write_lat.percentile_us(50),
                "write_p99_us": self.write_lat.percentile_us(99)}

    def report(self) -> None:
        """Send the counters to the hypervisor if they changed (never blocks)."""
        now = tuple(self.counters.values())
        if now != self._reported:
            st = self.stats()
            if self.link.send(pipe.G_STATS, pipe.encode_stats(st), block=False):
                self._reported = now

    # -- the deliberate faults of the control channel --------------------
    def _address(self, gfn: int) -> int:
        if not 0 <= gfn < self.npages:
            raise ValueError(f"gfn {gfn} is outside the domain's {self.npages} pages")
        mfn = max(int(self.p2m.mfn[gfn]), 0)
        return self.pool.ctypes.data + mfn * constants.PAGE_SIZE

    def write_mapping(self, gfn: int) -> dict:
        """Try the ways Python offers to store into the mapping; all must fail."""
        self._address(gfn)
        mfn = max(int(self.p2m.mfn[gfn]), 0)
        errors = []
        try:
            self.pool[mfn, 0] = 1
        except (ValueError, TypeError) as e:
            errors.append(f"numpy: {e}")
        try:
            self.pool_mm[mfn * constants.PAGE_SIZE] = 1
        except (ValueError, TypeError) as e:
            errors.append(f"mmap: {e}")
        return {"refused": len(errors) == 2, "errors": errors}

    def raw_write(self, gfn: int) -> None:
        """Store one byte through the read-only mapping with ctypes: the
        kernel answers with SIGSEGV, which kills this guest and only it."""
        ctypes.memset(self._address(gfn), 0x5A, 1)


def _exit(guest: Guest | None, status: int) -> None:
    if guest is not None:
        try:
            os.unlink(guest.cfg["socket"])
        except OSError:
            pass
    os._exit(status)


def attach_pool(boot: dict):
    """The frame pool, mapped read-only (the same for every guest)."""
    return attach_readonly(boot["pool"])[0]


def boot_of(argv: list[str], module: str) -> dict | int:
    """The boot config of ``python -m hvshare.guests.MODULE BOOT-JSON``, the
    process now set to die with its hypervisor; or the status to exit with
    (a wrong command line, a hypervisor that died before we got here)."""
    if len(argv) != 1:
        print(f"usage: python -m hvshare.guests.{module} BOOT-JSON (the hypervisor starts it)",
              file=sys.stderr)
        return 2
    boot = json.loads(argv[0])
    return boot if die_with_parent(boot["hv_pid"]) else 1


def main(argv: list[str] | None = None) -> int:
    """A guest started on its own (the hypervisor's fallback when its
    zygote cannot fork one): the same start as a forked one."""
    boot = boot_of(sys.argv[1:] if argv is None else argv, "runtime")
    return boot if isinstance(boot, int) else run(boot, attach_pool(boot))


def run(boot: dict, pool_mm) -> int:
    """Say we are warm (one byte on ``ready_fd``: the hypervisor may have
    taken us already and closed its end), wait for our domain, run it."""
    channel = ControlChannel()
    # The hypervisor's doorbell: numpy's threads exist already, so SIGUSR1
    # may hit any thread; the wake-up fd turns it into a readable pipe here.
    bell_r, bell_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(bell_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    bell = select.poll()
    bell.register(bell_r, select.POLLIN)
    try:
        os.write(boot["ready_fd"], b"w")
    except OSError:
        pass
    os.close(boot["ready_fd"])
    cfg = pipe.read_config(boot["rfd"])
    if cfg is None:
        return 0                       # the hypervisor stopped without needing us
    cfg.update(boot)
    guest = Guest(cfg, pool_mm)
    channel.open(guest, cfg["socket"])
    try:
        guest.link.send(pipe.G_HELLO, pipe.HELLO.pack(os.getpid()))
        if cfg["workload"] == "writer":
            threading.Thread(target=_writer, args=(guest,), name="writer", daemon=True).start()
        elif cfg["workload"] == "fuzz":
            threading.Thread(target=_fuzzer, args=(guest,), name="fuzz", daemon=True).start()
        guest.link.drain(block=True)   # what came before we listened for SIGUSR1
        while True:
            rung = bell.poll(500)
            if rung:
                os.read(bell_r, 512)
            if os.getppid() != guest.hv_pid:
                break
            guest.link.drain(block=bool(rung))
            guest.report()
    except HypervisorGone:
        pass
    _exit(guest, 0)
    return 0                            # pragma: no cover


def _writer(guest: Guest) -> None:
    cfg = guest.cfg

    def write_pages(gfns, pages):
        try:
            guest.write_pages(gfns, pages)
        except WriteError:
            time.sleep(0.05)            # paused under us: the next round waits
        except HypervisorGone:
            _exit(guest, 0)

    workloads.run_writer(write_pages, guest.npages, cfg["seed"], cfg["instance"],
                         cfg["rate"], cfg["batch"], lambda: guest.alive, guest.unpaused.wait)


def _fuzzer(guest: Guest) -> None:
    """The fuzz workload: one iteration per H_RUN, then G_DONE."""
    cfg = guest.cfg

    def done(iteration: int, written: int, read: int) -> None:
        guest.link.send(pipe.G_DONE, pipe.DONE.pack(iteration, written, read))

    def write_pages(gfns, pages):
        try:
            guest.write_pages(gfns, pages)
        except WriteError:
            pass                        # refused (a hole in every ancestor): the run goes on

    try:
        workloads.run_fuzz(write_pages, guest.read_pages, done, guest.npages, cfg["seed"],
                           cfg["instance"], cfg.get("fuzz_writes", constants.DEFAULT_FUZZ_WRITES),
                           cfg.get("fuzz_reads", constants.DEFAULT_FUZZ_READS),
                           guest.run_requested, lambda: guest.alive, guest.unpaused.wait)
    except HypervisorGone:
        _exit(guest, 0)


if __name__ == "__main__":
    sys.exit(main())
