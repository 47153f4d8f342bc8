"""The operations of the control socket and of a guest's control channel.

Every request is checked against its schema (:func:`check_request`) before
anything acts on it: unknown operations, unknown or missing arguments,
wrong types and out-of-range numbers are refused with one sentence.
"""
from __future__ import annotations

import errno

from ..constants import DOMID_MAX, MAX_BATCH_PAGES, PAGE_SIZE
from ..errors import ProtocolError
from .control import MAX_PAYLOAD

#: most pages one read_pages answer carries: it must fit in a control frame
MAX_READ_PAGES = MAX_PAYLOAD // PAGE_SIZE - 1

class _Arg:
    __slots__ = ("kind", "default", "lo", "hi", "choices")
    REQUIRED = object()

    def __init__(self, kind, default=REQUIRED, lo=None, hi=None, choices=None):
        self.kind, self.default, self.lo, self.hi, self.choices = kind, default, lo, hi, choices


def Int(lo=0, hi=(1 << 63) - 1, default=_Arg.REQUIRED):
    return _Arg(int, default, lo, hi)


def U64(default=_Arg.REQUIRED):
    return _Arg(int, default, 0, (1 << 64) - 1)


def Num(lo=0.0, hi=1e9, default=_Arg.REQUIRED):
    return _Arg(float, default, lo, hi)


def Str(default=_Arg.REQUIRED, maxlen=64, choices=None):
    return _Arg(str, default, 0, maxlen, choices)


def Bool(default=False):
    return _Arg(bool, default)


GFN = Int(0)
DOMID = Int(0, DOMID_MAX)

#: Operations of the hypervisor's control socket and their arguments.
CONTROL_OPS: dict[str, dict[str, _Arg]] = {
    "ping": {},
    "info": {},
    "list": {},
    "audit": {},
    # a job: frames saved (zero / other), degree histogram, intra/inter split,
    # per domain shr_pages, saved, cow_faults (hvcore/sharing_stats.py)
    "sharing_report": {},
    "stop": {},
    # pages may be left out when the memory comes from a process (from_pid,
    # all_mappings) or a file (image, an absolute path): then the source's size
    "create": {"pages": Int(1, 1 << 31, None), "workload": Str("zero"), "seed": Int(0, (1 << 32) - 1, 0),
               "name": Str(None), "paused": Bool(False), "rate": Num(0.0, 1e6, 200.0),
               "batch": Int(1, MAX_BATCH_PAGES, 1), "from_pid": Int(1, (1 << 31) - 1, None),
               "all_mappings": Bool(False), "image": Str(None, maxlen=4096)},
    # one preemptible teardown step (the kill controller repeats it while
    # "done" is false): done, state (dying/destroyed), phase, cursor, npages,
    # entries, entries_total, resumed, steps, continuations, step_ms,
    # max_pause_ms, max_pause_cpu_ms, hv_seconds, seconds. With brief, a
    # "restart" leaves out what the first answer told already (state, npages,
    # entries_total, resumed) and seconds; the final answer has every key
    "destroy": {"domid": DOMID, "brief": Bool()},
    "pause": {"domid": DOMID},
    "unpause": {"domid": DOMID},
    "nominate": {"domid": DOMID, "gfn": GFN},
    "share": {"sd": DOMID, "sgfn": GFN, "sh": U64(), "cd": DOMID, "cgfn": GFN, "ch": U64()},
    "add_to_physmap": {"sd": DOMID, "sgfn": GFN, "sh": U64(), "cd": DOMID, "cgfn": GFN},
    "range_share": {"sd": DOMID, "cd": DOMID, "first": GFN, "last": GFN},
    "unshare": {"domid": DOMID, "gfn": GFN},
    "read": {"domid": DOMID, "gfn": GFN},
    # payload: int64[count] gfns -> answer payload: uint64 handles, int64 codes
    # of the first `done` gfns. With budget_us the step stops once that much
    # work time is spent or other work waits (at least one chunk is done);
    # the caller sends the rest again ("restart")
    "nominate_many": {"domid": DOMID, "count": Int(0, 1 << 24), "budget_us": Int(1, 1_000_000, None)},
    # payload: [int64 sds], int64 sgfns, uint64 shs, [int64 cds], int64 cgfns,
    # uint64 chs -> int64 codes of the first `done` pairs; sds/cds travel only
    # when sd/cd are not given; budget_us as for nominate_many
    "share_many": {"sd": Int(0, DOMID_MAX, None), "cd": Int(0, DOMID_MAX, None), "count": Int(0, 1 << 24),
                   "budget_us": Int(1, 1_000_000, None)},
    # VM fork (hvcore/fork.py): a child of the parent's size with an empty
    # p2m and a guest running `workload` (default: the parent's); answered
    # once the guest runs: domid, parent, seconds (the fork in the
    # hypervisor), wall_seconds (until the guest said hello), pid, name
    "fork": {"parent": DOMID, "name": Str(None), "paused": Bool(False), "workload": Str(None),
             "fuzz_writes": Int(0, 1 << 20, None), "fuzz_reads": Int(0, 1 << 20, None)},
    # drop a fork's private pages: domid, pages_dropped, seconds; with run,
    # then one fuzz iteration (iteration, run_seconds) before the answer
    "fork_reset": {"domid": DOMID, "run": Bool(False)},
    # one iteration of a fuzz guest, answered when it signals done
    "fuzz_run": {"domid": DOMID},
    # subscribe to the sharing event ring: the answer, the retained events
    # after `since` (none if not given), then one frame per new event
    "events": {"since": Int(0, (1 << 63) - 1, None)},
}

#: Operations of a guest's control channel.
GUEST_OPS: dict[str, dict[str, _Arg]] = {
    "ping": {},
    "stats": {},
    "write": {"gfn": GFN, "offset": Int(0, PAGE_SIZE - 1, 0)},         # payload: the bytes
    "write_pages": {"count": Int(1, MAX_BATCH_PAGES)},                 # payload: gfns, pages
    "read": {"gfn": GFN},
    "read_pages": {"count": Int(1, MAX_READ_PAGES)},                   # payload: gfns
    "checksum": {"first": GFN, "count": Int(1, 1 << 24)},
    "verify": {"first": GFN, "count": Int(1, 1 << 24), "rounds": Int(1, 1 << 30, 1),
               "seconds": Num(0.0, 3600.0, 0.0)},
    "write_mapping": {"gfn": GFN},
    "raw_write": {"gfn": GFN},
    # tests: the payload goes verbatim onto the guest's pipe to the hypervisor
    # (anything a guest could send); with reply, the next H_REPLY comes back.
    # pieces: written in that many parts, cut at points chosen by split_seed,
    # gap_us apart (the hypervisor must join them, whatever the cuts)
    "pipe_send": {"reply": Bool(False), "pieces": Int(1, 4096, 1), "gap_us": Int(0, 100_000, 0),
                  "split_seed": Int(0, (1 << 32) - 1, 0)},
    # benchmarks: the guest times its own writes (answer payload: int64 ns each)
    "time_writes": {"first": GFN, "count": Int(1, 1 << 20), "size": Int(1, PAGE_SIZE, 1)},
    "time_write_pages": {"first": GFN, "count": Int(1, 1 << 24), "batch": Int(1, MAX_BATCH_PAGES, 1024)},
    # payload: int64 gfns, uint32 offsets, uint32 lengths, then the bytes
    "write_many": {"count": Int(1, MAX_BATCH_PAGES)},
    # benchmarks: ``size`` bytes at ``offset`` of each page, ``batch`` writes per message
    "time_write_many": {"first": GFN, "count": Int(1, 1 << 24), "batch": Int(1, MAX_BATCH_PAGES, 1024),
                        "size": Int(1, PAGE_SIZE, 1), "offset": Int(0, PAGE_SIZE - 1, 0)},
}


def check_request(obj: dict, ops: dict[str, dict[str, _Arg]]) -> tuple[str, dict]:
    """Validate a request object against ``ops``: (op, arguments with defaults)."""
    op = obj.get("op")
    if not isinstance(op, str) or op not in ops:
        raise ProtocolError(f"unknown operation {op!r}")
    schema = ops[op]
    extra = sorted(set(obj) - set(schema) - {"op"})
    if extra:
        raise ProtocolError(f"{op} takes no argument {extra[0]!r}")
    args = {}
    for key, a in schema.items():
        if key not in obj or obj[key] is None:
            if a.default is _Arg.REQUIRED:
                raise ProtocolError(f"{op} needs the argument {key!r}")
            args[key] = a.default
            continue
        args[key] = _check_value(op, key, obj[key], a)
    return op, args


def _check_value(op: str, key: str, v, a: _Arg):
    if a.kind is bool:
        if not isinstance(v, bool):
            raise ProtocolError(f"{op}: {key} must be true or false")
        return v
    if a.kind is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ProtocolError(f"{op}: {key} must be an integer")
        if not a.lo <= v <= a.hi:
            raise ProtocolError(f"{op}: {key} must be between {a.lo} and {a.hi}, not {v}")
        return v
    if a.kind is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise ProtocolError(f"{op}: {key} must be a number")
        if not a.lo <= v <= a.hi:
            raise ProtocolError(f"{op}: {key} must be between {a.lo:g} and {a.hi:g}, not {v}")
        return float(v)
    if not isinstance(v, str):
        raise ProtocolError(f"{op}: {key} must be a string")
    if len(v) > a.hi:
        raise ProtocolError(f"{op}: {key} is longer than {a.hi} characters")
    if a.choices and v not in a.choices:
        raise ProtocolError(f"{op}: {key} must be one of {', '.join(a.choices)}")
    return v


def ok(**result) -> dict:
    return {"ok": True, **result}


def error(message: str, code: int = errno.EINVAL, code_name: str = "EINVAL") -> dict:
    return {"ok": False, "error": message, "code": code, "code_name": code_name}
