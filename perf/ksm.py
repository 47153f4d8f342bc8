"""Linux KSM as a measured peer of hvshare.

KSM (``mm/ksm.c``) does the job hvshare emulates: a kernel thread, ksmd,
scans anonymous memory marked ``MADV_MERGEABLE``, merges identical pages
into write-protected KSM pages and breaks the sharing with a copy on the
first write.  This module drives the real thing so that hvshare's
benchmarks can put its numbers next to the kernel's, measured side by side
on the same machine in the same run.

Design:

* **Knobs are borrowed, never kept.**  KSM is configured through global
  files in ``/sys/kernel/mm/ksm``.  :func:`ksm_session` snapshots every
  writable knob on entry and writes back whatever differs on exit, also on
  exceptions, ``KeyboardInterrupt`` and ``SIGTERM`` (converted to
  ``SystemExit`` for the session).  ``max_page_sharing`` and
  ``merge_across_nodes`` can only change while no KSM page exists, so both
  setting and restoring them go through ``run=2`` (stop and unmerge
  everything) first; ``run`` itself is always written last.  Sessions of
  different processes are serialised with an ``flock`` so two benchmarks (or
  a benchmark and the tests) do not fight over the global knobs and
  counters; nested sessions in one process share the outer lock.
* **Counters are global, so measure deltas in a quiet system.**  A merge
  takes a baseline of ``pages_shared``/``pages_sharing`` right before ksmd
  starts.  Rmap items of regions this process already unmapped linger in
  the counters until ksmd rescans, so a merge first lets ksmd sweep them
  away; other processes with mergeable memory are listed in
  :attr:`KsmRegion.foreign_pids` so a report can flag a noisy run.  ksmd is
  stopped (``run=0``) as soon as the merge is complete, so it neither burns
  a core nor re-merges pages while copy-on-write or munmap is timed.
* **Merge time** is the time from ``run=1`` until the counters last
  changed: polling stops early when the expected counts (computed from the
  page contents and ``max_page_sharing``) are reached, or when two full
  scans pass without a change.
* **Copy-on-write break** writes one byte per merged page, flipping the byte
  at offset ``i % 4096`` of page ``i``: the broken pages then differ from
  each other (up to 4096 pages) and a later rescan does not merge them again,
  so the counters really drop.  :meth:`KsmRegion.write_floor` times the same
  writes on pages that are already private: the cost of the timing itself.
* Everything that measures returns a dict; where KSM cannot be used the dict
  is ``{"skipped": "<one-line reason>"}`` instead of an exception.

Page contents (``zero``, ``identical``, ``clone``) come from
:func:`page_content`/:func:`clone_content`, which are deterministic by seed
so hvshare's benchmarks can build exactly the same guest memory.

``python -m perf.ksm`` prints the headline numbers; ``python -m perf ksm``
runs the same through the benchmark runner (:func:`run`/:func:`report`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import mmap
import os
import signal
import statistics
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .common import latency_percentiles

KSM_DIR = Path("/sys/kernel/mm/ksm")
PAGE_SIZE = 4096
CONTENTS = ("zero", "identical", "clone")
LOCK_PATH = "/tmp/hvshare-ksm.lock"

# These two may only change while no KSM page exists (the kernel says EBUSY).
_NEEDS_UNMERGE = ("max_page_sharing", "merge_across_nodes")
_KPF_KSM = 1 << 21          # /proc/kpageflags bit of a KSM page
_PM_PRESENT = 1 << 63       # /proc/self/pagemap: page present
_PM_PFN_MASK = (1 << 55) - 1

_sessions: list["KsmSession"] = []           # this process's open sessions, outermost first
_live_regions: "weakref.WeakSet[KsmRegion]" = weakref.WeakSet()


class KsmUnavailable(RuntimeError):
    """KSM cannot be used here; ``str(exc)`` is the one-line reason."""


# --------------------------------------------------------------------------
# sysfs access

def ksm_available() -> str | None:
    """``None`` if KSM can be driven from this process, else a one-line reason.

    Checks without writing anything, so it is safe to call at test
    collection while another process holds a session.
    """
    if not hasattr(mmap, "MADV_MERGEABLE"):
        return "KSM unavailable: this platform has no MADV_MERGEABLE (not Linux)"
    if not (KSM_DIR / "run").exists():
        return f"KSM absent: {KSM_DIR} does not exist (kernel built without CONFIG_KSM)"
    if os.geteuid() != 0:
        return f"KSM read-only: changing {KSM_DIR} needs root (euid {os.geteuid()})"
    try:
        if os.statvfs(KSM_DIR).f_flag & os.ST_RDONLY:
            return f"KSM read-only: {KSM_DIR} is on a read-only mount"
    except OSError as e:
        return f"KSM unavailable: cannot stat {KSM_DIR}: {e.strerror}"
    if not os.access(KSM_DIR / "run", os.W_OK):
        return f"KSM read-only: {KSM_DIR / 'run'} is not writable"
    return None


def read_knob(name: str) -> str:
    """Current value of a KSM file; for choice files like ``advisor_mode``
    (``[none] scan-time``) the selected choice, which is what writing takes."""
    text = (KSM_DIR / name).read_text().strip()
    if "[" in text:
        text = text[text.index("[") + 1:text.index("]")]
    return text


def write_knob(name: str, value: object) -> None:
    """Write one knob; errors (EBUSY, EINVAL, EPERM...) surface right here.

    ``os.write`` rather than a buffered file, whose error would only show at
    close and be easy to lose.
    """
    fd = os.open(KSM_DIR / name, os.O_WRONLY)
    try:
        os.write(fd, f"{value}\n".encode())
    except OSError as e:
        raise OSError(e.errno, f"writing {value!r} to {KSM_DIR / name}: {e.strerror}") from None
    finally:
        os.close(fd)


def writable_knobs() -> list[str]:
    """Names of the writable files in the KSM directory (the knobs)."""
    return sorted(p.name for p in KSM_DIR.iterdir() if p.is_file() and p.stat().st_mode & 0o200)


def counters() -> dict[str, int]:
    """The global read-only KSM counters (``pages_shared``, ``full_scans``...)."""
    out = {}
    for p in KSM_DIR.iterdir():
        if p.is_file() and not p.stat().st_mode & 0o200:
            try:
                out[p.name] = int(p.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return out


def process_ksm_stat(pid: int | str = "self") -> dict[str, object]:
    """``/proc/<pid>/ksm_stat`` as a dict (Linux 6.1+); empty if unreadable."""
    out: dict[str, object] = {}
    try:
        text = Path(f"/proc/{pid}/ksm_stat").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, val = line.partition(" ")
        key, val = key.rstrip(":"), val.strip()
        out[key] = int(val) if val.lstrip("-").isdigit() else val
    return out


def foreign_mergers() -> list[int]:
    """Pids of other processes with memory KSM may scan: they add noise to
    the global counters and take ksmd's time."""
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        st = process_ksm_stat(entry)
        if st.get("ksm_mergeable") == "yes" or st.get("ksm_merge_any") == "yes" \
                or int(st.get("ksm_rmap_items", 0) or 0) > 0:
            pids.append(int(entry))
    return pids


class _Poller:
    """Cheap repeated reads of a few counters: sysfs files regenerate their
    text on a read at offset 0, so an open fd plus ``pread`` is enough."""

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self.fds = [os.open(KSM_DIR / n, os.O_RDONLY) for n in self.names]

    def read(self) -> tuple[int, ...]:
        return tuple(int(os.pread(fd, 64, 0)) for fd in self.fds)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


# --------------------------------------------------------------------------
# sessions

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
                    if outer and _own_stale() and not any(
                            read_knob(k) != session.saved[k] for k in _NEEDS_UNMERGE if k in session.saved):
                        # leave the global counters true for whoever comes next
                        # (restoring those two knobs unmerges everything anyway)
                        _run_scans(session, 2, timeout=10.0)
                except Exception:
                    pass
                finally:
                    _sessions.remove(session)
                    session.restore()


@contextlib.contextmanager
def _current_session() -> Iterator[KsmSession]:
    """The innermost open session, or a new one just for this operation."""
    if _sessions:
        yield _sessions[-1]
    else:
        with ksm_session() as s:
            yield s


# --------------------------------------------------------------------------
# page contents

def clone_content(n_pages: int, seed: int = 0, *, image_seed: int = 0,
                  image_fraction: float = 0.6, zero_fraction: float = 0.15,
                  image_pages: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Memory of a guest cloned from a common image: ``(n_pages, 4096) uint8``.

    Page ``i`` is, by a draw seeded with ``seed``: a page of the common image
    (probability ``image_fraction``), a zero page (``zero_fraction``) or a
    private random page (the rest).  The image is ``image_pages`` random
    pages seeded with ``image_seed`` (default: one image page per four image
    draws, so image pages repeat within one guest as shared libraries and
    page-cache copies do) and is the same for every ``seed``: clones with
    different seeds share it, as guests booted from one template do.
    Deterministic and vectorised; ``out`` fills an existing array (e.g. a
    view of guest memory) instead of allocating one.
    """
    if n_pages < 0 or not 0 <= image_fraction + zero_fraction <= 1:
        raise ValueError("bad clone_content parameters")
    rng = np.random.default_rng([seed, 0x6B736D])          # per-guest choices
    kind = rng.random(n_pages)                                # <img | <img+zero | private
    is_img = kind < image_fraction
    is_zero = (kind >= image_fraction) & (kind < image_fraction + zero_fraction)
    is_priv = ~(is_img | is_zero)
    if image_pages is None:
        image_pages = max(1, round(n_pages * image_fraction / 4))
    img_idx = rng.integers(0, image_pages, int(is_img.sum()))
    priv = rng.integers(0, 256, (int(is_priv.sum()), PAGE_SIZE), dtype=np.uint8)
    image = np.random.default_rng([image_seed, 0x696D67]).integers(
        0, 256, (image_pages, PAGE_SIZE), dtype=np.uint8)
    if out is None:
        out = np.empty((n_pages, PAGE_SIZE), dtype=np.uint8)
    elif out.shape != (n_pages, PAGE_SIZE) or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 of shape ({n_pages}, {PAGE_SIZE})")
    out[is_img] = image[img_idx]
    out[is_zero] = 0
    out[is_priv] = priv
    return out


def page_content(content: str, n_pages: int, seed: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """Page contents by name: ``zero``, ``identical`` (one random page by
    ``seed``, repeated) or ``clone`` (:func:`clone_content`)."""
    if out is None:
        out = np.empty((n_pages, PAGE_SIZE), dtype=np.uint8)
    if content == "zero":
        out[:] = 0
    elif content == "identical":
        out[:] = np.random.default_rng([seed, 0x696474]).integers(0, 256, PAGE_SIZE, dtype=np.uint8)
    elif content == "clone":
        clone_content(n_pages, seed, out=out)
    else:
        raise ValueError(f"content must be one of {CONTENTS}, not {content!r}")
    return out


def duplicate_groups(pages: np.ndarray) -> np.ndarray:
    """Sizes of the groups of identical pages (one entry per distinct page).

    Pages are compared by a 64-bit multiplicative hash of their 512 words;
    a collision would need ~2**32 distinct pages, far beyond any run here.
    """
    words = np.ascontiguousarray(pages).view(np.uint64)
    mult = np.random.default_rng(12345).integers(1, 2**63, words.shape[1], dtype=np.uint64) | np.uint64(1)
    h = np.zeros(len(words), dtype=np.uint64)
    for start in range(0, len(words), 8192):          # bounded temporaries
        chunk = words[start:start + 8192]
        h[start:start + 8192] = (chunk * mult).sum(axis=1, dtype=np.uint64)
    return np.unique(h, return_counts=True)[1]


def expected_counts(groups: np.ndarray | Sequence[int], max_page_sharing: int) -> tuple[int, int]:
    """``(pages_shared, pages_sharing)`` KSM ends with for these groups.

    A KSM page holds at most ``max_page_sharing`` mappings; a full one gets
    a sibling (a "dup" of a stable-node chain) as soon as two more identical
    pages meet, and a single leftover page has nobody to merge with.
    """
    g = np.asarray(groups, dtype=np.int64)
    g = g[g >= 2]
    full, rem = np.divmod(g, max_page_sharing)
    kpages = full + (rem >= 2)
    merged = g - (rem == 1)
    return int(kpages.sum()), int((merged - kpages).sum())


# --------------------------------------------------------------------------
# a merged region

class KsmRegion:
    """A private anonymous mapping whose pages KSM merged.

    Keeps the mapping alive (``mm``, ``array`` is its ``(n_pages, 4096)``
    view) with what the merge measured: ``merge_seconds``, ``pages_shared``
    and ``pages_sharing`` (deltas of the global counters), the expected
    counts, ``complete`` (expected counts reached), ``foreign_pids``.
    ``close()`` unmaps and returns the munmap time.  Do not keep other
    references to ``array`` across ``close()``: an exported buffer makes the
    unmap fail (``BufferError``).
    """

    def __init__(self, n_pages: int, content: str, seed: int):
        self.n_pages, self.content, self.seed = n_pages, content, seed
        self.mm: mmap.mmap | None = mmap.mmap(
            -1, n_pages * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            prot=mmap.PROT_READ | mmap.PROT_WRITE)
        # KSM splits huge pages before merging; 4 KiB pages keep it comparable.
        self.mm.madvise(mmap.MADV_NOHUGEPAGE)
        self.array: np.ndarray | None = np.frombuffer(self.mm, dtype=np.uint8).reshape(n_pages, PAGE_SIZE)
        self.merge_seconds = math.nan
        self.madvise_seconds = math.nan
        self.pages_shared = self.pages_sharing = 0
        self.expected_shared = self.expected_sharing = 0
        self.max_page_sharing = 0
        self.complete = False
        self.full_scans = 0
        self.foreign_pids: list[int] = []
        self.munmap_seconds: float | None = None
        self._base = (0, 0)
        _live_regions.add(self)

    # -- counters

    def counters(self) -> dict[str, int]:
        """Current deltas of the global counters against the merge baseline
        (only as fresh as ksmd's last scan: see :meth:`rescan`)."""
        shared, sharing = int(read_knob("pages_shared")), int(read_knob("pages_sharing"))
        return {"pages_shared": shared - self._base[0], "pages_sharing": sharing - self._base[1]}

    def rescan(self, full_scans: int = 2, timeout: float = 30.0) -> dict[str, int]:
        """Let ksmd run ``full_scans`` full scans, then stop it, so the
        counters catch up with writes and unmaps since the merge.  Returns
        :meth:`counters`."""
        with _current_session() as s:
            _run_scans(s, full_scans, timeout)
        return self.counters()

    def ksm_mask(self) -> np.ndarray:
        """Per page: is it mapped to a KSM page right now?  Read from
        ``/proc/self/pagemap`` and ``/proc/kpageflags`` (root), so it is exact
        and immediate, unlike the counters."""
        self._check_open()
        base = self.array.ctypes.data
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            raw = os.pread(f.fileno(), self.n_pages * 8, base // PAGE_SIZE * 8)
        ent = np.frombuffer(raw, dtype=np.uint64)
        present = (ent & np.uint64(_PM_PRESENT)) != 0
        pfn = ent & np.uint64(_PM_PFN_MASK)
        mask = np.zeros(self.n_pages, dtype=bool)
        uniq, inv = np.unique(pfn, return_inverse=True)
        flags = np.zeros(len(uniq), dtype=np.uint64)
        with open("/proc/kpageflags", "rb", buffering=0) as f:
            for i, p in enumerate(uniq.tolist()):
                if p:
                    flags[i] = int.from_bytes(os.pread(f.fileno(), 8, p * 8), "little")
        mask[:] = ((flags[inv] & np.uint64(_KPF_KSM)) != 0) & present
        return mask

    # -- copy-on-write

    def _targets(self, pages) -> tuple[np.ndarray, np.ndarray]:
        self._check_open()
        idx = np.arange(self.n_pages) if pages is None else np.asarray(pages, dtype=np.int64).ravel()
        return idx, idx * PAGE_SIZE + (idx % PAGE_SIZE)

    def cow_break(self, pages: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Write one byte into each page (all pages by default) and time every
        write alone: ``int64`` latencies in ns, one per page, in order.

        Page ``i`` gets the byte at offset ``i % 4096`` inverted, so the
        content changes visibly and broken pages stay distinct.
        """
        idx, pos = self._targets(pages)
        values = (self.array.reshape(-1)[pos] ^ 0xFF).tolist()
        return self._timed_writes(pos.tolist(), values)

    def write_floor(self, pages: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """The same timed one-byte writes, rewriting the current value: on
        pages already private this is the cost of the timing loop itself."""
        idx, pos = self._targets(pages)
        return self._timed_writes(pos.tolist(), self.array.reshape(-1)[pos].tolist())

    def _timed_writes(self, pos: list[int], values: list[int]) -> np.ndarray:
        lat = [0] * len(pos)
        clock = time.perf_counter_ns
        with memoryview(self.mm) as mv:
            for j, (p, v) in enumerate(zip(pos, values)):
                t0 = clock()
                mv[p] = v
                lat[j] = clock() - t0
        return np.array(lat, dtype=np.int64)

    def cow_break_batched(self, pages: Sequence[int] | np.ndarray | None = None) -> float:
        """Break all pages (all by default) with one vectorised numpy write
        (same bytes as :meth:`cow_break`); returns pages per second."""
        idx, pos = self._targets(pages)
        flat = self.array.reshape(-1)
        values = flat[pos] ^ 0xFF
        t0 = time.perf_counter()
        flat[pos] = values
        dt = time.perf_counter() - t0
        return len(idx) / dt if dt > 0 else math.inf

    # -- teardown

    def close(self) -> float:
        """Unmap the region; returns the munmap time in seconds (the first
        close's time again on later calls)."""
        if self.mm is not None:
            self.array = None
            mm, self.mm = self.mm, None
            t0 = time.perf_counter()
            mm.close()
            self.munmap_seconds = time.perf_counter() - t0
        return self.munmap_seconds or 0.0

    def _check_open(self) -> None:
        if self.mm is None:
            raise ValueError("KsmRegion is closed")

    def __enter__(self) -> "KsmRegion":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def summary(self) -> dict:
        """The merge measurements as a JSON-able dict."""
        return {
            "n_pages": self.n_pages, "content": self.content, "seed": self.seed,
            "merge_seconds": self.merge_seconds, "madvise_seconds": self.madvise_seconds,
            "pages_shared": self.pages_shared, "pages_sharing": self.pages_sharing,
            "expected_shared": self.expected_shared, "expected_sharing": self.expected_sharing,
            "max_page_sharing": self.max_page_sharing, "complete": self.complete,
            "full_scans": self.full_scans, "foreign_pids": self.foreign_pids,
        }


def _fast_scan_knobs(pages_to_scan: int) -> dict[str, object]:
    knobs: dict[str, object] = {"pages_to_scan": pages_to_scan, "sleep_millisecs": 0, "use_zero_pages": 0}
    if "advisor_mode" in _sessions[-1].saved:
        knobs["advisor_mode"] = "none"      # the advisor would override pages_to_scan
    return knobs


def _run_scans(session: KsmSession, n: int, timeout: float, pages_to_scan: int = 20000,
               idle_seconds: float = 0.05) -> None:
    """Run ksmd fast for ``n`` full scans, then stop it.

    Also stops when ksmd goes idle (``pages_scanned`` still for
    ``idle_seconds``): once no process has mergeable memory left, ksmd
    sleeps and ``full_scans`` no longer moves.
    """
    session.set(**_fast_scan_knobs(pages_to_scan))
    poll = _Poller(["full_scans", "pages_scanned"])
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


def _own_stale() -> bool:
    """Does this process still have rmap items of regions it unmapped?"""
    live = sum(r.n_pages for r in list(_live_regions) if r.mm is not None)
    return int(process_ksm_stat().get("ksm_rmap_items", 0) or 0) > live


def _sweep_stale(session: KsmSession, timeout: float = 60.0) -> None:
    """Rmap items of unmapped regions (ours, or of processes that exited)
    stay counted until ksmd rescans, and would vanish in the middle of the
    next measurement; two full scans sweep them before a baseline is taken."""
    c = counters()
    if _own_stale() or c.get("pages_shared", 0) + c.get("pages_sharing", 0) > 0:
        _run_scans(session, 2, timeout)


def merge(n_pages: int, content: str = "identical", seed: int = 0, *,
          pages_to_scan: int = 20000, timeout: float | None = None,
          settle_scans: int = 2, poll_seconds: float = 0.0005) -> KsmRegion:
    """Fill a new region with ``content``, let KSM merge it, return it.

    Runs in the current :func:`ksm_session` (or a private one for the call),
    with ``use_zero_pages=0`` (zero pages merge like any other),
    ``sleep_millisecs=0`` and ``pages_to_scan``; ksmd is stopped again once
    the expected counts are reached, or the counters stayed still for
    ``settle_scans`` full scans, or ``timeout`` s passed (``complete`` says
    which).  Raises :class:`KsmUnavailable` if KSM cannot be used.
    """
    if content not in CONTENTS:
        raise ValueError(f"content must be one of {CONTENTS}, not {content!r}")
    if timeout is None:
        timeout = 30.0 + n_pages * 1e-4
    with _current_session() as s:
        s.set(run=0, **_fast_scan_knobs(pages_to_scan))
        _sweep_stale(s)
        region = KsmRegion(n_pages, content, seed)
        try:
            page_content(content, n_pages, seed, out=region.array)   # faults every page in
            mps = int(read_knob("max_page_sharing"))
            groups = [n_pages] if content != "clone" else duplicate_groups(region.array)
            region.expected_shared, region.expected_sharing = expected_counts(groups, mps)
            region.max_page_sharing = mps
            region.foreign_pids = foreign_mergers()
            _wait_merged(s, region, timeout, settle_scans, poll_seconds)
        except BaseException:
            region.close()
            raise
    return region


def _wait_merged(s: KsmSession, region: KsmRegion, timeout: float, settle_scans: int, poll_seconds: float) -> None:
    poll = _Poller(["pages_shared", "pages_sharing", "full_scans"])
    try:
        b_shared, b_sharing, b_scans = poll.read()
        region._base = (b_shared, b_sharing)
        t0 = time.perf_counter()
        region.mm.madvise(mmap.MADV_MERGEABLE)
        region.madvise_seconds = time.perf_counter() - t0
        want = (region.expected_shared, region.expected_sharing)
        last = (0, 0)
        t0 = t_change = time.perf_counter()
        scans_at_change = b_scans
        write_knob("run", 1)
        while True:
            shared, sharing, scans = poll.read()
            now = time.perf_counter()
            cur = (shared - b_shared, sharing - b_sharing)
            if cur != last:
                last, t_change, scans_at_change = cur, now, scans
            if cur == want and want != (0, 0):
                region.complete = True
                break
            if scans - scans_at_change >= settle_scans:
                region.complete = cur == want
                break
            if now - t0 > timeout:
                break
            time.sleep(poll_seconds)
    finally:
        write_knob("run", 0)
        try:
            region.full_scans = poll.read()[2] - b_scans
        finally:
            poll.close()
    region.merge_seconds = t_change - t0
    region.pages_shared, region.pages_sharing = last


# --------------------------------------------------------------------------
# measurements (dicts; {"skipped": reason} where KSM cannot be used)

def _skip_reason(e: BaseException) -> str | None:
    if isinstance(e, KsmUnavailable):
        return str(e)
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"KSM read-only: {e.strerror or e}"
    return None


@contextlib.contextmanager
def _skippable(out: dict) -> Iterator[None]:
    """Turn 'KSM cannot be used' (found late: a busy lock, EPERM in a
    container) into ``out["skipped"]``; re-raise anything else."""
    try:
        yield
    except (KsmUnavailable, OSError) as e:
        reason = _skip_reason(e)
        if reason is None:
            raise
        out.clear()
        out["skipped"] = reason


def latency_stats(lat_ns: np.ndarray) -> dict[str, float]:
    """Percentiles (``CDF_PERCENTILES``: p50, p99 and more) and mean of latencies in ns."""
    return latency_percentiles(lat_ns, "ns")


def measure_merge(n_pages: int = 50_000, content: str = "identical", seed: int = 0, repeats: int = 1) -> dict:
    """Merge ``n_pages`` of ``content`` ``repeats`` times (fresh regions).

    Returns the last region's :meth:`KsmRegion.summary` with
    ``merge_seconds`` replaced by the median, plus ``merge_seconds_all``,
    ``pages_per_second`` (pages merged per second of ksmd time) and
    ``sharing_ratio`` (``pages_sharing / pages_shared``).
    """
    if reason := ksm_available():
        return {"n_pages": n_pages, "content": content, "skipped": reason}
    out: dict = {"n_pages": n_pages, "content": content}
    with _skippable(out), ksm_session():
        times = []
        for r in range(repeats):
            with merge(n_pages, content, seed) as region:
                times.append(region.merge_seconds)
                out.update(region.summary())
        out["merge_seconds_all"] = times
        out["merge_seconds"] = statistics.median(times)
        merged = out["pages_shared"] + out["pages_sharing"]
        out["pages_per_second"] = merged / out["merge_seconds"] if out["merge_seconds"] > 0 else math.inf
        out["sharing_ratio"] = out["pages_sharing"] / out["pages_shared"] if out["pages_shared"] else math.nan
    return out


def measure_cow_break(n_pages: int = 50_000, content: str = "identical", seed: int = 0) -> dict:
    """Per-page CoW break latencies on a freshly merged region.

    Only pages that really are KSM pages are written (``ksm_mask``).  Returns
    ``p50_ns``/``p99_ns``/``mean_ns`` of the timed writes, ``floor_p50_ns``
    (the same writes again, no fault: the timing overhead), ``pages``
    written, the counter deltas ``before`` and ``after`` a rescan, and the
    merge summary under ``merge``.
    """
    if reason := ksm_available():
        return {"n_pages": n_pages, "content": content, "skipped": reason}
    out: dict = {"n_pages": n_pages, "content": content}
    with _skippable(out), ksm_session():
        with merge(n_pages, content, seed) as region:
            targets = np.flatnonzero(region.ksm_mask())
            lat = region.cow_break(targets)
            floor = region.write_floor(targets)
            out["pages"] = int(len(targets))
            out.update(latency_stats(lat))
            out["floor_p50_ns"] = latency_stats(floor)["p50_ns"]
            out["still_ksm_after"] = int(region.ksm_mask().sum())
            out["merge"] = region.summary()
    return out


def measure_cow_batched(n_pages: int = 50_000, content: str = "identical", seed: int = 0, repeats: int = 3) -> dict:
    """CoW break of all merged pages by one numpy write; median of
    ``repeats`` fresh merges.  Returns ``pages_per_second``,
    ``seconds`` (for ``pages`` pages) and ``pages_per_second_all``."""
    if reason := ksm_available():
        return {"n_pages": n_pages, "content": content, "skipped": reason}
    out: dict = {"n_pages": n_pages, "content": content}
    with _skippable(out), ksm_session():
        rates = []
        for _ in range(repeats):
            with merge(n_pages, content, seed) as region:
                targets = np.flatnonzero(region.ksm_mask())
                rates.append(region.cow_break_batched(targets))
                out["pages"] = int(len(targets))
        out["pages_per_second_all"] = rates
        out["pages_per_second"] = statistics.median(rates)
        out["seconds"] = out["pages"] / out["pages_per_second"]
    return out


def measure_munmap(n_pages: int = 100_000, seed: int = 0, repeats: int = 1) -> dict:
    """munmap of ``n_pages`` all merged into ONE KSM page (hvshare's
    teardown case), next to munmap of as many private pages.

    ``max_page_sharing`` is raised to ``n_pages`` for the session (which
    means unmerging every KSM page of the system first, and again when it
    is restored).  Returns ``seconds`` (median), ``baseline_seconds``
    (median munmap of unmerged private pages), ``ratio``, ``seconds_all``,
    the merge summary under ``merge``; skipped if memory is short.
    """
    if reason := ksm_available():
        return {"n_pages": n_pages, "skipped": reason}
    out: dict = {"n_pages": n_pages}
    need = n_pages * PAGE_SIZE
    try:
        import psutil
        avail = psutil.virtual_memory().available
    except Exception:
        avail = None
    if avail is not None and need * 1.5 > avail:
        return {"n_pages": n_pages, "skipped": f"not enough memory: {need >> 20} MiB needed, {avail >> 20} MiB available"}
    with _skippable(out), ksm_session(max_page_sharing=max(n_pages, 2)):
        base, merged = [], []
        for _ in range(repeats):
            plain = KsmRegion(n_pages, "identical", seed)
            page_content("identical", n_pages, seed, out=plain.array)
            base.append(plain.close())
            with merge(n_pages, "identical", seed) as region:
                out["merge"] = region.summary()
                out["single_ksm_page"] = region.pages_shared == 1 and region.pages_sharing == n_pages - 1
                merged.append(region.close())
        out["seconds_all"] = merged
        out["baseline_seconds_all"] = base
        out["seconds"] = statistics.median(merged)
        out["baseline_seconds"] = statistics.median(base)
        out["ratio"] = out["seconds"] / out["baseline_seconds"] if out["baseline_seconds"] > 0 else math.nan
    return out


# --------------------------------------------------------------------------
# benchmark-runner protocol and CLI

def run(quick: bool = False, munmap_pages: int | None = None) -> dict:
    """The headline KSM numbers as a ``perf`` benchmark result."""
    n = 5_000 if quick else 50_000
    m = munmap_pages or (20_000 if quick else 100_000)
    res = {
        "merge": measure_merge(n, "identical", repeats=1 if quick else 3),
        "merge_clone": measure_merge(n, "clone", repeats=1),
        "cow_break": measure_cow_break(n),
        "cow_batched": measure_cow_batched(n, repeats=1 if quick else 3),
        "munmap": measure_munmap(m, repeats=1 if quick else 3),
    }
    skipped = next((r["skipped"] for r in res.values() if "skipped" in r), None)
    out = {"results": res}
    if skipped:
        out["skipped"] = skipped
    return out


def report(result: dict) -> str:
    from .common import table
    if "skipped" in result:
        return f"KSM: skipped: {result['skipped']}"
    r = result["results"]
    rows = []
    for key in ("merge", "merge_clone"):
        m = r[key]
        rows.append([f"merge {m['n_pages']:,} {m['content']} pages", f"{m['merge_seconds']:.3f} s",
                     f"shared {m['pages_shared']:,} sharing {m['pages_sharing']:,} "
                     f"(ratio {m['sharing_ratio']:.1f}, {m['pages_per_second']:,.0f} pages/s"
                     f"{'' if m['complete'] else ', INCOMPLETE'})"])
    c = r["cow_break"]
    rows.append([f"CoW break, {c['pages']:,} pages one by one",
                 f"p50 {c['p50_ns'] / 1e3:.2f} us", f"p99 {c['p99_ns'] / 1e3:.2f} us "
                 f"(timing floor {c['floor_p50_ns']:.0f} ns)"])
    b = r["cow_batched"]
    rows.append([f"CoW break, {b['pages']:,} pages in one numpy write",
                 f"{b['pages_per_second']:,.0f} pages/s", f"{b['seconds'] * 1e3:.1f} ms"])
    u = r["munmap"]
    if "skipped" in u:
        rows.append(["munmap", "skipped", u["skipped"]])
    else:
        rows.append([f"munmap {u['n_pages']:,} pages merged into "
                     f"{u['merge']['pages_shared']} KSM page(s)", f"{u['seconds'] * 1e3:.1f} ms",
                     f"private pages {u['baseline_seconds'] * 1e3:.1f} ms (x{u['ratio']:.2f}); "
                     f"merge took {u['merge']['merge_seconds']:.2f} s"])
    foreign = sorted({p for v in r.values() for p in (v.get("merge", v).get("foreign_pids") or [])})
    text = "Linux KSM\n" + table(["measure", "value", "detail"], rows)
    if foreign:
        text += f"\nnote: other processes had mergeable memory (pids {foreign}); counters may be noisy"
    return text


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    p = argparse.ArgumentParser(prog="python -m perf.ksm", description="Linux KSM measured as hvshare's peer.")
    p.add_argument("--quick", action="store_true", help="small sizes, single repeats")
    p.add_argument("--munmap-pages", type=int, default=None, metavar="N",
                   help="pages merged into one KSM page for the munmap measure (default 100,000)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    a = p.parse_args(argv)
    reason = ksm_available()
    if reason:
        print(f"KSM: skipped: {reason}")
        return 0
    result = run(quick=a.quick, munmap_pages=a.munmap_pages)
    print(report(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
