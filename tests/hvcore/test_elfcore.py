"""ELF core files from outside (hvcore.elfcore through hvcore.snapshot's
open_source): a crafted or broken core gets one sentence, never a
traceback or an allocation sized by its headers; a valid one reads."""
from __future__ import annotations

import os
import struct
import tempfile
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from hvshare.hvcore.constants import PAGE_SIZE
from hvshare.hvcore.elfcore import MAX_CORE_SEGMENTS, PN_XNUM
from hvshare.hvcore.errors import EINVAL, ENOMEM, HVError
from hvshare.hvcore.snapshot import open_source

#: what opening and parsing any image may allocate at its peak
ALLOCATION_BOUND = 16 << 20
GIB = 1 << 30

_EHDR = {2: "4sBBBBB7xHHIQQQIHHHHHH", 1: "4sBBBBB7xHHIIIIIHHHHHH"}
_PHDR = {2: "IIQQQQQQ", 1: "IIIIIIII"}
_SHDR = {2: "IIQQQQIIQQ", 1: "IIIIIIIIII"}
_EHSIZE, _PHENT, _SHENT = {2: 64, 1: 52}, {2: 56, 1: 32}, {2: 64, 1: 40}


def _ehdr(cls: int, order: str, e_type: int, phoff: int, shoff: int, phentsize: int, phnum: int,
          shentsize: int = 0, shnum: int = 0) -> bytes:
    return struct.pack(order + _EHDR[cls], b"\x7fELF", cls, 1 if order == "<" else 2, 1, 0, 0,
                       e_type, 62, 1, 0, phoff, shoff, 0, _EHSIZE[cls], phentsize, phnum,
                       shentsize, shnum, 0)


def _phdr(cls: int, order: str, p_type: int, offset: int, filesz: int) -> bytes:
    if cls == 2:
        return struct.pack(order + _PHDR[2], p_type, 6, offset, 0, 0, filesz, filesz, PAGE_SIZE)
    return struct.pack(order + _PHDR[1], p_type, offset, 0, 0, filesz, filesz, 6, PAGE_SIZE)


def _shdr0(cls: int, order: str, sh_info: int) -> bytes:
    return struct.pack(order + _SHDR[cls], *([0] * 7), sh_info, 0, 0)


def _open(path: str):
    """open_source(image=path) under tracemalloc: (image or HVError, peak bytes)."""
    tracemalloc.start()
    try:
        try:
            result = open_source(image=path)
        except HVError as e:
            result = e
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _check_sentence(e: HVError) -> None:
    msg = str(e)
    assert e.code in (EINVAL, ENOMEM) and "\n" not in msg and msg.count(". ") == 0, msg


def test_the_crafted_sparse_core_is_refused_without_reading_its_table(tmp_path):
    # 4 KiB of data, 3 GiB apparent: a table of 65,535 x 32,768 bytes fits "inside" it
    f = tmp_path / "core"
    f.write_bytes(_ehdr(2, "<", 4, 64, 0, 65535, 32768).ljust(PAGE_SIZE, b"\0"))
    os.truncate(f, 3 * GIB)
    result, peak = _open(str(f))
    assert isinstance(result, HVError) and result.code == EINVAL
    assert "program headers of 65535 bytes, where ELF64 has 56" in str(result)
    assert peak < ALLOCATION_BOUND


def test_too_many_headers_are_refused_before_any_is_read(tmp_path):
    f = tmp_path / "core"
    f.write_bytes(_ehdr(2, "<", 4, 64, 128, 56, PN_XNUM, 64, 1).ljust(128, b"\0") + _shdr0(2, "<", 1 << 30))
    os.truncate(f, 3 * GIB)
    result, peak = _open(str(f))
    assert isinstance(result, HVError) and f"at most {MAX_CORE_SEGMENTS}" in str(result)
    assert peak < ALLOCATION_BOUND


@pytest.mark.parametrize("cls,order", [(2, "<"), (2, ">"), (1, "<"), (1, ">")])
def test_pn_xnum_takes_the_count_from_section_header_0(tmp_path, cls, order):
    one, two = b"\x11" * (PAGE_SIZE + 5), b"\x22" * 7
    phoff = _EHSIZE[cls]
    shoff = phoff + 3 * _PHENT[cls]
    data = shoff + _SHENT[cls]
    phdrs = (_phdr(cls, order, 4, 0, 0) + _phdr(cls, order, 1, data, len(one))
             + _phdr(cls, order, 1, data + len(one), len(two)))
    head = _ehdr(cls, order, 4, phoff, shoff, _PHENT[cls], PN_XNUM, _SHENT[cls], 1)
    f = tmp_path / "core"
    f.write_bytes(head + phdrs + _shdr0(cls, order, 3) + one + two)
    img = open_source(image=str(f))
    try:
        assert img.kind == "elf-core" and img.segments == 2 and img.npages == 3
        flat = img(0, 3).reshape(-1)
        assert flat[:len(one)].tobytes() == one and not flat[len(one):2 * PAGE_SIZE].any()
        assert flat[2 * PAGE_SIZE:2 * PAGE_SIZE + 7].tobytes() == two
    finally:
        img.close()
    f.write_bytes(head + phdrs)          # no section header: nowhere to find the count
    result, _ = _open(str(f))
    assert isinstance(result, HVError) and "in a section header it does not have" in str(result)


_u64 = st.one_of(st.integers(0, 512), st.integers(0, 1 << 16), st.integers(0, (1 << 64) - 1),
                 st.sampled_from([(1 << 64) - 1, (1 << 63), (1 << 32) - 1, 3 * GIB]))


@st.composite
def _cores(draw):
    """The bytes of an ELF-like file, and the apparent size to give it."""
    cls = draw(st.sampled_from([2, 2, 2, 1, 1, 0, 3]))
    order = draw(st.sampled_from(["<", ">"]))
    fmt_cls = cls if cls in (1, 2) else 2
    mask = (1 << 64) - 1 if fmt_cls == 2 else (1 << 32) - 1
    # a sane table (right entry size, count and place, segments mostly in
    # the file) half of the time, so that valid cores come up as often
    sane = draw(st.booleans())
    field = st.integers(0, 1024) if sane else _u64
    segs = draw(st.lists(st.tuples(st.sampled_from([1, 1, 4, 0, 0x6474e550]), field, field), max_size=6))
    phentsize = _PHENT[fmt_cls] if sane else draw(st.one_of(
        st.just(_PHENT[fmt_cls]), st.sampled_from([0, 32, 56, 64, 65535]), st.integers(0, 65535)))
    phnum = len(segs) if sane else draw(st.one_of(st.just(len(segs)), st.just(PN_XNUM),
                                                  st.integers(0, 65535)))
    phoff = _EHSIZE[fmt_cls] if sane else draw(st.one_of(st.just(_EHSIZE[fmt_cls]), _u64)) & mask
    table = b"".join(_phdr(fmt_cls, order, t, o & mask, n & mask) for t, o, n in segs)
    shoff = _EHSIZE[fmt_cls] + len(table)
    sh_info = draw(st.one_of(st.just(len(segs)), st.integers(0, (1 << 32) - 1)))
    shentsize = draw(st.sampled_from([_SHENT[fmt_cls], 0, 64, 40, 65535]))
    head = bytearray(_ehdr(fmt_cls, order, draw(st.sampled_from([4, 4, 4, 4, 4, 2, 0xFFFF])), phoff,
                           draw(st.one_of(st.just(shoff), _u64)) & mask, phentsize, phnum,
                           shentsize, 1))
    head[4] = cls
    if draw(st.integers(0, 7)) == 0:
        head[5] = draw(st.sampled_from([0, 3, 0xFF]))
    body = bytes(head) + table + _shdr0(fmt_cls, order, sh_info) + bytes(draw(st.binary(max_size=600)))
    body = body[:draw(st.integers(0, len(body)))] if draw(st.integers(0, 3)) == 0 else body
    size = draw(st.one_of(st.just(len(body)), st.integers(len(body), 3 * GIB)))
    return body, size


@given(_cores())
@example((_ehdr(2, "<", 4, 64, 0, 56, 1)[:60], 60))       # a header cut off past e_type
@example((_ehdr(2, "<", 4, 64, 0, 56, 1) + _phdr(2, "<", 1, (1 << 64) - 8, 16), 3 * GIB))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_core_gives_a_sentence_or_an_image(core):
    body, size = core
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "core")
        with open(path, "wb") as f:
            f.write(body)
        os.truncate(path, size)
        result, peak = _open(path)
        assert peak < ALLOCATION_BOUND, peak
        if isinstance(result, HVError):
            _check_sentence(result)
            return
        try:
            assert 1 <= result.npages and result.kind in ("raw", "elf-core")
            first = result(0, min(result.npages, 2))
            last = result(result.npages - 1, 1)
            assert first.shape[1] == last.shape[1] == PAGE_SIZE
            if result.kind == "raw":
                n = min(len(body), 2 * PAGE_SIZE)
                assert first.reshape(-1)[:n].tobytes() == body[:n]
        finally:
            result.close()


def test_overlapping_segments_each_read_their_bytes(tmp_path):
    data = np.arange(3 * PAGE_SIZE, dtype=np.uint8).tobytes()
    phoff, base = 64, 64 + 2 * 56
    f = tmp_path / "core"
    f.write_bytes(_ehdr(2, "<", 4, phoff, 0, 56, 2) + _phdr(2, "<", 1, base, 2 * PAGE_SIZE)
                  + _phdr(2, "<", 1, base + PAGE_SIZE, 2 * PAGE_SIZE) + data)
    img = open_source(image=str(f))
    try:
        pages = img(0, 4).reshape(-1)
        assert pages[:2 * PAGE_SIZE].tobytes() == data[:2 * PAGE_SIZE]
        assert pages[2 * PAGE_SIZE:].tobytes() == data[PAGE_SIZE:3 * PAGE_SIZE]
    finally:
        img.close()
