"""Python API of the toolstack: start hypervisors, talk to them and to guests.

Three layers, each usable alone:

- :func:`start_hypervisor` launches ``python -m hvcore.process`` detached (a
  new session, stdio to the state directory's log) and returns once it
  serves, or raises :class:`HVCtlError` with the hypervisor's own reason.
- :class:`HypervisorClient` speaks the control socket (framed JSON, see
  :mod:`hvcore.protocol`): the ``hvctl`` operations plus the sharing
  hypercalls tests need (nominate, share, range_share, unshare, ...).
  :meth:`HypervisorClient.guest` opens a :class:`GuestClient` on a guest's
  own control channel (write, read, checksum, verify, stats, raw_write).
- :func:`hvshare_session` is a context manager that starts a real
  hypervisor on a private socket in a private directory and, on exit (also
  on an exception), stops it and makes sure nothing is left: no process, no
  shared-memory segment, no socket.

Every failure the hypervisor reports arrives as :class:`HVCtlError` with the
hypervisor's one-sentence message and Xen code; a missing hypervisor is
:class:`NoHypervisor`.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator

import numpy as np

from hvcore.wire import control
from hvcore import constants
from hvcore import errors
from hvcore import shm
from hvcore.constants import DEFAULT_FRAMES, SCHED_MODES, TEARDOWN_MODES
from hvcore.process.statedir import child_env, not_a_socket, state_dir_for

__all__ = ["HVCtlError", "NoHypervisor", "GuestGone", "HypervisorClient", "GuestClient", "EventStream",
           "HVSession", "hvshare_session", "start_hypervisor", "default_socket_path", "DEFAULT_FRAMES",
           "TEARDOWN_MODES"]

PAGE_SIZE = constants.PAGE_SIZE
#: where :class:`HVSession` makes its private directories (None: the
#: system's temporary directory); test suites point it at a root they check
SESSION_ROOT: str | None = None


def default_socket_path() -> str:
    """``$HVSHARE_SOCKET``, else the per-user runtime directory's
    ``hvshare/hvshare.sock``, else ``/tmp/hvshare-<uid>/hvshare.sock``."""
    env = os.environ.get("HVSHARE_SOCKET")
    if env:
        return os.path.abspath(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return os.path.join(xdg, "hvshare", "hvshare.sock")
    return os.path.join(tempfile.gettempdir(), f"hvshare-{os.getuid()}", "hvshare.sock")


class HVCtlError(Exception):
    """A request failed; ``str()`` is one sentence, ``code`` the Xen code."""

    def __init__(self, message: str, code: int = 22, code_name: str = "EINVAL"):
        super().__init__(message)
        self.code, self.code_name = code, code_name


class NoHypervisor(HVCtlError):
    """Nothing serves the control socket."""


class GuestGone(HVCtlError):
    """The guest's control channel is closed (the guest is not running)."""


class _Channel:
    """A blocking framed connection, opened lazily, one request at a time."""

    def __init__(self, path: str, timeout: float | None, what: str, gone=NoHypervisor):
        self.path, self.timeout, self.what, self.gone = path, timeout, what, gone
        self.sock: socket.socket | None = None
        self.lock = threading.Lock()

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            raise self.gone(f"no {self.what} is running on {self.path}") from None
        except OSError as e:
            s.close()
            raise self.gone(f"cannot reach the {self.what} on {self.path}: {e.strerror or e}") from None
        return s

    def request(self, obj: dict, payload=b"") -> tuple[dict, bytes]:
        with self.lock:
            if self.sock is None:
                self.sock = self._connect()
            try:
                control.send_frame(self.sock, obj, payload)
                got = control.recv_frame(self.sock)
            except socket.timeout:
                self.close()
                raise HVCtlError(f"the {self.what} did not answer {obj.get('op')} within {self.timeout:g} s",
                                 110, "ETIMEDOUT") from None
            except (ConnectionError, BrokenPipeError, OSError):
                got = None
            if got is None:
                self.close()
                raise self.gone(f"the {self.what} on {self.path} closed the connection "
                                   f"during {obj.get('op')}")
        answer, data = got
        if not answer.get("ok"):
            raise HVCtlError(answer.get("error", "request failed"), answer.get("code", 22),
                             answer.get("code_name", "EINVAL"))
        answer.pop("ok", None)
        return answer, data

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class _Requester:
    """Requests over one :class:`_Channel` (``self._ch``): what the
    hypervisor and guest clients share."""

    def request(self, op: str, payload=b"", **args) -> tuple[dict, bytes]:
        """Send ``op`` with ``args`` (and a binary payload); (answer, payload)."""
        return self._ch.request({"op": op, **args}, payload)

    def call(self, op: str, **args) -> dict:
        return self.request(op, **args)[0]

    def close(self) -> None:
        self._ch.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HypervisorClient(_Requester):
    """A connection to a hypervisor's control socket."""

    def __init__(self, socket_path: str | None = None, timeout: float | None = 120.0):
        self.socket_path = os.path.abspath(socket_path or default_socket_path())
        self._ch = _Channel(self.socket_path, timeout, "hypervisor")

    def open_connection(self, wait: bool = False) -> socket.socket:
        """A new connection of its own to this hypervisor, for requests kept
        in flight (the kill controller's steps, the scanner's batches):
        their answers come back in order. It has this client's timeout, or
        none with ``wait`` (a monolithic teardown step can take minutes)."""
        if wait:
            return _Channel(self.socket_path, None, "hypervisor")._connect()
        return self._ch._connect()

    # -- hvctl operations ------------------------------------------------
    def ping(self) -> int:
        """The hypervisor's pid (raises NoHypervisor if none serves)."""
        return self.call("ping")["pid"]

    def info(self) -> dict:
        return self.call("info")

    def list(self) -> list[dict]:
        return self.call("list")["domains"]

    def domain(self, domid: int) -> dict:
        for d in self.list():
            if d["domid"] == domid:
                return d
        raise HVCtlError(f"no domain with id {domid}", 3, "ESRCH")

    def create(self, pages: int, workload: str = "zero", seed: int = 0, name: str | None = None,
               paused: bool = False, rate: float | None = None, batch: int | None = None) -> int:
        """Create a domain and start its guest; returns the domid."""
        return self.create_domain(pages, workload, seed, name, paused, rate, batch)["domid"]

    def create_domain(self, pages: int, workload: str = "zero", seed: int = 0, name: str | None = None,
                      paused: bool = False, rate: float | None = None, batch: int | None = None) -> dict:
        """Like :meth:`create`, with the whole answer (domid, pid, name, guest_socket)."""
        args = {k: v for k, v in dict(rate=rate, batch=batch, name=name).items() if v is not None}
        return self.call("create", pages=pages, workload=workload, seed=seed, paused=paused, **args)

    def destroy(self, domid: int, progress=None) -> dict:
        """Destroy a domain to the end with the kill controller
        (:func:`tools.killctl.destroy`): domid, seconds, entries,
        continuations, max_pause_ms. ``progress(answer)`` sees every step."""
        from .killctl import destroy
        return destroy(self, domid, progress=progress)

    def destroy_step(self, domid: int) -> dict:
        """One destroy request: one teardown step and its progress
        (``done`` false means "restart": ask again)."""
        return self.call("destroy", domid=domid)

    def pause(self, domid: int) -> dict:
        return self.call("pause", domid=domid)

    def unpause(self, domid: int) -> dict:
        return self.call("unpause", domid=domid)

    def audit(self) -> int:
        return self.call("audit")["errors"]

    def stop(self) -> dict:
        return self.call("stop")

    # -- sharing hypercalls ----------------------------------------------
    def nominate(self, domid: int, gfn: int) -> int:
        return self.call("nominate", domid=domid, gfn=gfn)["handle"]

    def share(self, sd: int, sgfn: int, sh: int, cd: int, cgfn: int, ch: int) -> None:
        self.call("share", sd=sd, sgfn=sgfn, sh=sh, cd=cd, cgfn=cgfn, ch=ch)

    def add_to_physmap(self, sd: int, sgfn: int, sh: int, cd: int, cgfn: int) -> None:
        self.call("add_to_physmap", sd=sd, sgfn=sgfn, sh=sh, cd=cd, cgfn=cgfn)

    def range_share(self, sd: int, cd: int, first: int, last: int) -> int:
        """Share gfns first..last (inclusive) of both domains; pages shared."""
        return self.call("range_share", sd=sd, cd=cd, first=first, last=last)["shared"]

    def unshare(self, domid: int, gfn: int) -> bool:
        return self.call("unshare", domid=domid, gfn=gfn)["copied"]

    def read(self, domid: int, gfn: int) -> bytes:
        """A page as the hypervisor sees it (no guest involved)."""
        return self.request("read", domid=domid, gfn=gfn)[1]

    def nominate_many(self, domid: int, gfns) -> tuple[np.ndarray, np.ndarray]:
        gfns = np.ascontiguousarray(gfns, dtype="<i8")
        ans, data = self.request("nominate_many", gfns.tobytes(), domid=domid, count=len(gfns))
        self.last_work_ms = ans.get("work_ms")
        k = len(gfns)
        return (np.frombuffer(data, "<u8", k).astype(np.uint64),
                np.frombuffer(data, "<i8", k, 8 * k).astype(np.int64))

    def share_many(self, sd, sgfns, shs, cd, cgfns, chs) -> np.ndarray:
        """Share pairs (sd, sgfn) <- (cd, cgfn) in one request; a code per
        pair. ``sd`` and ``cd`` are a domid each, or arrays (one per pair)."""
        if np.ndim(sd) == 0 and np.ndim(cd) == 0:
            spec = ((sgfns, "<i8"), (shs, "<u8"), (cgfns, "<i8"), (chs, "<u8"))
            args = {"sd": int(sd), "cd": int(cd)}
        else:
            n = len(np.atleast_1d(sgfns))
            spec = ((np.broadcast_to(sd, (n,)), "<i8"), (sgfns, "<i8"), (shs, "<u8"),
                    (np.broadcast_to(cd, (n,)), "<i8"), (cgfns, "<i8"), (chs, "<u8"))
            args = {}
        arrays = [np.ascontiguousarray(a, dtype=t) for a, t in spec]
        payload = b"".join(a.tobytes() for a in arrays)
        ans, data = self.request("share_many", payload, count=len(arrays[0]), **args)
        self.last_work_ms = ans.get("work_ms")
        return np.frombuffer(data, "<i8").astype(np.int64)

    # -- the sharing event ring -------------------------------------------
    def events(self, since: int | None = 0, timeout: float | None = None) -> "EventStream":
        """Subscribe to the sharing event ring on a connection of its own:
        an :class:`EventStream` of the retained events after ``since``
        (None: only new ones), then every new event (``enomem``,
        ``resumed``, ``cancelled``)."""
        return EventStream(self.socket_path, since, timeout)

    # -- guests ----------------------------------------------------------
    def guest(self, domid: int) -> "GuestClient":
        """A client of the guest of ``domid``'s control channel."""
        d = self.domain(domid)
        if not d.get("guest_socket"):
            raise HVCtlError(f"domain {domid} has no running guest ({d['state']})", 3, "ESRCH")
        return GuestClient(d["guest_socket"], domid=domid, pid=d["pid"])


class GuestClient(_Requester):
    """A connection to one guest's control channel."""

    def __init__(self, path: str, domid: int | None = None, pid: int | None = None,
                 timeout: float | None = 120.0):
        self.path, self.domid, self.pid = path, domid, pid
        self._ch = _Channel(path, timeout, f"guest of domain {domid}", GuestGone)


    def write(self, gfn: int, data: bytes, offset: int = 0) -> bool:
        """Write through the hypervisor; True if it was a CoW fault."""
        return self.request("write", bytes(data), gfn=gfn, offset=offset)[0]["cow"]

    def write_pages(self, gfns, pages) -> int:
        """Write whole pages in one batched message; CoW faults taken."""
        gfns = np.ascontiguousarray(gfns, dtype="<i8")
        pages = np.ascontiguousarray(pages, dtype=np.uint8).reshape(len(gfns), PAGE_SIZE)
        payload = gfns.tobytes() + pages.tobytes()
        return self.request("write_pages", payload, count=len(gfns))[0]["cow_faults"]

    def read(self, gfn: int) -> bytes:
        """A page as the guest reads it from its own mapping."""
        return self.request("read", gfn=gfn)[1]

    def read_pages(self, gfns) -> np.ndarray:
        gfns = np.ascontiguousarray(gfns, dtype="<i8")
        data = self.request("read_pages", gfns.tobytes(), count=len(gfns))[1]
        return np.frombuffer(data, dtype=np.uint8).reshape(len(gfns), PAGE_SIZE)

    def checksum(self, first: int, count: int) -> np.ndarray:
        """A 64-bit checksum of each of pages first..first+count-1."""
        return np.frombuffer(self.request("checksum", first=first, count=count)[1], "<u8").astype(np.uint64)

    def verify(self, first: int, count: int, rounds: int = 1, seconds: float = 0.0) -> dict:
        """Re-read pages for ``rounds`` (or ``seconds``), counting torn ones."""
        return self.call("verify", first=first, count=count, rounds=rounds, seconds=seconds)

    def stats(self) -> dict:
        return self.call("stats")

    def time_writes(self, first: int, count: int, size: int = 1) -> np.ndarray:
        """The guest writes ``size`` bytes to each of ``count`` gfns from
        ``first``, timing each round trip itself: int64 ns per write."""
        data = self.request("time_writes", first=first, count=count, size=size)[1]
        return np.frombuffer(data, "<i8").astype(np.int64)

    def time_write_pages(self, first: int, count: int, batch: int = 1024) -> dict:
        """The guest writes whole pages, ``batch`` per message, and times the
        run: seconds, pages, messages, cow_faults."""
        return self.call("time_write_pages", first=first, count=count, batch=batch)

    def write_many(self, gfns, offsets, lengths, data) -> int:
        """Many small writes in one batched message: write ``i`` puts the
        next ``lengths[i]`` bytes of ``data`` at ``offsets[i]`` of
        ``gfns[i]``, in order. CoW faults taken."""
        gfns = np.ascontiguousarray(gfns, dtype="<i8")
        offsets = np.ascontiguousarray(offsets, dtype="<u4")
        lengths = np.ascontiguousarray(lengths, dtype="<u4")
        payload = gfns.tobytes() + offsets.tobytes() + lengths.tobytes() + bytes(data)
        return self.request("write_many", payload, count=len(gfns))[0]["cow_faults"]

    def time_write_many(self, first: int, count: int, batch: int = 1024, size: int = 1,
                        offset: int = 0) -> dict:
        """The guest writes ``size`` bytes at ``offset`` of each page,
        ``batch`` writes per message, and times the run: seconds, pages,
        messages, cow_faults."""
        return self.call("time_write_many", first=first, count=count, batch=batch, size=size,
                         offset=offset)

    def write_mapping(self, gfn: int) -> dict:
        """Try to store through the read-only mapping from Python (refused)."""
        return self.call("write_mapping", gfn=gfn)

    def pipe_send(self, data: bytes, reply: bool = False) -> dict:
        """Have the guest put ``data`` verbatim on its pipe to the hypervisor
        (testing what a hostile guest can send); with ``reply`` the answer's
        ``seq``, ``status`` and ``value`` come back."""
        return self.request("pipe_send", bytes(data), reply=reply)[0]

    def raw_write(self, gfn: int) -> None:
        """Store through the mapping with ctypes: the guest dies of SIGSEGV."""
        try:
            self.request("raw_write", gfn=gfn)
        except GuestGone:
            return                      # the connection died with the guest
        raise HVCtlError(f"the guest of domain {self.domid} survived a write to its read-only mapping")


class EventStream:
    """A subscription to the hypervisor's sharing event ring.

    Iterating yields one event dict at a time, blocking until the next
    (``timeout``: raise :class:`HVCtlError` ETIMEDOUT when none came in time),
    and ends when the hypervisor closes the connection (it stopped).
    ``subscribed`` is the first answer: ``seq`` (the ring's last sequence
    number) and ``parked`` (domids waiting for memory right now).
    """

    def __init__(self, socket_path: str, since: int | None = 0, timeout: float | None = None):
        self.socket_path, self.timeout = socket_path, timeout
        self.sock = _Channel(socket_path, timeout, "hypervisor")._connect()
        try:
            control.send_frame(self.sock, {"op": "events", "since": since})
            first = self._recv()
        except BaseException:
            self.close()
            raise
        if first is None:
            self.close()
            raise NoHypervisor(f"the hypervisor on {socket_path} closed the connection during events")
        if not first.get("ok"):
            self.close()
            raise HVCtlError(first.get("error", "events refused"), first.get("code", 22),
                             first.get("code_name", "EINVAL"))
        self.subscribed = first

    def _recv(self) -> dict | None:
        try:
            got = control.recv_frame(self.sock)
        except socket.timeout:
            raise HVCtlError(f"no event within {self.timeout:g} s", 110, "ETIMEDOUT") from None
        except (ConnectionError, OSError, errors.ProtocolError):
            return None
        return None if got is None else got[0]

    def next(self, timeout: float | None = None) -> dict | None:
        """The next event (None once the hypervisor closed the stream)."""
        if timeout is not None:
            self.sock.settimeout(timeout)
            self.timeout = timeout
        return self._recv()

    def wait_for(self, pred, timeout: float = 10.0) -> dict:
        """Skip events until ``pred(event)`` is true; that event."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise HVCtlError(f"no matching event within {timeout:g} s", 110, "ETIMEDOUT")
            ev = self.next(left)
            if ev is None:
                raise NoHypervisor(f"the hypervisor on {self.socket_path} closed the event stream")
            if pred(ev):
                return ev

    def __iter__(self):
        while True:
            ev = self._recv()
            if ev is None:
                return
            yield ev

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------
# launching


def running_pid(socket_path: str) -> int | None:
    """The pid of the hypervisor serving ``socket_path``, or None."""
    try:
        with HypervisorClient(socket_path, timeout=10) as c:
            return c.ping()
    except NoHypervisor:
        return None


def start_hypervisor(socket_path: str | None = None, frames: int = DEFAULT_FRAMES,
                     rmap: str = "buckets", teardown: str = "preemptible",
                     timeout: float = 60.0, sched: str = "fifo") -> subprocess.Popen:
    """Start a detached hypervisor and return once it serves.

    The caller owns the returned Popen only to reap it (it runs in its own
    session, so a terminal's Ctrl-C does not reach it). Raises HVCtlError
    when it cannot start, with the hypervisor's reason.
    """
    socket_path = os.path.abspath(socket_path or default_socket_path())
    refused = not_a_socket(socket_path)
    if refused:
        raise HVCtlError(refused)
    pid = running_pid(socket_path)
    if pid is not None:
        raise HVCtlError(f"a hypervisor (pid {pid}) is already running on {socket_path}", 16, "EBUSY")
    state = state_dir_for(socket_path)
    os.makedirs(os.path.dirname(socket_path), mode=0o700, exist_ok=True)
    os.makedirs(state, mode=0o700, exist_ok=True)
    log_path = os.path.join(state, "hypervisor.log")
    ready_r, ready_w = os.pipe()
    with open(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
        cmd = [sys.executable, "-m", "hvcore.process", "--socket", socket_path, "--frames", str(frames),
               "--rmap", rmap, "--teardown", teardown, "--sched", sched, "--ready-fd", str(ready_w)]
        try:
            proc = subprocess.Popen(cmd, pass_fds=(ready_w,), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log, start_new_session=True, env=child_env(), cwd="/")
        finally:
            os.close(ready_w)
    try:
        line = _read_line(ready_r, timeout)
    finally:
        os.close(ready_r)
    if line.startswith("ready "):
        # "ready PID {leftovers removed}"
        try:
            proc.cleaned = json.loads(line.split(" ", 2)[2])
        except (IndexError, ValueError):
            proc.cleaned = None
        return proc
    if proc.poll() is None and not line:
        proc.kill()
    proc.wait()
    reason = line[len("error "):] if line.startswith("error ") else _log_tail(log_path) or \
        f"the hypervisor exited with status {proc.returncode} before serving"
    if not line.startswith("error ") or "already running" not in reason:
        _remove_unowned_state(socket_path)
    raise HVCtlError(reason, 16 if "already running" in reason else 22,
                     "EBUSY" if "already running" in reason else "EINVAL")


def _read_line(fd: int, timeout: float) -> str:
    buf = b""
    end = time.monotonic() + timeout
    while b"\n" not in buf:
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").strip()


def _log_tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _remove_unowned_state(socket_path: str) -> None:
    """Remove a state directory no live hypervisor holds (a failed start)."""
    state = state_dir_for(socket_path)
    pidfile = os.path.join(state, "hypervisor.pid")
    try:
        fd = os.open(pidfile, os.O_RDONLY)
    except FileNotFoundError:
        fd = None
    except OSError:
        return
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return                  # alive: not ours to touch
        shutil.rmtree(state, ignore_errors=True)
    finally:
        if fd is not None:
            os.close(fd)


def cleanup_dead(socket_path: str) -> dict | None:
    """Remove a dead hypervisor's leftovers at ``socket_path`` (None if a
    hypervisor is alive there)."""
    from hvcore.process.statedir import cleanup_leftovers
    refused = not_a_socket(socket_path)
    if refused:
        raise HVCtlError(refused)
    if running_pid(socket_path) is not None:
        return None
    state = state_dir_for(socket_path)
    if os.path.isdir(state):
        pidfile = os.path.join(state, "hypervisor.pid")
        if os.path.exists(pidfile):
            fd = os.open(pidfile, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None             # starting up right now
            try:
                removed = cleanup_leftovers(socket_path)
                shutil.rmtree(state, ignore_errors=True)
            finally:
                os.close(fd)
            return removed
    return cleanup_leftovers(socket_path)


# ----------------------------------------------------------------------
# sessions


class HVSession(HypervisorClient):
    """A hypervisor this process started on a private socket; :meth:`close`
    stops it and removes every trace (processes, segments, files)."""

    def __init__(self, frames: int = 4096, rmap: str = "buckets", teardown: str = "preemptible",
                 directory: str | None = None, timeout: float | None = 120.0, sched: str = "fifo"):
        self._own_dir = directory is None
        # Short paths: a Unix socket path must fit in 107 bytes.
        root = SESSION_ROOT or ("/tmp" if os.path.isdir("/tmp") else None)
        self.directory = directory or tempfile.mkdtemp(prefix="hvs-", dir=root)
        super().__init__(os.path.join(self.directory, "hv.sock"), timeout=timeout)
        self.frames, self.rmap, self.teardown = frames, rmap, teardown
        self._guest_pids: set[int] = set()
        try:
            self.process = start_hypervisor(self.socket_path, frames, rmap, teardown, sched=sched)
        except BaseException:
            if self._own_dir:
                shutil.rmtree(self.directory, ignore_errors=True)
            raise
        self.pid = self.process.pid

    def create_domain(self, *a, **kw) -> dict:
        answer = super().create_domain(*a, **kw)
        self._guest_pids.add(answer["pid"])
        return answer

    def guest_pids(self) -> set[int]:
        """Pids of every guest this session saw (dead ones included)."""
        return set(self._guest_pids)

    def close(self) -> None:
        """Stop the hypervisor (killing it if it does not answer), wait for
        every process, unlink its segments, remove its files."""
        try:
            self._guest_pids |= {d["pid"] for d in self.list() if d.get("pid")}
            self.stop()
        except (HVCtlError, OSError):
            pass
        super().close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        _wait_gone(self._guest_pids, 3.0)
        for name in shm.list_segments():
            if shm.owner_pid(name) == self.pid:
                shm.unlink(name)
        for path in (self.socket_path,):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        shutil.rmtree(state_dir_for(self.socket_path), ignore_errors=True)
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __exit__(self, *exc):
        self.close()


def _wait_gone(pids: set[int], timeout: float) -> None:
    """Wait for processes to exit; SIGKILL the ones still there at the end."""
    import psutil
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(alive, timeout=2)


@contextlib.contextmanager
def hvshare_session(frames: int = 4096, rmap: str = "buckets", teardown: str = "preemptible",
                    directory: str | None = None, sched: str = "fifo") -> Iterator[HVSession]:
    """A real hypervisor process on a private socket, gone on exit::

        with hvshare_session(frames=8192) as hv:
            a = hv.create(pages=256, workload="clone", seed=1)
            b = hv.create(pages=256, workload="clone", seed=1)
            hv.range_share(a, b, 0, 255)
            hv.guest(b).write(0, b"new")      # a CoW fault
    """
    s = HVSession(frames, rmap, teardown, directory, sched=sched)
    try:
        yield s
    finally:
        s.close()
