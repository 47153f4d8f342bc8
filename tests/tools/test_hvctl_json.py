"""The JSON contract of ``hvctl``: every command's ``--json`` output, run as a
user runs it, matches its JSON Schema in docs/schema/.

The schema files are discovered: each carries an ``x-hvctl`` block saying
how to produce its output (``setup`` commands, the command to ``run``, and
for a stream the ``lines`` to read before Ctrl-C), so a command's schema is
checked as soon as its file exists (docs/schema/README.md)."""
from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import jsonschema
import pytest

from hvshare.tools import session
from hvshare.tools.cli.args import rounded

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schema"
FILES = sorted(SCHEMAS.glob("*.schema.json"))


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    assert not dup, f"duplicated keys {dup}"
    return dict(pairs)


def _parse(text: str):
    return json.loads(text, object_pairs_hook=_no_duplicate_keys)


class _Hvctl:
    """``hvctl`` in subprocesses on one private socket, with ``--json``."""

    def __init__(self, socket: str):
        self.socket = socket

    def argv(self, args):
        return [sys.executable, "-m", "hvshare.tools.hvctl", *args, "--json", "--socket", self.socket]

    def expand(self, args):
        """``{info.KEY}`` replaced by that key of ``hvctl info --json`` now."""
        def one(arg):
            m = re.fullmatch(r"\{info\.(\w+)\}", arg)
            return str(self.info()[m.group(1)]) if m else arg
        return [one(x) for x in args]

    def info(self):
        return _parse(self.run(["info"]).stdout)

    def run(self, args, timeout=120):
        p = subprocess.run(self.argv(self.expand(args)), capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, (args, p.stderr)
        return p


@pytest.fixture
def hvctl():
    d = tempfile.mkdtemp(prefix="json-", dir=session.SESSION_ROOT)
    h = _Hvctl(os.path.join(d, "hv.sock"))
    yield h
    subprocess.run(h.argv(["stop"]), capture_output=True, timeout=60)
    shutil.rmtree(d, ignore_errors=True)


def _stream(h: _Hvctl, args, lines: int) -> list[str]:
    """The first ``lines`` lines of a stream, then Ctrl-C and whatever it
    prints on its way out; it must exit as interrupted (130), quietly."""
    p = subprocess.Popen(h.argv(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: got.put([p.stdout.readline() for _ in range(lines)]),
                     daemon=True).start()
    try:
        try:
            first = got.get(timeout=30)
        except queue.Empty:
            pytest.fail(f"{args}: fewer than {lines} lines within 30 s")
        assert all(first), (first, p.poll())
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130 and err == "", err
    return first + rest.splitlines()


def _check_rounding(doc, where):
    assert rounded(doc) == doc, f"{where}: a float is not rounded to what it measures"


def test_every_command_has_a_schema():
    names = {f.name.split(".")[0] for f in FILES}
    for cmd in ("start", "stop", "create", "list", "info", "audit", "destroy", "pause", "unpause",
                "dedup", "dedup-watch", "events", "demo"):
        assert cmd in names, cmd
    for f in FILES:
        schema = json.loads(f.read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["x-hvctl"]["run"], f.name


@pytest.mark.parametrize("path", FILES, ids=[f.name.removesuffix(".schema.json") for f in FILES])
def test_output_matches_its_schema(hvctl, path):
    schema = json.loads(path.read_text())
    how = schema["x-hvctl"]
    for args in how.get("setup", []):
        hvctl.run(args)
    validator = jsonschema.Draft202012Validator(schema)
    if "lines" in how:
        docs = [_parse(line) for line in _stream(hvctl, how["run"], how["lines"])]
        assert len(docs) >= how["lines"]
    else:
        out = hvctl.run(how["run"]).stdout
        docs = [_parse(out)]
    for doc in docs:
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, "; ".join(f"{list(e.path)}: {e.message}" for e in errors)
        _check_rounding(doc, path.name)
    for args in how.get("teardown", []):
        hvctl.run(args)


def test_a_schema_rejects_what_breaks_the_contract():
    """The schemas are strict where scripts rely on them (else the test above
    could not fail)."""
    listing = jsonschema.Draft202012Validator(json.loads((SCHEMAS / "list.schema.json").read_text()))
    good = {"domid": 1, "name": "a", "state": "running", "pages": 64, "mib": 0.25, "shr_pages": 0, "pid": 9}
    assert listing.is_valid([good])
    assert not listing.is_valid({"domains": [good]})             # the array, not an object
    assert not listing.is_valid([{k: v for k, v in good.items() if k != "mib"}])
    assert not listing.is_valid([{**good, "state": "asleep"}])
    with pytest.raises(AssertionError, match="duplicated keys"):
        _parse('{"domid": 1, "domid": 2}')


@pytest.mark.parametrize("obj, want", [
    ({"max_pause_ms": 0.76612345}, {"max_pause_ms": 0.766}),
    ({"seconds": 0.0072275000002}, {"seconds": 0.0072275}),
    ({"uptime_s": 12345.6789}, {"uptime_s": 12345.7}),
    ({"phase_seconds": {"hash": 0.000765432001}}, {"phase_seconds": {"hash": 0.000765432}}),
    ({"fault_p50_us": 61.4321, "fault_p99_us": None}, {"fault_p50_us": 61.4, "fault_p99_us": None}),
    ({"time": 1712345678.1234567}, {"time": 1712345678.123457}),
    ({"hit_ratio": 0.123456, "mib": 0.00390625}, {"hit_ratio": 0.123, "mib": 0.004}),
    ({"rate": 1234.56789, "pages": 3, "x": [0.1234567891]}, {"rate": 1234.57, "pages": 3, "x": [0.123457]}),
])
def test_one_rounding_rule(obj, want):
    assert rounded(obj) == want
