"""A real process with memory the test knows, for snapshot tests.

The child maps ``pages`` anonymous private pages, writes page ``i`` with a
pattern of its own (:func:`pattern`), optionally maps a PROT_NONE guard
region, a file (shared) and a huge ``MAP_NORESERVE`` read-only region of
which it reads ``touch`` pages (``huge``, the offsets ``touched``), prints
the addresses as one JSON line, then
obeys lines on its stdin: ``unmap`` (drop the known pages; it answers
``done``), ``exit``. Stop it with SIGSTOP for a fixed memory.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np

PAGE = 4096

_CHILD = r"""
import ctypes, json, mmap, os, sys
import numpy as np
pages, guard, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
huge, touch = int(sys.argv[4]), int(sys.argv[5])
m = mmap.mmap(-1, pages * 4096, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
a = np.frombuffer(m, dtype=np.uint8).reshape(pages, 4096)
a[:] = (np.arange(pages, dtype=np.uint32)[:, None] * 7 + np.arange(4096, dtype=np.uint32) % 251 + 1) % 256
a.view(np.uint32)[:, 0] = np.arange(pages, dtype=np.uint32) + 0x5A000000
out = {"addr": ctypes.addressof(ctypes.c_char.from_buffer(m))}
if guard:
    g = mmap.mmap(-1, guard * 4096, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, 0)   # PROT_NONE
    out["guard"] = True
if path:
    f = open(path, "rb")
    fm = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ)
    sum(fm[i * 4096] for i in range(len(fm) // 4096))     # fault every page in
    out["file"] = True
if huge:
    noreserve = getattr(mmap, "MAP_NORESERVE", 0x4000)     # (Python 3.13 names it)
    h = mmap.mmap(-1, huge, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | noreserve, mmap.PROT_READ)
    hv = np.frombuffer(h, dtype=np.uint8)
    out["huge"] = hv.ctypes.data
    out["touched"] = [i * (huge // touch // 4096) * 4096 for i in range(touch)]
    sum(int(hv[i]) for i in out["touched"])     # reading maps the zero page there
print(json.dumps(out), flush=True)
for line in sys.stdin:
    if line.strip() == "unmap":
        del a
        m.close()
        print("done", flush=True)
    elif line.strip() == "exit":
        break
"""


def pattern(pages: int) -> np.ndarray:
    """What the child writes into its known pages, ``(pages, 4096)``."""
    a = ((np.arange(pages, dtype=np.uint32)[:, None] * 7 + np.arange(PAGE, dtype=np.uint32) % 251 + 1)
         % 256).astype(np.uint8)
    a.view(np.uint32)[:, 0] = np.arange(pages, dtype=np.uint32) + 0x5A000000
    return a


class MemProcess:
    """The child process (a context manager: killed and reaped on exit)."""

    def __init__(self, pages: int = 64, guard: int = 0, file: str = "", stopped: bool = True,
                 huge: int = 0, touch: int = 0):
        self.pages = pages
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(pages), str(guard), file,
                                      str(huge), str(touch)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.info = json.loads(self.proc.stdout.readline())
        self.addr = self.info["addr"]
        if stopped:
            self.stop()

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def cont(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def unmap(self) -> None:
        """Let the child drop its known pages (it runs for that)."""
        self.cont()
        self.proc.stdin.write("unmap\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "done"

    def mem(self, addrs) -> np.ndarray:
        """The pages at ``addrs`` as /proc/PID/mem reads them now."""
        fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY)
        try:
            return np.stack([np.frombuffer(os.pread(fd, PAGE, int(x)), dtype=np.uint8) for x in addrs])
        finally:
            os.close(fd)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
