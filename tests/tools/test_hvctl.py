"""The ``hvctl`` command line as users and scripts see it: exit statuses,
one-sentence errors on stderr, and the ``--json`` keys of the README."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from hvshare.tools import api, session

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
        return subprocess.run([sys.executable, "-m", "hvshare.tools.hvctl", *args, "--socket", socket],
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
    assert info["max_pause_ms"] > 0 and info["max_pause_cpu_ms"] > 0
    text = hvctl("info").stdout
    # every counter's name stands apart from its value, the longest names too
    for key in ("frames_total", "max_pause_ms", "max_pause_cpu_ms", "sharing_freed_memory"):
        line = next(x for x in text.splitlines() if x.startswith(key))
        assert re.fullmatch(rf"{key}\s+{re.escape(str(info[key]))}\b.*", line), line

    p = hvctl("audit", "--json")
    audit = json.loads(p.stdout)
    assert p.returncode == 0 and audit.pop("seconds") > 0 and audit == {"errors": 0, "report": []}

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
    out = subprocess.run([sys.executable, "-m", "hvshare.tools.hvctl", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("start", "stop", "create", "list", "info", "audit", "destroy", "demo"):
        assert cmd in out.stdout
        sub = subprocess.run([sys.executable, "-m", "hvshare.tools.hvctl", cmd, "--help"],
                             capture_output=True, text=True)
        assert sub.returncode == 0 and "--json" in sub.stdout and "--socket" in sub.stdout
    assert "HVSHARE_SOCKET" in out.stdout


def test_options_before_the_command(hvctl):
    p = subprocess.run([sys.executable, "-m", "hvshare.tools.hvctl", "--socket", hvctl.socket, "--json", "start",
                        "--frames", "256"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    started = json.loads(p.stdout)
    assert started["socket"] == hvctl.socket
    assert os.path.isfile(started["log"]) and started["log"].endswith("hypervisor.log")
    assert json.loads(hvctl("info", "--json").stdout)["frames_total"] == 256


def test_foreground_start(hvctl):
    proc = subprocess.Popen([sys.executable, "-m", "hvshare.tools.hvctl", "start", "--foreground", "--frames", "256",
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


def test_foreground_start_ends_on_ctrl_c(hvctl):
    """Ctrl-C reaches the hypervisor hvctl runs in the foreground: it stops,
    cleans up, and hvctl ends with it, as an interrupted command (130)."""
    proc = subprocess.Popen([sys.executable, "-m", "hvshare.tools.hvctl", "start", "--foreground", "--frames", "256",
                             "--socket", hvctl.socket], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert "serving on" in proc.stdout.readline()
        hv_pid = api.running_pid(hvctl.socket)
        assert hv_pid != proc.pid                   # a process of its own, not hvctl's loop
        os.killpg(proc.pid, signal.SIGINT)          # as a terminal's Ctrl-C does
        assert proc.wait(timeout=20) == 130
        assert "Traceback" not in proc.stderr.read()
        assert not os.path.exists(f"/proc/{hv_pid}") and not os.path.exists(hvctl.socket)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_demo_json():
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "hvshare.tools.hvctl", "demo", "--json", "--guests", "2",
                        "--pages", "512", "--seconds", "0.5"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert {"audit_errors", "nr_saved_mfns", "cow_faults", "teardown"} <= set(r)
    assert DESTROY_KEYS <= set(r["teardown"])
    assert r["audit_errors"] == 0 and r["nr_saved_mfns"] > 0 and r["cow_faults"] > 0
    assert r["leftovers"] == {"processes": 0, "segments": 0}
    # single-page faults taken alone: every write was a fault, its own latency
    one = r["single_fault"]
    assert one["writes"] == one["cow_faults"] > 0 and 0 < one["p50_us"] <= one["p99_us"]
    w = r["writer_during_dedup"]
    assert w["batch_pages"] == 8 and w["cow_faults"] <= 8 * w["writes"]
    steps = r["longest_step_by_op"]
    assert {"create", "destroy", "nominate_many", "share_many"} <= set(steps)
    assert max(steps.values()) == r["max_pause_ms"]
    assert time.monotonic() - t0 < 60


def test_demo_report_labels_each_figure():
    p = subprocess.run([sys.executable, "-m", "hvshare.tools.hvctl", "demo", "--guests", "2", "--pages", "512",
                        "--seconds", "0.3"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    report = p.stdout[p.stdout.index("hvshare demo:"):]
    assert "single-page faults taken alone" in report and "writer paused, no scan" in report
    assert "batches of 8 pages during the dedup pass" in report
    assert "round trip of a batch that faulted" in report
    assert "per operation, ms:" in report and "create " in report and "destroy " in report
    assert "audit        0 errors" in report and "nothing left behind" in report


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
    assert re.search(r"^unbounded +audit:", text, re.M)
    assert re.search(r"^unbounded +destroy: --teardown monolithic", text, re.M)
    hvctl("stop")
    assert hvctl("start", "--frames", "256", "--prefault").returncode == 0
    info = json.loads(hvctl("info", "--json").stdout)
    assert list(info["unbounded"]) == ["audit"] and info["frames_free"] == 256
    # every frame of the pool is backed by memory before any domain exists
    assert os.stat("/dev/shm" + info["pool"]).st_blocks * 512 >= 256 * 4096


def _wait_until(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_writer_flags_and_the_mib_column(hvctl):
    assert hvctl("start", "--frames", "1024").returncode == 0
    p = hvctl("create", "--pages", "64", "--workload", "writer", "--write-rate", "400",
              "--write-batch", "4", "--name", "w")
    assert p.returncode == 0, p.stderr
    # the names before them still work, and say nothing more
    p = hvctl("create", "--pages", "128", "--workload", "writer", "--rate", "400", "--batch", "2",
              "--name", "old")
    assert p.returncode == 0 and p.stderr == "" and p.stdout.strip() == "2"

    def doms():
        return {d["name"]: d for d in json.loads(hvctl("list", "--json").stdout)}
    _wait_until(lambda: all(d["writes"] >= 3 for d in doms().values()))
    d = doms()
    assert d["w"]["pages_written"] == 4 * d["w"]["writes"]
    assert d["old"]["pages_written"] == 2 * d["old"]["writes"]
    assert d["w"]["mib"] == 0.25 and d["old"]["mib"] == 0.5
    header, *rows = hvctl("list").stdout.splitlines()
    cols = header.split()
    assert cols[4] == "MiB" and [r.split()[cols.index("MiB")] for r in rows] == ["0.25", "0.50"]
    p = hvctl("create", "--pages", "8", "--write-batch", "0")
    assert p.returncode == 2
    _one_sentence(p, "--write-batch")
    helptext = subprocess.run([sys.executable, "-m", "hvshare.tools.hvctl", "create", "--help"],
                              capture_output=True, text=True).stdout
    assert "--write-rate PAGES_PER_SECOND" in helptext and "--write-batch PAGES" in helptext
    assert "--rate" not in helptext.replace("--write-rate", "")


def test_help_lists_every_exit_status_the_code_uses():
    from hvshare.tools import cli
    text = subprocess.run([sys.executable, "-m", "hvshare.tools.hvctl", "--help"], capture_output=True,
                          text=True).stdout
    listed = {int(m) for m in re.findall(r"^  (\d+) ", text.split("Exit status:")[1], re.M)}
    assert listed == {code for code, _ in cli.EXIT_STATUSES} >= {0, 1, 2, 130, 141}
    used = set()
    for path in Path(cli.__file__).parent.glob("*.py"):
        src = path.read_text()
        used |= {int(x) for x in re.findall(r"return None, None, (\d+)", src)}
        used |= {int(x) for x in re.findall(r"\), (\d+)\)$", src, re.M)}
        used |= {int(x) for x in re.findall(r"^\s+return (\d+)$", src, re.M)}
        used |= {int(x) for x in re.findall(r"sys\.exit\((\d+)\)", src)}
    assert used and used <= listed, used - listed


def test_a_closed_output_pipe_ends_quietly(hvctl):
    assert hvctl("start", "--frames", "1024").returncode == 0
    assert hvctl("create", "--pages", "8", "--name", "a").returncode == 0

    def closed(*args):
        """Run with stdout a pipe whose reader is already gone."""
        r, w = os.pipe()
        os.close(r)
        try:
            return subprocess.run([sys.executable, "-m", "hvshare.tools.hvctl", *args, "--socket", hvctl.socket],
                                  stdout=w, stderr=subprocess.PIPE, text=True, timeout=60)
        finally:
            os.close(w)
    for args in (["list"], ["list", "--json"], ["info"], ["--help"]):
        p = closed(*args)
        assert p.stderr == "" and p.returncode in (141, 0), (args, p)
        assert p.returncode == 141 or args == ["--help"]
    # a stream: the sharing event ring, with one enomem event in it
    for name in ("b", "c"):
        assert hvctl("create", "--pages", "64", "--name", name, "--workload", "clone",
                     "--seed", "1").returncode == 0
    with api.HypervisorClient(hvctl.socket) as c:
        assert c.range_share(2, 3, 0, 7) == 8
        filler = c.create(c.info()["frames_free"], name="filler")
        with c.guest(3) as g:               # its CoW fault waits for a frame
            t = threading.Thread(target=g.write, args=(0, b"x"), daemon=True)
            t.start()
            _wait_until(lambda: c.info()["events_posted"] == 1)
            p = closed("events")
            assert (p.returncode, p.stderr) == (141, "")
            c.destroy(filler)
            t.join(10)
            assert not t.is_alive()
    # a pipeline as a user types it: head leaves after the first line
    sh = subprocess.run(["bash", "-c", f"'{sys.executable}' -m hvshare.tools.hvctl dedup --watch --verbose --json "
                         f"--interval 0.05 --socket '{hvctl.socket}' | head -1; "
                         f"echo \"status ${{PIPESTATUS[0]}}\""],
                        capture_output=True, text=True, timeout=60)
    first, status = sh.stdout.splitlines()
    assert "scanned" in json.loads(first) and status == "status 141" and sh.stderr == ""


def test_shell_completion(tmp_path):
    def complete(line):
        out = tmp_path / "out"
        env = dict(os.environ, _ARGCOMPLETE="1", COMP_LINE=line, COMP_POINT=str(len(line)),
                   _ARGCOMPLETE_STDOUT_FILENAME=str(out))
        p = subprocess.run([sys.executable, "-m", "hvshare.tools.hvctl"], env=env, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        return set(out.read_text().replace("\v", " ").split())
    assert complete("hvctl cre") == {"create"}
    assert complete("hvctl des") == {"destroy"} and "dedup" in complete("hvctl ded")
    assert complete("hvctl create --wr") == {"--write-rate", "--write-batch"}
    assert complete("hvctl create --ra") == set()          # the old name works, is not offered
    assert complete("hvctl create --workload ") == {"zero", "clone", "writer", "fuzz"}
    assert complete("hvctl start --rmap b") == {"buckets"}
