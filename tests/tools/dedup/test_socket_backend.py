"""The dedup scanner against a real hypervisor process: ``SocketBackend``,
``hvctl dedup`` and ``hvctl dedup --watch``.

What a guest reads is checked through its own control channel (its read-only
mapping), so a merge of different contents would show as a guest reading
bytes it never wrote. The ``hvs`` fixture checks the audit at the end.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading

import numpy as np

from hvshare.hvcore import images
from hvshare.hvcore.constants import PAGE_SIZE
from hvshare.hvcore.errors import ESRCH
from hvshare.hvcore.p2m import RAM_RW, RAM_SHARED, P2MView
from hvshare.tools import api
from hvshare.tools.dedup import Scanner, SocketBackend

PASS_KEYS = {"scanned", "merged", "seconds", "nr_saved_mfns", "pages_shared", "pages_sharing",
             "pages_unshared", "pages_volatile", "full_scans"}


def memory(hv, domid: int) -> np.ndarray:
    """Every page of a domain as its guest reads it."""
    n = hv.domain(domid)["pages"]
    with hv.guest(domid) as g:
        return np.concatenate([g.read_pages(np.arange(lo, min(lo + 1024, n)))
                               for lo in range(0, n, 1024)])


def types(hv, domid: int) -> np.ndarray:
    view = P2MView(hv.domain(domid)["p2m"])
    try:
        return view.type.copy()
    finally:
        view.close()


def saved_from_content(*memories: np.ndarray) -> int:
    """Frames saved if every set of identical pages shares one frame."""
    rows = np.concatenate(memories)
    _, counts = np.unique(rows.view(np.dtype((np.void, PAGE_SIZE))).ravel(), return_counts=True)
    return int((counts - 1).sum())


def hvctl(sock: str, *args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hvshare.tools.hvctl", *args, "--socket", sock],
                          capture_output=True, text=True, timeout=timeout)


def test_clones_share_image_and_zero_pages_private_pages_stay(hvs):
    pages, seed = 1024, 7
    doms = [hvs.create(pages, "clone", seed=seed) for _ in range(3)]
    before = [memory(hvs, d) for d in doms]
    kinds = images.clone_kinds(seed, pages)
    n_image = int((kinds == images.KIND_IMAGE).sum())
    n_zero = int((kinds == images.KIND_ZERO).sum())
    with Scanner(SocketBackend(hvs)) as sc:
        r = sc.scan_pass()
    # what the content predicts: the image once, one zero frame, private pages alone
    want = saved_from_content(*before)
    assert want == 2 * n_image + 3 * n_zero - 1
    assert r.nr_saved_mfns == r.saved_delta == hvs.info()["nr_saved_mfns"] == want
    assert r.scanned == 3 * pages and r.full_scan
    assert r.counters["pages_sharing"] == want
    assert r.counters["pages_unshared"] == 3 * int((kinds == images.KIND_PRIVATE).sum())
    for d, mem in zip(doms, before):
        t = types(hvs, d)
        assert (t[kinds == images.KIND_PRIVATE] == RAM_RW).all()
        assert (t[kinds != images.KIND_PRIVATE] == RAM_SHARED).all()
        assert np.array_equal(memory(hvs, d), mem)      # guests read what they had
    # the hypervisor's own accounting of the pass
    steps = r.hv_steps
    assert steps["share_many"]["count"] == r.requests - steps["nominate_many"]["count"]
    assert r.max_request_ms > 0
    again = Scanner(SocketBackend(hvs))
    with again:
        assert again.scan_pass().merged == 0


def test_racing_writer_reads_what_it_wrote(hvs):
    """A guest writes pages, some of them just nominated or just verified by
    the scanner, others at any moment of a pass; it must always read back
    exactly what it wrote, and nothing is ever merged with stale content."""
    pages, seed = 512, 3
    ref = hvs.create(pages, "clone", seed=seed)
    w = hvs.create(pages, "clone", seed=seed)
    ref_mem = memory(hvs, ref)
    expect = memory(hvs, w)
    lock = threading.Lock()
    rng = np.random.default_rng(11)
    candidates = [ref_mem[g] for g in range(0, pages, 7)] + [np.zeros(PAGE_SIZE, np.uint8)]
    problems: list[str] = []
    writes = [0]

    def write(g, gfns, contents):
        """Write through the guest, then read back through the guest."""
        with lock:
            writes[0] += 1
            g.write_pages(gfns, contents)
            expect[gfns] = contents
            got = g.read_pages(gfns)
        if not np.array_equal(got, contents):
            problems.append(f"gfns {gfns.tolist()} read back other bytes")

    def pick(k):
        # pages the scanner would love to merge (twins of the reference's or
        # zero) and pages it must not (random)
        out = np.stack([candidates[i] for i in rng.integers(0, len(candidates), k)])
        out[k // 2:] = rng.integers(0, 256, (k - k // 2, PAGE_SIZE), dtype=np.uint8)
        return out

    stop = threading.Event()

    def racer():
        with hvs.guest(w) as g:
            while not stop.is_set():
                gfns = rng.choice(pages, 8, replace=False).astype(np.int64)
                write(g, gfns, pick(8))

    gw = hvs.guest(w)
    hooked = {"nominate": 0, "share": 0}

    def after_nominate(batch):        # write pages the scanner has just nominated
        hooked["nominate"] += 1
        mine = np.unique(batch.cg[batch.cd == w])[:4]
        if len(mine):
            write(gw, mine, pick(len(mine)))

    def before_share(batch):          # ... and pages it has just verified
        hooked["share"] += 1
        mine = np.unique(batch.sg[batch.sd == w])[:2]   # a source serves many pairs
        if len(mine):
            write(gw, mine, pick(len(mine)))

    t = threading.Thread(target=racer)
    t.start()
    merged = skipped = 0
    try:
        with Scanner(SocketBackend(hvs), batch_pages=32, round_pages=64, skip_volatile=False) as sc:
            for i in range(8):
                if i % 2 == 0:
                    sc.after_nominate, sc.before_share = after_nominate, before_share
                else:
                    sc.after_nominate = sc.before_share = None
                r = sc.scan_pass()
                merged += r.merged
                skipped += r.skipped
    finally:
        stop.set()
        t.join()
        gw.close()
    assert not problems, problems[:3]
    assert hooked["nominate"] and writes[0] > 2 * hooked["nominate"]
    assert merged > 0 and skipped > 0
    assert np.array_equal(memory(hvs, w), expect)
    assert np.array_equal(memory(hvs, ref), ref_mem)
    assert hvs.audit() == 0


def test_rescan_after_writes_merges_only_what_is_identical_again(hvs):
    pages, seed = 256, 5
    a = hvs.create(pages, "clone", seed=seed)
    b = hvs.create(pages, "clone", seed=seed)
    kinds = images.clone_kinds(seed, pages)
    image = np.nonzero(kinds == images.KIND_IMAGE)[0]
    g, h = int(image[0]), int(image[1])
    rng = np.random.default_rng(2)
    with Scanner(SocketBackend(hvs)) as sc:
        sc.scan_pass()
        saved = hvs.info()["nr_saved_mfns"]
        new = rng.integers(0, 256, (1, PAGE_SIZE), dtype=np.uint8)
        with hvs.guest(a) as ga, hvs.guest(b) as gb:
            ga.write_pages([g], new)                  # g: identical again in a and b
            gb.write_pages([g], new)
            ga.write_pages([h], rng.integers(0, 256, (1, PAGE_SIZE), dtype=np.uint8))   # h: unique now
        assert hvs.info()["nr_saved_mfns"] == saved - 2
        r2 = sc.scan_pass()                           # changed since the last scan: volatile
        assert r2.volatile == 3 and r2.merged == 0
        r3 = sc.scan_pass()                           # held still: merge what matches
        assert r3.volatile == 0 and r3.merged == 1
    ta, tb = types(hvs, a), types(hvs, b)
    assert ta[g] == tb[g] == RAM_SHARED
    assert ta[h] == RAM_RW            # b's h stays on its old frame, alone
    assert hvs.info()["nr_saved_mfns"] == saved - 1 == saved_from_content(memory(hvs, a), memory(hvs, b))


def test_socket_backend_answers_codes_for_a_vanished_domain(hvs):
    a = hvs.create(16, "zero")
    b = hvs.create(16, "zero")
    be = SocketBackend(hvs)
    handles, codes = be.nominate_many(a, np.arange(4))
    hb, cb = be.nominate_many(b, np.arange(4))
    assert (codes == 0).all() and (cb == 0).all()
    hvs.destroy(b)
    h, c = be.nominate_many(b, np.arange(4))
    assert (c == ESRCH).all()
    codes = be.share_many(np.full(4, a), np.arange(4), handles, np.array([a, b, a, b]),
                          np.array([8, 0, 9, 1]), np.concatenate([be.nominate_many(a, [8])[0], hb[:1],
                                                                  be.nominate_many(a, [9])[0], hb[1:2]]))
    assert codes.tolist() == [0, ESRCH, 0, ESRCH]
    assert [d for d, _, _ in be.domains()] == [a]
    assert be.pool_name() == hvs.info()["pool"]


def test_a_budgeted_request_answers_a_prefix(hvs):
    # A step whose budget is spent stops after its first chunk and answers
    # how many items it did; those are the request's first ones, the rest
    # is untouched (the caller sends it again).
    n = 600
    a = hvs.create(n, "zero")
    ans, data = hvs.request("nominate_many", np.arange(n, dtype="<i8").tobytes(), domid=a,
                            count=n, budget_us=1)
    done = ans["done"]
    assert 16 <= done < n and ans["count"] == n and len(data) == 16 * done
    assert (np.frombuffer(data, "<i8", done, 8 * done) == 0).all()
    t = types(hvs, a)
    assert (t[:done] == RAM_SHARED).all() and (t[done:] == RAM_RW).all()
    # without a budget, the whole request is one step
    ans, _ = hvs.request("nominate_many", np.arange(n, dtype="<i8").tobytes(), domid=a, count=n)
    assert ans["done"] == n and (types(hvs, a) == RAM_SHARED).all()


def test_a_pass_in_tiny_steps_merges_what_a_whole_pass_does(hvs):
    # With a budget no step can keep, every request is answered in part and
    # sent again, two in flight: the pass ends as one without budgets.
    doms = [hvs.create(512, "clone", seed=3) for _ in range(2)]
    before = [memory(hvs, d) for d in doms]
    with Scanner(SocketBackend(hvs, request_budget_ms=0.001)) as sc:
        r = sc.scan_pass()
    assert r.nr_saved_mfns == saved_from_content(*before) > 0
    # whole requests would be 3 (a nominate per domain, one share)
    assert r.requests >= 10
    assert r.hv_steps["share_many"]["count"] + r.hv_steps["nominate_many"]["count"] == r.requests
    for d, mem in zip(doms, before):
        assert np.array_equal(memory(hvs, d), mem)
    with Scanner(SocketBackend(hvs, request_budget_ms=None)) as sc:
        again = sc.scan_pass()
    assert again.merged == 0 and again.requests == 0


def test_hvctl_dedup_one_pass(hvs):
    a = hvs.create(256, "clone", seed=9)
    b = hvs.create(256, "clone", seed=9)
    c = hvs.create(256, "clone", seed=9)
    p = hvctl(hvs.socket_path, "dedup", str(a), str(b), "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert PASS_KEYS <= set(r)
    assert r["scanned"] == 512 and r["merged"] > 0 and r["nr_saved_mfns"] == hvs.info()["nr_saved_mfns"]
    assert (types(hvs, c) == RAM_RW).all()            # not named: not touched
    shared = sum(d["shr_pages"] for d in hvs.list())
    p = hvctl(hvs.socket_path, "dedup")               # every private page, c's too
    assert p.returncode == 0, p.stderr
    assert f"scanned {768 - shared} pages" in p.stdout, p.stdout
    assert "frames saved" in p.stdout and "longest step" in p.stdout
    assert (types(hvs, c) == RAM_SHARED).any()
    for args, status, words in ((["dedup", "99"], 1, "no domain with id 99"),
                                (["dedup", "--scan-rate", "10"], 2, "only applies with --watch"),
                                (["dedup", "-v"], 2, "only applies with --watch"),
                                (["dedup", "--stop", "--watch"], 2, "--stop takes no --watch"),
                                (["dedup", "--watch", "--interval", "0"], 2, "--interval")):
        p = hvctl(hvs.socket_path, *args)
        assert p.returncode == status, p
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in p.stderr


def _watch(sock: str, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hvshare.tools.hvctl", "dedup", "--watch", "--json",
                             "--interval", "0.05", "--socket", sock, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _unique(pairs):
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), keys        # one copy of each counter
    return dict(pairs)


def test_hvctl_dedup_watch_stops_on_sigterm(hvs):
    a = hvs.create(256, "clone", seed=4)
    b = hvs.create(256, "writer", seed=4, rate=500, batch=4)
    proc = _watch(hvs.socket_path, "--scan-rate", "4000", "-v")  # 200 gfns per pass: several per full scan
    try:
        passes = [json.loads(proc.stdout.readline(), object_pairs_hook=_unique) for _ in range(8)]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert err == ""
    for r in passes:
        assert PASS_KEYS <= set(r) and r["scanned"] <= 200
    assert passes[-1]["full_scans"] >= 2
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped"] == "SIGTERM" and summary["passes"] >= 8
    assert hvs.info()["nr_saved_mfns"] > 0 and hvs.audit() == 0
    assert {a, b} <= {d["domid"] for d in hvs.list()}


def test_hvctl_dedup_watch_exits_when_the_hypervisor_goes_away():
    with api.hvshare_session(frames=1024) as hv:
        hv.create(64, "zero")
        proc = _watch(hv.socket_path, "-v")
        try:
            assert "scanned" in proc.stdout.readline()
            hv.stop()
            out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "hvctl dedup:" in lines[0] and "Traceback" not in err
    assert json.loads(out.strip().splitlines()[-1])["stopped"] == "hypervisor gone"


def test_hvctl_dedup_help_documents_the_daemon_knobs():
    p = subprocess.run([sys.executable, "-m", "hvshare.tools.hvctl", "dedup", "--help"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0
    for word in ("--watch", "--scan-rate", "PAGES_PER_SECOND", "--interval", "SECONDS", "--share-batch",
                 "200,000", "0.1", "SIGTERM", "--json", "--socket", "--detach", "--stop", "-v",
                 "dedup-show", "dedup-set"):
        assert word in p.stdout, word


def test_share_runs_the_callers_idle_work_until_it_is_done(hvs):
    """``share_many``'s ``idle`` is called while requests are in flight,
    and no more once it says nothing is left; the shares are unaffected."""
    pages = 600
    d = hvs.create(pages, "zero")
    g = np.arange(pages, dtype=np.int64)
    be = SocketBackend(hvs)
    try:
        h, codes = be.nominate_many(d, g)
        assert (codes == 0).all()
        calls = []

        def idle():
            calls.append(len(calls))
            return len(calls) < 2
        codes = be.share_many(np.full(pages - 1, d), np.zeros(pages - 1, np.int64),
                              np.full(pages - 1, h[0], np.uint64), np.full(pages - 1, d), g[1:], h[1:],
                              limit=64, idle=idle)
        assert (codes == 0).all()
        assert calls == [0, 1]          # 9+ requests, idle stopped after its False
        assert hvs.info()["nr_saved_mfns"] == pages - 1
    finally:
        be.close()


def test_pipelined_rounds_merge_what_the_content_predicts(hvs):
    """Rounds whose shares overlap the next round's compare (many small
    rounds, sources spanning rounds): every identical page merged, guests
    read what they wrote."""
    pages, seed = 700, 3
    doms = [hvs.create(pages, "clone", seed=seed) for _ in range(2)]
    before = [memory(hvs, d) for d in doms]
    with Scanner(SocketBackend(hvs), batch_pages=16, round_pages=48) as sc:
        r = sc.scan_pass()
    assert r.batches > 5 and r.mismatched == 0
    assert hvs.info()["nr_saved_mfns"] == saved_from_content(*before)
    for d, mem in zip(doms, before):
        assert np.array_equal(memory(hvs, d), mem)
