"""The ``hvctl`` command line as users and scripts see it: exit statuses,
one-sentence errors on stderr, and the ``--json`` keys of the README."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from tools import api, session

DOMAIN_KEYS = {"domid", "name", "state", "pages", "shr_pages", "pid"}
INFO_KEYS = {"frames_total", "frames_free", "nr_shared_mfns", "nr_saved_mfns", "rmap", "teardown",
             "max_pause_ms"}
DESTROY_KEYS = {"domid", "seconds", "entries", "continuations", "max_pause_ms"}


@pytest.fixture
def hvctl():
    """Run ``hvctl`` in a subprocess against a private socket; stops whatever
    the test started."""
    d = tempfile.mkdtemp(prefix="cli-", dir=session.SESSION_ROOT)
    sock = os.path.join(d, "hv.sock")

    def run(*args, socket=sock, timeout=60):
        return subprocess.run([sys.executable, "-m", "tools.hvctl", *args, "--socket", socket],
                              capture_output=True, text=True, timeout=timeout)
    run.socket = sock
    yield run
    run("stop")
    shutil.rmtree(d, ignore_errors=True)


def _one_sentence(p, *words):
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert p.stdout == ""
    for w in words:
        assert w in lines[0], lines[0]
    assert "Traceback" not in p.stderr
    return lines[0]


def test_without_a_hypervisor(hvctl):
    for cmd in (["list"], ["info", "--json"], ["audit"], ["stop"], ["create", "--pages", "4"],
                ["destroy", "1"]):
        p = hvctl(*cmd)
        assert p.returncode == 1, (cmd, p)
        _one_sentence(p, "no hypervisor is running on", hvctl.socket)


def test_commands_and_json_keys(hvctl):
    p = hvctl("start", "--frames", "2048", "--rmap", "index", "--teardown", "monolithic", "--json")
    assert p.returncode == 0, p.stderr
    started = json.loads(p.stdout)
    assert started["socket"] == hvctl.socket and started["pid"] > 0

    p = hvctl("start")
    assert p.returncode == 1
    _one_sentence(p, "already running", str(started["pid"]))

    p = hvctl("create", "--pages", "64", "--workload", "clone", "--seed", "3", "--json")
    assert p.returncode == 0, p.stderr
    a = json.loads(p.stdout)["domid"]
    p = hvctl("create", "--pages", "64", "--workload", "clone", "--seed", "3", "--name", "twin")
    assert p.returncode == 0 and p.stdout.strip().isdigit()
    b = int(p.stdout)
    with api.HypervisorClient(hvctl.socket) as c:
        assert c.range_share(a, b, 0, 63) == 64

    p = hvctl("list", "--json")
    doms = json.loads(p.stdout)
    assert isinstance(doms, list) and len(doms) == 2
    for d in doms:
        assert DOMAIN_KEYS <= set(d)
        assert d["state"] == "running" and d["shr_pages"] == 64 and d["pages"] == 64
    assert [d["name"] for d in doms] == [f"dom{a}", "twin"]
    text = hvctl("list").stdout
    assert "twin" in text and "DOMID" in text

    p = hvctl("info", "--json")
    info = json.loads(p.stdout)
    assert INFO_KEYS <= set(info)
    assert info["rmap"] == "index" and info["teardown"] == "monolithic"
    assert info["frames_total"] == 2048 and info["nr_saved_mfns"] == 64
    assert info["max_pause_ms"] > 0
    assert "max_pause_ms" in hvctl("info").stdout

    p = hvctl("audit", "--json")
    audit = json.loads(p.stdout)
    assert p.returncode == 0 and audit.pop("seconds") >= 0 and audit == {"errors": 0, "report": []}

    p = hvctl("destroy", "99")
    assert p.returncode == 1
    _one_sentence(p, "no domain with id 99")
    p = hvctl("pause", "99")
    assert p.returncode == 1

    p = hvctl("destroy", str(b), "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert DESTROY_KEYS <= set(r) and r["domid"] == b and r["entries"] == 64 and r["continuations"] == 0

    p = hvctl("create", "--pages", "100000")
    assert p.returncode == 1
    _one_sentence(p, "100000 pages")

    p = hvctl("stop", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["stopped"] is True
    assert not os.path.exists(hvctl.socket)
    assert hvctl("list").returncode == 1


@pytest.mark.parametrize("args, words", [
    (["create", "--pages", "abc"], ["--pages", "positive integer", "'abc'"]),
    (["create", "--pages", "0"], ["--pages", "positive integer"]),
    (["create", "--pages", "8", "--seed", "-1"], ["--seed"]),
    (["create"], ["--pages"]),
    (["start", "--frames", "lots"], ["--frames"]),
    (["start", "--rmap", "tree"], ["--rmap", "tree"]),
    (["destroy", "tab\tbed"], ["a domid or a domain name"]),
    (["frobnicate"], ["frobnicate"]),
])
def test_bad_command_lines(hvctl, args, words):
    p = hvctl(*args)
    assert p.returncode == 2, p
    _one_sentence(p, *words)


def test_help_explains_every_command():
    out = subprocess.run([sys.executable, "-m", "tools.hvctl", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("start", "stop", "create", "list", "info", "audit", "destroy", "demo"):
        assert cmd in out.stdout
        sub = subprocess.run([sys.executable, "-m", "tools.hvctl", cmd, "--help"],
                             capture_output=True, text=True)
        assert sub.returncode == 0 and "--json" in sub.stdout and "--socket" in sub.stdout
    assert "HVSHARE_SOCKET" in out.stdout


def test_options_before_the_command(hvctl):
    p = subprocess.run([sys.executable, "-m", "tools.hvctl", "--socket", hvctl.socket, "--json", "start",
                        "--frames", "256"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    started = json.loads(p.stdout)
    assert started["socket"] == hvctl.socket
    assert os.path.isfile(started["log"]) and started["log"].endswith("hypervisor.log")
    assert json.loads(hvctl("info", "--json").stdout)["frames_total"] == 256


def test_foreground_start(hvctl):
    proc = subprocess.Popen([sys.executable, "-m", "tools.hvctl", "start", "--foreground", "--frames", "256",
                             "--socket", hvctl.socket], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert "serving on" in line and hvctl.socket in line
        assert hvctl("create", "--pages", "8").returncode == 0
        assert hvctl("stop").returncode == 0
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_json():
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "tools.hvctl", "demo", "--json", "--guests", "2",
                        "--pages", "512", "--seconds", "0.5"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert {"audit_errors", "nr_saved_mfns", "cow_faults", "teardown"} <= set(r)
    assert DESTROY_KEYS <= set(r["teardown"])
    assert r["audit_errors"] == 0 and r["nr_saved_mfns"] > 0 and r["cow_faults"] > 0
    assert r["leftovers"] == {"processes": 0, "segments": 0}
    assert time.monotonic() - t0 < 60


def test_a_domain_name_that_cannot_be_printed_is_refused_and_nothing_is_made(hvctl):
    assert hvctl("start", "--frames", "256").returncode == 0
    p = hvctl("create", "--pages", "8", "--name", "web\n2    fake   running")
    assert p.returncode == 1, p
    assert "\n2" not in _one_sentence(p, "name")        # printed escaped, never raw
    with api.HypervisorClient(hvctl.socket) as c:
        for bad in ("esc\x1b[2Jape", "nul\x00", "\udcff", "x" * 65, " lead", "tail ", ""):
            with pytest.raises(api.HVCtlError) as e:
                c.create(8, name=bad)
            assert e.value.code_name == "EINVAL" and "name" in str(e.value), bad
            assert "\x1b" not in str(e.value) and "\x00" not in str(e.value)
        assert c.list() == [] and c.info()["frames_free"] == 256


def test_domain_names_are_unique(hvctl):
    assert hvctl("start", "--frames", "256").returncode == 0
    assert hvctl("create", "--pages", "8", "--name", "web").returncode == 0
    p = hvctl("create", "--pages", "8", "--name", "web")
    assert p.returncode == 1
    _one_sentence(p, "already called web")
    # a user's name never clashes with a default one
    assert hvctl("create", "--pages", "8", "--name", "dom3").returncode == 0
    assert hvctl("create", "--pages", "8").returncode == 0
    listed = json.loads(hvctl("list", "--json").stdout)
    names = [d["name"] for d in (listed["domains"] if isinstance(listed, dict) else listed)]
    assert len(names) == len(set(names)) == 3 and names[:2] == ["web", "dom3"]


def test_version_and_domains_by_name_as_xl_takes_them(hvctl):
    p = hvctl("--version")
    assert p.returncode == 0 and p.stdout.startswith("hvctl (hvshare) ")
    assert hvctl("start", "--frames", "256").returncode == 0
    assert hvctl("create", "--pages", "8", "--name", "web2").returncode == 0
    assert hvctl("create", "--pages", "8", "--name", "db").returncode == 0
    assert hvctl("pause", "web2").stdout.strip() == "domain 1 paused"
    assert hvctl("unpause", "web2").returncode == 0
    assert hvctl("dedup", "web2", "db", "--json").returncode == 0
    p = hvctl("destroy", "web3")
    assert p.returncode == 1
    _one_sentence(p, "no domain is called web3")
    r = json.loads(hvctl("destroy", "web2", "--json").stdout)
    assert r["domid"] == 1
    listed = json.loads(hvctl("list", "--json").stdout)
    names = [d["name"] for d in (listed["domains"] if isinstance(listed, dict) else listed)]
    assert names == ["db"]


def test_info_names_the_operations_that_stay_one_step(hvctl):
    assert hvctl("start", "--frames", "256", "--teardown", "monolithic").returncode == 0
    info = json.loads(hvctl("info", "--json").stdout)
    assert sorted(info["unbounded"]) == ["audit", "destroy"]
    text = hvctl("info").stdout
    assert "unbounded       audit:" in text and "unbounded       destroy: --teardown monolithic" in text
    hvctl("stop")
    assert hvctl("start", "--frames", "256", "--prefault").returncode == 0
    info = json.loads(hvctl("info", "--json").stdout)
    assert list(info["unbounded"]) == ["audit"] and info["frames_free"] == 256
    # every frame of the pool is backed by memory before any domain exists
    assert os.stat("/dev/shm" + info["pool"]).st_blocks * 512 >= 256 * 4096
