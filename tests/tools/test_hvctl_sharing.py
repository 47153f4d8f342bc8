"""``hvctl sharing`` and the sharing counters of ``hvctl info`` and
``hvctl dedup --json``, run as a user runs them."""
from __future__ import annotations

import json
import re

import pytest


def _json(p):
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_sharing_and_info_after_a_dedup(hvctl):
    assert hvctl("start", "--frames", "1024").returncode == 0
    for name in ("a", "b"):
        assert hvctl("create", "--pages", "256", "--name", name).returncode == 0   # zero pages
    d = _json(hvctl("dedup", "--json"))
    # every page is zero: one frame of 512 references saves 511
    assert d["sharing"]["saved_frames"] == 511 == d["nr_saved_mfns"]
    info = _json(hvctl("info", "--json"))
    assert info["sharing_freed_memory"] == 1 and info["sharing_used_memory"] == 0
    r = info["sharing"]
    assert r["zero"] == {"frames": 1, "saved": 511} and r["other"] == {"frames": 0, "saved": 0}
    assert r["intra"] == {"frames": 0, "saved": 510} and r["inter"] == {"frames": 1, "saved": 1}
    assert r["degree"]["max"] == 512
    assert r["degree"]["histogram"][-1] == {"min": 257, "max": 512, "frames": 1}
    text = hvctl("info").stdout
    assert re.search(r"^sharing_freed_memory +1 MiB$", text, re.M)
    assert "zero pages 511, other pages 0" in text and "across domains 1" in text

    every = _json(hvctl("sharing", "--json"))
    assert [x["name"] for x in every["domains"]] == ["a", "b"]
    one = _json(hvctl("sharing", "b", "--json"))
    assert one == every["domains"][1]
    assert one["shr_pages"] == 256 and one["saved"] == pytest.approx(256 * 511 / 512, abs=1e-3)
    assert one["cow_faults"] == 0
    lines = hvctl("sharing").stdout.splitlines()
    assert lines[0].split()[:3] == ["Name", "ID", "Shared"] and len(lines) == 3
    assert lines[2].split()[:3] == ["b", str(one["domid"]), "256"]
    audit = hvctl("audit")
    assert audit.returncode == 0 and "0 errors" in audit.stdout


def test_sharing_of_no_such_domain_is_one_sentence(hvctl):
    assert hvctl("start", "--frames", "256").returncode == 0
    for ref, words in (("nosuch", "no domain is called nosuch"), ("7", "no domain with id 7")):
        p = hvctl("sharing", ref)
        assert p.returncode == 1 and p.stdout == ""
        assert p.stderr.strip().splitlines() == [f"hvctl sharing: {words}."]
    assert _json(hvctl("sharing", "--json")) == {"domains": []}
