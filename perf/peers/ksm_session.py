"""Borrowing the global KSM knobs: :func:`ksm_session` and :class:`KsmSession`.

Knobs are borrowed, never kept.  :func:`ksm_session` snapshots every
writable knob on entry and writes back whatever differs on exit, also on
exceptions, ``KeyboardInterrupt`` and ``SIGTERM`` (converted to
``SystemExit`` for the session); SIGINT/SIGTERM are held while the restore
runs.  ``max_page_sharing`` and ``merge_across_nodes`` can only change
while no KSM page exists, so both setting and restoring them go through
``run=2`` (stop and unmerge everything) first; ``run`` itself is always
written last.  Sessions of different processes are serialised with an
``flock`` on :data:`LOCK_PATH` so two benchmarks (or a benchmark and the
tests) do not fight over the global knobs and counters; nested sessions in
one process share the outer lock.

The counters are global too, so this module also runs ksmd for a few full
scans (:func:`run_scans`) and sweeps away rmap items of regions this
process already unmapped (:func:`sweep_stale`, using the regions
registered with :func:`track_region`): a session leaves the counters true
for whoever comes next, and a merge takes its baseline in a quiet system.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import threading
import time
import weakref
from typing import Iterator

from .ksm_sysfs import (CounterPoller, KsmUnavailable, counters, ksm_available, process_ksm_stat,
                        read_knob, writable_knobs, write_knob)

LOCK_PATH = "/tmp/hvshare-ksm.lock"

# These two may only change while no KSM page exists (the kernel says EBUSY).
_NEEDS_UNMERGE = ("max_page_sharing", "merge_across_nodes")

_sessions: list["KsmSession"] = []           # this process's open sessions, outermost first
#: mapped regions of this process that KSM may have scanned (any object with
#: ``n_pages`` and ``mm``, the mapping or None once unmapped)
_live_regions: weakref.WeakSet = weakref.WeakSet()


class KsmSession:
    """Knob changes that are undone when the session ends.

    Create through :func:`ksm_session`.  ``saved`` is the snapshot of every
    writable knob taken on entry; :meth:`restore` writes back each one that
    differs, whoever changed it.
    """

    def __init__(self) -> None:
        self.saved = {k: read_knob(k) for k in writable_knobs()}

    def set(self, **knobs: object) -> None:
        """Apply knobs in an order the kernel accepts: ``run=2`` first if
        ``max_page_sharing``/``merge_across_nodes`` change, ``run`` last."""
        unknown = set(knobs) - set(self.saved)
        if unknown:
            raise ValueError(f"not a writable KSM knob: {', '.join(sorted(unknown))}")
        want = {k: str(v) for k, v in knobs.items()}
        cur = {k: read_knob(k) for k in want}
        heavy = {k: v for k, v in want.items() if k in _NEEDS_UNMERGE and cur[k] != v}
        if heavy:
            _unmerge_and_write(heavy)
        for k, v in want.items():
            if k != "run" and k not in heavy and cur[k] != v:
                write_knob(k, v)
        if "run" in want and read_knob("run") != want["run"]:
            write_knob("run", want["run"])

    def restore(self) -> None:
        """Put back every knob that differs from the snapshot, ``run`` last.

        Keeps going past a failing knob and raises the first error at the
        end, so one stubborn file does not leave the others changed.
        """
        cur = {k: read_knob(k) for k in self.saved}
        diff = {k: v for k, v in self.saved.items() if cur[k] != v}
        if not diff:
            return
        errors: list[BaseException] = []
        if cur["run"] == "1":          # stop ksmd while the rest is rewritten
            _try(errors, write_knob, "run", 0)
        heavy = {k: v for k, v in diff.items() if k in _NEEDS_UNMERGE}
        if heavy:
            _try(errors, _unmerge_and_write, heavy)
        for k, v in diff.items():
            if k != "run" and k not in heavy:
                _try(errors, write_knob, k, v)
        if read_knob("run") != self.saved["run"]:
            _try(errors, write_knob, "run", self.saved["run"])
        if errors:
            raise RuntimeError(f"KSM knobs not fully restored: {errors[0]}") from errors[0]


def _try(errors: list[BaseException], fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:  # collected, raised after the other knobs
        errors.append(e)


def _unmerge_and_write(knobs: dict[str, str]) -> None:
    """``run=2`` unmerges every KSM page in the system (synchronously), the
    precondition for changing ``max_page_sharing``/``merge_across_nodes``.
    Stale stable nodes can still make the kernel say EBUSY for a moment, so
    retry a few times."""
    for attempt in range(20):
        write_knob("run", 2)
        try:
            for k, v in knobs.items():
                if read_knob(k) != v:
                    write_knob(k, v)
            return
        except OSError as e:
            if e.errno != errno.EBUSY or attempt == 19:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while knobs are restored: a second Ctrl-C must
    not leave the system half restored."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _sigterm_to_exit(signum, frame):
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _process_lock(timeout: float) -> Iterator[None]:
    """Exclusive lock shared by every hvshare process that drives KSM."""
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise KsmUnavailable(
                        f"KSM busy: another process held {LOCK_PATH} for {timeout:.0f} s") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)     # closing drops the flock


@contextlib.contextmanager
def ksm_session(lock_timeout: float = 300.0, **knobs: object) -> Iterator[KsmSession]:
    """Borrow the KSM knobs: set ``knobs`` now, restore everything on exit.

    ``with ksm_session(max_page_sharing=4096) as s: ...; s.set(run=1)``.
    The outermost session of a process takes a cross-process lock (waiting
    up to ``lock_timeout`` s) and turns SIGTERM into ``SystemExit`` so the
    restore runs.  Raises :class:`KsmUnavailable` if KSM cannot be used.
    Note that restoring ``max_page_sharing`` unmerges every KSM page,
    including those of regions still open: close them inside the session.
    """
    reason = ksm_available()
    if reason:
        raise KsmUnavailable(reason)
    outer = not _sessions
    with contextlib.ExitStack() as stack:
        if outer:
            stack.enter_context(_process_lock(lock_timeout))
            if threading.current_thread() is threading.main_thread() \
                    and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _sigterm_to_exit)
                stack.callback(signal.signal, signal.SIGTERM, signal.SIG_DFL)
        session = KsmSession()
        _sessions.append(session)
        try:
            session.set(**knobs)
            yield session
        finally:
            with _signals_deferred():
                try:
                    if outer and own_stale() and not any(
                            read_knob(k) != session.saved[k] for k in _NEEDS_UNMERGE if k in session.saved):
                        # leave the global counters true for whoever comes next
                        # (restoring those two knobs unmerges everything anyway)
                        run_scans(session, 2, timeout=10.0)
                except Exception:
                    pass
                finally:
                    _sessions.remove(session)
                    session.restore()


@contextlib.contextmanager
def current_session() -> Iterator[KsmSession]:
    """The innermost open session, or a new one just for this operation."""
    if _sessions:
        yield _sessions[-1]
    else:
        with ksm_session() as s:
            yield s


# --------------------------------------------------------------------------
# running ksmd between measurements

def track_region(region) -> None:
    """Count ``region`` (``n_pages``, ``mm``) as this process's live
    mergeable memory until it is unmapped or garbage."""
    _live_regions.add(region)


def fast_scan_knobs(session: KsmSession, pages_to_scan: int) -> dict[str, object]:
    """Knobs that make ksmd scan flat out (and merge zero pages like any
    other) while it runs; ``session`` says which knobs this kernel has."""
    knobs: dict[str, object] = {"pages_to_scan": pages_to_scan, "sleep_millisecs": 0, "use_zero_pages": 0}
    if "advisor_mode" in session.saved:
        knobs["advisor_mode"] = "none"      # the advisor would override pages_to_scan
    return knobs


def run_scans(session: KsmSession, n: int, timeout: float, pages_to_scan: int = 20000,
              idle_seconds: float = 0.05) -> None:
    """Run ksmd fast for ``n`` full scans, then stop it.

    Also stops when ksmd goes idle (``pages_scanned`` still for
    ``idle_seconds``): once no process has mergeable memory left, ksmd
    sleeps and ``full_scans`` no longer moves.
    """
    session.set(**fast_scan_knobs(session, pages_to_scan))
    poll = CounterPoller(["full_scans", "pages_scanned"])
    try:
        start, scanned = poll.read()
        session.set(run=1)
        now = time.monotonic()
        deadline, moved = now + timeout, now
        while now < deadline:
            scans, s2 = poll.read()
            now = time.monotonic()
            if scans - start >= n:
                break
            if s2 != scanned:
                scanned, moved = s2, now
            elif now - moved > idle_seconds:
                break
            time.sleep(0.001)
    finally:
        write_knob("run", 0)
        poll.close()


def own_stale() -> bool:
    """Does this process still have rmap items of regions it unmapped?"""
    live = sum(r.n_pages for r in list(_live_regions) if r.mm is not None)
    return int(process_ksm_stat().get("ksm_rmap_items", 0) or 0) > live


def sweep_stale(session: KsmSession, timeout: float = 60.0) -> None:
    """Rmap items of unmapped regions (ours, or of processes that exited)
    stay counted until ksmd rescans, and would vanish in the middle of the
    next measurement; two full scans sweep them before a baseline is taken."""
    c = counters()
    if own_stale() or c.get("pages_shared", 0) + c.get("pages_sharing", 0) > 0:
        run_scans(session, 2, timeout)

