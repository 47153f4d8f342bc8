"""``hvctl create --from-pid`` and ``--image`` as users see them: the JSON
answer, and one sentence and a non-zero status for each source that
cannot be read, with no domain left behind."""
from __future__ import annotations

import json
import subprocess
import sys

from memproc import MemProcess
from test_hvctl import _one_sentence, hvctl  # noqa: F401  (the fixture)
from waiting import wait_until

SNAPSHOT_KEYS = {"domid", "pages", "regions", "skipped_pages", "swapped_pages", "source"}


def _empty(hvctl) -> None:
    p = hvctl("list", "--json")
    assert p.returncode == 0 and json.loads(p.stdout) == []
    p = hvctl("audit", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["errors"] == 0


def test_create_from_a_process_and_from_a_file(hvctl, tmp_path):
    assert hvctl("start", "--frames", "16384").returncode == 0
    with MemProcess(pages=32) as proc:
        p = hvctl("create", "--from-pid", str(proc.pid), "--json")
        assert p.returncode == 0, p.stderr
        r = json.loads(p.stdout)
        assert SNAPSHOT_KEYS <= set(r) and r["source"] == f"pid {proc.pid}" and r["pages"] >= 32
        p = hvctl("create", "--from-pid", str(proc.pid), "--all-mappings", "--pages", "5")
        assert p.returncode == 0, p.stderr
        first, summary = p.stdout.strip().splitlines()
        assert first.isdigit() and summary.startswith(f"5 pages from pid {proc.pid}")
    (tmp_path / "raw").write_bytes(b"\1" * 5000)
    p = hvctl("create", "--image", str(tmp_path / "raw"), "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["pages"] == 2


def test_sources_that_cannot_be_read(hvctl, tmp_path):
    assert hvctl("start", "--frames", "4096").returncode == 0
    (tmp_path / "empty").write_bytes(b"")
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    assert wait_until(lambda: open(f"/proc/{zombie.pid}/stat").read().split(") ")[1][0] == "Z", timeout=10)
    try:
        cases = [(["--from-pid", str(zombie.pid)], "exited before its snapshot"),
                 (["--image", str(tmp_path / "missing")], "no file"),
                 (["--image", str(tmp_path / "empty")], "is empty")]
        for args, words in cases:
            p = hvctl("create", *args)
            assert p.returncode == 1, (args, p)
            _one_sentence(p, "cannot create a domain", words)
            _empty(hvctl)
    finally:
        zombie.wait()
    p = hvctl("create", "--from-pid", str(zombie.pid))
    assert p.returncode == 1
    _one_sentence(p, f"no process {zombie.pid}")
    for args, words in ((["create"], "--pages"), (["create", "--all-mappings", "--pages", "4"], "--from-pid"),
                        (["create", "--from-pid", "1", "--image", "x"], "not allowed with")):
        p = hvctl(*args)
        assert p.returncode == 2, (args, p)
        _one_sentence(p, words)
    _empty(hvctl)
