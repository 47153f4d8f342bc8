"""Smoke tests of the measured peers (``hvshare.perf.peers``: KSM and the pipe).

They check behaviour, not speed: knobs come back, KSM really merges and
unmerges, the pipe echo returns sane numbers and leaves no process behind.
KSM tests skip with ``ksm_available()``'s reason where KSM cannot be driven.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from hvshare.perf.peers import contents, ksm, ksm_session, ksm_sysfs, pipe

KSM_REASON = ksm_sysfs.ksm_available()
needs_ksm = pytest.mark.skipif(KSM_REASON is not None, reason=KSM_REASON or "")
N = 2000


def _knobs() -> dict[str, str]:
    return {k: ksm_sysfs.read_knob(k) for k in ksm_sysfs.writable_knobs()}


# -- pure helpers (no KSM needed)

def test_ksm_clone_pages_is_deterministic_and_mixed():
    a = contents.ksm_clone_pages(3000, seed=1)
    assert a.shape == (3000, 4096) and a.dtype == np.uint8
    assert np.array_equal(a, contents.ksm_clone_pages(3000, seed=1))
    b = contents.ksm_clone_pages(3000, seed=2)
    assert not np.array_equal(a, b)
    # both clones draw from the same image: many pages of one appear in the other
    rows_a = {r.tobytes() for r in a}
    assert sum(r.tobytes() in rows_a for r in b if r.any()) > 1000
    assert (~a.any(axis=1)).sum() > 200                      # zero pages
    groups = contents.duplicate_groups(a)
    assert (groups == 1).sum() > 500 and groups.max() > 100  # private pages, and duplicates


def test_expected_counts_follow_max_page_sharing():
    assert contents.expected_counts([N], 4096) == (1, N - 1)
    assert contents.expected_counts([N], 256) == (8, N - 8)       # 7 full KSM pages + one of 208
    assert contents.expected_counts([257], 256) == (1, 255)       # the leftover page has no partner
    assert contents.expected_counts([1, 1, 2], 256) == (1, 1)


def test_measures_skip_with_reason_when_ksm_unusable(monkeypatch):
    for mod in (ksm_sysfs, ksm_session, ksm):          # each module that asks
        monkeypatch.setattr(mod, "ksm_available", lambda: "KSM absent: test")
    for res in (ksm.measure_merge(10), ksm.measure_cow_break(10), ksm.measure_cow_batched(10),
                ksm.measure_munmap(10)):
        assert res["skipped"] == "KSM absent: test"
    assert "skipped" in ksm.run(quick=True)
    with pytest.raises(ksm_sysfs.KsmUnavailable, match="KSM absent"):
        with ksm_session.ksm_session():
            pass


# -- KSM sessions

@needs_ksm
def test_session_restores_every_knob():
    before = _knobs()
    with ksm_session.ksm_session(pages_to_scan=1234, sleep_millisecs=7, max_page_sharing=512) as s:
        s.set(use_zero_pages=1 - int(before["use_zero_pages"]), run=1)
        assert ksm_sysfs.read_knob("pages_to_scan") == "1234"
        assert ksm_sysfs.read_knob("max_page_sharing") == "512"
        assert ksm_sysfs.read_knob("run") == "1"
    assert _knobs() == before


@needs_ksm
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_session_restores_knobs_after_exception(exc):
    before = _knobs()
    with pytest.raises(exc):
        with ksm_session.ksm_session(max_page_sharing=300, pages_to_scan=777) as s:
            s.set(run=1, sleep_millisecs=3)
            with ksm.merge(200):              # KSM pages exist when the restore runs
                raise exc("boom")
    assert _knobs() == before


# -- merging and copy-on-write

@needs_ksm
def test_merge_identical_pages_into_one_ksm_page():
    before = _knobs()
    with ksm_session.ksm_session(max_page_sharing=4 * N):
        with ksm.merge(N, "identical", seed=3) as r:
            assert r.complete, r.summary()
            assert r.pages_shared == 1
            assert abs(r.pages_sharing - (N - 1)) <= N // 100
            assert r.merge_seconds > 0
            assert r.ksm_mask().all()
    assert _knobs() == before                    # ksmd stopped again, run as it was


@needs_ksm
def test_merge_respects_max_page_sharing_and_zero_pages():
    with ksm_session.ksm_session():
        mps = int(ksm_sysfs.read_knob("max_page_sharing"))
        with ksm.merge(N, "zero") as r:         # zero pages merge like others (use_zero_pages=0)
            assert (r.pages_shared, r.pages_sharing) == contents.expected_counts([N], mps)
            assert not r.array.any()


@needs_ksm
def test_cow_break_changes_content_and_counters_drop():
    with ksm_session.ksm_session(max_page_sharing=4 * N):
        with ksm.merge(N, "identical", seed=5) as r:
            before = r.array.copy()
            broken = np.arange(0, N, 2)
            kept = np.arange(1, N, 2)
            lat = r.cow_break(broken)
            assert lat.shape == (len(broken),) and (lat > 0).all()
            off = broken % 4096
            assert np.array_equal(r.array[broken, off], before[broken, off] ^ 0xFF)
            assert np.array_equal(r.array[kept], before[kept])          # the others did not see it
            mask = r.ksm_mask()
            assert not mask[broken].any() and mask[kept].all()
            c = r.rescan()
            assert c == {"pages_shared": 1, "pages_sharing": len(kept) - 1}, c
            assert r.cow_break_batched(kept) > 0
            assert not r.ksm_mask().any()
            assert r.write_floor(kept).min() > 0
        assert r.close() == r.munmap_seconds > 0


# -- pipe

def test_pipe_round_trip_is_sane():
    import psutil
    mine = os.sched_getaffinity(0)
    res = pipe.measure(pipe.REQUEST_SIZE, "same", n=500)
    assert 0 < res["p50_us"] <= res["p99_us"] < 100_000
    # both processes, every thread of each, on the one CPU; ours given back its mask
    rec = res["placement_record"]
    assert rec["held"] and [p["role"] for p in rec["processes"]] == ["echo", "driver"]
    assert all(t["allowed"] == [res["cpus"][0]] for p in rec["processes"] for t in p["threads"])
    assert os.sched_getaffinity(0) == mine
    big = pipe.measure(pipe.PAGE_SIZE, "cross", n=300)
    if "skipped" not in big:
        assert 0 < big["p50_us"] <= big["p99_us"] < 100_000
        echo, driver = big["placement_record"]["processes"]
        assert echo["cpus"] == [big["cpus"][1]] and driver["cpus"] == [big["cpus"][0]]
    from hvshare.tools import launch
    server = launch.fork_server()                   # the run's own helper, not the bench's
    assert not [p for p in psutil.Process().children(recursive=True) if server is None or p.pid != server.pid]
