"""The content-based dedup scanner: the toolstack part of memory sharing.

Xen shares only what the toolstack tells it to (docs/semantics.md): it never
looks at page contents, it trusts the caller to name identical pages, and it
makes that trust safe with handles -- nominate makes a page read-only and
gives it a version, and a share whose handle is stale fails. This module is
the caller that finds the identical pages, in the spirit of VMware ESX's
transparent page sharing (hash, then full compare) and Linux KSM
(``mm/ksm.c``: periodic scans, checksums to skip pages that keep changing).

What the scanner sees
---------------------
It needs no help from the hypervisor to read memory: it maps the frame pool
read-only (:func:`hvcore.shm.attach_readonly`) and each running domain's p2m
(:class:`hvcore.p2m.P2MView`), exactly as a guest maps its own. A pass takes
a consistent snapshot of every p2m (type and mfn of each gfn, under the p2m's
seqlock) and from it:

- **candidates** are private (``ram_rw``) gfns of the domains being scanned;
- **targets** are frames already shared (``ram_shared``) by any running
  domain, one entry per frame, represented by one (domid, gfn) that maps it.

Everything it talks to the hypervisor about goes through a :class:`Backend`:
:class:`InProcessBackend` calls a :class:`hvcore.Hypervisor` directly (unit
tests); :class:`SocketBackend` sends the same calls as requests on a
hypervisor process's control socket (``hvctl dedup``, the demo, runtime
tests and benchmarks), one request per call.

A pass, phase by phase
----------------------
1. **Snapshot** (:meth:`Scanner.plan`): copy each p2m's type and mfn arrays
   between two equal, even reads of its sequence counter.
2. **Hash.** Zero pages are the common case and are found without hashing:
   a page whose first 8-byte word is nonzero is not zero (one gathered word
   per page); the rest are tested whole with ``any()`` over the page's 512
   words, in chunks, on a slice of the mapping rather than a copy where the
   frames are contiguous. Other pages are hashed with **xxh3_64** (the
   ``xxhash`` package), one C call per page over a ``memoryview`` slice of
   the mapping, frames visited in mfn order. Measured on this machine over
   50,000 pages of the clone mix, side by side, 15 repeats: xxh3 median
   72 ms (best 33 ms), a vectorised numpy multiply-and-sum hash of the 512
   words (chunks of 512 pages, the fastest chunk size) median 84 ms (best
   42 ms); on 50,000 identical pages 49 ms against 61 ms. The numpy hash
   must gather every frame into a temporary first; xxh3 reads the mapping in
   place, so it is kept. Its per-page Python loop does nothing but the C
   call: a page already in cache hashes in 0.4 us, call included; the rest
   of the ~1 us per page is reading the frame from memory.
   Shared frames are hashed once per full scan (their contents cannot
   change while they stay shared) and kept in an mfn-indexed cache.
3. **Volatility** (KSM's ``oldchecksum``): each scanned (domid, gfn) keeps
   the checksum it had at its last scan (a shared gfn: its frame's hash). A
   private page whose checksum changed since is being written and is skipped
   this pass (``pages_volatile``); it becomes a candidate again once it holds
   still for one pass. A page never seen before is not volatile, so a single
   pass (``hvctl dedup``) merges everything it can.
4. **Group** (numpy sort, no Python loop): entries are sorted by (hash,
   shared first, most references first); a group of equal hashes with at
   least two entries, one of them a candidate, is kept. Its first entry is
   the **source**, preferably an already-shared frame, the one with the
   most references (share moves the client's rmap entries, so the biggest
   rmap is never the one moved); the others are its members.
   Candidates in no group are ``pages_unshared``.
5. **Merge** (:meth:`Scanner.execute`), in rounds of ``round_pages``
   members:

   a. *nominate* every member and source of the round, per domain
      (``nominate_many`` takes one domain; nominating a shared page
      returns its handle);
   b. re-read those p2m entries: a page no longer ``ram_shared`` was written
      since nominate (CoW) and its handle is already stale: skipped;
   c. **verify** byte equality of each member with its source, on the
      frames: one C-level copy and compare per page (``bytes ==``), pairs
      visited by source so a source with many members is read once. Hash
      equality is never trusted. Members that differ (a hash collision, or
      a write between hashing and nominate) are regrouped by exact content
      (``np.unique`` over the page bytes) and merged with their true twins
      of the same round;
   d. *share* the verified pairs, one backend call per client domain,
      pairs ordered by source: the hypervisor's fixed cost of a request
      grows with the domains it names (two numpy calls each, more in the
      rmap), and a request naming one source and one client domain takes
      the core's shortest path. Measured in a soak (8 writer guests, a pass
      after another): share steps of 0.8 ms median work, 40% of them 1 ms
      or more, with requests spanning the guests; 0.5 ms and 2% with one
      client domain per request.

   Each of a and d is one call on the backend, which sends it as requests
   of at most ``batch_pages`` pairs (``NOMINATE_FACTOR`` times as many
   gfns for nominate): through a hypervisor process, budgeted and
   pipelined requests (below). Rounds exist so that the scanner's own
   work (snapshot, verify) is done once per round, not once per request.

Why no page can be merged with different content: the bytes are compared
after nominate made both pages read-only, and each handle is the version
under which they were compared, however long the round takes. A guest
write after nominate unshares the page (a CoW fault), which retires the
handle, so the share of that pair fails (``S``/``C_HANDLE_INVALID``) and
the page is simply skipped (``skipped``, counted volatile). Reading the
frames without the seqlock is therefore safe: a torn read can only produce
a failed compare or a stale-handle share.

Nominate has a cost the toolstack accepts, as Xen's does: a member whose
verification finds no twin stays nominated (a shared frame with one gfn) --
harmless, and its next write is a cheap last-gfn unshare with no copy.

Steps and requests
------------------
The hypervisor is one CPU: while it serves one request nothing else runs
(no guest's fault, no other request), so every step of its must stay
short: the goal is under 1 ms. It times each of its steps per kind of
request (``info``'s ``pause_by_op``), and each pass reports the steps of
its own window (``PassResult.hv_steps``; ``hvctl dedup`` prints the
longest).

So the hypervisor bounds the steps itself, as a preemptible teardown
does: a ``nominate_many`` or ``share_many`` request carries ``budget_us``
(:data:`STEP_BUDGET_MS`), the hypervisor does the items in order until
that much work time is spent or a guest's fault waits, and answers how
many it did; :class:`SocketBackend` sends the rest again at the head of
its next request ("restart"). The hypervisor sizes the step's chunk from
its own cost model of the op (a fixed part, 0.1-0.5 ms of numpy calls per
core call, plus 1-5 us per page, fitted over the last chunks), so a step
is one call into the core that about fills the budget, whatever the load
and the content; fixed request sizes chosen by the scanner (96 pairs
before) made the clone mix's shares 1-2 ms under load and most requests
far too small when quiet. Requests are sized by what the last steps did
(a quarter more), and two are in flight on the backend's own connection,
so the hypervisor starts the next step as soon as it answers one. The
hypervisor also keeps the frames a batch makes out of its cycle
collector's passes (``gc.freeze``): left young, a pass's 50,000 rmap
frames triggered collections of 0.6-5 ms in the middle of later steps.

Measured with ``python -m perf dedup`` (50,000 pages, identical in one
guest, the clone mix over four; the merge rate next to Linux KSM merging
the same bytes in the same run) and ``python -m perf soak``: see the
README's performance section. On this 2-core machine a request's fixed
cost doubles or triples when other processes load it, and with it the
number of steps a pass needs.

Watch mode
----------
:meth:`Scanner.watch` is ksmd: every ``interval`` seconds it scans the next
``pages_per_second * interval`` gfns (a cursor over the running domains in
domid order, like KSM's ``pages_to_scan`` per ``sleep_millisecs``), so the
scan never runs faster than the rate limit; each wrap of the cursor is a
full scan. A window's candidates are also grouped with private pages of
earlier windows whose remembered checksums match (KSM's unstable tree);
those are re-hashed before they are used. A stop request is honoured
between merge rounds; ``hvctl dedup --watch`` sets it on SIGINT/SIGTERM,
and ends when the backend raises (the hypervisor is gone).

Tunables
--------
- ``batch_pages`` (:class:`Scanner` argument, ``hvctl dedup --batch``,
  default :data:`BATCH_PAGES` = 1024): most pairs per ``share_many``
  request; a cap, the hypervisor's step budget decides a step's size.
- :data:`NOMINATE_FACTOR` (module constant, 3): a ``nominate_many``
  request carries up to ``NOMINATE_FACTOR * batch_pages`` gfns.
- ``step_budget_ms`` and ``depth`` (:class:`SocketBackend` arguments,
  defaults :data:`STEP_BUDGET_MS` = 0.5 and :data:`PIPELINE_DEPTH` = 2):
  the work time the hypervisor may spend on one batch request (None: no
  budget, a request is one step however long), and requests in flight.
- ``round_pages`` (:class:`Scanner` argument, default :data:`ROUND_PAGES`
  = 4096): members nominated, verified and shared together; bounds the
  scanner's temporaries and how long a nominated page waits for its share.
- ``skip_volatile`` (:class:`Scanner` argument, default True): skip pages
  whose checksum changed since their last scan.
- ``interval`` and ``pages_per_second`` (:meth:`Scanner.watch` arguments,
  ``hvctl dedup --watch --interval/--rate``, defaults
  :data:`WATCH_INTERVAL` = 0.1 s and :data:`WATCH_PAGES_PER_SECOND` =
  200,000): watch mode's tick and rate limit.
- :data:`CHUNK_PAGES` (module constant, 1024): pages per vectorised chunk
  of the zero test (bounds temporaries to 4 MiB).

Counters (:attr:`Scanner.counters`, KSM's names where they exist)
-----------------------------------------------------------------
- ``pages_shared``: shared frames mapped by running domains, after the last
  pass (KSM: KSM pages in use);
- ``pages_sharing``: gfns mapping those frames beyond the first of each,
  i.e. frames saved (equals ``nr_saved_mfns`` when every sharing domain is
  running);
- ``pages_unshared``: private pages whose last scan found no identical page;
- ``pages_volatile``: private pages whose last scan found them changing
  (checksum moved, or written while being merged);
- ``full_scans``: passes that covered every gfn of the scanned domains;
- ``pages_scanned``, ``pages_merged``, ``pages_skipped``, ``passes``:
  running totals over the scanner's life.

Each :class:`PassResult` also carries, from a backend that has ``steps()``
(:class:`SocketBackend`), ``hv_steps``: the hypervisor's own timing of the
steps it ran during the pass (:func:`step_delta`).
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from socket import timeout as socket_timeout
from typing import TYPE_CHECKING, Callable, Iterable, Protocol

import numpy as np
import posix_ipc
import xxhash

from hvcore.wire import control
from hvcore import shm
from hvcore.errors import C_HANDLE_INVALID, ESRCH, S_HANDLE_INVALID, HVError
from hvcore.p2m import RAM_RW, RAM_SHARED, P2MView
from hvcore.constants import PAGE_SIZE

if TYPE_CHECKING:
    from hvcore import Hypervisor

__all__ = ["Backend", "InProcessBackend", "SocketBackend", "Scanner", "Plan", "Batch", "PassResult",
           "step_delta", "page_hashes", "zero_pages", "BATCH_PAGES", "NOMINATE_FACTOR",
           "ROUND_PAGES", "CHUNK_PAGES", "WATCH_INTERVAL", "WATCH_PAGES_PER_SECOND", "ZERO_SUM",
           "SCANNER_OPS", "STEP_BUDGET_MS", "PIPELINE_DEPTH"]

#: Most pairs per share_many request (and, times NOMINATE_FACTOR, gfns per
#: nominate_many). Through a hypervisor process (:class:`SocketBackend`)
#: this is only a cap: the hypervisor bounds each step by its budget
#: (STEP_BUDGET_MS) and requests are sized by what the last steps did.
BATCH_PAGES = 1024
#: A nominate_many request carries up to this many times ``batch_pages``
#: gfns: per page, nominate costs the hypervisor a third to a half of what
#: share does (module docstring).
NOMINATE_FACTOR = 3
#: The work time the hypervisor may spend on one batch request (its
#: ``budget_us``) before it answers with what it did: framing adds
#: 0.1-0.2 ms, so a step stays under 1 ms with room for a slower chunk.
STEP_BUDGET_MS = 0.5
#: Batch requests in flight on :class:`SocketBackend`'s connection: with
#: two, the hypervisor starts the next step as soon as it answers one.
PIPELINE_DEPTH = 2
#: Items in a stream's first request, before any step has said how many
#: fit in its budget; later requests carry REQUEST_HEADROOM times what the
#: last step that ran out of budget did (the rest comes back, and goes
#: first in the next request), so a step never runs out of items.
FIRST_REQUEST = 256
REQUEST_HEADROOM = 1.25
#: ... and never fewer items than this (unless fewer are left): a request
#: costs a round trip and the hypervisor's framing, a few more items nothing.
MIN_REQUEST = 64
#: Members (client pages) per merge round: nominated, verified and shared
#: together, so the scanner's own work is done once per round and every
#: request is filled to its limit whatever domains the round spans.
ROUND_PAGES = 4096
#: Pages per vectorised chunk of the zero test: 4 MiB temporaries.
CHUNK_PAGES = 1024
#: Watch mode: seconds between ticks (KSM's sleep_millisecs is 20 ms).
WATCH_INTERVAL = 0.1
#: Watch mode: gfns scanned per second at most (KSM: pages_to_scan per
#: sleep_millisecs, 100 per 20 ms = 5,000/s by default; ours is cheaper).
WATCH_PAGES_PER_SECOND = 200_000

_WORDS = PAGE_SIZE // 8
#: The checksum of a zero page: what xxh3_64 gives for 4096 zero bytes, so a
#: page that becomes zero, or stops being zero, looks changed.
ZERO_SUM = np.uint64(xxhash.xxh3_64_intdigest(bytes(PAGE_SIZE)))

# page status, as of its last scan (for the gauges)
_UNKNOWN, _UNSHARED, _VOLATILE = 0, 1, 2
# entry kinds, in source-preference order
_SHARED_FRAME, _CANDIDATE = 0, 1


# ----------------------------------------------------------------------
# the seam to the hypervisor

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
                   limit: int | None = None) -> np.ndarray:
        """Share pairs ``(sds[i], sgfns[i]) <- (cds[i], cgfns[i])`` (domains
        given per pair); a code per pair."""

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
    """A :class:`Backend` over an in-process :class:`hvcore.Hypervisor`:
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

    def share_many(self, sds, sgfns, shs, cds, cgfns, chs, limit=None):
        sds = np.asarray(sds, dtype=np.int64)
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
    ``budget_us`` (``step_budget_ms``): the hypervisor works on it until
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

    A hypervisor that stops answering raises :class:`tools.api.NoHypervisor`,
    which ends a pass (and watch mode): it is not a per-page failure. From
    then on every method raises it too: the scanner maps *this*
    hypervisor's pool, and a new hypervisor on the same socket has other
    frames behind the same numbers.

    ``socket`` is a path (None: the default socket) or an open
    :class:`tools.api.HypervisorClient`, which stays the caller's to close.
    """

    def __init__(self, socket=None, step_budget_ms: float | None = STEP_BUDGET_MS,
                 depth: int = PIPELINE_DEPTH):
        from .api import HypervisorClient
        self._own = not isinstance(socket, HypervisorClient)
        self.client = HypervisorClient(socket) if self._own else socket
        self.gone: str | None = None        # why the hypervisor is gone, once it is
        self.step_budget_ms = step_budget_ms
        self.depth = max(1, int(depth))
        self.requests = 0
        self.max_request_s = 0.0
        self._conn = None                   # the batch requests' connection
        self._fit: dict[str, int] = {}      # items the last steps did, by op

    def _request(self, fn, *args):
        from .api import NoHypervisor
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

    def share_many(self, sds, sgfns, shs, cds, cgfns, chs, limit=None):
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
        self._stream("share_many", {}, (sds, cds), cols, len(sds), limit, answer, refused)
        return codes

    def _connection(self):
        """The batch requests' own connection (opened on first use): its
        answers come back in order, several requests may be in flight."""
        if self._conn is None:
            self._conn = self._request(self.client.open_connection)
        return self._conn

    def _drop_connection(self) -> None:
        """Close the batch connection (answers still on their way with it)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _stream(self, op: str, args: dict, domains, cols: list, n: int, limit: int | None,
                answer: Callable, refused: Callable) -> None:
        """Items ``[0, n)`` through budgeted ``op`` requests, ``depth`` in flight.

        ``cols`` are the payload's columns (array, wire dtype) indexed by
        item. ``answer(idx, data)`` takes the answer payload for the first
        ``done`` items of request ``idx``; ``refused(idx, error)`` handles
        a request refused whole and returns the items to send again (or
        None). ``domains`` (share_many: source and client domids) lets a
        request whose pairs share one source and one client domain name
        them once. Remainders the hypervisor did not get to are sent first.
        """
        from .api import HVCtlError, NoHypervisor
        if n == 0:
            return
        if self.gone:
            raise NoHypervisor(self.gone)
        limit = limit or n
        budget = None if self.step_budget_ms is None else max(1, int(self.step_budget_ms * 1e3))
        sock = self._connection()
        fresh, again, inflight = 0, [], deque()
        try:
            while fresh < n or again or inflight:
                while len(inflight) < self.depth and (fresh < n or again):
                    size = limit if budget is None else min(limit, max(
                        MIN_REQUEST, int(self._fit.get(op, FIRST_REQUEST) * REQUEST_HEADROOM)))
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
                    inflight.append((idx, size, time.perf_counter()))
                idx, size, t0 = inflight.popleft()
                got = control.recv_frame(sock)
                self.requests += 1
                self.max_request_s = max(self.max_request_s, time.perf_counter() - t0)
                if got is None:
                    raise ConnectionError("closed")
                ans, data = got
                if not ans.get("ok"):
                    e = HVCtlError(ans.get("error", "request failed"), ans.get("code", 22),
                                   ans.get("code_name", "EINVAL"))
                    redo = refused(idx, e)
                    if redo is not None and len(redo):
                        again.insert(0, redo)
                    continue
                done = int(ans.get("done", len(idx)))
                answer(idx, data)
                fit = self._fit.get(op, FIRST_REQUEST)
                if done < len(idx):         # the step's budget ran out: the rest again
                    again.insert(0, idx[done:])
                    self._fit[op] = (fit + done) / 2
                elif len(idx) == size:      # it might have done more
                    self._fit[op] = max(fit, done)
        except (ConnectionError, OSError) as e:
            self._drop_connection()
            if isinstance(e, socket_timeout):
                raise HVCtlError(f"the hypervisor did not answer {op} in time", 110, "ETIMEDOUT") from None
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


# ----------------------------------------------------------------------
# zero test and hash

def zero_pages(words: np.ndarray, mfns: np.ndarray, chunk: int = CHUNK_PAGES) -> np.ndarray:
    """Which frames ``mfns`` are all zero; ``words`` is the pool as
    ``(nframes, 512)`` uint64.

    Two stages so that nonzero pages cost one gathered word: only frames
    whose first word is zero are tested whole. Those are tested in mfn
    order, on a slice of the mapping where the chunk's frames are dense
    (no copy), else on a gathered copy.
    """
    mfns = np.asarray(mfns, dtype=np.int64)
    out = np.zeros(len(mfns), dtype=bool)
    if len(mfns) == 0:
        return out
    maybe = np.nonzero(words[mfns, 0] == 0)[0]
    maybe = maybe[np.argsort(mfns[maybe], kind="stable")]
    for start in range(0, len(maybe), chunk):
        idx = maybe[start:start + chunk]
        m = mfns[idx]
        lo, hi = int(m[0]), int(m[-1]) + 1
        if hi - lo <= 2 * len(m):
            out[idx] = ~words[lo:hi].any(axis=1)[m - lo]
        else:
            out[idx] = ~words[m].any(axis=1)
    return out


def page_hashes(frames: memoryview, mfns: np.ndarray) -> np.ndarray:
    """xxh3_64 of each frame ``mfns``; ``frames`` is the whole pool as bytes.

    One C call per page on a slice of the mapping (no copy), frames visited
    in mfn order for locality. Measured faster than a vectorised numpy hash
    (module docstring), which has to gather every frame first.
    """
    mfns = np.asarray(mfns, dtype=np.int64)
    order = np.argsort(mfns, kind="stable")
    h = xxhash.xxh3_64_intdigest
    out = np.empty(len(mfns), dtype=np.uint64)
    out[order] = np.fromiter((h(frames[m << 12:(m + 1) << 12]) for m in mfns[order].tolist()),
                             dtype=np.uint64, count=len(mfns))
    return out


def _checksums(words: np.ndarray, frames: memoryview, mfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(checksum, is_zero) of frames: ZERO_SUM for zero pages, else the hash."""
    zero = zero_pages(words, mfns)
    sums = np.full(len(mfns), ZERO_SUM, dtype=np.uint64)
    nz = ~zero
    if nz.any():
        # looked up at call time, so tests can replace the hash
        sums[nz] = page_hashes(frames, mfns[nz])
    return sums, zero


def _rows_equal(frames: memoryview, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Byte equality of frames ``a[i]`` and ``b[i]``; ``frames`` is the pool.

    One C-level copy and compare per page (``bytes ==`` is a memcmp), pairs
    visited by source so that a source shared by many members (every zero
    page of a pass) is copied once. Measured on 50,000 pairs: 0.07 s with
    one source, 0.15 s with all sources distinct, against 0.45 s for
    gathering both sides into numpy rows and comparing them.
    """
    order = np.argsort(b, kind="stable")
    res = []
    last, src = -1, b""
    for x, y in zip(a[order].tolist(), b[order].tolist()):
        if y != last:
            last, src = y, frames[y << 12:(y + 1) << 12].tobytes()
        res.append(frames[x << 12:(x + 1) << 12].tobytes() == src)
    out = np.empty(len(a), dtype=bool)
    out[order] = res
    return out


# ----------------------------------------------------------------------
# snapshots


def _snapshot(view: P2MView, gfns: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(type, mfn) of every gfn (or of ``gfns``), one consistent view."""
    while True:
        s = view.stable_seq()
        if gfns is None:
            typ, mfn = view.type.copy(), view.mfn.copy()
        else:
            typ, mfn = view.type[gfns], view.mfn[gfns]
        if view.seq == s:
            return typ, mfn


@dataclass(eq=False)
class _Domain:
    """Per-domain scan state: its p2m mapping and the last pass's checksums."""
    domid: int
    p2m_name: str
    npages: int
    view: P2MView
    sums: np.ndarray            # uint64 checksum per gfn at its last scan
    have: np.ndarray            # bool: sums[gfn] is meaningful
    status: np.ndarray          # uint8 _UNKNOWN / _UNSHARED / _VOLATILE
    typ: np.ndarray | None = None   # this pass's snapshot
    mfn: np.ndarray | None = None


# ----------------------------------------------------------------------
# plans and results

@dataclass
class Batch:
    """One merge round (up to ``round_pages`` members, sent in requests of
    up to ``batch_pages``): pair ``i`` merges client ``(cd[i], cg[i])`` into
    source ``(sd[i], sg[i])``; ``group[i]`` is the pair's hash group."""
    sd: np.ndarray
    sg: np.ndarray
    cd: np.ndarray
    cg: np.ndarray
    group: np.ndarray

    def __len__(self) -> int:
        return len(self.cg)


@dataclass
class Plan:
    """The result of the snapshot, hash and group phases of a pass."""
    batches: list[Batch]
    full: bool                  # the pass covers every gfn of the scanned domains
    scanned: int                # private pages examined
    zero: int                   # zero pages among them
    volatile: int               # skipped: checksum changed since the last scan
    unmatched: int              # no other page with the same hash
    started: float              # perf_counter() at the start of the pass
    nr_saved_before: int
    phase_seconds: dict = field(default_factory=dict)
    steps_before: dict | None = None    # backend.steps() when the pass began


@dataclass
class PassResult:
    """What one pass did (``to_dict()`` carries the keys ``hvctl dedup
    --json`` promises: scanned, merged, seconds, nr_saved_mfns)."""
    scanned: int                # private pages examined (zero test and/or hash)
    zero: int                   # zero pages among them
    merged: int                 # pairs shared: pages (or duplicate shared frames)
                                # merged into a source frame
    volatile: int               # skipped: checksum changed since their last scan
    skipped: int                # dropped between hashing and sharing (written,
                                # not nominable, stale handle at share)
    mismatched: int             # members whose bytes differed from their source
                                # at verification (hash collision or late write)
    unmatched: int              # candidates with no identical page
    batches: int                # merge rounds executed (each nominates, verifies
                                # and shares up to round_pages members)
    requests: int               # backend requests (nominate_many + share_many)
    max_request_ms: float       # longest backend request, seen from the scanner
    seconds: float              # the whole pass
    nr_saved_mfns: int          # the hypervisor's nr_saved_mfns after the pass
    saved_delta: int            # ... minus before
    full_scan: bool
    phase_seconds: dict = field(default_factory=dict)   # snapshot, hash, group, merge
    counters: dict = field(default_factory=dict)        # Scanner.counters after
    max_pause_ms: float | None = None                   # from the backend, if it knows
    hv_steps: dict | None = None        # the hypervisor's steps during the pass
                                        # (step_delta), if the backend knows

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------
# the scanner

class Scanner:
    """Finds identical pages of running domains and shares them.

    ``after_nominate(batch)`` and ``before_share(batch)``, if set, are
    called in every merge batch right after its nominate requests and right
    before its share request: a seam for tests that interleave guest writes
    with the merge (and for tracing).
    """

    COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                "full_scans", "pages_scanned", "pages_merged", "pages_skipped", "passes")

    def __init__(self, backend: Backend, *, batch_pages: int = BATCH_PAGES,
                 round_pages: int = ROUND_PAGES, skip_volatile: bool = True):
        if batch_pages < 1:
            raise ValueError("batch_pages must be at least 1")
        self.backend = backend
        self.batch_pages = int(batch_pages)
        self.round_pages = max(int(round_pages), self.batch_pages)
        self.skip_volatile = skip_volatile
        self.after_nominate: Callable[[Batch], None] | None = None
        self.before_share: Callable[[Batch], None] | None = None
        self.counters = {k: 0 for k in self.COUNTERS}
        self._mm, size = shm.attach_readonly(backend.pool_name())
        self._frames = memoryview(self._mm)
        self._words = np.frombuffer(self._mm, dtype=np.uint64).reshape(size // PAGE_SIZE, _WORDS)
        nframes = len(self._words)
        # hash cache of shared frames, valid within one full scan
        self._fsum = np.zeros(nframes, dtype=np.uint64)
        self._fknown = np.zeros(nframes, dtype=bool)
        self._doms: dict[int, _Domain] = {}
        self._cursor: tuple[int, int] | None = None     # watch mode: (domid, gfn)
        self._stop: threading.Event | None = None       # watch mode's stop event

    # -- domains ---------------------------------------------------------
    def _refresh(self) -> list[_Domain]:
        """Map new running domains, forget gone ones, snapshot every p2m."""
        listed = {int(d): (name, int(n)) for d, name, n in self.backend.domains()}
        for domid in list(self._doms):
            st = self._doms[domid]
            if domid not in listed or listed[domid][0] != st.p2m_name:
                st.view.close()
                del self._doms[domid]
        for domid, (name, npages) in listed.items():
            if domid in self._doms:
                continue
            try:
                view = P2MView(name)
            except posix_ipc.ExistentialError:      # destroyed since it was listed
                continue
            self._doms[domid] = _Domain(domid, name, npages, view,
                                        np.zeros(npages, dtype=np.uint64),
                                        np.zeros(npages, dtype=bool),
                                        np.zeros(npages, dtype=np.uint8))
        doms = [self._doms[d] for d in sorted(self._doms)]
        for st in doms:
            st.typ, st.mfn = _snapshot(st.view)
        return doms

    # -- phases 1-4: snapshot, hash, group ------------------------------
    def plan(self, domids: Iterable[int] | None = None, *,
             windows: dict[int, tuple[int, int]] | None = None) -> Plan:
        """Snapshot, hash and group: the merge batches of one pass.

        ``domids`` limits the candidates to those domains (default: every
        running domain); frames shared by any running domain are merge
        targets either way. ``windows`` (watch mode) limits candidates to
        ``{domid: (first_gfn, end_gfn)}``; without it the pass is a full
        scan.
        """
        t0 = time.perf_counter()
        steps = getattr(self.backend, "steps", None)
        steps_before = steps() if callable(steps) else None
        saved_before = int(self.backend.nr_saved_mfns())
        doms = self._refresh()
        full = windows is None
        if windows is None:
            want = set(self._doms) if domids is None else {int(d) for d in domids}
            windows = {st.domid: (0, st.npages) for st in doms if st.domid in want}
        else:
            windows = {int(d): (max(0, int(lo)), min(self._doms[int(d)].npages, int(hi)))
                       for d, (lo, hi) in windows.items() if int(d) in self._doms}
        if full:
            self._fknown[:] = False     # a new full scan re-hashes shared frames
        t1 = time.perf_counter()

        # shared frames: one entry per frame (first gfn mapping it), refs
        sh = [(st, np.nonzero(st.typ == RAM_SHARED)[0]) for st in doms]
        sh_d = np.concatenate([np.full(len(g), st.domid, np.int64) for st, g in sh] + [_I64])
        sh_g = np.concatenate([g for _, g in sh] + [_I64]).astype(np.int64)
        sh_m = np.concatenate([st.mfn[g] for st, g in sh] + [_I64])
        frames, first, refs = np.unique(sh_m, return_index=True, return_counts=True)
        known = np.zeros_like(self._fknown)
        known[frames] = self._fknown[frames]        # forget frames no longer shared
        self._fknown = known
        new = frames[~known[frames]]
        if len(new):
            self._fsum[new], _ = _checksums(self._words, self._frames, new)
            self._fknown[new] = True
        # a shared gfn's checksum is its frame's: a later CoW write shows as a change
        for st, g in sh:
            st.sums[g] = self._fsum[st.mfn[g]]
            st.have[g] = True

        # candidates: private gfns in the windows
        cd, cg, cm = [], [], []
        for domid, (lo, hi) in windows.items():
            st = self._doms[domid]
            g = np.nonzero(st.typ[lo:hi] == RAM_RW)[0].astype(np.int64) + lo
            cd.append(np.full(len(g), domid, np.int64))
            cg.append(g)
            cm.append(st.mfn[g])
        cd = np.concatenate(cd + [_I64])
        cg = np.concatenate(cg + [_I64])
        cm = np.concatenate(cm + [_I64])
        sums, zero = _checksums(self._words, self._frames, cm)
        volatile = np.zeros(len(cg), dtype=bool)
        for domid in windows:
            st = self._doms[domid]
            sel = cd == domid
            g = cg[sel]
            if self.skip_volatile:
                volatile[sel] = st.have[g] & (st.sums[g] != sums[sel])
            st.sums[g] = sums[sel]
            st.have[g] = True
        t2 = time.perf_counter()

        # partners (watch windows): earlier unmatched pages with a matching checksum
        pd, pg, pm, psum = self._partners(windows, np.unique(sums[~volatile])) if not full \
            else (_I64, _I64, _I64, _U64)

        # entries: shared frames first in each group, then candidates
        keep_c = ~volatile
        e_d = np.concatenate([sh_d[first], cd[keep_c], pd])
        e_g = np.concatenate([sh_g[first], cg[keep_c], pg])
        e_key = np.concatenate([self._fsum[frames], sums[keep_c], psum])
        e_kind = np.concatenate([np.full(len(frames), _SHARED_FRAME, np.int8),
                                 np.full(int(keep_c.sum()) + len(pg), _CANDIDATE, np.int8)])
        e_refs = np.concatenate([refs, np.ones(int(keep_c.sum()) + len(pg), np.int64)])
        e_win = np.concatenate([np.zeros(len(frames), bool), np.ones(int(keep_c.sum()), bool),
                                np.zeros(len(pg), bool)])
        order = np.lexsort((-e_refs, e_kind, e_key))
        e_d, e_g, e_key, e_kind, e_win = (a[order] for a in (e_d, e_g, e_key, e_kind, e_win))
        n = len(e_key)
        starts = np.ones(n, dtype=bool)
        starts[1:] = e_key[1:] != e_key[:-1]
        gid = np.cumsum(starts) - 1
        size = np.bincount(gid, minlength=0) if n else _I64
        n_win = np.bincount(gid, weights=e_win) if n else _U64
        n_shared = np.bincount(gid, weights=e_kind == _SHARED_FRAME) if n else _U64
        keep_g = (size >= 2) & ((n_win > 0) | (n_shared >= 2))
        first_of = np.nonzero(starts)[0]            # the source of each group
        member = keep_g[gid] & ~starts
        src = first_of[gid[member]]
        unmatched_win = e_win & ~keep_g[gid]
        # status of this window's candidates, as of this scan
        self._set_status(e_d[unmatched_win], e_g[unmatched_win], _UNSHARED)
        self._set_status(cd[volatile], cg[volatile], _VOLATILE)

        batches = []
        md, mg, sd_, sg_, mgid = e_d[member], e_g[member], e_d[src], e_g[src], gid[member]
        for s in range(0, len(mg), self.round_pages):
            e = s + self.round_pages
            batches.append(Batch(sd_[s:e], sg_[s:e], md[s:e], mg[s:e], mgid[s:e]))
        t3 = time.perf_counter()
        return Plan(batches, full, scanned=len(cg), zero=int(zero.sum()),
                    volatile=int(volatile.sum()), unmatched=int(unmatched_win.sum()),
                    started=t0, nr_saved_before=saved_before,
                    phase_seconds={"snapshot": t1 - t0, "hash": t2 - t1, "group": t3 - t2},
                    steps_before=steps_before)

    def _partners(self, windows, keys):
        """Private pages outside the windows, unmatched at their last scan,
        whose remembered checksum is one of ``keys``; re-hashed now, and
        kept only if they still have it."""
        out_d, out_g, out_m = [], [], []
        for st in self._doms.values():
            lo, hi = windows.get(st.domid, (0, 0))
            cand = (st.typ == RAM_RW) & (st.status == _UNSHARED) & st.have
            cand[lo:hi] = False
            g = np.nonzero(cand)[0]
            g = g[np.isin(st.sums[g], keys)]
            out_d.append(np.full(len(g), st.domid, np.int64))
            out_g.append(g.astype(np.int64))
            out_m.append(st.mfn[g])
        d = np.concatenate(out_d + [_I64])
        g = np.concatenate(out_g + [_I64])
        m = np.concatenate(out_m + [_I64])
        now, _ = _checksums(self._words, self._frames, m)
        same = now == self._lookup_sums(d, g)
        return d[same], g[same], m[same], now[same]

    def _lookup_sums(self, d: np.ndarray, g: np.ndarray) -> np.ndarray:
        out = np.zeros(len(g), dtype=np.uint64)
        for domid in np.unique(d).tolist():
            sel = d == domid
            out[sel] = self._doms[domid].sums[g[sel]]
        return out

    def _set_status(self, d: np.ndarray, g: np.ndarray, status: int) -> None:
        if len(d) == 0:
            return
        for domid in np.unique(d).tolist():
            st = self._doms.get(domid)
            if st is not None:
                st.status[g[d == domid]] = status

    # -- phase 5: merge ---------------------------------------------------
    def execute(self, plan: Plan) -> PassResult:
        """Nominate, verify and share every round of ``plan``."""
        t0 = time.perf_counter()
        be = self.backend
        requests0, be.max_request_s = be.requests, 0.0
        merged = skipped = mismatched = unmatched = rounds = 0
        for batch in plan.batches:
            if self._stop is not None and self._stop.is_set():
                break                   # watch mode stopping: the rest waits
            rounds += 1
            m, s, x, u = self._merge_batch(batch)
            merged += m
            skipped += s
            mismatched += x
            unmatched += u
        t1 = time.perf_counter()
        saved = int(self.backend.nr_saved_mfns())
        c = self.counters
        c["passes"] += 1
        full = plan.full and rounds == len(plan.batches)
        c["full_scans"] += int(full)
        c["pages_scanned"] += plan.scanned
        c["pages_merged"] += merged
        c["pages_skipped"] += skipped
        self._gauges()
        steps = getattr(self.backend, "steps", None)
        hv_steps, pause_ms = None, None
        if callable(steps) and plan.steps_before is not None:
            after = steps()
            hv_steps, pause_ms = step_delta(plan.steps_before, after), after["max_pause_ms"]
        elif callable(getattr(self.backend, "max_pause_ms", None)):
            pause_ms = self.backend.max_pause_ms()
        return PassResult(
            scanned=plan.scanned, zero=plan.zero, merged=merged, volatile=plan.volatile,
            skipped=skipped, mismatched=mismatched, unmatched=plan.unmatched + unmatched,
            batches=rounds, requests=be.requests - requests0,
            max_request_ms=round(be.max_request_s * 1e3, 3),
            seconds=time.perf_counter() - plan.started, nr_saved_mfns=saved,
            saved_delta=saved - plan.nr_saved_before, full_scan=full,
            phase_seconds={**plan.phase_seconds, "merge": t1 - t0},
            counters=dict(c), max_pause_ms=pause_ms, hv_steps=hv_steps)

    def scan_pass(self, domids: Iterable[int] | None = None) -> PassResult:
        """One full pass over ``domids`` (default: every running domain)."""
        return self.execute(self.plan(domids))

    def _merge_batch(self, b: Batch) -> tuple[int, int, int, int]:
        """(merged, skipped, mismatched, unmatched) of one batch."""
        k = len(b)
        step = self.batch_pages
        # a. nominate every distinct page of the round: per domain, at most
        #    NOMINATE_FACTOR * batch_pages gfns per request
        nstep = NOMINATE_FACTOR * step
        all_d = np.concatenate([b.sd, b.cd])
        all_g = np.concatenate([b.sg, b.cg])
        pages, inv = np.unique(all_d << 40 | all_g, return_inverse=True)
        p_d, p_g = pages >> 40, pages & ((1 << 40) - 1)
        handle = np.zeros(len(pages), dtype=np.uint64)
        code = np.zeros(len(pages), dtype=np.int64)
        typ = np.zeros(len(pages), dtype=np.uint8)
        mfn = np.zeros(len(pages), dtype=np.int64)
        for domid in np.unique(p_d).tolist():
            sel = np.nonzero(p_d == domid)[0]
            handle[sel], code[sel] = self.backend.nominate_many(domid, p_g[sel], nstep)
        if self.after_nominate:
            self.after_nominate(b)
        # b. where each page is now; a page not ram_shared lost its handle
        for domid in np.unique(p_d).tolist():
            sel = np.nonzero(p_d == domid)[0]
            st = self._doms.get(domid)
            if st is None:
                code[sel] = ESRCH
                continue
            typ[sel], mfn[sel] = _snapshot(st.view, p_g[sel])
        good = (code == 0) & (typ == RAM_SHARED)
        s_i, c_i = inv[:k], inv[k:]
        valid = good[s_i] & good[c_i]
        skipped = ~valid
        s_m, c_m = mfn[s_i], mfn[c_i]
        # c. verify, on the frames, after nominate
        cmp = valid & (s_m != c_m)
        eq = np.zeros(k, dtype=bool)
        idx = np.nonzero(cmp)[0]
        eq[idx] = _rows_equal(self._frames, c_m[idx], s_m[idx])
        bad = cmp & ~eq
        # a shared source that failed its compare: forget its cached hash
        self._fknown[s_m[bad]] = False
        extra_s, extra_c, lonely = self._regroup(np.nonzero(bad)[0], c_i, c_m, b.group)
        ps = np.concatenate([s_i[eq], extra_s])
        pc = np.concatenate([c_i[eq], extra_c])
        # d. share the verified pairs, at most batch_pages per request, the
        #    members of one source together: the hypervisor's cost of a
        #    share is mostly per frame touched, so a request naming each
        #    source frame once is cheaper than one grouped by domains
        order = np.lexsort((ps, p_d[pc]))
        ps, pc = ps[order], pc[order]
        merged = failed = 0
        written = (code == 0) & (typ != RAM_SHARED)     # CoW-faulted since nominate
        if len(ps):
            if self.before_share:
                self.before_share(b)
            # one call per client domain: its requests name few domains
            codes = np.empty(len(ps), dtype=np.int64)
            cut = np.flatnonzero(np.diff(p_d[pc])) + 1
            for lo, hi in zip([0, *cut.tolist()], [*cut.tolist(), len(ps)]):
                s_, c_ = ps[lo:hi], pc[lo:hi]
                codes[lo:hi] = self.backend.share_many(p_d[s_], p_g[s_], handle[s_], p_d[c_],
                                                       p_g[c_], handle[c_], step)
            merged = int((codes == 0).sum())
            failed = len(codes) - merged
            # the side whose handle went stale was written
            written[ps[codes == S_HANDLE_INVALID]] = True
            written[pc[codes == C_HANDLE_INVALID]] = True
        self._set_status(p_d[written], p_g[written], _VOLATILE)
        return merged, int(skipped.sum()) + failed, int(bad.sum()), lonely

    def _regroup(self, bad: np.ndarray, c_i: np.ndarray, c_m: np.ndarray,
                 group: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Members that differ from their source, grouped by exact bytes
        (within their hash group): pairs (source page, client page) of the
        batch's page table, and how many found no twin. Rare (a collision or
        a write between hashing and nominate), so a sort of whole pages is
        affordable."""
        if len(bad) == 0:
            return _I64, _I64, 0
        rows = np.ascontiguousarray(self._words[c_m[bad]]).view(np.dtype((np.void, PAGE_SIZE)))
        _, content = np.unique(rows.ravel(), return_inverse=True)
        key = group[bad].astype(np.int64) * (int(content.max()) + 1) + content.ravel()
        order = np.argsort(key, kind="stable")
        key_s = key[order]
        starts = np.ones(len(order), dtype=bool)
        starts[1:] = key_s[1:] != key_s[:-1]
        head = order[np.nonzero(starts)[0][np.cumsum(starts) - 1]]
        twin = ~starts
        sizes = np.bincount(np.cumsum(starts) - 1)
        return c_i[bad[head[twin]]], c_i[bad[order[twin]]], int((sizes == 1).sum())

    def _gauges(self) -> None:
        """KSM-like gauges from a fresh snapshot of every running domain."""
        ms, unshared, volatile = [], 0, 0
        for st in self._doms.values():
            typ, mfn = _snapshot(st.view)
            ms.append(mfn[typ == RAM_SHARED])
            rw = typ == RAM_RW
            unshared += int((rw & (st.status == _UNSHARED)).sum())
            volatile += int((rw & (st.status == _VOLATILE)).sum())
        allm = np.concatenate(ms + [_I64])
        frames = len(np.unique(allm))
        self.counters.update(pages_shared=frames, pages_sharing=len(allm) - frames,
                             pages_unshared=unshared, pages_volatile=volatile)

    # -- watch mode -------------------------------------------------------
    def _next_windows(self, budget: int, domids: set[int] | None = None
                      ) -> tuple[dict[int, tuple[int, int]], bool]:
        """The next ``budget`` gfns from the cursor, over the running domains
        (those of ``domids`` only, if given) in domid order; True if they
        reach the end (a full scan is done)."""
        doms = sorted((int(d), int(n)) for d, _, n in self.backend.domains()
                      if domids is None or int(d) in domids)
        domid, gfn = self._cursor or (-1, 0)
        windows = {}
        for d, n in doms:
            if d < domid:
                continue
            lo = gfn if d == domid else 0
            take = min(max(n - lo, 0), budget)
            if take:
                windows[d] = (lo, lo + take)
                budget -= take
            if budget == 0 and lo + take < n:
                self._cursor = (d, lo + take)
                return windows, False
            if budget == 0:
                later = [x for x, _ in doms if x > d]
                if later:
                    self._cursor = (later[0], 0)
                    return windows, False
                break
        self._cursor = None
        return windows, True

    def watch(self, interval: float = WATCH_INTERVAL,
              pages_per_second: float = WATCH_PAGES_PER_SECOND,
              stop_event: threading.Event | None = None,
              on_pass: Callable[[PassResult], None] | None = None,
              domids: Iterable[int] | None = None) -> dict:
        """Scan continuously until ``stop_event`` is set (ksmd).

        Each tick scans the next ``pages_per_second * interval`` gfns (a
        cursor over the running domains, or over ``domids`` only) and then
        sleeps for the rest of the interval, so the rate limit holds however
        fast a tick is; a tick that overruns is followed at once by the
        next. A stop request is honoured between merge rounds, so stopping
        never waits for a whole tick. ``on_pass`` gets each tick's
        :class:`PassResult` (``full_scan`` is True on the tick that
        completes a full scan). Returns totals: ticks, scanned, merged,
        full_scans, seconds. Exceptions of the backend (a hypervisor gone)
        end the watch and propagate.
        """
        stop = stop_event or threading.Event()
        only = None if domids is None else {int(d) for d in domids}
        budget = max(1, int(pages_per_second * interval))
        totals = {"ticks": 0, "scanned": 0, "merged": 0, "full_scans": 0, "seconds": 0.0}
        t_start = time.monotonic()
        self._stop = stop
        try:
            while not stop.is_set():
                t0 = time.monotonic()
                if self._cursor is None:
                    self._fknown[:] = False     # a new full scan re-hashes shared frames
                windows, wrapped = self._next_windows(budget, only)
                plan = self.plan(windows=windows)
                plan.full = wrapped
                res = self.execute(plan)
                totals["ticks"] += 1
                totals["scanned"] += res.scanned
                totals["merged"] += res.merged
                totals["full_scans"] += int(res.full_scan)
                if on_pass:
                    on_pass(res)
                stop.wait(max(0.0, interval - (time.monotonic() - t0)))
        finally:
            self._stop = None
            totals["seconds"] = time.monotonic() - t_start
        return totals

    # -- clean-up ----------------------------------------------------------
    def close(self) -> None:
        """Unmap the pool and every p2m; release the backend's own
        resources for batch requests (``release()``, if it has one)."""
        release = getattr(self.backend, "release", None)
        if callable(release):
            release()
        for st in self._doms.values():
            st.view.close()
        self._doms.clear()
        self._words = None
        if self._frames is not None:
            self._frames.release()
            self._frames = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass
            self._mm = None

    def __enter__(self) -> "Scanner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_I64 = np.empty(0, dtype=np.int64)
_U64 = np.empty(0, dtype=np.uint64)
