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

from hvcore.process.statedir import child_env
from perf.peers import linux_fork


def _sane(s: dict, n: int) -> None:
    assert s["n"] == n == len(s["all"])
    assert 0 < s["min"] <= s["median"] <= s["max"]


def test_linux_fork_peer_holds_its_pages_and_gives_sane_numbers():
    n = 8192
    r = linux_fork.measure(n, fork_repeats=3, loop_ks=(1, 64), loop_iterations=4, loop_repeats=2)
    assert r["pages"] == n
    # every page touched, and THP off: the helper holds n pages of its own (and not many more)
    assert n <= r["resident_pages"] <= n + 512
    assert r["helper_pages"] > 0
    _sane(r["fork"]["seconds_spread"], 3)
    _sane(r["fork"]["helper_alone_spread"], 3)
    assert r["fork"]["seconds"] == r["fork"]["seconds_spread"]["median"] < 1.0
    assert set(r["loop"]) == {"1", "64"}
    for k, lo in r["loop"].items():
        assert lo["k"] == int(k) and lo["iterations"] == 4
        _sane(lo["iterations_per_second_spread"], 2)
        # one iteration is a fork, a child's exit and a wait: more than the fork alone,
        # so no loop can run faster than forks can happen back to back
        assert lo["iterations_per_second"] < 4 / min(r["fork"]["seconds_spread"]["all"])


def test_linux_fork_peer_refuses_more_writes_than_pages():
    with pytest.raises(ValueError, match="k <= pages"):
        linux_fork.measure(16, loop_ks=(64,))
