"""Compiled kernels: the per-entry loops of the hypervisor core.

Overview
--------
Most of the core is numpy: a batch of entries is a few array operations,
whatever its size. A few loops cannot be written that way cheaply, because
each step depends on the one before: walking a linked chain node by node,
unlinking nodes from chains that the previous unlink just changed, turning a
list into a hash table or back. In Xen those loops are C, and a node visit is
a couple of loads; in Python a visit costs a hundred times more, and the
benchmarks would then measure the interpreter rather than the algorithms.
This module is the one place where such loops are compiled (numba), so that
visiting a node costs what it costs in C while every policy keeps its
algorithm: ``list`` still scans linearly, ``buckets`` still scans one of its
256 buckets and converts at 256 and 64.

Each kernel is written once, as a plain Python function over numpy arrays
(``name_py``: the reference, what the tests compare against). The compiled
version is the same source compiled with ``numba.njit``; a kernel that calls
another calls the other's compiled version. The compiled kernels are made on
first use (``compiled()`` or attribute access, ``kernels.chains_remove``), so
importing this module does not import numba: the toolstack and the guest
processes import the core's modules but never run a kernel.

The kernels:

- ``chain_find``: the node of a (domid, gfn) in one chain (Xen's linear scan);
- ``to_hash``, ``to_list``: the ``buckets`` policy's conversions, relinking
  every node of a frame from its list into its 256 buckets or back;
- ``chains_remove``: a batch of removals from the chains of the ``list`` and
  ``buckets`` policies, each found by its scan, with the conversion back to a
  list exactly where a removal would do it (a teardown's chunk);
- ``buckets_scan``: ``chains_remove``'s scans of up to 16 consecutive
  entries in distinct buckets, side by side (each still a linear scan of
  its bucket from the head; a list's one chain cannot be split so);
- ``walk_chains``: every node of many chains at once (the audit's bulk view);
- ``copy_frames``: frame ``src[i]`` copied into frame ``dst[i]``, row by row
  in 8-byte words (a batched CoW fault's copies: one pass, where a numpy
  gather and scatter make two through a bounce buffer).

Compilation is cached on disk (``cache=True``): in the package's
``__pycache__`` when that is writable, else in a per-user directory
(``$XDG_CACHE_HOME/hvshare/numba``, ``~/.cache/hvshare/numba``) unless
``NUMBA_CACHE_DIR`` says otherwise. The hypervisor process calls ``warm()``
before it says it is ready; ``warm()`` compiles or loads every kernel and
writes a stamp, keyed by the numba version and this file's contents, that
``cache_is_warm()`` looks for without importing numba.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import time
import types

import numpy as np

#: buckets of a hashed frame (the ``buckets`` policy's RMAP_HASHTAB_SIZE)
HASH_BUCKETS = 256
#: entries of distinct buckets ``chains_remove`` scans side by side (16
#: int32 links: one cache line)
SCAN_LANES = 16
#: seconds a cold compilation of every kernel takes on a typical machine
COLD_COMPILE_SECONDS = 5

_HERE = os.path.dirname(os.path.abspath(__file__))
_KERNELS = ("chain_find", "to_hash", "to_list", "buckets_scan", "chains_remove", "walk_chains",
            "copy_frames")


# ----------------------------------------------------------------------------
# the cache


def cache_dir() -> str:
    """Where the compiled kernels are cached."""
    env = os.environ.get("NUMBA_CACHE_DIR")
    if env:
        return env
    if os.access(_HERE, os.W_OK):
        return os.path.join(_HERE, "__pycache__")        # numba's own default
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hvshare", "numba")


def _use_cache_dir() -> None:
    """Point numba at the per-user cache when the package is read-only (only
    if the user chose no directory; numba reads it when it is imported)."""
    if not os.environ.get("NUMBA_CACHE_DIR") and not os.access(_HERE, os.W_OK):
        os.environ["NUMBA_CACHE_DIR"] = cache_dir()


def _stamp_path() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        nv = version("numba")
    except PackageNotFoundError:
        nv = "none"
    with open(__file__, "rb") as f:
        src = hashlib.sha256(f.read()).hexdigest()[:16]
    key = f"{nv}-py{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}-{src}"
    return os.path.join(cache_dir(), f"hvshare-kernels-{key}.stamp")


def cache_is_warm() -> bool:
    """Whether ``warm()`` has already compiled these kernels on this machine
    (their cache is there): cheap, and does not import numba."""
    try:
        return os.path.exists(_stamp_path())
    except OSError:
        return False


# ----------------------------------------------------------------------------
# the reference kernels


def chain_find_py(nxt, gfn, dom, n, domid, g):
    """The node of (domid, g) in the chain from node ``n``, or -1: a linear
    scan from the head, one node at a time (``NodeArena.find``)."""
    while n >= 0:
        if gfn[n] == g and dom[n] == domid:
            return n
        n = nxt[n]
    return -1


def to_hash_py(head, pool, nxt, prv, dom, gfn, mfn, t):
    """Convert list frame ``mfn`` into the hash table ``t`` (its 256 bucket
    heads at ``pool[256 t:256 t + 256]``, all empty): walk the list from its
    head, head-inserting each node into bucket ``(gfn + domid) % 256``."""
    o = t * HASH_BUCKETS
    n = head[mfn]
    while n >= 0:
        x = nxt[n]
        b = o + (gfn[n] + dom[n]) % HASH_BUCKETS
        h = pool[b]
        nxt[n] = h
        prv[n] = -1
        if h >= 0:
            prv[h] = n
        pool[b] = n
        n = x
    head[mfn] = -2 - t


def to_list_py(head, pool, nxt, prv, mfn):
    """Convert hashed frame ``mfn`` back into a list: bucket by bucket, each
    from its head, head-inserting every node into one list. Returns the
    table the frame used (the caller frees it)."""
    t = -2 - head[mfn]
    h = -1
    for b in range(t * HASH_BUCKETS, (t + 1) * HASH_BUCKETS):
        n = pool[b]
        while n >= 0:
            x = nxt[n]
            nxt[n] = h
            prv[n] = -1
            if h >= 0:
                prv[h] = n
            h = n
            n = x
    head[mfn] = h
    return t


def chains_remove_py(head, count, walkers, pool, nxt, prv, dom, gfn, m, d, g, light,
                     freed, tables):
    """Remove entries (m[i], d[i], g[i]) in order from the chains of the
    ``list`` and ``buckets`` policies, as ``remove`` one by one would.

    A frame is a list (``head[m] >= -1``) or hashed in table ``-2 - head[m]``
    (its chain for a pair is bucket ``(gfn + domid) % 256`` of ``pool``).
    Each entry is found by a scan of its chain and unlinked; its node goes to
    ``freed[i]`` (the caller frees them in that order). A removal that
    leaves a hashed frame with at most ``light`` entries and no walker
    converts it to a list there (``to_list``); its table goes to the next
    slot of ``tables``. Returns (entries removed, tables freed): fewer
    entries than given when entry ``i`` is in no chain (nothing of it done).

    Up to ``SCAN_LANES`` consecutive entries of hashed frames whose buckets
    are distinct, and whose removals convert nothing, are scanned side by
    side (``buckets_scan``): each scan still visits its bucket from the
    head, node by node, and finds the node removal one by one would find,
    so the result is the same. A list frame's entries (one chain) are
    scanned one at a time, as a single chain allows nothing else.
    """
    nt = 0
    i = 0
    total = len(m)
    # the side-by-side scans' lanes: bucket slot, node, gfn, domid
    lanes = np.empty((4, SCAN_LANES), np.int64)
    slots = lanes[0]
    nodes = lanes[1]
    while i < total:
        k = buckets_scan(head, count, pool, nxt, dom, gfn, m, d, g, i, light, lanes)
        chains = pool                   # where the run's chain heads are
        if k == 0:                      # entry i on its own
            mfn = m[i]
            domid = d[i]
            gg = g[i]
            hd = head[mfn]
            if hd < -1:
                slot = (-2 - hd) * HASH_BUCKETS + (gg + domid) % HASH_BUCKETS
            else:
                slot = mfn
                chains = head
            n = chain_find(nxt, gfn, dom, chains[slot], domid, gg)
            if n < 0:
                return i, nt
            slots[0] = slot
            nodes[0] = n
            k = 1
        for j in range(k):
            n = nodes[j]
            p = prv[n]
            x = nxt[n]
            if x >= 0:
                prv[x] = p
            if p >= 0:
                nxt[p] = x
            else:
                chains[slots[j]] = x
            freed[i + j] = n
            mfn = m[i + j]
            c = count[mfn] - 1
            count[mfn] = c
            if c <= light and head[mfn] < -1 and walkers[mfn] == 0:
                tables[nt] = to_list(head, pool, nxt, prv, mfn)
                nt += 1
        i += k
    return total, nt


def buckets_scan_py(head, count, pool, nxt, dom, gfn, m, d, g, i, light, lanes):
    """Find the nodes of entries ``i, i + 1, ...`` side by side: the longest
    run (at least 2, at most ``SCAN_LANES``) of entries of hashed frames in
    distinct buckets whose removals leave each frame above ``light``
    entries. Each bucket is scanned from its head, one node per round, all
    the run's scans in the same round: independent scans overlap their
    memory loads, and the nodes of neighbouring buckets visited in one
    round often share cache lines. Fills ``lanes``: per entry its bucket
    (a slot of ``pool``), its node, its gfn and its domid; returns the
    run's length, or 0 (no run, or an entry of it in no bucket: the caller
    then goes one by one)."""
    slots = lanes[0]
    nodes = lanes[1]
    kg = lanes[2]
    kd = lanes[3]
    total = len(m)
    k = 0
    while k < SCAN_LANES and i + k < total:
        mfn = m[i + k]
        hd = head[mfn]
        # removals of the run before this one leave at most k fewer entries
        if hd >= -1 or count[mfn] - k - 1 <= light:
            break
        s = (-2 - hd) * HASH_BUCKETS + (g[i + k] + d[i + k]) % HASH_BUCKETS
        clash = False
        for j in range(k):
            if slots[j] == s:
                clash = True
                break
        if clash:
            break
        slots[k] = s
        nodes[k] = pool[s]
        kg[k] = g[i + k]
        kd[k] = d[i + k]
        k += 1
    if k < 2:
        return 0
    left = k
    while left:
        left = 0
        for j in range(k):
            n = nodes[j]
            if n >= 0:
                if gfn[n] != kg[j] or dom[n] != kd[j]:
                    nodes[j] = nxt[n]
                    left += 1
    for j in range(k):
        if nodes[j] < 0:
            return 0
    return k


def walk_chains_py(nxt, heads, top):
    """Every node of the chains from ``heads``: ``(chains, nodes)``, node
    ``nodes[i]`` in the walk of ``heads[chains[i]]``, walk order. A walk stops
    at a link outside the arrays or after ``top`` + 1 nodes (a damaged arena
    cannot make it run forever)."""
    cap = len(nxt)
    limit = top + 1
    total = 0
    for c in range(len(heads)):
        n = heads[c]
        s = 0
        while 0 <= n < cap and s < limit:
            n = nxt[n]
            s += 1
        total += s
    chains = np.empty(total, np.int64)
    nodes = np.empty(total, np.int64)
    k = 0
    for c in range(len(heads)):
        n = heads[c]
        s = 0
        while 0 <= n < cap and s < limit:
            chains[k] = c
            nodes[k] = n
            k += 1
            n = nxt[n]
            s += 1
    return chains, nodes


def copy_frames_py(words, dst, src):
    """Row ``src[i]`` of ``words`` (frames as rows of uint64) copied into row
    ``dst[i]``, in order; ``dst`` and ``src`` are distinct rows of the array."""
    width = words.shape[1]
    for i in range(len(dst)):
        a = dst[i]
        b = src[i]
        for j in range(width):
            words[a, j] = words[b, j]


# The references call each other by the kernels' names: bound here to the
# references, and in ``compiled()`` to the compiled kernels.
_REF: dict = dict(globals())
for _name in _KERNELS:
    _f = globals()[_name + "_py"]
    _REF[_name] = globals()[_name + "_py"] = types.FunctionType(
        _f.__code__, _REF, _name + "_py", _f.__defaults__)
    _REF[_name].__doc__ = _f.__doc__
del _name, _f


# ----------------------------------------------------------------------------
# compiling


_compiled: dict | None = None


def compiled() -> dict:
    """The compiled kernels by name (compiled, or loaded from the cache, on
    first use)."""
    global _compiled
    if _compiled is None:
        _use_cache_dir()
        import numba
        g = dict(globals())
        out = {}
        for name in _KERNELS:
            ref = _REF[name]
            fn = types.FunctionType(ref.__code__, g, name, ref.__defaults__)
            fn.__qualname__ = name
            fn.__doc__ = ref.__doc__
            out[name] = g[name] = numba.njit(cache=True, nogil=True)(fn)
        _compiled = out
        globals().update(out)
    return _compiled


def reference() -> dict:
    """The Python reference of every kernel, by name."""
    return {name: _REF[name] for name in _KERNELS}


def __getattr__(name: str):
    if name in _KERNELS:
        return compiled()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def warm() -> float:
    """Compile (or load from the cache) every kernel for the argument types
    the core passes, on tiny inputs, and stamp the cache as warm. Returns the
    seconds it took."""
    t0 = time.perf_counter()
    k = compiled()
    i32 = np.int32
    nxt = np.full(4, -1, i32)
    prv = np.full(4, -1, i32)
    dom = np.zeros(4, np.uint16)
    gfn = np.arange(4, dtype=i32)
    nxt[0], prv[1] = 1, 0
    head = np.array([0, -1], i32)
    count = np.array([2, 0], i32)
    walkers = np.zeros(2, i32)
    pool = np.full(HASH_BUCKETS, -1, i32)
    k["chain_find"](nxt, gfn, dom, 0, 0, 1)
    k["to_hash"](head, pool, nxt, prv, dom, gfn, 0, 0)
    k["to_list"](head, pool, nxt, prv, 0)
    one = np.zeros(1, np.int64)
    freed, tables = np.empty(1, np.int64), np.empty(1, np.int64)
    k["chains_remove"](head, count, walkers, pool, nxt, prv, dom, gfn, one, one,
                       np.ones(1, np.int64), 64, freed, tables)
    k["walk_chains"](nxt, np.zeros(1, np.int64), 4)
    k["copy_frames"](np.zeros((2, 4), np.uint64), np.ones(1, np.int64), np.zeros(1, np.int64))
    try:
        path = _stamp_path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(f"{time.time():.0f}\n")
    except OSError:
        pass
    return time.perf_counter() - t0
