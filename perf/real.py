"""Real programs: hvshare's dedup on snapshots of live processes, next to Linux KSM on the processes.

``python -m hvshare.perf real [--quick] [--json PATH]``

Two groups of real programs, each started K times (K = 4; 2 with
``--quick``): ``imports``, a Python interpreter that imports numpy, json,
sqlite3 and a few other standard modules, then sleeps; and ``dicts``, a
Python process that builds a large dict and a large list, then sleeps.
Each starts with ``prctl(PR_SET_MEMORY_MERGE, 1)`` (inherited across fork
and exec), so KSM may merge all of its anonymous memory.

At one moment every process is stopped (SIGSTOP) and snapshotted twice:
by the hypervisor (``create --from-pid``: a domain per process, its
present anonymous private pages) and by this benchmark (the same pages'
checksums, which say what the content predicts). Then they run again
(SIGCONT).

- **hvshare**: one :class:`hvshare.tools.dedup.Scanner` pass over those domains
  (scan and merge, as ``hvctl dedup`` runs it): its seconds, the frames it
  saved (``nr_saved_mfns``) and the zero pages among the pages it scanned.
- **Linux KSM**: ksmd at full speed (``sleep_millisecs=0``,
  ``use_zero_pages=0``) from the moment the snapshots are done until
  ``pages_sharing`` stops changing (unchanged for two full scans): the
  time to settle, ``pages_shared``, ``pages_sharing`` and each process's
  ``/proc/PID/ksm_merging_pages``. Skipped, with the reason, where KSM
  cannot be driven. The knobs are restored afterwards
  (:func:`hvshare.perf.peers.ksm_session.ksm_session`).

Where the frames saved differ, the counts that explain it
(``differences``):

- ``max_page_sharing``: KSM maps one KSM page at most that many times and
  starts another beyond, so a group of g equal pages saves g - ceil(g/cap)
  frames with KSM and g - 1 with hvshare; ``max_page_sharing_frames`` is
  the sum over the snapshots' groups. Zero pages are usually the largest
  group (``zero_pages``; with ``use_zero_pages=1`` KSM would map them to
  the zero page instead and count them apart).
- ``changed_pages``: pages whose bytes changed (or that went away) between
  the snapshot and the end of KSM's scan (the processes ran meanwhile).
- ``ksm_only_pages``: anonymous pages (written copies) in private
  file-backed mappings, which KSM may merge and a snapshot of anonymous
  mappings does not take.

Goals: hvshare's frames saved within 2% of KSM's ``pages_sharing``, and
hvshare's scan-and-merge time at most half of KSM's settle time.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

import numpy as np

from hvshare.hvcore.constants import PAGE_SIZE
from hvshare.hvcore.images import checksums
from hvshare.hvcore.snapshot import PM_PRESENT, ProcessSnapshot

from .common import sigterm_exits, table
from .figure import Figures
from .peers.ksm_session import fast_scan_knobs, ksm_session, sweep_stale
from .peers.ksm_sysfs import CounterPoller, foreign_mergers, ksm_available, read_knob, run_until_settled
from .report.headlines import report_goals

#: prctl option: KSM may merge every compatible mapping of the process
PR_SET_MEMORY_MERGE = 67
#: pagemap bit 61: a file page or a shared anonymous one
PM_FILE = np.uint64(1 << 61)
#: KSM has settled when pages_sharing did not change for this many full scans
SETTLE_SCANS = 2
#: pages read per chunk when this benchmark checksums a snapshot
_CHUNK = 4096

_IMPORTS = ("import numpy, json, sqlite3, decimal, email.parser, http.client, xml.etree.ElementTree, "
            "collections, re, datetime\n"
            "con = sqlite3.connect(':memory:'); numpy.arange(1000).sum(); json.dumps({'a': 1})\n")
_DICTS = ("import json\n"
          "d = {{i: (i, str(i)) for i in range({n})}}\n"
          "l = list(range({m}))\n")
_TAIL = "print('ready', flush=True)\nimport sys\nsys.stdin.read()\n"


def programs(quick: bool) -> dict[str, str]:
    """The Python source of each group's program (each waits on stdin)."""
    n, m = (100_000, 500_000) if quick else (400_000, 2_000_000)
    return {"imports": _IMPORTS + _TAIL, "dicts": _DICTS.format(n=n, m=m) + _TAIL}


def _merge_any() -> None:
    """In the child before exec: KSM may merge everything it maps."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MEMORY_MERGE)")


class Programs:
    """The running programs: ``procs`` as ``(group, Popen)``; all stopped
    and reaped on close."""

    def __init__(self, sources: dict[str, str], k: int):
        self.procs: list[tuple[str, subprocess.Popen]] = []
        try:
            for group, src in sources.items():
                for _ in range(k):
                    p = subprocess.Popen([sys.executable, "-c", src], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, preexec_fn=_merge_any)
                    self.procs.append((group, p))
            for _, p in self.procs:
                if p.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"program {p.pid} did not start (exit {p.poll()})")
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for _, p in self.procs]

    def signal(self, sig: int) -> None:
        for pid in self.pids:
            os.kill(pid, sig)

    @contextlib.contextmanager
    def stopped(self):
        """Every program stopped (SIGSTOP) for the block, running after."""
        self.signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.signal(signal.SIGCONT)

    def close(self) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                p.kill()
        for _, p in self.procs:
            p.wait()
            for f in (p.stdin, p.stdout):
                try:
                    f.close()
                except OSError:
                    pass
        self.procs = []


def _page_sums(snap: ProcessSnapshot) -> np.ndarray:
    """A checksum per page of a snapshot (read now, a chunk at a time)."""
    out = np.empty(snap.npages, dtype=np.uint64)
    buf = np.empty((_CHUNK, PAGE_SIZE), dtype=np.uint8)
    for lo in range(0, snap.npages, _CHUNK):
        part = buf[:min(_CHUNK, snap.npages - lo)]
        snap.into(part, lo)
        out[lo:lo + len(part)] = checksums(part)
    return out


def ksm_only_pages(pid: int) -> int:
    """Present anonymous pages in the private file-backed mappings of
    ``pid``: what KSM may merge and a snapshot of anonymous mappings
    leaves out."""
    n = 0
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                x = line.split(maxsplit=5)
                if len(x) < 6 or int(x[4]) == 0 or x[1][3] != "p" or x[1][0] != "r":
                    continue
                lo, hi = (int(v, 16) // PAGE_SIZE for v in x[0].split("-"))
                e = np.frombuffer(os.pread(fd, 8 * (hi - lo), 8 * lo), dtype=np.uint64)
                n += int(np.count_nonzero(((e & PM_PRESENT) != 0) & ((e & PM_FILE) == 0)))
    finally:
        os.close(fd)
    return n


def predicted(sums: np.ndarray, cap: int) -> dict:
    """What the content predicts: frames hvshare saves (every group of equal
    pages on one frame) and KSM saves (one KSM page per ``cap`` mappings)."""
    _, counts = np.unique(sums, return_counts=True)
    hv = int(len(sums) - len(counts))
    ksm = int((counts - -(-counts // cap)).sum())
    return {"pages": int(len(sums)), "distinct": int(len(counts)), "hvshare_saves": hv, "ksm_saves": ksm,
            "max_page_sharing_frames": hv - ksm, "zero_pages": int(np.count_nonzero(sums == 0))}


def _hvshare(progs: Programs, snaps: list[ProcessSnapshot]) -> tuple[dict, list[dict]]:
    """Snapshots by the hypervisor (the programs are stopped), then one
    dedup pass over them."""
    from hvshare.tools.api import hvshare_session
    from hvshare.tools.dedup import Scanner, SocketBackend
    frames = sum(s.npages for s in snaps) + 4096
    with hvshare_session(frames=frames) as hv:
        t0 = time.perf_counter()
        answers = [hv.create_domain(None, from_pid=pid) for pid in progs.pids]
        snapshot_seconds = time.perf_counter() - t0
        with Scanner(SocketBackend(hv)) as sc:
            t0 = time.perf_counter()
            res = sc.scan_pass()
            seconds = time.perf_counter() - t0
        audit = hv.audit()
    return ({"scan_seconds": seconds, "snapshot_seconds": snapshot_seconds,
             "frames_saved": res.nr_saved_mfns, "scanned": res.scanned, "zero_pages": res.zero,
             "zero_frames_saved": max(0, res.zero - 1), "merged": res.merged, "audit_errors": audit},
            answers)


def _ksm(progs: Programs, session) -> dict:
    """ksmd at full speed until pages_sharing stops changing."""
    session.set(**fast_scan_knobs(session, 20000))
    poll = CounterPoller(["pages_shared", "pages_sharing", "full_scans"])
    try:
        got = run_until_settled(poll, lambda: session.set(run=1), SETTLE_SCANS, 600.0, min_scans=SETTLE_SCANS)
    finally:
        poll.close()
    merging = {}
    for pid in progs.pids:
        with open(f"/proc/{pid}/ksm_merging_pages") as f:
            merging[pid] = int(f.read())
    return {"settle_seconds": got["seconds"], "settled": got["settled"], "pages_shared": got["counts"][0],
            "pages_sharing": got["counts"][1], "full_scans": got["full_scans"],
            "max_page_sharing": int(read_knob("max_page_sharing")),
            "use_zero_pages": int(read_knob("use_zero_pages")),
            "ksm_merging_pages": merging, "foreign_pids": foreign_mergers()}


#: the process of the large-snapshot phase: ``pages`` touched pages, each
#: distinct (its index in its first word), stopped while it is read
_BIG = ("import sys, numpy as np\n"
        "a = np.ones(({pages}, 4096), np.uint8)\n"
        "a.view(np.int64)[:, 0] = np.arange({pages})\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n")


def big_snapshot(pages: int) -> dict:
    """The longest hypervisor step while it snapshots one stopped process
    of ``pages`` touched pages (the goal: 1 ms at 1 GiB), and the create's
    wall time, on a prefaulted hypervisor as for ``perf scale``."""
    from hvshare.tools.session import HVSession
    from .scale import step_window
    progs = Programs({"big": _BIG.format(pages=pages)}, 1)
    try:
        with progs.stopped():
            hv = HVSession(frames=pages + 8192, timeout=None, prefault=True)
            try:
                i0 = hv.info()
                t0 = time.perf_counter()
                r = hv.create_domain(None, from_pid=progs.pids[0])
                seconds = time.perf_counter() - t0
                w = step_window(i0, hv.info())
                audit = hv.audit()
            finally:
                hv.close()
    finally:
        progs.close()
    return {"pages": pages, "snapshot_pages": r["pages"], "seconds": round(seconds, 4),
            "max_step_ms": w["max_ms"], "max_step_cpu_ms": w.get("max_cpu_ms"), "steps": w.get("steps"),
            "audit_errors": audit}


def run(quick: bool = False) -> dict:
    with sigterm_exits():
        return _run(quick)


def _run(quick: bool) -> dict:
    k = 2 if quick else 4
    reason = ksm_available()
    result: dict = {"bench": "real", "config": {"k": k, "groups": sorted(programs(quick)), "repeats": 1}}
    with contextlib.ExitStack() as stack:
        session = None
        if reason is None:
            session = stack.enter_context(ksm_session(run=0))
            sweep_stale(session)
        progs = Programs(programs(quick), k)
        stack.callback(progs.close)
        snaps = []
        stack.callback(lambda: [s.close() for s in snaps])
        with progs.stopped():
            snaps.extend(ProcessSnapshot(pid) for pid in progs.pids)
            sums = [_page_sums(s) for s in snaps]
            scope = [ksm_only_pages(pid) for pid in progs.pids]
            hv, answers = _hvshare(progs, snaps)
        cap = int(read_knob("max_page_sharing")) if reason is None else 256
        ksm = _ksm(progs, session) if session is not None else {"skipped": reason}
        with progs.stopped():
            # what changed between the snapshot and the end of KSM's scan
            changed = sum(int(np.count_nonzero(_page_sums(s) != x)) for s, x in zip(snaps, sums))
            lost = sum(s.lost_pages for s in snaps)
        merging = ksm.get("ksm_merging_pages", {})
        result["processes"] = [
            {"group": g, "pid": p.pid, "pages": a["pages"], "regions": a["regions"],
             "swapped_pages": a["swapped_pages"], "skipped_pages": a["skipped_pages"],
             "ksm_only_pages": extra, "ksm_merging_pages": merging.get(p.pid)}
            for (g, p), a, extra in zip(progs.procs, answers, scope)]
    content = predicted(np.concatenate(sums), cap)
    result.update(hvshare=hv, ksm=ksm, content=content)
    diff = {"zero_pages": content["zero_pages"], "max_page_sharing": cap,
            "max_page_sharing_frames": content["max_page_sharing_frames"],
            "changed_pages": changed - lost, "lost_pages": lost, "ksm_only_pages": sum(scope)}
    figs = Figures()
    figs.add("frames_saved", [hv["frames_saved"]], "frames")
    figs.add("scan_seconds", [hv["scan_seconds"]], "s")
    if "pages_sharing" in ksm:
        diff["frames_difference"] = hv["frames_saved"] - ksm["pages_sharing"]
        diff["unexplained"] = diff["frames_difference"] - content["max_page_sharing_frames"]
        figs.add("ksm_pages_sharing", [ksm["pages_sharing"]], "frames")
        figs.add("ksm_settle_seconds", [ksm["settle_seconds"]], "s")
    result["differences"] = diff
    big = big_snapshot(16384 if quick else 262144)
    result["big_snapshot"] = big
    figs.add("snapshot_max_step", [big["max_step_ms"]], "ms", pages=big["pages"])
    figs.add("snapshot_seconds", [big["seconds"]], "s", pages=big["pages"])
    result["figures"] = figs.dicts()
    return result


def report(result: dict) -> str:
    hv, k, c, d = result["hvshare"], result["ksm"], result["content"], result["differences"]
    procs = result["processes"]
    lines = [f"Real programs: {len(procs)} processes ({', '.join(result['config']['groups'])}, "
             f"{result['config']['k']} each), {c['pages']:,} present anonymous pages snapshotted"]
    rows = [["hvshare dedup pass (scan and merge)", f"{hv['scan_seconds']:.3f} s",
             f"{hv['frames_saved']:,} frames saved, {hv['zero_pages']:,} zero pages scanned "
             f"(snapshots took {hv['snapshot_seconds']:.3f} s)"]]
    if "skipped" in k:
        rows.append(["Linux KSM", "skipped", k["skipped"]])
    else:
        rows.append(["Linux KSM ksmd until settled", f"{k['settle_seconds']:.3f} s",
                     f"pages_shared {k['pages_shared']:,}, pages_sharing {k['pages_sharing']:,} "
                     f"({k['full_scans']} full scans{'' if k['settled'] else ', NOT SETTLED'})"])
    rows.append(["content predicts", "", f"hvshare {c['hvshare_saves']:,}, KSM {c['ksm_saves']:,} frames "
                 f"({c['distinct']:,} distinct pages)"])
    text = "\n".join(lines) + "\n" + table(["measure", "value", "detail"], rows)
    text += ("\ndifferences: " + f"zero pages {d['zero_pages']:,}; max_page_sharing {d['max_page_sharing']} "
             f"costs KSM {d['max_page_sharing_frames']:,} frames; changed after the snapshot "
             f"{d['changed_pages']:,} (gone {d['lost_pages']:,}); anonymous pages in private file "
             f"mappings (KSM only) {d['ksm_only_pages']:,}")
    text += "\n" + report_goals("real", result)
    return text

