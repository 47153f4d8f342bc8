"""``hvctl fork``, ``fork-reset``, ``fuzz``, and forks in ``list`` and
``destroy``, run as a user runs them."""
from __future__ import annotations

import json
import sys

from hvshare.tools import api


def _json(p):
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_fork_reset_fuzz_list_and_destroy(hvctl):
    assert hvctl("start", "--frames", "1024").returncode == 0
    assert hvctl("create", "--pages", "128", "--workload", "clone", "--name", "base").returncode == 0
    p = hvctl("fork", "base", "--name", "kid", "--workload", "fuzz", "--fuzz-writes", "5",
              "--fuzz-reads", "7")
    assert p.returncode == 0, p.stderr
    kid = int(p.stdout)
    f = _json(hvctl("fork", str(kid), "--json"))
    assert f["parent"] == kid and {"domid", "seconds"} <= set(f)

    doms = {d["name"]: d for d in _json(hvctl("list", "--json"))}
    assert doms["base"]["forks"] == 1 and doms["base"]["parent"] is None
    assert doms["kid"]["parent"] == doms["base"]["domid"] and doms["kid"]["forks"] == 1
    lines = hvctl("list").stdout.splitlines()
    head = lines[0].split()
    assert "PARENT" in head and "FORKS" in head
    kid_row = next(line.split() for line in lines if " kid " in f" {line} ")
    assert kid_row[head.index("PARENT")] == str(doms["base"]["domid"])

    # the grandchild must go before kid can be reset or run freely
    assert "forks of its own" in hvctl("fork-reset", "kid").stderr
    assert _json(hvctl("destroy", str(f["domid"]), "--json"))["domid"] == f["domid"]

    r = _json(hvctl("fork-reset", "kid", "--run", "--json"))
    assert r["domid"] == kid and r["pages_dropped"] == 0 and r["iteration"] == 1
    z = _json(hvctl("fuzz", "kid", "--iterations", "5", "--json"))
    assert z["iterations"] == 5 and z["pages_written"] == 5 and z["pages_read"] == 7
    # the pages of the run before, then those of the first four runs
    assert z["pages_dropped"] == 5 * 5 and z["iterations_per_second"] > 0
    assert "iterations in" in hvctl("fuzz", "kid", "--iterations", "2").stdout
    text = hvctl("fork-reset", "kid").stdout
    assert text.startswith(f"domain {kid} reset in") and "5 pages dropped" in text

    p = hvctl("destroy", "base")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "--forks" in p.stderr
    out = _json(hvctl("destroy", "base", "--forks", "--json"))
    assert out["forks_destroyed"] == [kid]
    assert hvctl("list").stdout.strip() == "no domains"
    assert _json(hvctl("audit", "--json"))["errors"] == 0


def test_fork_refusals(hvctl):
    assert hvctl("start", "--frames", "256").returncode == 0
    p = hvctl("fork", "7")
    assert p.returncode == 1 and "no domain" in p.stderr
    assert hvctl("create", "--pages", "8").returncode == 0
    p = hvctl("fork-reset", "1")
    assert p.returncode == 1 and "not a fork" in p.stderr
    p = hvctl("fuzz", "1")
    assert p.returncode == 1 and "not fuzz" in p.stderr
    p = hvctl("fork", "1", "--fuzz-writes", "-1")
    assert p.returncode == 2
    assert "Xen's VM fork" in hvctl("fork", "--help").stdout


def _client_listing(monkeypatch, domains):
    """A client whose ``list`` answers ``domains``: the tree walk is the
    client's own work, whatever the hypervisor holds."""
    c = api.HypervisorClient("/nonexistent/hv.sock")
    monkeypatch.setattr(c, "list", lambda: [dict(d) for d in domains])
    return c


def test_descendants_deepest_first(monkeypatch):
    tree = {1: None, 2: 1, 3: 2, 4: 2, 5: 1, 6: 5, 7: None, 8: 7}
    c = _client_listing(monkeypatch, [{"domid": d, "parent": p} for d, p in tree.items()])
    assert c.descendants(1) == [3, 4, 2, 6, 5]
    assert c.descendants(2) == [3, 4] and c.descendants(7) == [8] and c.descendants(6) == []


def test_descendants_of_a_fork_chain_deeper_than_the_recursion_limit(monkeypatch):
    depth = 2 * sys.getrecursionlimit()
    chain = [{"domid": 1, "parent": None}] + [{"domid": d, "parent": d - 1} for d in range(2, depth + 2)]
    c = _client_listing(monkeypatch, chain)
    assert c.descendants(1) == list(range(depth + 1, 1, -1))
