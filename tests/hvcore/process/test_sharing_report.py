"""The sharing_report control op on a real hypervisor: a job whose answer
splits the frames saved by zero and other pages and within and across
domains, with each domain's CoW faults."""
from __future__ import annotations

import threading

from hvshare.tools import api


def test_sharing_report_of_a_known_state(hvs):
    a = hvs.create(pages=64)                      # zero pages
    b = hvs.create(pages=64)
    c = hvs.create(pages=4)
    hvs.range_share(a, b, 0, 63)                  # 64 zero frames of degree 2
    hvs.guest(b).write(0, b"x")                   # a CoW fault: frame 0 keeps a only
    ga, gc = hvs.guest(a), hvs.guest(c)
    ga.write(10, b"same")                         # a's gfn 10 private again
    gc.write(3, b"same")                          # private: no CoW fault
    ha, hc = hvs.nominate(a, 10), hvs.nominate(c, 3)
    hvs.share(a, 10, ha, c, 3, hc)                # one nonzero frame across a and c
    h0, h1 = hvs.nominate(c, 0), hvs.nominate(c, 1)
    hvs.share(c, 0, h0, c, 1, h1)                 # one zero frame within c
    r = hvs.sharing_report()
    info = hvs.info()
    assert r["saved_frames"] == r["nr_saved_mfns"] == info["nr_saved_mfns"] == 62 + 1 + 1
    assert r["shared_frames"] == info["nr_shared_mfns"] == 64 + 1 + 1
    # frame 0 (a alone) and gfn 10's old frame (b alone) are zero frames of degree 1
    assert r["zero"] == {"frames": 65, "saved": 63}
    assert r["other"] == {"frames": 1, "saved": 1}
    assert r["intra"] == {"frames": 1, "saved": 1}
    assert r["inter"] == {"frames": 63, "saved": 63}
    assert r["unsettled"] == {"frames": 0, "saved": 0}
    assert r["degree"]["max"] == 2
    assert [h["frames"] for h in r["degree"]["histogram"]] == [2, 64]
    doms = {d["domid"]: d for d in r["domains"]}
    assert doms[b]["cow_faults"] == 1 and doms[a]["cow_faults"] == 1 and doms[c]["cow_faults"] == 0
    assert doms[c]["shr_pages"] == 3 and doms[c]["saved"] == 1.5
    assert sum(d["saved"] for d in r["domains"]) == r["saved_frames"]
    assert info["sharing_freed_memory"] == 0 and info["sharing_used_memory"] == 0
    assert "sharing_report" in info["pause_by_op"]


def test_reports_asked_at_once_each_get_an_answer(hvs):
    a = hvs.create(pages=512)
    b = hvs.create(pages=512)
    hvs.range_share(a, b, 0, 511)
    out = []

    def ask():
        with api.HypervisorClient(hvs.socket_path) as c:
            out.append(c.sharing_report()["saved_frames"])
    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [512] * 4
    assert hvs.audit() == 0
