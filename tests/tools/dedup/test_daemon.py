"""The dedup daemon as a user runs it: ``hvctl dedup --watch [--detach]``,
``dedup-show``, ``dedup-set`` and ``dedup --stop``, each a real ``hvctl``
process against a real hypervisor."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import psutil

from hvshare.tools import api
from hvshare.tools.dedup import daemon

HVCTL = [sys.executable, "-m", "hvshare.tools.hvctl"]


def hvctl(sock: str, *args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*HVCTL, *args, "--socket", sock], capture_output=True, text=True,
                          timeout=timeout)


def show(sock: str) -> dict:
    p = hvctl(sock, "dedup-show", "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def wait(pred, timeout: float = 30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError("timed out")


def unique_keys(pairs):
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), keys
    return dict(pairs)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def one_sentence(stderr: str, words: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in stderr, stderr


def test_detached_daemon_is_tuned_live_and_stops_leaving_nothing(hvs):
    for _ in range(2):
        hvs.create(256, "clone", seed=3)
    p = hvctl(hvs.socket_path, "dedup", "--detach", "--scan-rate", "2000", "--interval", "0.05",
              "--json")
    assert p.returncode == 0, p.stderr
    started = json.loads(p.stdout)
    pid, files = started["pid"], daemon.paths(hvs.socket_path)
    assert started["knobs"] == {"pages_to_scan": 100, "sleep_millisecs": 50, "share_batch": 1024}
    assert psutil.Process(pid).is_running() and all(os.path.exists(f) for f in files.values())
    again = hvctl(hvs.socket_path, "dedup", "--watch", "--detach")
    assert again.returncode == 1
    one_sentence(again.stderr, f"a dedup daemon (pid {pid}) is already running")

    # before the change: passes of up to 100 gfns, more than 7 on average
    before = wait(lambda: (s := show(hvs.socket_path))["counters"]["passes"] >= 3 and s)
    assert before["pid"] == pid and before["detached"] and before["knobs"]["pages_to_scan"] == 100
    assert before["counters"]["pages_scanned"] > 7 * before["counters"]["passes"]
    p = hvctl(hvs.socket_path, "dedup-set", "pages_to_scan=7", "sleep_millisecs=10")
    assert p.returncode == 0, p.stderr
    assert "pages_to_scan 100 -> 7" in p.stdout and "sleep_millisecs 50 -> 10" in p.stdout
    s0 = show(hvs.socket_path)
    assert s0["knobs"] == {"pages_to_scan": 7, "sleep_millisecs": 10, "share_batch": 1024}
    # the pass running during the change may still be of 100: start from the one after
    n0 = s0["counters"]["passes"]
    c1 = wait(lambda: (s := show(hvs.socket_path)["counters"])["passes"] >= n0 + 2 and s)
    c2 = wait(lambda: (s := show(hvs.socket_path)["counters"])["passes"] >= c1["passes"] + 5 and s)
    assert c2["pages_scanned"] - c1["pages_scanned"] <= 7 * (c2["passes"] - c1["passes"])
    assert c2["pages_sharing"] == hvs.info()["nr_saved_mfns"] > 0

    p = hvctl(hvs.socket_path, "dedup", "--stop")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"dedup daemon {pid} stopped after")
    assert wait(lambda: gone(pid), 10)
    assert not any(os.path.exists(f) for f in files.values())
    p = hvctl(hvs.socket_path, "dedup-show")
    assert p.returncode == 1
    one_sentence(p.stderr, "no dedup daemon is running")
    p = hvctl(hvs.socket_path, "dedup", "--stop")
    assert p.returncode == 1
    one_sentence(p.stderr, "no dedup daemon is running")


def test_detached_daemon_ends_with_its_hypervisor():
    with api.hvshare_session(frames=1024) as hv:
        hv.create(64, "zero")
        p = hvctl(hv.socket_path, "dedup", "--detach", "--interval", "0.5", "--json")
        assert p.returncode == 0, p.stderr
        pid = json.loads(p.stdout)["pid"]
        files = daemon.paths(hv.socket_path)
        hv.stop()
        assert wait(lambda: gone(pid), 10)
        assert not any(os.path.exists(f) for f in files.values())


def _watch(sock: str, *extra) -> subprocess.Popen:
    return subprocess.Popen([*HVCTL, "dedup", "--watch", "--json", "--interval", "0.02",
                             "--socket", sock, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _end(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_watch_is_quiet_until_a_merge_and_tuned_like_the_daemon(hvs):
    proc = _watch(hvs.socket_path)
    try:
        s = wait(lambda: os.path.exists(daemon.paths(hvs.socket_path)["sock"]) and
                 (s := show(hvs.socket_path))["counters"]["passes"] >= 5 and s)
        assert not s["detached"] and s["pid"] == proc.pid
        assert not select.select([proc.stdout], [], [], 0)[0]      # nothing changed: no line
        # bad settings: one sentence each, nothing changed
        p = hvctl(hvs.socket_path, "dedup-set", "pages_to_scan=0", "speed=9", "sleep_millisecs=5")
        assert p.returncode == 2
        errs = p.stderr.strip().splitlines()
        assert len(errs) == 2 and "pages_to_scan" in errs[0] and "'speed' is not a knob" in errs[1]
        assert show(hvs.socket_path)["knobs"]["sleep_millisecs"] == 20
        p = hvctl(hvs.socket_path, "dedup-set", "sleep_millisecs=5", "share_batch=64")
        assert p.returncode == 0, p.stderr
        assert show(hvs.socket_path)["knobs"] == {"pages_to_scan": 4000, "sleep_millisecs": 5,
                                                  "share_batch": 64}
        a, b = hvs.create(128, "clone", seed=5), hvs.create(128, "clone", seed=5)
        lines = []
        while not any(x["merged"] for x in lines):
            assert select.select([proc.stdout], [], [], 30)[0]
            lines.append(json.loads(proc.stdout.readline(), object_pairs_hook=unique_keys))
        r = lines[-1]
        assert "counters" not in r and r["pages_sharing"] > 0
        assert r["seconds"] == round(r["seconds"], 4)
        assert all(v == round(v, 4) for v in r["phase_seconds"].values())
        p = hvctl(hvs.socket_path, "dedup", "--stop")
        assert p.returncode == 0, p.stderr
    finally:
        out, err = _end(proc)
    assert proc.returncode == 0 and err == ""
    assert json.loads(out.strip().splitlines()[-1])["stopped"] == "dedup --stop"
    assert {a, b} <= {d["domid"] for d in hvs.list()}


def test_verbose_watch_prints_every_pass(hvs):
    hvs.create(64, "zero")
    proc = _watch(hvs.socket_path, "-v")
    try:
        wait(lambda: os.path.exists(daemon.paths(hvs.socket_path)["sock"]) and
             show(hvs.socket_path)["counters"]["passes"] >= 5)
        proc.send_signal(signal.SIGTERM)
    finally:
        out, err = _end(proc)
    assert proc.returncode == 0, err
    *passes, summary = [json.loads(x, object_pairs_hook=unique_keys) for x in out.strip().splitlines()]
    assert summary["stopped"] == "SIGTERM" and len(passes) == summary["passes"] >= 5
    assert [p["passes"] for p in passes] == list(range(1, len(passes) + 1))


def test_knob_values_are_ascii_digits_only(hvs):
    """``int()`` also reads other scripts' digits and underscores: a knob
    takes the digits 0-9 only, from hvctl and on the control socket, and a
    refused value changes nothing."""
    p = hvctl(hvs.socket_path, "dedup", "--detach", "--scan-rate", "2000", "--interval", "0.5")
    assert p.returncode == 0, p.stderr
    knobs = {"pages_to_scan": 1000, "sleep_millisecs": 500, "share_batch": 1024}
    try:
        for bad in ("\u0661\u0662", "1_000", "\uff11\uff12", " 12", "+12", "12\n"):
            p = hvctl(hvs.socket_path, "dedup-set", f"pages_to_scan={bad}", "sleep_millisecs=20")
            assert p.returncode == 2
            one_sentence(p.stderr, "in the digits 0-9")
            assert "nothing was changed" in p.stderr
            with daemon.DaemonClient(hvs.socket_path) as d:
                try:
                    d.set(pages_to_scan=bad, sleep_millisecs="20")
                except api.HVCtlError as e:
                    assert "in the digits 0-9" in str(e)
                else:
                    raise AssertionError(f"the daemon took pages_to_scan={bad!r}")
            assert show(hvs.socket_path)["knobs"] == knobs
        p = hvctl(hvs.socket_path, "dedup-set", "pages_to_scan=12")
        assert p.returncode == 0 and "pages_to_scan 1000 -> 12" in p.stdout, p.stderr
    finally:
        assert hvctl(hvs.socket_path, "dedup", "--stop").returncode == 0
