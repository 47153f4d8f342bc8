"""The scanner's seam to a hypervisor: in-process, or over the control socket.

A :class:`Backend` is everything the scanner asks of a hypervisor: the pool
and p2m segments to map, and the two batch hypercalls, nominate_many and
share_many. :class:`InProcessBackend` calls a :class:`hvshare.hvcore.Hypervisor`
directly (unit tests); :class:`SocketBackend` sends the same calls as
budgeted, pipelined requests on a hypervisor process's control socket
(``hvctl dedup``, the demo, runtime tests and benchmarks).

Per-page failures are codes, never exceptions, so one dying guest does not
abort a pass over the others; a hypervisor that stops answering is
:class:`~tools.errors.NoHypervisor` and ends the pass.
"""
from __future__ import annotations

import time
from collections import deque
from socket import timeout as socket_timeout
from typing import TYPE_CHECKING, Callable, Iterable, Protocol

import numpy as np

from hvshare.hvcore.budget import BATCH_OVERRUN, ChunkCost
from hvshare.hvcore.constants import DEDUP_REQUEST_BUDGET_SECONDS
from hvshare.hvcore.errors import ESRCH, HVError, ProtocolError
from hvshare.hvcore.wire import control

from ..client import HypervisorClient
from ..errors import HVCtlError, NoHypervisor, check_answer, timed_out

if TYPE_CHECKING:
    from hvshare.hvcore import Hypervisor

__all__ = ["Backend", "InProcessBackend", "SocketBackend", "SCANNER_OPS", "REQUEST_BUDGET_MS",
           "PIPELINE_DEPTH", "step_delta"]

#: The work time the hypervisor may spend on one batch request (its
#: ``budget_us``) before it answers with what it did, in ms: the dedup
#: request budget, :data:`hvshare.hvcore.constants.DEDUP_REQUEST_BUDGET_SECONDS`
#: (a share of the hypervisor's step budget).
REQUEST_BUDGET_MS = DEDUP_REQUEST_BUDGET_SECONDS * 1e3
#: Batch requests in flight on :class:`SocketBackend`'s connection: with
#: two, the hypervisor starts the next step as soon as it answers one.
PIPELINE_DEPTH = 2
#: Requests carry REQUEST_HEADROOM times the items the hypervisor's step
#: is predicted to do (the op's :class:`~hvcore.budget.ChunkCost`, fitted
#: to the items done and the work time of the answers), so a step never
#: runs out of items; what it leaves goes first in the next request...
REQUEST_HEADROOM = 1.25
#: ... and never fewer items than this (unless fewer are left): a request
#: costs a round trip and the hypervisor's framing, a few more items nothing.
MIN_REQUEST = 64


class Backend(Protocol):
    """What the scanner needs from a hypervisor.

    Per-page failures are codes (Xen's: 0 success, ``EINVAL``, ``E2BIG``,
    ``EBUSY``, ``S_HANDLE_INVALID`` ...), never exceptions; a domain that
    vanished between the scanner's snapshot and the request also yields
    codes (``ESRCH``) rather than an exception, so one dying guest does
    not abort a pass over the others.

    The batch calls take every item of a merge round and send them in
    requests of at most ``limit`` items; ``requests`` counts the requests
    sent and ``max_request_s`` is the longest, as the scanner saw it.
    """

    requests: int
    max_request_s: float

    def pool_name(self) -> str:
        """The frame pool's shared-memory segment name (for attach_readonly)."""

    def domains(self) -> list[tuple[int, str, int]]:
        """``(domid, p2m segment name, npages)`` of every running domain."""

    def nominate_many(self, domid: int, gfns: np.ndarray,
                      limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Nominate gfns of one domain: ``(handles uint64, codes int64)``."""

    def share_many(self, sds: np.ndarray, sgfns: np.ndarray, shs: np.ndarray,
                   cds: np.ndarray, cgfns: np.ndarray, chs: np.ndarray,
                   limit: int | None = None, idle: Callable[[], bool] | None = None) -> np.ndarray:
        """Share pairs ``(sds[i], sgfns[i]) <- (cds[i], cgfns[i])`` (domains
        given per pair); a code per pair. ``idle()``, if given, is other
        work the caller has: a backend that waits for the hypervisor may
        call it while requests are in flight, a slice of that work per call,
        until it returns False (none left)."""

    def nr_saved_mfns(self) -> int:
        """The hypervisor's ``nr_saved_mfns``."""

    # Optional: ``max_pause_ms() -> float``, the hypervisor's longest
    # non-preemptible step so far; reported in PassResult when present.
    # Optional: ``steps() -> dict``, the hypervisor's step accounting
    # (SocketBackend.steps); read before and after a pass, the difference
    # (step_delta) is PassResult.hv_steps.
    # Optional: ``release()``, free what the batch calls hold (a
    # connection); Scanner.close() calls it.


def _chunks(n: int, limit: int | None) -> Iterable[slice]:
    """``[0, n)`` in slices of at most ``limit`` (None: one slice)."""
    step = max(1, limit or n)
    return (slice(lo, lo + step) for lo in range(0, n, step))


class InProcessBackend:
    """A :class:`Backend` over an in-process :class:`hvshare.hvcore.Hypervisor`:
    each request is one core call of ``limit`` items."""

    def __init__(self, hv: "Hypervisor"):
        self.hv = hv
        self.requests = 0
        self.max_request_s = 0.0

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.requests += 1
            self.max_request_s = max(self.max_request_s, time.perf_counter() - t0)

    def pool_name(self) -> str:
        return self.hv.pool.name

    def domains(self) -> list[tuple[int, str, int]]:
        return [(d.domid, d.p2m.name, d.npages) for d in self.hv.domains.values()
                if d.state == "running"]

    def nominate_many(self, domid, gfns, limit=None):
        gfns = np.asarray(gfns, dtype=np.int64)
        handles = np.zeros(len(gfns), dtype=np.uint64)
        codes = np.zeros(len(gfns), dtype=np.int64)
        for sel in _chunks(len(gfns), limit):
            try:
                handles[sel], codes[sel] = self._timed(self.hv.nominate_many, int(domid), gfns[sel])
            except HVError as e:          # the domain is gone: every page fails
                codes[sel] = e.code
        return handles, codes

    def share_many(self, sds, sgfns, shs, cds, cgfns, chs, limit=None, idle=None):
        sds = np.asarray(sds, dtype=np.int64)      # (nothing to wait for: idle not called)
        cds = np.asarray(cds, dtype=np.int64)
        sgfns, shs, cgfns, chs = (np.asarray(a) for a in (sgfns, shs, cgfns, chs))
        codes = np.full(len(sds), ESRCH, dtype=np.int64)
        for sel in _chunks(len(sds), limit):
            # Pairs naming a vanished domain fail alone (the core would
            # refuse the whole request).
            alive = np.array(sorted(self.hv.domains), dtype=np.int64)
            ok = np.isin(sds[sel], alive) & np.isin(cds[sel], alive)
            if ok.any():
                part = codes[sel]
                part[ok] = self._timed(self.hv.share_many, sds[sel][ok], sgfns[sel][ok],
                                       shs[sel][ok], cds[sel][ok], cgfns[sel][ok], chs[sel][ok])
                codes[sel] = part
        return codes

    def nr_saved_mfns(self) -> int:
        return int(self.hv.nr_saved_mfns)


class SocketBackend:
    """A :class:`Backend` over a hypervisor's control socket (``hvctl dedup``).

    - :meth:`pool_name`, :meth:`nr_saved_mfns`, :meth:`max_pause_ms`,
      :meth:`steps`: ``info``;
    - :meth:`domains`: ``list``, keeping ``running`` domains;
    - :meth:`nominate_many`, :meth:`share_many`: a stream of budgeted
      ``nominate_many`` / ``share_many`` requests (:meth:`_stream`) on a
      connection of their own, ``depth`` of them in flight.

    **Budgeted, pipelined requests.** Each batch request carries
    ``budget_us`` (``request_budget_ms``): the hypervisor works on it until
    that much time is spent or other work (a guest's fault) is waiting,
    and answers how many items it did (``done``); the rest are sent again
    at the head of the next request, Xen's "restart" as the kill
    controller knows it. So the hypervisor, which knows its own speed and
    load, bounds every step, and requests can be large: a request's fixed
    cost (framing, parsing, numpy's per-call overhead in the core: 0.2-0.4
    ms) is paid once per step's worth of pages rather than once per 96.
    Requests are sized to what the last steps did (a quarter more, so the
    hypervisor never runs dry within a step) and up to ``depth`` are in
    flight, so the hypervisor never waits for the scanner to encode the
    next one or read the last answer.

    A request refused whole (the domain is gone or dying: ESRCH, EBUSY)
    becomes that code for each of its pages; for ``share_many``, the pairs
    of live domains are sent again and the others get ESRCH.

    A hypervisor that stops answering raises :class:`hvshare.tools.errors.NoHypervisor`,
    which ends a pass (and watch mode): it is not a per-page failure. From
    then on every method raises it too: the scanner maps *this*
    hypervisor's pool, and a new hypervisor on the same socket has other
    frames behind the same numbers.

    ``socket`` is a path (None: the default socket) or an open
    :class:`hvshare.tools.client.HypervisorClient`, which stays the caller's to close.
    """

    def __init__(self, socket=None, request_budget_ms: float | None = REQUEST_BUDGET_MS,
                 depth: int = PIPELINE_DEPTH):
        self._own = not isinstance(socket, HypervisorClient)
        self.client = HypervisorClient(socket) if self._own else socket
        self.gone: str | None = None        # why the hypervisor is gone, once it is
        self.request_budget_ms = request_budget_ms
        self.depth = max(1, int(depth))
        self.requests = 0
        self.max_request_s = 0.0
        self._conn = None                   # the batch requests' connection
        self._frames = None                 # ... and the reader of its answers
        self._cost: dict[str, ChunkCost] = {}   # the hypervisor's steps, by op

    def _request(self, fn, *args):
        if self.gone:
            raise NoHypervisor(self.gone)
        try:
            return fn(*args)
        except NoHypervisor as e:
            self.gone = str(e)
            raise

    def pool_name(self) -> str:
        return self._request(self.client.info)["pool"]

    def domains(self) -> list[tuple[int, str, int]]:
        return [(d["domid"], d["p2m"], d["pages"]) for d in self._request(self.client.list)
                if d["state"] == "running"]

    def nominate_many(self, domid, gfns, limit=None):
        gfns = np.asarray(gfns, dtype=np.int64)
        handles = np.zeros(len(gfns), dtype=np.uint64)
        codes = np.zeros(len(gfns), dtype=np.int64)

        def answer(idx, data):
            k = len(data) // 16
            handles[idx[:k]] = np.frombuffer(data, "<u8", k)
            codes[idx[:k]] = np.frombuffer(data, "<i8", k, 8 * k)

        def refused(idx, e):            # the domain is gone or dying: every page fails
            codes[idx] = e.code
            return None
        self._stream("nominate_many", {"domid": int(domid)}, None, [(gfns, "<i8")], len(gfns),
                     limit, answer, refused)
        return handles, codes

    def share_many(self, sds, sgfns, shs, cds, cgfns, chs, limit=None, idle=None):
        sds = np.asarray(sds, dtype=np.int64)
        cds = np.asarray(cds, dtype=np.int64)
        codes = np.full(len(sds), ESRCH, dtype=np.int64)
        cols = [(sds, "<i8"), (np.asarray(sgfns), "<i8"), (np.asarray(shs), "<u8"),
                (cds, "<i8"), (np.asarray(cgfns), "<i8"), (np.asarray(chs), "<u8")]

        def answer(idx, data):
            k = len(data) // 8
            codes[idx[:k]] = np.frombuffer(data, "<i8", k)

        def refused(idx, e):
            if e.code != ESRCH:
                raise e
            # a domain vanished: its pairs get ESRCH, the others go again
            alive = np.array([d["domid"] for d in self._request(self.client.list)], dtype=np.int64)
            ok = np.isin(sds[idx], alive) & np.isin(cds[idx], alive)
            return idx[ok] if not ok.all() else None
        self._stream("share_many", {}, (sds, cds), cols, len(sds), limit, answer, refused, idle)
        return codes

    def _connection(self):
        """The batch requests' own connection (opened on first use): its
        answers come back in order, several requests may be in flight."""
        if self._conn is None:
            self._conn = self._request(self.client.open_connection)
            self._frames = control.FrameReader(self._conn)
        return self._conn

    def _drop_connection(self) -> None:
        """Close the batch connection (answers still on their way with it)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = self._frames = None

    def _stream(self, op: str, args: dict, domains, cols: list, n: int, limit: int | None,
                answer: Callable, refused: Callable, idle: Callable[[], bool] | None = None) -> None:
        """Items ``[0, n)`` through budgeted ``op`` requests, ``depth`` in flight.

        ``cols`` are the payload's columns (array, wire dtype) indexed by
        item. ``answer(idx, data)`` takes the answer payload for the first
        ``done`` items of request ``idx``; ``refused(idx, error)`` handles
        a request refused whole and returns the items to send again (or
        None). ``domains`` (share_many: source and client domids) lets a
        request whose pairs share one source and one client domain name
        them once. Remainders the hypervisor did not get to are sent first.
        ``idle()`` (the caller's other work, a slice per call, False once
        none is left) runs once before each answer is awaited, while the
        hypervisor works on the requests in flight.
        """
        if n == 0:
            return
        if self.gone:
            raise NoHypervisor(self.gone)
        limit = limit or n
        budget = None if self.request_budget_ms is None else max(1, int(self.request_budget_ms * 1e3))
        cost = self._cost.setdefault(op, ChunkCost())
        sock = self._connection()
        frames = self._frames
        fresh, again, inflight = 0, [], deque()
        try:
            while fresh < n or again or inflight:
                while len(inflight) < self.depth and (fresh < n or again):
                    size = limit if budget is None else min(limit, max(
                        MIN_REQUEST, int(REQUEST_HEADROOM * cost.items(budget * 1e-6,
                                                                       BATCH_OVERRUN * budget * 1e-6))))
                    idx = np.concatenate(again + [np.arange(fresh, min(n, fresh + size))])[:size]
                    held = sum(len(a) for a in again)
                    again = [] if len(idx) >= held else [np.concatenate(again)[len(idx):]]
                    fresh += max(0, len(idx) - held)
                    obj, skip = {"op": op, **args, "count": len(idx)}, ()
                    if domains is not None:
                        s0, c0 = int(domains[0][idx[0]]), int(domains[1][idx[0]])
                        if (domains[0][idx] == s0).all() and (domains[1][idx] == c0).all():
                            obj.update(sd=s0, cd=c0)
                            skip = (0, 3)       # the sds and cds columns
                    if budget is not None:
                        obj["budget_us"] = budget
                    payload = b"".join(np.ascontiguousarray(a[idx], dtype=t).tobytes()
                                       for i, (a, t) in enumerate(cols) if i not in skip)
                    control.send_frame(sock, obj, payload)
                    inflight.append((idx, time.perf_counter()))
                if idle is not None and not idle():
                    idle = None
                idx, t0 = inflight.popleft()
                got = frames.next()
                self.requests += 1
                self.max_request_s = max(self.max_request_s, time.perf_counter() - t0)
                if got is None:
                    raise ConnectionError("closed")
                ans, data = got
                try:
                    check_answer(ans, op)
                except HVCtlError as e:
                    redo = refused(idx, e)
                    if redo is not None and len(redo):
                        again.insert(0, redo)
                    continue
                done = int(ans.get("done", len(idx)))
                answer(idx, data)
                if done and "work_ms" in ans:
                    cost.learn(done, ans["work_ms"] * 1e-3)
                if done < len(idx):         # the step's budget ran out: the rest again
                    again.insert(0, idx[done:])
        except (ConnectionError, OSError, ProtocolError) as e:
            self._drop_connection()
            if isinstance(e, socket_timeout):
                raise timed_out(f"the hypervisor did not answer {op} in time") from None
            self.gone = f"the hypervisor closed the connection during {op}"
            raise NoHypervisor(self.gone) from None
        except BaseException:
            self._drop_connection()         # answers may still be on their way
            raise

    def nr_saved_mfns(self) -> int:
        return int(self._request(self.client.info)["nr_saved_mfns"])

    def max_pause_ms(self) -> float:
        return float(self._request(self.client.info)["max_pause_ms"])

    def steps(self) -> dict:
        """The hypervisor's step accounting now (see :func:`step_delta`)."""
        i = self._request(self.client.info)
        return {"max_pause_ms": i["max_pause_ms"], "histogram": i.get("pause_histogram", []),
                "by_op": i.get("pause_by_op", {})}

    def release(self) -> None:
        """Close the batch requests' connection (a later request opens it
        again); :meth:`Scanner.close` calls this."""
        self._drop_connection()

    def close(self) -> None:
        """Close the batch connection, and the client if this backend opened it."""
        self.release()
        if self._own:
            self.client.close()


#: The requests a pass makes, whose hypervisor-side steps it reports.
SCANNER_OPS = ("nominate_many", "share_many")


def step_delta(before: dict, after: dict) -> dict:
    """The hypervisor's steps between two :meth:`SocketBackend.steps` readings.

    Per scanner request kind (:data:`SCANNER_OPS`) and for ``all`` steps
    (guests' writes and faults, every request): ``count``; ``over_1ms``,
    steps of 1.024 ms or more; ``max_lt_ms``, a bound the longest step of
    the window stayed under (log2 histogram buckets). Per request kind also
    ``mean_ms``, and ``max_ms`` when the kind's longest step ever happened
    in the window (else None: only the bound is known).
    """
    def hist(h):
        return {b["lt_us"]: b["count"] for b in h}

    def window(h0, h1):
        d = {k: v - h0.get(k, 0) for k, v in h1.items() if v - h0.get(k, 0)}
        return {"count": sum(d.values()), "over_1ms": sum(v for k, v in d.items() if k >= 2048),
                "max_lt_ms": max(d) / 1e3 if d else 0.0}

    out = {"all": window(hist(before["histogram"]), hist(after["histogram"]))}
    for op in SCANNER_OPS:
        b0 = before["by_op"].get(op, {"count": 0, "total_ms": 0.0, "max_ms": 0.0, "histogram": []})
        b1 = after["by_op"].get(op)
        if b1 is None:
            continue
        w = window(hist(b0.get("histogram", [])), hist(b1.get("histogram", [])))
        n = b1["count"] - b0["count"]
        w["mean_ms"] = round((b1["total_ms"] - b0["total_ms"]) / n, 3) if n else 0.0
        w["max_ms"] = b1["max_ms"] if b1["max_ms"] > b0["max_ms"] else None
        out[op] = w
    return out


# zero test and hash
