"""``python -m perf fork`` and its Linux peer (:mod:`perf.peers.linux_fork`).

The peer must measure what it says: a helper holding N touched pages,
whose fork latency and fork loops give sane, self-consistent figures.
The bench's ``--quick`` JSON must carry every key the report and the
headlines read, and its frames check must hold. No timing is judged
against another (shared machines)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hvcore.statedir import child_env
from perf.peers import linux_fork


def _sane(s: dict, n: int) -> None:
    assert s["n"] == n
    assert 0 < s["min"] <= s["median"] <= s["max"]


def test_linux_fork_peer_holds_its_pages_and_gives_sane_numbers():
    n = 8192
    r = linux_fork.measure(n, fork_repeats=3, loop_ks=(1, 64), loop_iterations=4, loop_repeats=2)
    assert r["pages"] == n
    # every page touched, and THP off: the helper holds n pages of its own (and not many more)
    assert n <= r["resident_pages"] <= n + 512
    assert r["helper_pages"] > 0
    _sane(r["fork"]["seconds_stats"], 3)
    _sane(r["fork"]["helper_alone_stats"], 3)
    assert r["fork"]["seconds"] == r["fork"]["seconds_stats"]["median"] < 1.0
    assert set(r["loop"]) == {"1", "64"}
    for k, lo in r["loop"].items():
        assert lo["k"] == int(k) and lo["iterations"] == 4
        _sane(lo["iterations_per_second_stats"], 2)
        # one iteration is a fork, a child's exit and a wait: more than the fork alone,
        # so no loop can run faster than forks can happen back to back
        assert lo["iterations_per_second"] < 4 / r["fork"]["seconds_stats"]["min"]


def test_linux_fork_peer_refuses_more_writes_than_pages():
    with pytest.raises(ValueError, match="k <= pages"):
        linux_fork.measure(16, loop_ks=(64,))


def test_fork_bench_quick_emits_every_key_and_its_frames_check_holds(tmp_path):
    from perf import fork
    from perf.report import headlines
    out = tmp_path / "fork.json"
    p = subprocess.run([sys.executable, "-m", "perf", "fork", "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env=child_env())
    assert p.returncode == 0, p.stderr[-2000:]
    assert "fork: N=4,096" in p.stderr and "Goals:" in p.stdout
    doc = json.loads(out.read_text())
    assert doc["bench"] == "fork" and doc["sizes"] == list(fork.QUICK_SIZES)
    assert [r["pages"] for r in doc["results"]] == list(fork.QUICK_SIZES)
    for r in doc["results"]:
        n = r["pages"]
        assert r["audit_errors"] == 0 and r["max_step_ms"] > 0
        _sane(r["fork"]["seconds_stats"], doc["repeats"]["fork"])
        assert r["fork"]["max_step_ms"] > 0
        reset = r["reset"]
        assert reset["dropped_all"] and reset["reset"]["pages_dropped"] == [fork.RESET_DIRTY] * doc["repeats"]["reset"]
        _sane(reset["reset"]["seconds_stats"], doc["repeats"]["reset"])
        _sane(reset["destroy_and_fork"]["seconds_stats"], doc["repeats"]["reset"])
        assert set(r["loop"]) == {str(k) for k in fork.LOOP_KS}
        for lo in r["loop"].values():
            _sane(lo["iterations_per_second_stats"], doc["repeats"]["loop"])
        for k, f in r["frames"].items():
            # the check itself: a fork takes one frame per page written, none for reads
            assert (f["frames_used"], f["frames_at_fork"], f["ok"], f["frames_back"]) == (int(k), 0, True, True)
        peer = doc["peers"][str(n)]
        assert peer["resident_pages"] >= n and set(peer["loop"]) == set(r["loop"])
        for key in ("fork_over_linux", "reset_over_destroy_fork", "loop_over_linux_k64"):
            assert doc["ratios"][f"{key}_{n}"] > 0
    goals = {g["goal"]: g["met"] for g in doc["goals"]}
    assert goals["fork of 1,048,576 pages <= 1x Linux fork"] is None        # not judged in --quick
    assert goals["frames used by a fork that wrote K and read M pages == K"] is True
    assert goals["audit 0 after every N"] is True
    hs = [h for h in headlines.headlines(doc) if h["bench"] == "fork"]
    assert len(hs) == 5 and all(h["value"] is not None for h in hs)
    assert hs[0]["met"] is None and hs[3]["met"] is True
