"""``python -m hvshare.perf real --quick`` as a user runs it: every key of its JSON,
the KSM knobs as they were, every program it started gone (the autouse
``no_leftovers`` fixture). No timing is judged here."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from hvshare.perf.peers import ksm_sysfs
from hvshare.perf.real import predicted

KSM_REASON = ksm_sysfs.ksm_available()
KEYS = {
    "hvshare": {"scan_seconds", "snapshot_seconds", "frames_saved", "scanned", "zero_pages",
                "zero_frames_saved", "merged", "audit_errors"},
    "ksm": {"settle_seconds", "settled", "pages_shared", "pages_sharing", "full_scans", "max_page_sharing",
            "use_zero_pages", "ksm_merging_pages", "foreign_pids"},
    "content": {"pages", "distinct", "hvshare_saves", "ksm_saves", "max_page_sharing_frames", "zero_pages"},
    "differences": {"zero_pages", "max_page_sharing", "max_page_sharing_frames", "changed_pages",
                    "lost_pages", "ksm_only_pages", "frames_difference", "unexplained"},
}
PROCESS_KEYS = {"group", "pid", "pages", "regions", "swapped_pages", "skipped_pages", "ksm_only_pages",
                "ksm_merging_pages"}


def _knobs() -> dict:
    return {k: ksm_sysfs.read_knob(k) for k in ksm_sysfs.writable_knobs()} if KSM_REASON is None else {}


def test_quick_run_has_every_key_and_restores_the_knobs(tmp_path, contract):
    before = _knobs()
    out = tmp_path / "real.json"
    p = subprocess.run([sys.executable, "-m", "hvshare.perf", "real", "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert _knobs() == before
    doc = json.loads(out.read_text())
    assert doc["bench"] == "real" and doc["quick"] is True and doc["config"]["k"] == 2
    if KSM_REASON is not None:
        assert doc["ksm"] == {"skipped": KSM_REASON}
        keys = {k: v for k, v in KEYS.items() if k != "ksm"}
        keys["differences"] = KEYS["differences"] - {"frames_difference", "unexplained"}
    else:
        keys = KEYS
    for section, want in keys.items():
        assert want <= set(doc[section]), (section, want - set(doc[section]))
    assert len(doc["processes"]) == 4 and {q["group"] for q in doc["processes"]} == {"imports", "dicts"}
    for q in doc["processes"]:
        assert PROCESS_KEYS <= set(q)
    assert doc["hvshare"]["audit_errors"] == 0
    # the domains hold what this benchmark read: the scanner saves what the content predicts
    assert doc["hvshare"]["frames_saved"] == doc["content"]["hvshare_saves"]
    assert doc["content"]["pages"] == sum(q["pages"] for q in doc["processes"])
    names = {f["name"] for f in contract(doc)}
    want = {"frames_saved", "scan_seconds", "snapshot_max_step", "snapshot_seconds"}
    assert want | ({"ksm_pages_sharing", "ksm_settle_seconds"} if KSM_REASON is None else set()) == names


def test_content_predictions_count_groups_and_the_cap():
    sums = np.array([0] * 600 + [7, 7, 7] + [1, 2, 3], dtype=np.uint64)
    c = predicted(sums, cap=256)
    assert c["zero_pages"] == 600 and c["distinct"] == 5
    assert c["hvshare_saves"] == 599 + 2
    assert c["ksm_saves"] == (600 - 3) + 2            # 600 zero pages need three KSM pages
    assert c["max_page_sharing_frames"] == 2
