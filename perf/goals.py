"""The project's performance goals, each stated once: the one table the
benches' reports, the headlines, the README table and the plots judge by.

A goal names a figure of a bench's result (:mod:`hvshare.perf.figure`: a name and
labels) and, for a ratio, the anchor it is divided by (a peer measured
side by side, or hvshare itself in another case); it holds when the
figure's median (or the ratio of the medians) is ``op`` ``target``.
``at`` is the case the goal is stated for (N = 100,000 entries, degree
262,144...): a run that did not measure it (``--quick``) shows the largest
case it has, not judged.

:data:`FLOORS` are the figures another figure of the same run cannot
physically be below (a CoW fault does everything the floor probe and the
raw pipe do, and more). A goal whose figure or anchor is under one of its
floors, in the same case, is a broken measurement, never a goal met; so
is one measured with a placement that did not hold
(:mod:`hvshare.perf.placement`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .figure import LARGEST

#: the seed's teardown case: 100,000 gfns on one shared frame
SEED_N = 100_000
#: the seed (Xen, 2012) tore it down in over 7 minutes with a list, under 2 s with a hash table
SEED_LIST_SECONDS, SEED_BUCKETS_SECONDS = 7 * 60, 2.0
#: the sharing degree the rmap goals are stated at
TOP_DEGREE = 262_144
#: the fork goals' parent sizes (1 GiB, 4 GiB)
FORK_SMALL_PAGES, FORK_PAGES = 262_144, 1_048_576
#: the dedup goal's size
DEDUP_PAGES = 50_000
#: the longest hypervisor step allowed, in ms
STEP_MS = 1.0


@dataclass(frozen=True)
class Ref:
    """A figure of a bench's result: its name and the labels it must have."""
    name: str
    labels: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Goal:
    bench: str
    title: str
    figure: Ref
    op: str                       # "<=", ">=", "==" or "~=" (within ``target`` of 1)
    target: float
    anchor: Ref | None = None     # a ratio goal: figure / anchor
    at: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        if self.op == "~=":
            return f"within {self.target:.0%} of it"
        what = f"{self.target:g}x" if self.anchor else f"{self.target:g}"
        return f"{self.op} {what}"


def _pre(**kw) -> dict:
    return {"mode": "preemptible", **kw}


GOALS: tuple[Goal, ...] = (
    Goal("rmap", "rmap delete at the top degree: list over buckets",
         Ref("delete", {"policy": "list"}), ">=", 200, Ref("delete", {"policy": "buckets"}),
         at={"degree": TOP_DEGREE}),
    Goal("rmap", "rmap index delete at the top degree over degree 16 (flat)",
         Ref("delete", {"policy": "index"}), "<=", 2, Ref("delete", {"policy": "index", "degree": 16}),
         at={"degree": TOP_DEGREE}),
    Goal("rmap", "rmap index memory per entry at the top degree (B)",
         Ref("bytes_per_entry", {"policy": "index"}), "<=", 32, at={"degree": TOP_DEGREE}),
    Goal("teardown", f"teardown of {SEED_N:,} entries on one frame: list over buckets",
         Ref("seconds", _pre(rmap="list")), ">=", 200, Ref("seconds", _pre(rmap="buckets")),
         at={"entries": SEED_N}),
    Goal("teardown", f"teardown of {SEED_N:,} entries, index over Linux munmap of one KSM page",
         Ref("seconds", _pre(rmap="index")), "<=", 1, Ref("munmap_ksm"), at={"entries": SEED_N}),
    Goal("teardown", "longest step of a preemptible teardown, any N (ms)",
         Ref("max_step", _pre(rmap=("buckets", "index"))), "<=", STEP_MS),
    Goal("teardown", "guest CoW fault p99 during a preemptible teardown over idle",
         Ref("fault_p99", _pre(rmap=("buckets", "index"))), "<=", 2, Ref("idle_fault_p99")),
    Goal("cow", "CoW fault p50, same core, over the floor probe",
         Ref("fault_p50", {"placement": "same"}), "<=", 1.2, Ref("floor_p50", {"placement": "same"})),
    Goal("cow", "CoW fault p50, same core, over Linux KSM's CoW break",
         Ref("fault_p50", {"placement": "same"}), "<=", 3, Ref("ksm_cow_p50")),
    Goal("cow", "batched CoW pages/s over Linux KSM's batched CoW break",
         Ref("batched_rate", {"write": "one byte"}), ">=", 2, Ref("ksm_batched_rate")),
    *(Goal("dedup", f"dedup merge rate over Linux KSM ({content} pages)",
           Ref("merge_rate", {"content": content, "rmap": "buckets"}), ">=", 2,
           Ref("ksm_merge_rate", {"content": content}), at={"pages": DEDUP_PAGES})
      for content in ("identical", "clone")),
    Goal("density", "clone guests in one pool with dedup over what the content predicts",
         Ref("guests", {"dedup": "with"}), ">=", 1, Ref("predicted_guests", {"dedup": "with"})),
    Goal("real", "real programs: frames saved by dedup over Linux KSM's pages_sharing",
         Ref("frames_saved"), "~=", 0.02, Ref("ksm_pages_sharing")),
    Goal("real", "real programs: dedup scan-and-merge time over KSM's settle time",
         Ref("scan_seconds"), "<=", 0.5, Ref("ksm_settle_seconds")),
    Goal("real", "longest step while snapshotting a stopped 1 GiB process (ms)",
         Ref("snapshot_max_step"), "<=", STEP_MS, at={"pages": 262_144}),
    *(Goal("scale", f"scale: longest step of any operation, {rmap}, largest N (ms)",
           Ref("max_step", {"rmap": rmap, "pages": LARGEST}), "<=", STEP_MS)
      for rmap in ("buckets", "index")),
    Goal("scale", "scale: dedup pass merge rate over ksmd, index, largest N",
         Ref("rate", {"op": "dedup", "rmap": "index", "pages": LARGEST}), ">=", 1, Ref("ksm_merge_rate")),
    Goal("scale", "scale: destroy, index, over Linux munmap of the KSM-merged region, largest N",
         Ref("seconds", {"op": "destroy", "rmap": "index", "pages": LARGEST}), "<=", 1,
         Ref("ksm_munmap_seconds")),
    *(Goal("fork", f"fork until the child runs over Linux fork(), {pages // 262_144} GiB parent",
           Ref("fork_seconds"), "<=", 1, Ref("linux_fork_seconds"), at={"pages": pages})
      for pages in (FORK_SMALL_PAGES, FORK_PAGES)),
    Goal("fork", "fork_reset after 64 dirty pages over destroy + new fork",
         Ref("reset_seconds", {"pages": LARGEST}), "<=", 0.5, Ref("destroy_fork_seconds")),
    Goal("fork", "fork + 64 writes + reset loop over Linux fork + 64 writes + exit",
         Ref("loop_rate", {"k": 64, "pages": LARGEST}), ">=", 1, Ref("linux_loop_rate")),
    Goal("fork", "frames a fork takes once it wrote 64 pages, over 64",
         Ref("frames_used", {"k": 64, "pages": LARGEST}), "==", 1, Ref("pages_written")),
    Goal("fork", "fork: longest step in fork, fork_reset and the loops, any N (ms)",
         Ref("max_step"), "<=", STEP_MS),
)


@dataclass(frozen=True)
class Floor:
    """``figure`` cannot be below ``floor`` measured in the same run and
    case (every label both have): ``why`` says what makes it physical."""
    figure: Ref
    floor: Ref
    why: str


#: what a round trip cannot be cheaper than, per placement
FLOORS: tuple[Floor, ...] = (
    Floor(Ref("fault_p50"), Ref("floor_p50"), "a CoW fault does all the floor probe does, and more"),
    Floor(Ref("fault_p50"), Ref("pipe_p50"), "a CoW fault rides on a pipe round trip"),
    Floor(Ref("fault_p99"), Ref("pipe_p50"), "a fault's p99 is not under the pipe's median"),
    Floor(Ref("floor_p50"), Ref("pipe_p50"), "the floor probe is a pipe round trip and a core write"),
)


def of(bench: str) -> tuple[Goal, ...]:
    """The goals of one bench (its report prints them)."""
    return tuple(g for g in GOALS if g.bench == bench)
