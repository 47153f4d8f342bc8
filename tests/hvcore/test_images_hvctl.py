"""``hvctl create --image`` of files that could block the hypervisor, as a
user runs it: one sentence and status 1 for each, and the hypervisor
answers ``list`` straight after (it never waited on the file)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys


def _hvctl(sock: str, *args) -> subprocess.CompletedProcess:
    # the timeout only ends a hung run (a hypervisor blocked on the file)
    return subprocess.run([sys.executable, "-m", "hvshare.tools.hvctl", *args, "--socket", sock],
                          capture_output=True, text=True, timeout=60)


def test_an_image_that_could_block_gets_a_sentence_and_the_hypervisor_answers(hvs, tmp_path):
    fifo, sock = tmp_path / "fifo", tmp_path / "sock"
    os.mkfifo(fifo)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    master, slave = os.openpty()
    try:
        cases = [(str(fifo), "is a FIFO"), (str(sock), "is a socket"),
                 (os.ttyname(slave), "is a character device"),
                 ("/dev/zero", "has no fixed size"), ("/dev/urandom", "has no fixed size")]
        for path, words in cases:
            p = _hvctl(hvs.socket_path, "create", "--image", path)
            lines = p.stderr.strip().splitlines()
            assert p.returncode == 1 and len(lines) == 1 and p.stdout == "", (path, p)
            assert "cannot create a domain" in lines[0] and words in lines[0], lines[0]
            p = _hvctl(hvs.socket_path, "list", "--json")
            assert p.returncode == 0 and json.loads(p.stdout) == [], p
    finally:
        s.close()
        os.close(master)
        os.close(slave)
