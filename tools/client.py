"""Clients of the control sockets: the hypervisor's and each guest's.

:class:`HypervisorClient` speaks the hypervisor's control socket (framed
JSON, :mod:`hvshare.hvcore.wire.control`): the ``hvctl`` operations plus the
sharing hypercalls tests need (nominate, share, range_share, unshare...).
:meth:`HypervisorClient.guest` opens a :class:`GuestClient` on a guest's
own control channel (write, read, checksum, verify, stats, raw_write).
:class:`EventStream` follows the sharing event ring on a connection of its
own.

Each client holds one :class:`Channel`: a blocking connection opened on
first use, one request at a time, its answers read by one
:class:`~hvcore.wire.control.FrameReader`. Every failure arrives as
:class:`~tools.errors.HVCtlError` (:func:`hvshare.tools.errors.check_answer`).
"""
from __future__ import annotations

import os
import socket
import tempfile
import threading
import time

import numpy as np

from hvshare.hvcore.constants import PAGE_SIZE
from hvshare.hvcore.errors import ProtocolError
from hvshare.hvcore.statedir import crash_note
from hvshare.hvcore.wire import control
from hvshare.hvcore.wire.schema import MAX_READ_PAGES

from .errors import GuestGone, HVCtlError, NoHypervisor, check_answer, timed_out

__all__ = ["HypervisorClient", "GuestClient", "EventStream", "Channel", "default_socket_path"]


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


class Channel:
    """A blocking framed connection, opened lazily, one request at a time."""

    def __init__(self, path: str, timeout: float | None, what: str, gone=NoHypervisor):
        self.path, self.timeout, self.what, self.gone = path, timeout, what, gone
        self.sock: socket.socket | None = None
        self.frames: control.FrameReader | None = None
        self.lock = threading.Lock()

    def connect(self) -> socket.socket:
        """A new blocking connection with this channel's timeout."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            note = crash_note(self.path) if self.gone is NoHypervisor else ""
            raise self.gone(f"no {self.what} is running on {self.path}{note}") from None
        except OSError as e:
            s.close()
            raise self.gone(f"cannot reach the {self.what} on {self.path}: {e.strerror or e}") from None
        return s

    def request(self, obj: dict, payload=b"") -> tuple[dict, bytes]:
        with self.lock:
            if self.sock is None:
                self.sock = self.connect()
                self.frames = control.FrameReader(self.sock)
            try:
                control.send_frame(self.sock, obj, payload)
                got = self.frames.next()
            except socket.timeout:
                self.close()
                raise timed_out(f"the {self.what} did not answer {obj.get('op')} "
                                f"within {self.timeout:g} s") from None
            except (ConnectionError, BrokenPipeError, OSError, ProtocolError):
                got = None
            except BaseException:
                # interrupted between the request and its answer: the answer
                # would be read as the next request's, so the connection goes
                self.close()
                raise
            if got is None:
                self.close()
                raise self.gone(f"the {self.what} on {self.path} closed the connection "
                                   f"during {obj.get('op')}")
        answer, data = got
        check_answer(answer)
        answer.pop("ok", None)
        return answer, data

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = self.frames = None


class Requester:
    """Requests over one :class:`Channel` (``self._ch``): what the
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


#: seconds between two looks at a create's progress (HypervisorClient.create_domain)
PROGRESS_INTERVAL = 0.25


def _creating(domains: list, pages: int | None, name: str | None) -> dict | None:
    """The newest domain of ``list`` being created with ``pages`` (and ``name``)."""
    found = [d for d in domains if d.get("state") == "creating" and pages in (None, d["pages"])
             and (name is None or d["name"] == name)]
    return max(found, key=lambda d: d["domid"]) if found else None


class HypervisorClient(Requester):
    """A connection to a hypervisor's control socket."""

    def __init__(self, socket_path: str | None = None, timeout: float | None = 120.0):
        self.socket_path = os.path.abspath(socket_path or default_socket_path())
        self._ch = Channel(self.socket_path, timeout, "hypervisor")

    def open_connection(self, wait: bool = False) -> socket.socket:
        """A new connection of its own to this hypervisor, for requests kept
        in flight (the kill controller's steps, the scanner's batches):
        their answers come back in order. It has this client's timeout, or
        none with ``wait`` (a monolithic teardown step can take minutes)."""
        if wait:
            return Channel(self.socket_path, None, "hypervisor").connect()
        return self._ch.connect()

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

    def create_domain(self, pages: int | None, workload: str = "zero", seed: int = 0, name: str | None = None,
                      paused: bool = False, rate: float | None = None, batch: int | None = None,
                      progress=None, *, from_pid: int | None = None, all_mappings: bool = False,
                      image: str | None = None) -> dict:
        """Like :meth:`create`, with the whole answer (domid, pid, name, guest_socket).

        The hypervisor populates a domain a bounded step at a time and
        answers once its guest runs. ``progress(entry)``, if given, is
        called every PROGRESS_INTERVAL seconds meanwhile with the domain's
        ``list`` entry (state ``creating``, ``populated`` of ``pages``, or
        ``listed``, the pages found while a process's pages are listed),
        read over a second connection.

        ``from_pid``: the memory is a snapshot of that process's present
        anonymous private pages (``all_mappings``: of every mapping);
        ``image``: a file's bytes (raw, or an ELF core's PT_LOAD segments).
        ``pages`` may then be None (the source's size) or cuts it. The
        answer adds source, source_pages, regions, skipped_regions,
        skipped_pages, swapped_pages and lost_pages."""
        args = {k: v for k, v in dict(rate=rate, batch=batch, name=name, pages=pages, from_pid=from_pid,
                                      image=None if image is None else os.path.abspath(image)).items()
                if v is not None}
        if all_mappings:
            args["all_mappings"] = True
        if progress is None:
            return self.call("create", workload=workload, seed=seed, paused=paused, **args)
        out: dict = {}

        def create():
            try:
                out["answer"] = self.call("create", workload=workload, seed=seed, paused=paused, **args)
            except BaseException as e:          # re-raised in the caller's thread
                out["error"] = e
        worker = threading.Thread(target=create, daemon=True)
        worker.start()
        worker.join(PROGRESS_INTERVAL)
        if worker.is_alive():
            with HypervisorClient(self.socket_path, timeout=10) as peek:
                while worker.is_alive():
                    try:
                        entry = _creating(peek.list(), pages, name)
                    except HVCtlError:
                        entry = None
                    if entry is not None:
                        progress(entry)
                    worker.join(PROGRESS_INTERVAL)
        worker.join()
        if "error" in out:
            raise out["error"]
        return out["answer"]

    def destroy(self, domid: int, progress=None, forks: bool = False) -> dict:
        """Destroy a domain to the end with the kill controller
        (:func:`hvshare.tools.killctl.destroy`): domid, seconds, entries,
        continuations, max_pause_ms. ``progress(answer)`` sees every step.
        A domain with forks is refused (EBUSY) unless ``forks``: then its
        forks, and theirs, are destroyed first, deepest first (their
        domids in ``forks_destroyed``)."""
        from .killctl import destroy
        if not forks:
            return destroy(self, domid, progress=progress)
        gone = []
        for child in self.descendants(domid):
            destroy(self, child, progress=progress)
            gone.append(child)
        out = destroy(self, domid, progress=progress)
        out["forks_destroyed"] = gone
        return out

    def descendants(self, domid: int) -> list[int]:
        """The forks of ``domid``, their forks and so on, deepest first."""
        children: dict = {}
        for d in self.list():
            if d.get("parent") is not None:
                children.setdefault(d["parent"], []).append(d["domid"])
        # a walk with a stack of its own: a fork chain can be deeper than
        # Python's recursion limit
        out: list[int] = []
        stack = [(domid, iter(sorted(children.get(domid, []))))]
        while stack:
            node, todo = stack[-1]
            child = next(todo, None)
            if child is not None:
                stack.append((child, iter(sorted(children.get(child, [])))))
                continue
            stack.pop()
            if stack:
                out.append(node)
        return out

    # -- VM fork -----------------------------------------------------------
    def fork(self, parent: int, name: str | None = None, paused: bool = False,
             workload: str | None = None, fuzz_writes: int | None = None,
             fuzz_reads: int | None = None) -> dict:
        """Fork ``parent`` (docs/semantics.md, "VM fork"): a child of its
        size with an empty p2m, filled lazily from its ancestors; the
        parent stays paused while it has forks. Returns domid, parent,
        seconds (the fork's step in the hypervisor), wall_seconds (until
        the child's guest ran), pid, name, guest_socket. ``workload``: the
        child guest's (default: the parent's); ``fuzz_writes`` and
        ``fuzz_reads``: pages a ``fuzz`` run writes and reads."""
        args = {k: v for k, v in dict(name=name, workload=workload, fuzz_writes=fuzz_writes,
                                      fuzz_reads=fuzz_reads).items() if v is not None}
        return self.call("fork", parent=parent, paused=paused, **args)

    def fork_reset(self, domid: int, run: bool = False) -> dict:
        """Drop the fork's private pages, so it reads its parent's again:
        domid, pages_dropped, seconds. ``run``: then one iteration of its
        ``fuzz`` guest, answered when the guest signals it is done (adds
        iteration, pages_written, pages_read, run_seconds)."""
        return self.call("fork_reset", domid=domid, run=run)

    def fuzz_run(self, domid: int) -> dict:
        """One iteration of the ``fuzz`` guest of ``domid``, answered when
        it signals done: domid, iteration, pages_written, pages_read,
        run_seconds."""
        return self.call("fuzz_run", domid=domid)

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

    def sharing_report(self) -> dict:
        """Where the sharing lies (docs/counters.md): frames saved by zero
        and other pages, the degree histogram, the split within and across
        domains, and per domain shr_pages, saved frames and CoW faults."""
        return self.call("sharing_report")

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


class GuestClient(Requester):
    """A connection to one guest's control channel."""

    def __init__(self, path: str, domid: int | None = None, pid: int | None = None,
                 timeout: float | None = 120.0):
        self.path, self.domid, self.pid = path, domid, pid
        self._ch = Channel(path, timeout, f"guest of domain {domid}", GuestGone)


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
        """Pages as the guest reads them from its mapping, ``(k, 4096)``.
        A read larger than one answer can carry is asked for in pieces;
        each piece is one consistent snapshot."""
        gfns = np.ascontiguousarray(gfns, dtype="<i8")
        out = np.empty((len(gfns), PAGE_SIZE), dtype=np.uint8)
        for lo in range(0, len(gfns), MAX_READ_PAGES):
            part = gfns[lo:lo + MAX_READ_PAGES]
            data = self.request("read_pages", part.tobytes(), count=len(part))[1]
            out[lo:lo + len(part)] = np.frombuffer(data, dtype=np.uint8).reshape(len(part), PAGE_SIZE)
        return out

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

    def pipe_send(self, data: bytes, reply: bool = False, pieces: int = 1, gap_us: int = 0,
                  split_seed: int = 0) -> dict:
        """Have the guest put ``data`` verbatim on its pipe to the hypervisor
        (testing what a hostile guest can send); with ``reply`` the answer's
        ``seq``, ``status`` and ``value`` come back. ``pieces``: written in
        that many parts, cut at points ``split_seed`` picks, ``gap_us`` apart."""
        return self.request("pipe_send", bytes(data), reply=reply, pieces=pieces, gap_us=gap_us,
                            split_seed=split_seed)[0]

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
        self.sock = Channel(socket_path, timeout, "hypervisor").connect()
        self.frames = control.FrameReader(self.sock)
        try:
            control.send_frame(self.sock, {"op": "events", "since": since})
            first = self._recv()
        except BaseException:
            self.close()
            raise
        if first is None:
            self.close()
            raise NoHypervisor(f"the hypervisor on {socket_path} closed the connection during events")
        try:
            check_answer(first, "events")
        except HVCtlError:
            self.close()
            raise
        self.subscribed = first

    def _recv(self) -> dict | None:
        try:
            got = self.frames.next()
        except socket.timeout:
            raise timed_out(f"no event within {self.timeout:g} s") from None
        except (ConnectionError, OSError, ProtocolError):
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
                raise timed_out(f"no matching event within {timeout:g} s")
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
