"""A create from a live process or a file: the hypervisor reads it inside
the bounded create job; the domain's pages are the source's bytes, and a
failed create leaves nothing."""
from __future__ import annotations

import re
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest

from hvshare.hvcore.constants import STEP_BUDGET_SECONDS
from hvshare.hvcore.snapshot import ProcessSnapshot
from memproc import PAGE, MemProcess, pattern
from hvshare.tools import api
from waiting import wait_until

ANSWER_KEYS = {"domid", "pid", "name", "pages", "source", "source_pages", "regions", "skipped_regions",
               "skipped_pages", "swapped_pages", "lost_pages"}


def _pages(hv, domid: int, n: int) -> np.ndarray:
    """Every page of a domain as its guest reads them."""
    return hv.guest(domid).read_pages(np.arange(n))


def _nothing_left(hv) -> None:
    assert hv.list() == []
    assert hv.call("audit")["errors"] == 0
    assert hv.info()["frames_free"] == hv.info()["frames_total"]


def test_a_snapshot_domain_holds_the_process_memory_page_by_page(hvs):
    with MemProcess(pages=200) as p:
        r = hvs.create_domain(None, from_pid=p.pid)
        assert ANSWER_KEYS <= set(r) and r["source"] == f"pid {p.pid}"
        addrs = ProcessSnapshot(p.pid).addrs     # the listing, in address order
        assert r["pages"] == r["source_pages"] == len(addrs) and r["lost_pages"] == 0
        got = _pages(hvs, r["domid"], r["pages"])
        assert (got == p.mem(addrs)).all()
        i = int(np.searchsorted(addrs, p.addr))
        assert (got[i:i + 200] == pattern(200)).all()
        d = hvs.domain(r["domid"])
        assert d["tot_pages"] == r["pages"] and d["source"] == f"pid {p.pid}" and d["workload"] == "zero"


def test_pages_cut_a_snapshot_or_pad_it_with_zeros(hvs):
    with MemProcess(pages=8) as p:
        cut = hvs.create_domain(10, from_pid=p.pid)
        assert cut["pages"] == cut["source_pages"] == 10
        full = hvs.create_domain(None, from_pid=p.pid)
        big = hvs.create_domain(full["pages"] + 50, from_pid=p.pid)
        assert big["source_pages"] == full["pages"] and big["pages"] == full["pages"] + 50
        a, b = _pages(hvs, full["domid"], full["pages"]), _pages(hvs, big["domid"], big["pages"])
        assert (b[:full["pages"]] == a).all() and not b[full["pages"]:].any()
        assert (_pages(hvs, cut["domid"], 10) == a[:10]).all()


def test_a_writer_dirties_a_snapshot(hvs):
    with MemProcess(pages=16) as p:
        r = hvs.create_domain(None, "writer", rate=1000.0, from_pid=p.pid)
        assert wait_until(lambda: hvs.domain(r["domid"])["pages_written"] > 0, timeout=10)


#: a process big enough that its snapshot takes many create steps
BIG = 40000


def test_a_large_snapshot_is_read_a_bounded_step_at_a_time():
    with MemProcess(pages=BIG) as p, api.hvshare_session(frames=BIG + 8192) as s:
        r = s.create_domain(None, from_pid=p.pid)
        assert r["source_pages"] >= BIG
        steps = s.info()["pause_by_op"]["create"]
        assert steps["count"] > 2, steps
        got = s.guest(r["domid"]).read_pages(np.arange(r["pages"] - 4000, r["pages"]))
        assert (got == p.mem(ProcessSnapshot(p.pid).addrs[-4000:])).all()
        assert s.call("audit")["errors"] == 0


def _elf_core(segments: list[bytes]) -> bytes:
    phnum = len(segments)
    head = struct.pack("<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, 4, 62, 1, 0, 64, 0, 0,
                       64, 56, phnum, 0, 0, 0)
    off, phdrs, body = 64 + 56 * phnum, [], b""
    for i, seg in enumerate(segments):
        phdrs.append(struct.pack("<IIQQQQQQ", 1, 6, off + len(body), 0x10000 * (i + 1), 0, len(seg),
                                 len(seg), PAGE))
        body += seg
    return head + b"".join(phdrs) + body


def test_images_raw_and_elf_core(hvs, tmp_path):
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, 5 * PAGE + 7, dtype=np.uint8).tobytes()
    (tmp_path / "raw").write_bytes(raw)
    r = hvs.create_domain(None, image=str(tmp_path / "raw"))
    assert r["pages"] == 6 and r["source"] == f"raw {tmp_path / 'raw'}"
    flat = _pages(hvs, r["domid"], 6).reshape(-1)
    assert flat[:len(raw)].tobytes() == raw and not flat[len(raw):].any()

    one, two = rng.integers(0, 256, PAGE + 1, dtype=np.uint8).tobytes(), b"\x42" * (3 * PAGE)
    (tmp_path / "core").write_bytes(_elf_core([one, two]))
    r = hvs.create_domain(None, image=str(tmp_path / "core"))
    assert r["pages"] == 5 and r["regions"] == 2 and r["source"].startswith("elf-core ")
    flat = _pages(hvs, r["domid"], 5).reshape(-1)
    assert flat[:len(one)].tobytes() == one and not flat[len(one):2 * PAGE].any()
    assert flat[2 * PAGE:].tobytes() == two


def test_a_source_that_fails_leaves_no_domain(hvs, tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    assert wait_until(lambda: open(f"/proc/{zombie.pid}/stat").read().split(") ")[1][0] == "Z", timeout=10)
    try:
        cases = [(dict(from_pid=zombie.pid), "ESRCH", "exited before its snapshot"),
                 (dict(image=str(tmp_path / "missing")), "ENOENT", "no file"),
                 (dict(image=str(tmp_path / "empty")), "EINVAL", "is empty")]
        for kw, code, words in cases:
            with pytest.raises(api.HVCtlError) as e:
                hvs.create_domain(None, **kw)
            assert e.value.code_name == code and words in str(e.value), (kw, e.value)
            _nothing_left(hvs)
    finally:
        zombie.wait()
    with pytest.raises(api.HVCtlError) as e:
        hvs.create_domain(None, from_pid=zombie.pid)
    assert e.value.code_name == "ESRCH" and f"no process {zombie.pid}" in str(e.value)
    with pytest.raises(api.HVCtlError) as e:
        hvs.create_domain(None)
    assert "needs pages" in str(e.value)
    _nothing_left(hvs)


def test_a_process_that_exits_during_its_snapshot_fails_the_create():
    """The process is killed once the create shows its first chunks in."""
    with MemProcess(pages=BIG) as p, api.hvshare_session(frames=BIG + 8192) as hvs:
        out = {}

        def create():
            with api.HypervisorClient(hvs.socket_path) as c:
                try:
                    out["answer"] = c.create_domain(None, from_pid=p.pid)
                except api.HVCtlError as e:
                    out["error"] = e
        t = threading.Thread(target=create)
        t.start()
        creating = wait_until(lambda: [d for d in hvs.list() if d["state"] == "creating"], timeout=30,
                              step=0.0005)
        p.kill()
        t.join(30)
        assert creating
        if "answer" in out:
            pytest.skip("the create finished before the process was killed")
        assert out["error"].code_name == "ESRCH" and "exited during its snapshot" in str(out["error"])
        _nothing_left(hvs)


#: a huge reservation a process never touches but for a few pages
TIB = 1 << 40


def test_a_huge_untouched_mapping_is_listed_in_bounded_steps():
    """A 4 TiB MAP_NORESERVE mapping with 5 pages read: the domain holds
    exactly the present pages, and no create step took more than 50 step
    budgets (walking the span's pagemap took seconds in one step)."""
    with MemProcess(pages=200, huge=4 * TIB, touch=5) as p, api.hvshare_session(frames=8192) as s:
        r = s.create_domain(None, from_pid=p.pid)
        addrs = ProcessSnapshot(p.pid).addrs
        huge = p.info["huge"]
        inside = addrs[(addrs >= huge) & (addrs < huge + 4 * TIB)]
        assert (inside == huge + np.array(p.info["touched"])).all() and len(inside) == 5
        assert r["pages"] == len(addrs) and r["lost_pages"] == 0
        got = _pages(s, r["domid"], r["pages"])
        assert (got == p.mem(addrs)).all()
        assert not got[np.searchsorted(addrs, inside)].any()          # the zero page
        i = int(np.searchsorted(addrs, p.addr))
        assert (got[i:i + 200] == pattern(200)).all()
        create = s.info()["pause_by_op"]["create"]
        assert create["max_cpu_ms"] < 50 * STEP_BUDGET_SECONDS * 1e3, create
        assert s.call("audit")["errors"] == 0


def test_a_snapshot_larger_than_the_free_frames_fails_once_listed():
    """The size is known only once the listing ends: ENOMEM then, and
    nothing of the create is left."""
    with MemProcess(pages=3000) as p, api.hvshare_session(frames=2048) as s:
        with pytest.raises(api.HVCtlError) as e:
            s.create_domain(None, from_pid=p.pid)
        assert e.value.code_name == "ENOMEM", e.value
        assert re.fullmatch(r"cannot create a domain of (\d+) pages: \1 frames asked, 2048 free",
                            str(e.value)), str(e.value)
        _nothing_left(s)
        r = s.create_domain(1000, from_pid=p.pid)         # a cut fits
        assert r["pages"] == 1000
