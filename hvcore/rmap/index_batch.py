"""The vectorised batch forms of the ``index`` rmap (:mod:`.index`).

They work on the arena layout :mod:`.index` documents (its docstring is the
one to hold in mind), through the rmap object ``r`` each function takes;
:class:`.index.IndexRmap` calls them for its ``add_many``, ``remove_many``
and ``move_all``. Each costs a fixed number of numpy calls plus O(k) work
for k entries - never O(arena) or O(frames), so a teardown that removes a
huge frame chunk by chunk pays per chunk, not per frame size:

- ``add_many`` takes the common batch (one domain, covered by its dense
  index) through ~20 numpy calls; it writes each node's whole row at once
  and links the new nodes in front of their frames' old heads, with fast
  cases for one frame and for distinct frames;
- ``remove_many`` marks the batch's nodes in their frame column (``-2 -
  position``: "being removed"), finds each one's surviving neighbours -
  isolated nodes at once, runs that are contiguous in the batch (a teardown
  removes gfns in order, which a list holds in order) in one step, anything
  else by pointer jumping - and relinks around every run;
- ``move_all`` splices the whole list in O(1) and retags its nodes in one
  vectorised store.

Invariants kept here:
- a batch checks every pair first and raises before changing anything;
- the marks of ``remove_many`` (frame values below -1) live only while it
  runs: on every return, and on every raise, each frame column is >= -1.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .arena import MAX_DOMID, MAX_GFN

if TYPE_CHECKING:
    from .index import IndexRmap

#: columns of an arena row
NXT, PRV, FRM, GFN = 0, 1, 2, 3
_SMALL_BATCH = 8            # below this a batch is a plain loop (less overhead)


def _ints(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.int64)
    return a if a.ndim == 1 else a.ravel()


def _batch(mfns, domids, gfns, op: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """A batch's three columns as int64 arrays, and its length."""
    m, d, g = _ints(mfns), _ints(domids), _ints(gfns)
    k = m.shape[0]
    if not (k == d.shape[0] == g.shape[0]):
        raise ValueError(f"{op}: arrays of different lengths")
    return m, d, g, k


# The batch forms run a fixed series of numpy calls, and at 64 entries the
# calls' fixed costs are the whole bill. numpy's reductions (any, min, ...)
# and ufuncs with a Python-int operand cost more per call than
# count_nonzero, argmin/argmax and 0-d array operands, hence these.
def any_of(b: np.ndarray) -> bool:
    return np.count_nonzero(b) > 0


def min_of(a: np.ndarray) -> int:
    return int(a[a.argmin()])


def max_of(a: np.ndarray) -> int:
    return int(a[a.argmax()])


NONE = np.array(-1, np.int32)      # "no node" / "free"
_ZERO = np.array(0, np.int32)
_MARK0 = np.array(-2, np.int64)     # batch position p of a node being removed: frame -2 - p
_B32 = np.array(32, np.int64)
_LOW32 = np.array(2**32 - 1, np.int64)


def _one_index(r: "IndexRmap", d: np.ndarray, nonneg: np.ndarray) -> np.ndarray | None:
    """The dense index of the batch's one domain, or None if the batch
    needs the general path (several domains, a negative key, no index).
    Batches nearly always come from one domain. The caller still finds
    gfns past the index by the IndexError of looking them up."""
    arr = r._dense.get(int(d[0]))
    if arr is None or min_of(nonneg) < 0 or any_of(d != d[:1]):
        return None
    return arr


def _in_range(r: "IndexRmap", m: np.ndarray, d: np.ndarray, g: np.ndarray) -> bool:
    return (min_of(m | d | g) >= 0 and max_of(m) < r.nframes and max_of(d) <= MAX_DOMID
            and max_of(g) <= MAX_GFN)


def _slots(r: "IndexRmap", m: np.ndarray, d: np.ndarray, g: np.ndarray, out_of_range: Exception):
    """The node in each pair's index slot (-1: none), as ``(nodes, arr,
    groups)``: from ``arr``, the one domain's dense index, when the
    batch names one domain that index covers (``groups`` None), else by
    lookup (``arr`` None). Raises ``out_of_range`` for a key no index
    can hold, a frame past the pool included."""
    arr = _one_index(r, d, m | g)
    if arr is not None:
        try:
            nodes = arr[g]                  # IndexError: a gfn past the index
            if max_of(m) < r._head.shape[0]:
                return nodes, arr, None
        except IndexError:
            pass
    if not _in_range(r, m, d, g):
        raise out_of_range
    groups = r._groups(d)
    return r._lookup_many(d, g, groups), None, groups


def add_many(r: "IndexRmap", mfns: np.ndarray, domids: np.ndarray, gfns: np.ndarray) -> None:
    m, d, g, k = _batch(mfns, domids, gfns, "add_many")
    if k < _SMALL_BATCH:
        if len(set(zip(d.tolist(), g.tolist()))) < k:
            raise ValueError("add_many: a pair appears twice")
        for mm, dd, gg in zip(m.tolist(), d.tolist(), g.tolist()):
            r.add(mm, dd, gg)  # add() checks presence before changing anything
        return
    # -- check every pair before changing anything --
    cur, arr, groups = _slots(r, m, d, g, ValueError("add_many: rmap key out of range"))
    old = r._head[m]
    if arr is None:
        key = np.sort((d << 31) | g)
        if any_of(key[1:] == key[:-1]):
            raise ValueError("add_many: a pair appears twice")
    if max_of(cur) >= 0:
        raise ValueError("add_many: a pair is already in an rmap")
    nodes32, nodes = r._alloc(k)
    if arr is None:
        r._store_many(d, g, nodes32, groups)
    else:
        arr[g] = nodes32
        if any_of(arr[g] != nodes32):
            # A pair appears twice in the batch: a later write hid an earlier one.
            arr[g] = NONE
            r._live += k  # _free_nodes counts them down again
            r._free_nodes(nodes, nodes32)
            raise ValueError("add_many: a pair appears twice")
    # -- link: as k head insertions in batch order would --
    r._dom[nodes] = d[:1] if arr is not None else d
    r._gfn[nodes] = g.astype(np.int32)
    _link_new(r, m, nodes32, nodes, old)
    r._live += k


def _link_new(r: "IndexRmap", m: np.ndarray, nodes32: np.ndarray, nodes: np.ndarray,
              old: np.ndarray) -> None:
    """Link new nodes (keys set) in front of their frames' old heads
    ``old``; within a frame a later entry goes in front of an earlier one."""
    k = m.shape[0]
    nxt, prv, head = r._nxt, r._prv, r._head
    m0 = int(m[0])
    if m0 == int(m[-1]) and not any_of(m != m[:1]):
        # One frame: a chain from the last entry to the first, which
        # goes in front of the old head.
        h, first, last = int(old[0]), int(nodes32[0]), int(nodes32[-1])
        r._frm[nodes] = m0
        nxt[nodes[1:]] = nodes32[:-1]
        prv[nodes[:-1]] = nodes32[1:]
        va = r._arena_view
        va[(first << 2) + NXT] = h
        va[(last << 2) + PRV] = -1
        if h >= 0:
            va[(h << 2) + PRV] = first
        r._head_view[m0] = last
        r._count_view[m0] += k
        return
    r._frm[nodes] = m.astype(np.int32)
    head[m] = nodes32
    if not any_of(head[m] != nodes32):
        # Distinct frames (no write hid another): one new node per frame.
        nxt[nodes] = old
        prv[nodes] = NONE
        prv[old] = nodes32        # old head -1: lands on the sentinel row
        r._count[m] += r._ones_k(k)
        return
    # Mixed: group by frame, batch order kept within a group (the sort
    # keys are unique, so any sort is stable here). In a group entry j
    # goes in front of entry j - 1, the group's first in front of the
    # old head; the group's last becomes the head.
    order = np.sort((m << _B32) | np.arange(k)) & _LOW32
    ms, ns, nodes, os = m[order], nodes32[order], nodes[order], old[order]
    edge = np.empty(k + 1, bool)             # edge[j]: a group starts at j
    edge[0] = edge[k] = True
    np.not_equal(ms[1:], ms[:-1], out=edge[1:k])
    first, last = edge[:k], edge[1:]
    shifted = np.empty(k, np.int32)
    shifted[0], shifted[1:] = -1, ns[:-1]
    nxt[nodes] = np.where(first, os, shifted)
    shifted[-1], shifted[:-1] = -1, ns[1:]
    prv[nodes] = np.where(last, NONE, shifted)
    prv[os[first]] = ns[first]                # old head -1: the sentinel row
    head[ms[last]] = ns[last]
    np.add.at(r._count, m, r._ones_k(k))


def _surviving(r: "IndexRmap", nodes: np.ndarray, link: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each node being removed (frame marked ``-2 - position``), the
    first node along ``link`` that stays (-1: none), int32 and int64."""
    frm = r._frm
    t32 = link[nodes]
    t = t32.astype(np.int64)
    f = frm[t]                               # the sentinel answers for -1
    if min_of(f) >= -1:
        return t32, t                        # no neighbour leaves: done
    k = t.shape[0]
    idx = np.arange(k)
    pos = _MARK0 - f                         # batch position of the target
    # A run contiguous in the batch, either way round, in one step: jump
    # to the target of the run's far end.
    back = pos[1:] == idx[:-1]               # entry i+1's target is entry i
    if any_of(back):
        far = idx.copy()
        far[1:][back] = 0
        np.maximum.accumulate(far, out=far)
        t = t[far]
        pos = _MARK0 - frm[t]
    ahead = pos[:-1] == idx[1:]              # entry i's target is entry i+1
    if any_of(ahead):
        far = idx.copy()
        far[:-1][ahead] = k
        t = t[np.minimum.accumulate(far[::-1])[::-1]]
    # Anything else by pointer jumping: a target that is itself leaving
    # is replaced by its own target, so a run of L needs log2(L) rounds.
    act = (frm[t] < NONE).nonzero()[0]
    while act.shape[0]:
        t[act] = t[_MARK0 - frm[t[act]]]
        act = act[frm[t[act]] < NONE]
    return t.astype(np.int32), t


def _unlink(r: "IndexRmap", nodes: np.ndarray, m: np.ndarray) -> None:
    """Take nodes marked ``-2 - position`` (``m``: their frames) out of
    their lists: every run of them is bridged from its surviving
    predecessor to its surviving successor."""
    succ32, succ = _surviving(r, nodes, r._nxt)
    pred32, pred = _surviving(r, nodes, r._prv)
    # Every node of a run writes the same pair; a -1 lands on the sentinel.
    r._nxt[pred] = succ32
    r._prv[succ] = pred32
    front = pred32 == NONE                   # the run began at the head
    if any_of(front):
        r._head[m[front]] = succ32[front]


def _remove_run(r: "IndexRmap", m: np.ndarray, nodes: np.ndarray, nodes32: np.ndarray) -> bool:
    """Unlink the batch if it is one run of one frame's list, in list
    order either way round (a teardown chunk), and not the whole list:
    the run is bridged in O(1). False (nothing changed) otherwise.

    The checks suffice: every node is a live node of the frame (an
    absent pair's -1 reaches the sentinel, frame -1), and a chain of
    links in an acyclic list has no node twice."""
    k = nodes.shape[0]
    m0 = int(m[0])
    va = r._arena_view
    if (m0 != int(m[-1]) or r._count_view[m0] <= k or any_of(m != m[:1])
            or any_of(r._frm[nodes] != m0)):
        return False
    a, b = int(nodes[0]), int(nodes[-1])
    if va[(b << 2) + PRV] == nodes32[k - 2] and not any_of(r._nxt[nodes[:-1]] != nodes32[1:]):
        first, last = a, b                   # head ... a -> ... -> b ... tail
    elif va[(b << 2) + NXT] == nodes32[k - 2] and not any_of(r._prv[nodes[:-1]] != nodes32[1:]):
        first, last = b, a                   # head ... b -> ... -> a ... tail
    else:
        return False
    r._unlink_run(m0, first, last, k)
    return True


def remove_many(r: "IndexRmap", mfns: np.ndarray, domids: np.ndarray, gfns: np.ndarray) -> None:
    m, d, g, k = _batch(mfns, domids, gfns, "remove_many")
    if k < _SMALL_BATCH:
        pairs = list(zip(m.tolist(), d.tolist(), g.tolist()))
        for p in pairs:
            if not r.contains(*p):
                raise KeyError(p)
        if len(set(pairs)) < k:
            raise KeyError("remove_many: a pair appears twice")
        for p in pairs:
            r.remove(*p)
        return
    # -- check every pair before changing anything --
    nodes32, arr, groups = _slots(r, m, d, g, KeyError("remove_many: rmap key out of range"))
    nodes32 = nodes32.astype(np.int32, copy=False)
    nodes = nodes32.astype(np.int64)
    if arr is not None and _remove_run(r, m, nodes, nodes32):
        arr[g] = NONE
        r._free_nodes(nodes, nodes32)
        return
    # Mark the batch: node of entry p gets frame -2 - p. Then every entry
    # must have found a node of its frame (an absent pair finds -1: the
    # sentinel, frame -1), and must still see its own mark (a pair
    # given twice shows as a mark hidden by a later one).
    frm = r._frm
    before = frm[nodes]
    mark = _MARK0 - np.arange(k, dtype=np.int32)
    frm[nodes] = mark
    wrong = before != m
    if any_of(wrong | (frm[nodes] != mark)):
        frm[nodes] = before
        if any_of(wrong):
            i = int(wrong.argmax())
            raise KeyError((int(m[i]), int(d[i]), int(g[i])))
        raise KeyError("remove_many: a pair appears twice")
    # -- unlink (frames losing every entry need no relinking) --
    m0 = int(m[0])
    if m0 == int(m[-1]) and not any_of(m != m[:1]):
        left = r._count_view[m0] - k
        r._count_view[m0] = left
        if left == 0:
            r._head_view[m0] = -1
        else:
            _unlink(r, nodes, m)
    else:
        count = r._count
        np.subtract.at(count, m, r._ones_k(k))
        whole = count[m] == _ZERO
        if not any_of(whole):
            _unlink(r, nodes, m)
        else:
            r._head[m[whole]] = NONE
            part = ~whole
            if any_of(part):
                rest = nodes[part]
                frm[rest] = _MARK0 - np.arange(rest.shape[0], dtype=np.int32)
                _unlink(r, rest, m[part])
    if arr is not None:
        arr[g] = NONE
    else:
        r._clear_many(d, g, groups)
    r._free_nodes(nodes, nodes32)


def move_all(r: "IndexRmap", src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """Splice src's whole list in front of dst's: O(1) relinking, plus
    O(k) vectorised work to retag the nodes and return the pairs."""
    nodes = r._frame_nodes(src)
    doms = r._dom[nodes].astype(np.int64)
    gfns = r._gfn[nodes].astype(np.int64)
    if src == dst or nodes.shape[0] == 0:
        return doms, gfns
    r._frm[nodes] = dst
    tail = int(nodes[np.argmax(r._nxt[nodes] < 0)])
    hd = int(r._head[dst])
    r._nxt[tail] = hd
    if hd >= 0:
        r._prv[hd] = tail
    r._head[dst] = r._head[src]
    r._count[dst] += nodes.shape[0]
    r._head[src] = -1
    r._count[src] = 0
    return doms, gfns
