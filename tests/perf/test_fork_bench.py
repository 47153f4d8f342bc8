"""``python -m hvshare.perf fork`` and its Linux peer (:mod:`hvshare.perf.peers.linux_fork`).

The peer must measure what it says: a helper holding N touched pages,
whose fork latency and fork loops give sane, self-consistent figures.
The bench's ``--quick`` JSON must carry every figure the report and the
headlines read, and its frames check must hold. No timing is judged
against another (shared machines)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hvshare.perf.figure import find, select
from hvshare.perf.goals import GOALS
from hvshare.perf.peers import linux_fork
from hvshare.perf.report import headlines


def _sane(f, n: int) -> None:
    assert f.n == n and len(f.values) == n
    assert 0 < f.min <= f.median <= f.max


def test_linux_fork_peer_holds_its_pages_and_gives_sane_numbers():
    n = 8192
    r = linux_fork.measure(n, fork_repeats=3, loop_ks=(1, 64), loop_iterations=4, loop_repeats=2)
    assert r["pages"] == n
    # every page touched, and THP off: the helper holds n pages of its own (and not many more)
    assert n <= r["resident_pages"] <= n + 512
    assert r["helper_pages"] > 0
    _sane(r["fork_seconds"], 3)
    _sane(r["helper_alone_seconds"], 3)
    assert set(r["loop_rate"]) == {1, 64} and r["loop_iterations"] == 4
    for k, lo in r["loop_rate"].items():
        assert lo.labels == {"pages": n, "k": k}
        _sane(lo, 2)
        # one iteration is a fork, a child's exit and a wait: more than the fork alone,
        # so no loop can run faster than forks can happen back to back
        assert lo.median < 4 / r["fork_seconds"].min


def test_linux_fork_peer_refuses_more_writes_than_pages():
    with pytest.raises(ValueError, match="k <= pages"):
        linux_fork.measure(16, loop_ks=(64,))


def test_fork_bench_quick_emits_every_figure_and_its_frames_check_holds(tmp_path, contract):
    from hvshare.perf import fork
    out = tmp_path / "fork.json"
    p = subprocess.run([sys.executable, "-m", "hvshare.perf", "fork", "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "fork: N=4,096" in p.stderr and "Goals" in p.stdout and "Checks:" in p.stdout
    doc = json.loads(out.read_text())
    assert doc["bench"] == "fork" and doc["sizes"] == list(fork.QUICK_SIZES)
    contract(doc)
    assert [r["pages"] for r in doc["results"]] == list(fork.QUICK_SIZES)
    reps = doc["repeats"]
    for r in doc["results"]:
        n = r["pages"]
        assert r["audit_errors"] == 0
        assert r["reset"]["dropped_all"] and r["reset"]["pages_dropped"] == [fork.RESET_DIRTY] * reps["reset"]
        _sane(find(doc, "fork_seconds", pages=n), reps["fork"])
        _sane(find(doc, "linux_fork_seconds", pages=n), reps["peer_fork"])
        _sane(find(doc, "reset_seconds", pages=n), reps["reset"])
        _sane(find(doc, "destroy_fork_seconds", pages=n), reps["reset"])
        for k in fork.LOOP_KS:
            _sane(find(doc, "loop_rate", pages=n, k=k), reps["loop"])
            _sane(find(doc, "linux_loop_rate", pages=n, k=k), reps["loop"])
        assert {f.labels["phase"] for f in select(doc, "max_step", pages=n)} >= {"fork", "fork_reset"}
        for k, f in r["frames"].items():
            # the check itself: a fork takes one frame per page written, none for reads
            assert (f["frames_used"], f["frames_at_fork"], f["ok"], f["frames_back"]) == (int(k), 0, True, True)
        assert doc["peers"][str(n)]["resident_pages"] >= n
    assert all(c["met"] is True for c in doc["checks"])
    # a fork's guest, started by the pinned hypervisor, inherited its mask
    assert [r["labels"]["pages"] for r in doc["placements"]] == list(fork.QUICK_SIZES)
    for rec in doc["placements"]:
        roles = {p["role"]: p for p in rec["processes"]}
        assert rec["held"] and {"hypervisor", "driver", "parent's guest", "a fork's guest"} <= set(roles)
        assert set(roles) <= {"hypervisor", "driver", "parent's guest", "a fork's guest", "hypervisor's child"}
        assert {c for t in roles["a fork's guest"]["threads"] for c in t["allowed"]} == set(roles["hypervisor"]["cpus"])
    hs = {h["title"]: h for h in headlines.headlines(doc) if h["bench"] == "fork"}
    assert len(hs) == sum(g.bench == "fork" for g in GOALS) == 6 and all(h["figure"] is not None for h in hs.values())
    for size in ("1 GiB", "4 GiB"):                  # --quick measures neither size
        assert hs[f"fork until the child runs over Linux fork(), {size} parent"]["verdict"] == headlines.NOT_JUDGED
    assert hs["frames a fork takes once it wrote 64 pages, over 64"]["verdict"] == headlines.MET
