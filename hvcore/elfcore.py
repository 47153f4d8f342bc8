"""ELF core files as content: where the bytes of their ``PT_LOAD`` segments are.

A core file (``gcore``, QEMU ``dump-guest-memory``) comes from outside the
hypervisor, so nothing in it is trusted: every size and count is checked
against the file and against fixed limits *before* anything is read or
allocated by it. In particular:

- ``e_phentsize`` must be exactly the size of a program header of the
  file's class (56 bytes for ELF64, 32 for ELF32);
- the header count is ``e_phnum`` or, when that is ``PN_XNUM``, section
  header 0's ``sh_info`` (the ELF rule for more than 65,534 headers), and
  it may not pass :data:`MAX_CORE_SEGMENTS`;
- the table must lie inside the file, and is read :data:`PHDR_PIECE`
  headers at a time (a sparse file may claim a table of gigabytes);
- a segment's file bytes must lie inside the file (no sum may overflow:
  the checks subtract instead of adding).

Any of these failing is an ``EINVAL`` :class:`hvshare.hvcore.errors.HVError`, one
sentence naming the file. A file that is not an ELF core (no ELF magic, an
unknown class or byte order, another ``e_type``) is not parsed at all: it
is taken as raw bytes by the caller.
"""
from __future__ import annotations

import os
import struct

import numpy as np

from .errors import EINVAL, HVError

ELF_MAGIC = b"\x7fELF"
#: e_type of a core file; p_type of a loadable segment
ET_CORE, PT_LOAD = 4, 1
#: e_phnum saying "the real count is in section header 0's sh_info"
PN_XNUM = 0xFFFF
#: most program headers a core may have (gcore writes one per mapping)
MAX_CORE_SEGMENTS = 1 << 16
#: program headers read (and parsed) per pread
PHDR_PIECE = 4096


class _Class:
    """What differs between ELF32 and ELF64: field offsets and sizes."""

    def __init__(self, bits: int, ehsize: int, word: str, at: dict, phdr: list, shentsize: int,
                 sh_info_at: int):
        self.bits, self.ehsize, self.word, self.at = bits, ehsize, word, at
        self.phdr, self.shentsize, self.sh_info_at = phdr, shentsize, sh_info_at

    def phdr_dtype(self, order: str) -> np.dtype:
        return np.dtype([(name, order + kind) for name, kind in self.phdr])


_ELF32 = _Class(32, 52, "I", {"phoff": 28, "shoff": 32, "phentsize": 42, "phnum": 44, "shentsize": 46},
                [("p_type", "u4"), ("p_offset", "u4"), ("p_vaddr", "u4"), ("p_paddr", "u4"),
                 ("p_filesz", "u4"), ("p_memsz", "u4"), ("p_flags", "u4"), ("p_align", "u4")],
                40, 28)
_ELF64 = _Class(64, 64, "Q", {"phoff": 32, "shoff": 40, "phentsize": 54, "phnum": 56, "shentsize": 58},
                [("p_type", "u4"), ("p_flags", "u4"), ("p_offset", "u8"), ("p_vaddr", "u8"),
                 ("p_paddr", "u8"), ("p_filesz", "u8"), ("p_memsz", "u8"), ("p_align", "u8")],
                64, 44)
_CLASSES = {1: _ELF32, 2: _ELF64}
_ORDERS = {1: "<", 2: ">"}


def core_segments(fd: int, size: int, path: str) -> list[tuple[int, int]] | None:
    """``(offset, bytes)`` of each ``PT_LOAD`` segment with file bytes of
    the ELF core open on ``fd`` (``size`` bytes), in header order; None if
    the file is not an ELF core. EINVAL: a core whose headers are broken."""
    head = os.pread(fd, _ELF64.ehsize, 0)
    if len(head) < 18 or head[:4] != ELF_MAGIC or head[4] not in _CLASSES or head[5] not in _ORDERS:
        return None
    cls, order = _CLASSES[head[4]], _ORDERS[head[5]]
    if struct.unpack_from(order + "H", head, 16)[0] != ET_CORE:
        return None
    if len(head) < cls.ehsize:
        raise _broken(path, "cut off inside its ELF header")

    def field(name: str, kind: str = "H") -> int:
        return struct.unpack_from(order + kind, head, cls.at[name])[0]

    entsize = field("phentsize")
    if entsize != cls.phdr_dtype(order).itemsize:
        raise _broken(path, f"with program headers of {entsize} bytes, where ELF{cls.bits} "
                            f"has {cls.phdr_dtype(order).itemsize}")
    count = field("phnum")
    if count == PN_XNUM:
        count = _extended_count(fd, size, path, cls, order, field("shoff", cls.word),
                                field("shentsize"))
    if count > MAX_CORE_SEGMENTS:
        raise _broken(path, f"with {count} program headers (at most {MAX_CORE_SEGMENTS} are read)")
    phoff = field("phoff", cls.word)
    if phoff > size or entsize * count > size - phoff:
        raise _broken(path, "whose program headers are cut off")
    return _load_segments(fd, size, path, phoff, count, cls.phdr_dtype(order))


def _extended_count(fd: int, size: int, path: str, cls: _Class, order: str, shoff: int,
                    shentsize: int) -> int:
    """The program header count of a core with ``PN_XNUM`` headers: section
    header 0's ``sh_info``."""
    if shoff == 0 or shentsize != cls.shentsize or shoff > size or shentsize > size - shoff:
        raise _broken(path, "whose program header count is in a section header it does not have")
    sh = os.pread(fd, shentsize, shoff)
    if len(sh) < shentsize:
        raise _broken(path, "whose section header 0 is cut off")
    return struct.unpack_from(order + "I", sh, cls.sh_info_at)[0]


def _load_segments(fd: int, size: int, path: str, phoff: int, count: int,
                   dtype: np.dtype) -> list[tuple[int, int]]:
    """The PT_LOAD segments with file bytes among ``count`` headers at
    ``phoff``, read a piece at a time and checked against the file size."""
    out: list[tuple[int, int]] = []
    limit = np.uint64(size)
    for first in range(0, count, PHDR_PIECE):
        n = min(PHDR_PIECE, count - first)
        raw = os.pread(fd, n * dtype.itemsize, phoff + first * dtype.itemsize)
        if len(raw) < n * dtype.itemsize:
            raise _broken(path, "whose program headers are cut off")
        h = np.frombuffer(raw, dtype=dtype)
        load = np.flatnonzero((h["p_type"] == PT_LOAD) & (h["p_filesz"] != 0))
        if not len(load):
            continue
        off = h["p_offset"][load].astype(np.uint64)
        nbytes = h["p_filesz"][load].astype(np.uint64)
        outside = (nbytes > limit) | (off > limit - np.minimum(nbytes, limit))
        if outside.any():
            raise _broken(path, f"cut off inside segment {first + int(load[outside.argmax()])}")
        out.extend(zip(off.tolist(), nbytes.tolist()))
    return out


def _broken(path: str, what: str) -> HVError:
    return HVError(EINVAL, f"{path} is an ELF core file {what}")
