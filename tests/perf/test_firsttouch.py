"""The first-touch probe runs, writes what it says, and leaves no segment."""
from __future__ import annotations

from hvshare.hvcore import shm
from hvshare.perf import firsttouch


def test_probe_measures_every_kind_of_memory_and_cleans_up():
    before = set(shm.list_segments())
    r = firsttouch.run(pages=512, chunk=16, repeats=1)
    kinds = [row["memory"] for row in r["rows"]]
    assert kinds == ["shm, first touch", "shm, backed", "anonymous, first touch"]
    for row in r["rows"]:
        assert row["chunks"] == 32 and row["us_per_page"] > 0
        assert row["chunk_max_ms"] >= row["chunk_p999_ms"] >= row["chunk_median_ms"] >= 0
    assert "first touch" in firsttouch.report(r)
    assert set(shm.list_segments()) == before
