"""The content sources of hvcore.snapshot, on real processes and real files."""
from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from hvshare.hvcore import pagemap
from hvshare.hvcore.errors import EACCES, EINVAL, EIO, ENOENT, ESRCH, HVError
from hvshare.hvcore.snapshot import FileImage, ProcessSnapshot, open_source
from memproc import PAGE, MemProcess, pattern


def _index(s: ProcessSnapshot, addr: int) -> int:
    i = int(np.searchsorted(s.addrs, addr))
    assert s.addrs[i] == addr
    return i


def test_snapshot_equals_the_process_memory_page_by_page():
    with MemProcess(pages=300) as p:
        s = ProcessSnapshot(p.pid)
        try:
            assert s.npages == len(s.addrs) and (np.diff(s.addrs) > 0).all()   # address order
            pages = s(0, s.npages)
            assert (pages == p.mem(s.addrs)).all()
            i = _index(s, p.addr)
            assert (pages[i:i + 300] == pattern(300)).all()
            assert (s.addrs[i:i + 300] == p.addr + PAGE * np.arange(300)).all()
            r = s.report()
            assert r["pages"] == s.npages and r["regions"] >= 1 and r["source"] == f"pid {p.pid}"
            assert r["lost_pages"] == 0 and r["swapped_pages"] >= 0
            # any chunking reads the same bytes, also straight into frames
            dst = np.full((s.npages + 5, PAGE), 0xEE, dtype=np.uint8)
            for lo in range(0, s.npages + 5, 37):
                s.into(dst[lo:lo + 37], lo)
            assert (dst[:s.npages] == pages).all() and not dst[s.npages:].any()
        finally:
            s.close()


def test_a_cut_snapshot_is_the_first_pages_in_address_order():
    with MemProcess(pages=64) as p:
        full, cut = ProcessSnapshot(p.pid), ProcessSnapshot(p.pid, max_pages=10)
        try:
            assert cut.npages == 10 and (cut.addrs == full.addrs[:10]).all()
            assert (cut(0, 10) == full(0, 10)).all()
        finally:
            full.close()
            cut.close()


def test_only_present_pages_go_in():
    # a mapping never touched has no present page: none of it is taken
    code = ("import mmap, sys, ctypes; m = mmap.mmap(-1, 4096 * 1000); "
            "print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        addr = int(p.stdout.readline())
        s = ProcessSnapshot(p.pid)
        try:
            assert not ((s.addrs >= addr) & (s.addrs < addr + 4096 * 1000)).any()
        finally:
            s.close()
    finally:
        p.kill()
        p.wait()
        p.stdin.close()
        p.stdout.close()


def test_all_mappings_takes_file_backed_mappings_and_skips_unreadable_regions(tmp_path):
    f = tmp_path / "mapped"
    f.write_bytes(b"x" * PAGE * 8)
    with MemProcess(pages=16, guard=32, file=str(f)) as p:
        anon, every = ProcessSnapshot(p.pid), ProcessSnapshot(p.pid, all_mappings=True)
        try:
            line = next(x for x in open(f"/proc/{p.pid}/maps") if x.rstrip().endswith(str(f)))
            lo = int(line.split("-")[0], 16)
            mapped = lo + PAGE * np.arange(8)
            assert not np.isin(mapped, anon.addrs).any()
            assert np.isin(mapped, every.addrs).all()
            pages = every(0, every.npages)
            assert (pages[np.searchsorted(every.addrs, mapped)] == ord("x")).all()
            assert every.npages > anon.npages and every.regions > anon.regions
            # the PROT_NONE guard region cannot be read: skipped and counted
            assert anon.skipped_regions >= 1 and anon.skipped_pages >= 32
        finally:
            anon.close()
            every.close()


def test_pages_unmapped_before_they_are_read_are_zeroed_and_counted():
    with MemProcess(pages=50) as p:
        s = ProcessSnapshot(p.pid)
        try:
            i = _index(s, p.addr)
            p.unmap()
            p.stop()
            pages = s(0, s.npages)
            assert s.lost_pages == 50 and s.report()["lost_pages"] == 50
            assert not pages[i:i + 50].any()
            rest = np.r_[0:i, i + 50:s.npages]
            assert (pages[rest] == p.mem(s.addrs[rest])).all()
        finally:
            s.close()


def test_a_process_that_exits_during_the_snapshot_fails_it():
    with MemProcess(pages=8) as p:
        s = ProcessSnapshot(p.pid)
        p.kill()
        try:
            with pytest.raises(HVError) as e:
                s(0, s.npages)
            assert e.value.code == ESRCH and "exited" in str(e.value)
        finally:
            s.close()


def test_no_such_process_and_a_zombie():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    while open(f"/proc/{p.pid}/stat").read().split(") ")[1][0] != "Z":
        time.sleep(0.01)
    try:
        with pytest.raises(HVError) as e:
            ProcessSnapshot(p.pid)
        assert e.value.code == ESRCH and "exited" in str(e.value)
    finally:
        p.wait()
    with pytest.raises(HVError) as e:
        ProcessSnapshot(p.pid)
    assert e.value.code == ESRCH and f"no process {p.pid}" in str(e.value)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to drop privileges")
def test_another_users_process_cannot_be_read():
    """A child that is nobody may not read a root process (ptrace rules)."""
    with MemProcess(pages=4) as p:
        r, w = os.pipe()
        child = os.fork()
        if child == 0:                          # pragma: no cover - the child
            code = 9
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                ProcessSnapshot(p.pid)
                code = 0
            except HVError as e:
                os.write(w, str(e).encode())
                code = 1 if e.code == EACCES else 2
            finally:
                os._exit(code)
        os.close(w)
        message = os.read(r, 1000).decode()
        os.close(r)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 1, message
        assert f"not allowed to read the memory of process {p.pid}" in message


def _elf_core(segments: list[bytes], gap: int = 100) -> bytes:
    """A minimal little-endian ELF64 core: a PT_NOTE and one PT_LOAD per segment."""
    phnum = len(segments) + 1
    head = struct.pack("<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, 4, 62, 1, 0, 64, 0, 0,
                       64, 56, phnum, 0, 0, 0)
    off = 64 + 56 * phnum + gap
    phdrs = [struct.pack("<IIQQQQQQ", 4, 0, off, 0, 0, 0, 0, 4)]        # an empty note
    body = b""
    for i, seg in enumerate(segments):
        phdrs.append(struct.pack("<IIQQQQQQ", 1, 6, off + len(body), 0x100000 * (i + 1), 0, len(seg),
                                 len(seg) + PAGE, PAGE))
        body += seg + b"\0" * 13            # segments need not be page-aligned in the file
    return head + b"".join(phdrs) + b"\xAB" * gap + body


def test_a_raw_image_is_its_bytes_padded_to_a_page(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, 3 * PAGE + 100, dtype=np.uint8)
    f = tmp_path / "raw"
    f.write_bytes(data.tobytes())
    img = FileImage(str(f))
    try:
        assert img.npages == 4 and img.kind == "raw"
        pages = img(0, 5)
        assert (pages.reshape(-1)[:len(data)] == data).all() and not pages.reshape(-1)[len(data):].any()
        dst = np.empty((4, PAGE), dtype=np.uint8)
        img.into(dst[:2], 2)
        img.into(dst[2:], 0)
        assert (dst[:2] == pages[2:4]).all() and (dst[2:] == pages[:2]).all()
    finally:
        img.close()
    cut = FileImage(str(f), max_pages=2)
    assert cut.npages == 2
    cut.close()


def test_an_elf_core_is_its_load_segments_in_order(tmp_path):
    rng = np.random.default_rng(2)
    one = rng.integers(1, 256, 2 * PAGE, dtype=np.uint8).tobytes()
    two = rng.integers(1, 256, PAGE + 10, dtype=np.uint8).tobytes()
    f = tmp_path / "core"
    f.write_bytes(_elf_core([one, two]))
    img = open_source(image=str(f))
    try:
        assert img.kind == "elf-core" and img.npages == 4 and img.report()["regions"] == 2
        flat = img(0, 4).reshape(-1)
        assert flat[:2 * PAGE].tobytes() == one
        assert flat[2 * PAGE:2 * PAGE + len(two)].tobytes() == two and not flat[2 * PAGE + len(two):].any()
        assert (img(1, 2) == img(0, 4)[1:3]).all()
    finally:
        img.close()


def test_file_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    cut = tmp_path / "cut-core"
    cut.write_bytes(_elf_core([b"y" * PAGE])[:-100])
    cases = [(tmp_path / "missing", ENOENT, "no file"), (empty, EINVAL, "is empty"),
             (tmp_path, EINVAL, "is a directory"), (cut, EINVAL, "cut off inside segment")]
    for path, code, words in cases:
        with pytest.raises(HVError) as e:
            open_source(image=str(path))
        assert e.value.code == code and words in str(e.value), (path, e.value)
    with pytest.raises(HVError) as e:
        open_source(image="relative/path")
    assert e.value.code == EINVAL


def test_a_file_that_shrinks_while_read_fails_the_read(tmp_path):
    f = tmp_path / "raw"
    f.write_bytes(b"z" * 4 * PAGE)
    img = FileImage(str(f))
    try:
        os.truncate(f, PAGE)
        with pytest.raises(HVError) as e:
            img(0, 4)
        assert e.value.code == EIO
    finally:
        img.close()


def _file_types(tmp) -> list[tuple[str, str]]:
    """(path, words of its sentence) for a file of every type that is no
    image, and a symlink to each; made under ``tmp``."""
    import socket
    fifo, sock, empty = os.path.join(tmp, "fifo"), os.path.join(tmp, "sock"), os.path.join(tmp, "empty")
    os.mkfifo(fifo)
    s = socket.socket(socket.AF_UNIX)
    s.bind(sock)
    s.close()
    open(empty, "wb").close()
    cases = [(fifo, "is a FIFO"), (sock, "is a socket"), (empty, "is empty"), (tmp, "is a directory"),
             ("/dev/null", "no fixed size"), ("/dev/zero", "no fixed size"),
             ("/dev/urandom", "no fixed size"), ("/proc/self/status", "is empty")]
    for i, (path, words) in enumerate(list(cases)):
        link = os.path.join(tmp, f"link{i}")
        os.symlink(path, link)
        cases.append((link, words))
    return cases


def test_only_regular_files_and_block_devices_are_images(tmp_path):
    """Nothing that could block the hypervisor is opened blocking or read:
    each other type of file gets one sentence at once."""
    d = tmp_path / "types"
    d.mkdir()
    master, slave = os.openpty()
    try:
        cases = _file_types(str(d)) + [(os.ttyname(slave), "no fixed size")]
        if os.path.exists("/dev/tty"):
            cases.append(("/dev/tty", "is a character device"))
        for path, words in cases:
            with pytest.raises(HVError) as e:
                open_source(image=path)
            assert e.value.code == EINVAL and words in str(e.value), (path, e.value)
            assert "\n" not in str(e.value)
    finally:
        os.close(master)
        os.close(slave)
    sparse = tmp_path / "sparse"
    sparse.write_bytes(b"\1" * 10)
    os.truncate(sparse, 64 * PAGE)
    img = open_source(image=str(sparse))
    try:
        assert img.npages == 64 and img(0, 1)[0, 9] == 1 and not img(63, 1).any()
    finally:
        img.close()


def _listed_in_steps(pid: int) -> tuple[ProcessSnapshot, int]:
    """A snapshot listed a small chunk per step, and its steps."""
    s = ProcessSnapshot(pid, all_mappings=True, listed=False)
    steps = 1
    while not s.list_step(lambda: True, 1e-4):
        steps += 1
    return s, steps


def test_the_stride_reading_lists_what_pagemap_scan_lists(monkeypatch):
    """A kernel without PAGEMAP_SCAN (ENOTTY) is read in pagemap strides:
    the same pages, runs and counters as the scan, on the same process."""
    calls = []

    def counted(fd, arg, real=pagemap._scan_ioctl):
        calls.append(1)
        return real(fd, arg)

    def refused(fd, arg):
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    with MemProcess(pages=300, guard=8, huge=1 << 36, touch=3) as p:
        monkeypatch.setattr(pagemap, "_scan_ioctl", counted)
        scan, scan_steps = _listed_in_steps(p.pid)
        monkeypatch.setattr(pagemap, "_scan_ioctl", refused)
        stride, stride_steps = _listed_in_steps(p.pid)
        try:
            assert calls and scan_steps > 1 and stride_steps > 1
            assert (stride.addrs == scan.addrs).all()
            assert stride.report() == scan.report()
            huge = p.info["huge"]
            assert np.isin(huge + np.array(p.info["touched"]), scan.addrs).all()
            assert (stride(0, stride.npages) == scan(0, scan.npages)).all()
        finally:
            scan.close()
            stride.close()
