"""Content sources read from outside: a live process's memory, or a file.

A domain made with ``create --from-pid`` or ``create --image`` is filled
by the hypervisor the way a domain builder fills one, a bounded chunk at
a time (:meth:`hvshare.hvcore.domains.DomainTable.build_step`). Its size
must be known before the first page is populated (the frames are
reserved then): a file's when it opens; a process's once its pages are
listed, which is the create's first phase, also a chunk at a time
(:meth:`ProcessSnapshot.list_step`). Then the source is read chunk by
chunk through :meth:`into`:

- :class:`ProcessSnapshot`: the process's anonymous private mappings
  (every readable mapping with ``all_mappings``) from ``/proc/PID/maps``;
  of those, the pages the pagemap says are present
  (:mod:`hvshare.hvcore.pagemap`, whose walk costs what is present, not
  the span mapped), in address order, kept as runs of adjacent pages.
  Swapped-out pages are counted, not read. Regions that cannot be
  read (no read permission, ``[vvar]``, ``[vsyscall]``) are skipped and
  counted. The bytes come from ``/proc/PID/mem``; a page that was unmapped
  between the listing and its read is zeroed and counted (``lost_pages``):
  a snapshot that loses such a race keeps what it read and says so. A
  process that is gone (exited, or its memory replaced by ``exec``) fails
  the create.
- :class:`FileImage`: a raw memory dump or disk image (its bytes, padded
  to a page) or an ELF core file (``gcore``, QEMU ``dump-guest-memory``):
  the file bytes of its ``PT_LOAD`` segments in header order, each padded
  to a page.

Both read with ``os.preadv`` straight into the frames, and both have
:meth:`report` (what the create answers) and :meth:`close`.
"""
from __future__ import annotations

import errno
import itertools
import os
import stat
import time

import numpy as np

from .budget import MIN_CHUNK_ITEMS, ChunkCost
from .constants import PAGE_SIZE
from .elfcore import core_segments
from .errors import EACCES, EINVAL, EIO, ENOENT, ESRCH, HVError
from .pagemap import PM_PRESENT, Pagemap

#: a listing chunk takes about this long when nothing preempts it
LIST_CHUNK_SECONDS = 0.0002
#: the first listing chunk, in units (later ones follow its rate)
FIRST_LIST_CHUNK = 1 << 12
#: the most units of one listing chunk (bounds a chunk after fast ones)
MAX_LIST_CHUNK = 1 << 13
#: units a maps line, a pagemap walk call and a maps block count for
#: (their fixed cost)
LINE_UNITS = 512
CALL_UNITS = 1024
MAPS_BLOCK_UNITS = 4096
#: runs of adjacent pages a listing has room for at first
FIRST_RUNS = 1024
#: bytes of /proc/PID/maps read at a time
MAPS_BLOCK = 1 << 16
#: special mappings /proc/PID/mem cannot read
_UNREADABLE = ("[vvar]", "[vvar_vclock]", "[vsyscall]")
#: offsets of /proc/PID/mem are signed: addresses past this cannot be read
_MAX_OFFSET = (1 << 63) - 1
#: most pages an image may hold: their byte offsets fit a signed 64-bit int
_MAX_IMAGE_PAGES = _MAX_OFFSET // PAGE_SIZE


class ProcessSnapshot:
    """The present pages of process ``pid`` as a domain's content.

    Opening reads the first block of ``/proc/PID/maps`` and keeps it,
    ``mem`` and ``pagemap`` open; the listing of the pages follows, all at once (``listed``) or
    a bounded chunk at a time through :meth:`list_step` (a create's first
    phase: its size is known only when the listing ends); :meth:`into`
    reads them. ``max_pages`` cuts the snapshot to its first pages in
    address order. Raises HVError: ESRCH (no such process, or it exited),
    EACCES (not allowed to read its memory), EINVAL (it has no present
    page to take).
    """

    def __init__(self, pid: int, all_mappings: bool = False, max_pages: int | None = None,
                 listed: bool = True):
        self.pid, self.all_mappings, self.max_pages = pid, all_mappings, max_pages
        self.source = f"pid {pid}"
        self.regions = self.skipped_regions = self.skipped_pages = self.swapped_pages = 0
        self.lost_pages = 0
        #: the snapshot's pages, once listed (None: still listing)
        self.npages = None
        self.found = 0                  # present pages listed so far
        self._mem = self._pagemap = self._maps = None
        # /proc/PID/maps, a block at a time: its lines, the next to take,
        # a line the block cut, and whether it is all read
        self._lines, self._line, self._carry, self._maps_read = [], 0, "", False
        try:
            self._maps = self._open_proc("maps")
            self._read_maps()
            if not self._lines:
                self._no_memory()
            self._mem = self._open_proc("mem")
            self._pagemap = self._open_proc("pagemap")
        except BaseException:
            self.close()
            raise
        self._pm = Pagemap(self._pagemap, pid)
        # the region being listed: (lo, hi), where the walk stands, its runs so far
        self._region, self._at = None, 0
        # the runs found (address, pages): ``_runs[:_nruns]``, those of the
        # region being listed from ``_mark`` on
        self._runs = np.empty((FIRST_RUNS, 2), dtype=np.int64)
        self._nruns = self._mark = 0
        self._cost = ChunkCost.rate(FIRST_LIST_CHUNK)
        if listed:
            self.list_step()

    def _open_proc(self, what: str, text: bool = False):
        path = f"/proc/{self.pid}/{what}"
        try:
            if text:
                with open(path) as f:
                    return f.read()
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise HVError(ESRCH, f"no process {self.pid}") from None
        except PermissionError:
            raise HVError(EACCES, f"not allowed to read the memory of process {self.pid} "
                                  f"(another user's process, or one that is not dumpable)") from None
        except ProcessLookupError:
            raise HVError(ESRCH, f"process {self.pid} exited before its snapshot") from None

    def _read_maps(self) -> None:
        """The next block of ``/proc/PID/maps`` as the lines to take (a
        process may have tens of thousands of mappings)."""
        try:
            block = os.read(self._maps, MAPS_BLOCK)
        except OSError as e:
            code = ESRCH if e.errno == errno.ESRCH else EACCES
            raise HVError(code, f"cannot read the mappings of process {self.pid}: {e.strerror}") from None
        text = self._carry + block.decode(errors="surrogateescape")
        lines = text.split("\n")
        self._carry = lines.pop() if block else ""
        self._lines, self._line = [x for x in lines if x], 0
        self._maps_read = not block

    def _no_memory(self) -> None:
        stat_line = self._open_proc("stat", text=True)
        if stat_line[stat_line.rfind(")") + 2:].startswith("Z"):
            raise HVError(ESRCH, f"process {self.pid} exited before its snapshot")
        raise HVError(EINVAL, f"process {self.pid} has no memory of its own (a kernel thread)")

    @property
    def listed(self) -> bool:
        return self.npages is not None

    def list_step(self, should_yield=None, chunk_seconds: float | None = None) -> bool:
        """List more of the pages; True once the listing is done (then
        ``npages`` is the snapshot's size). Without ``should_yield``, all
        of them; otherwise chunk by chunk, each sized to take about
        ``chunk_seconds``, asking ``should_yield()`` after each (the first
        chunk always runs). A failure closes the snapshot and is raised."""
        if self.listed:
            return True
        clock, cost = time.perf_counter, self._cost
        chunk_seconds = chunk_seconds or LIST_CHUNK_SECONDS
        try:
            while not self._walked():
                t0 = clock()
                k = MAX_LIST_CHUNK if should_yield is None else \
                    min(MAX_LIST_CHUNK, max(MIN_CHUNK_ITEMS, cost.items(chunk_seconds, chunk_seconds)))
                cost.learn(self._list_chunk(k), clock() - t0)
                if should_yield is not None and not self._walked() and should_yield():
                    return False
            self._end_listing()
        except BaseException:
            self.close()
            raise
        return True

    def _walked(self) -> bool:
        cut = self.max_pages is not None and self.found >= self.max_pages
        return cut or (self._region is None and self._line >= len(self._lines) and self._maps_read)

    def _list_chunk(self, k: int) -> int:
        """List up to about ``k`` units of work (a page found or a pagemap
        entry read; a maps line or a walk call counts as several); the
        units done."""
        done = 0
        while done < k and not self._walked():
            if self._region is None and self._line >= len(self._lines):
                done += MAPS_BLOCK_UNITS
                self._read_maps()
                continue
            if self._region is None:
                done += LINE_UNITS
                self._take_line(self._lines[self._line])
                self._line += 1
                continue
            lo, hi = self._region
            got = self._pm.runs(self._at, hi, k - done)
            done += CALL_UNITS
            if got is None:
                self._skip(lo, hi)
                continue
            starts, counts, swapped, self._at, spent = got
            done += spent
            self.swapped_pages += swapped
            if len(starts):
                self._add_runs(starts, counts)
            if self._at >= hi or self._walked():
                self.regions += 1
                self._region, self._mark = None, self._nruns
        return done

    def _add_runs(self, starts: np.ndarray, counts: np.ndarray) -> None:
        n, m = self._nruns, len(starts)
        if n + m > len(self._runs):         # grown by doubling: amortised O(1) a run
            grown = np.empty((max(2 * len(self._runs), n + m), 2), dtype=np.int64)
            grown[:n] = self._runs[:n]
            self._runs = grown
        self._runs[n:n + m, 0] = starts
        self._runs[n:n + m, 1] = counts
        self._nruns = n + m
        self.found += int(counts.sum())

    def _take_line(self, line: str) -> None:
        """Start listing the region of a maps line, or count it skipped."""
        f = line.split(maxsplit=5)
        if len(f) < 5:
            return
        lo, hi = (int(x, 16) for x in f[0].split("-"))
        perms, inode = f[1], int(f[4])
        path = f[5].strip() if len(f) > 5 else ""
        anonymous = inode == 0 and (path in ("", "[heap]") or path.startswith(("[stack", "[anon:")))
        if not self.all_mappings and not (anonymous and perms[3] == "p"):
            return
        if perms[0] != "r" or path in _UNREADABLE or hi > _MAX_OFFSET:
            self._skip(lo, hi)
            return
        self._region, self._at, self._mark = (lo, hi), lo, self._nruns

    def _skip(self, lo: int, hi: int) -> None:
        """A region that cannot be read: counted, and nothing of it taken."""
        self.found -= int(self._runs[self._mark:self._nruns, 1].sum())
        self._nruns = self._mark
        self.skipped_regions += 1
        self.skipped_pages += (hi - lo) // PAGE_SIZE
        self._region = None

    def _end_listing(self) -> None:
        """The listing is done: the runs as arrays, cut to ``max_pages``."""
        runs = self._runs[:self._nruns]
        starts = runs[:, 0]
        first = np.concatenate([[0], np.cumsum(runs[:, 1])]).astype(np.int64)
        if self.max_pages is not None and first[-1] > self.max_pages:
            n = int(np.searchsorted(first, self.max_pages, "left"))
            starts, first = starts[:n], first[:n + 1].copy()
            first[-1] = self.max_pages
        if first[-1] == 0:
            if self._pm.gone():
                raise HVError(ESRCH, f"process {self.pid} exited during its snapshot")
            what = "mapping" if self.all_mappings else "anonymous private mapping"
            raise HVError(EINVAL, f"process {self.pid} has no present page in any readable {what}")
        #: per run of adjacent pages: its address and its first page (and the end)
        self._run_addr, self._run_first = starts.copy(), first
        self._runs = self._lines = None
        os.close(self._maps)
        self._maps = None
        self.npages = int(first[-1])

    @property
    def addrs(self) -> np.ndarray:
        """The address of every page of the snapshot, in order."""
        first = self._run_first
        base = np.repeat(self._run_addr - first[:-1] * PAGE_SIZE, np.diff(first))
        return base + np.arange(self.npages, dtype=np.int64) * PAGE_SIZE

    def __call__(self, start: int, count: int) -> np.ndarray:
        out = np.empty((count, PAGE_SIZE), dtype=np.uint8)
        self.into(out, start)
        return out

    def into(self, dst: np.ndarray, start: int) -> None:
        """Read the snapshot's pages ``start..start+len(dst)-1`` into ``dst``
        (past its end: zero pages), one read per run of adjacent pages
        (a listed snapshot only)."""
        n = len(dst)
        have = max(0, min(n, self.npages - start))
        if have < n:
            dst[have:] = 0
        if not have:
            return
        first, end = self._run_first, start + have
        for r in range(int(np.searchsorted(first, start, "right")) - 1,
                       int(np.searchsorted(first, end, "left"))):
            lo, hi = max(start, int(first[r])), min(end, int(first[r + 1]))
            addr = int(self._run_addr[r]) + (lo - int(first[r])) * PAGE_SIZE
            self._read_run(dst[lo - start:hi - start], addr)

    def _read_run(self, dst: np.ndarray, addr: int) -> None:
        """Read adjacent pages at ``addr`` into ``dst``; what cannot be read
        is zeroed and counted, what is present again is read again."""
        got = self._read(dst, addr)
        if got == len(dst):
            return
        rest, base = dst[got:], addr + got * PAGE_SIZE
        entries = self._pm.entries(base // PAGE_SIZE, len(rest))
        present = np.zeros(len(rest), dtype=bool) if entries is None else (entries & PM_PRESENT) != 0
        rest[~present] = 0
        self.lost_pages += int(np.count_nonzero(~present))
        edges = np.flatnonzero(np.diff(np.concatenate([[0], present.view(np.int8), [0]])))
        for i, j in zip(edges[::2].tolist(), edges[1::2].tolist()):
            part = rest[i:j]
            k = self._read(part, base + i * PAGE_SIZE)
            if k < len(part):
                part[k:] = 0
                self.lost_pages += len(part) - k

    def _read(self, dst: np.ndarray, addr: int) -> int:
        """Whole pages read into ``dst`` from ``addr`` (a short read keeps
        what came; the partial page is read again by the caller)."""
        try:
            got = os.preadv(self._mem, [dst], addr)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise HVError(ESRCH, f"process {self.pid} exited during its snapshot") from None
            return 0
        if got == 0 and self._pm.gone():
            raise HVError(ESRCH, f"process {self.pid} exited during its snapshot")
        return got // PAGE_SIZE

    def report(self) -> dict:
        return {"source": self.source, "pages": self.npages, "regions": self.regions,
                "skipped_regions": self.skipped_regions, "skipped_pages": self.skipped_pages,
                "swapped_pages": self.swapped_pages, "lost_pages": self.lost_pages}

    def close(self) -> None:
        for fd in (self._mem, self._pagemap, self._maps):
            if fd is not None:
                os.close(fd)
        self._mem = self._pagemap = self._maps = None


class FileImage:
    """A file's bytes as a domain's content: raw, or an ELF core's
    ``PT_LOAD`` segments (:mod:`hvshare.hvcore.elfcore`), each extent starting on a
    page of its own.

    Only a regular file or a block device is an image: anything else (a
    FIFO, a socket, a tty, a character device such as ``/dev/zero``) may
    block a read or has no size, and the hypervisor must never wait on a
    file. So the file is opened without blocking (``O_NONBLOCK``: a FIFO
    with no writer opens at once; ``O_NOCTTY``: a tty never becomes the
    hypervisor's terminal), and its type is taken from the open descriptor,
    not the path, so no rename can slip another file in between. Raises
    HVError: ENOENT (no such file), EACCES, EINVAL (empty, not a regular
    file or block device, a broken core)."""

    def __init__(self, path: str, max_pages: int | None = None):
        self.path = path
        self._fd = None
        try:
            # What is plainly no image is not even opened (opening a device
            # may act on it); the descriptor's type is what counts below.
            if not _may_be_image(os.stat(path).st_mode):
                raise _not_an_image(path, path)
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except FileNotFoundError:
            raise HVError(ENOENT, f"no file {path}") from None
        except PermissionError:
            raise HVError(EACCES, f"not allowed to read {path}") from None
        except OSError as e:
            if e.errno == errno.ENXIO:      # a socket, or a device with nothing behind it
                raise _not_an_image(path, path) from None
            raise HVError(EINVAL, f"cannot open {path}: {e.strerror}") from None
        try:
            self._describe(max_pages)
        except BaseException:
            self.close()
            raise

    def _describe(self, max_pages: int | None) -> None:
        st = os.fstat(self._fd)
        if not _may_be_image(st.st_mode):
            raise _not_an_image(self.path, self._fd)
        size = st.st_size if stat.S_ISREG(st.st_mode) else _device_size(self._fd)
        if size == 0:
            raise HVError(EINVAL, f"{self.path} is empty")
        segments = core_segments(self._fd, size, self.path)
        self.kind = "raw" if segments is None else "elf-core"
        if segments is None:
            segments = [(0, size)]
        firsts = list(itertools.accumulate((-(-n // PAGE_SIZE) for _, n in segments), initial=0))
        page = firsts[-1]
        if page > _MAX_IMAGE_PAGES:         # overlapping segments of a huge sparse core
            raise HVError(EINVAL, f"{self.path} holds {page} pages, more than any domain can have")
        # per extent: file offset, bytes, first page (arrays: a core may have
        # thousands, and a read finds its own by bisection)
        self._off = np.array([o for o, _ in segments], dtype=np.int64)
        self._bytes = np.array([n for _, n in segments], dtype=np.int64)
        self._first = np.array(firsts, dtype=np.int64)
        if page == 0:
            raise HVError(EINVAL, f"{self.path} is an ELF core file without memory in its PT_LOAD segments")
        self.segments = len(segments)
        self.source_pages = page
        self.npages = page if max_pages is None else min(page, max_pages)
        self.source = f"{self.kind} {self.path}"

    def __call__(self, start: int, count: int) -> np.ndarray:
        out = np.empty((count, PAGE_SIZE), dtype=np.uint8)
        self.into(out, start)
        return out

    def into(self, dst: np.ndarray, start: int) -> None:
        """Pages ``start..start+len(dst)-1`` of the image into ``dst`` (past
        its end and in segments' padding: zeros)."""
        n = len(dst)
        flat = dst.reshape(-1)
        covered = 0                     # bytes of dst written from the file, from its start
        first = self._first
        lo_i = max(0, int(np.searchsorted(first, start, "right")) - 1)
        hi_i = int(np.searchsorted(first, start + n, "left"))
        for i in range(lo_i, min(hi_i, len(self._off))):
            f0, off, nbytes = int(first[i]), int(self._off[i]), int(self._bytes[i])
            lo, hi = max(start, f0), min(start + n, int(first[i + 1]))
            if lo >= hi:
                continue
            a = (lo - start) * PAGE_SIZE
            if a > covered:
                flat[covered:a] = 0
            skip = (lo - f0) * PAGE_SIZE
            want = min(nbytes - skip, (hi - lo) * PAGE_SIZE)
            got = os.preadv(self._fd, [flat[a:a + want]], off + skip)
            if got < want:
                raise HVError(EIO, f"{self.path} shrank while it was read")
            covered = a + want
        flat[covered:] = 0

    def report(self) -> dict:
        return {"source": self.source, "pages": self.npages, "regions": self.segments,
                "skipped_regions": 0, "skipped_pages": 0, "swapped_pages": 0, "lost_pages": 0}

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _may_be_image(mode: int) -> bool:
    """Only a regular file or a block device has a size and never blocks a read."""
    return stat.S_ISREG(mode) or stat.S_ISBLK(mode)


def _not_an_image(path: str, file: int | str) -> HVError:
    """The sentence for ``path`` (open as ``file``, a descriptor or the
    path), which is neither a regular file nor a block device."""
    try:
        mode = os.stat(file).st_mode
    except OSError:
        mode = 0
    if stat.S_ISCHR(mode):
        return HVError(EINVAL, f"{path} is a character device, which has no fixed size: "
                               f"an image must be a regular file or a block device")
    kind = "not a regular file"
    for test, words in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                        (stat.S_ISSOCK, "a socket")):
        if test(mode):
            kind = words
    return HVError(EINVAL, f"{path} is {kind}, not a regular file or a block device")


def _device_size(fd: int) -> int:
    """The size of a block device (or 0 for what has none)."""
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    except OSError:
        return 0


def open_source(from_pid: int | None = None, image: str | None = None, all_mappings: bool = False,
                max_pages: int | None = None):
    """The content source of a create: a process snapshot or a file image."""
    if from_pid is not None and image is not None:
        raise HVError(EINVAL, "a create reads a process or a file, not both")
    if from_pid is None and image is None:
        raise HVError(EINVAL, "all_mappings is for a process snapshot")
    if from_pid is not None:
        return ProcessSnapshot(from_pid, all_mappings, max_pages, listed=False)
    if all_mappings:
        raise HVError(EINVAL, "all_mappings is for a process snapshot, not a file")
    if not os.path.isabs(image):
        raise HVError(EINVAL, f"the image path must be absolute, not {image!r}")
    return FileImage(image, max_pages)
