"""Reverse-map policies: ``list`` (pre-2012 Xen), ``buckets`` (the 2012
series: list <-> 256-bucket hash at 256/64), ``index`` (O(1), hvshare's own).
"""
from __future__ import annotations

from ..constants import RMAP_POLICIES
from .base import Rmap


def make_rmap(policy: str, nframes: int, **kw) -> Rmap:
    """Build the rmap of a pool of ``nframes`` frames under ``policy``."""
    if policy == "list":
        from .listmap import ListRmap
        return ListRmap(nframes, **kw)
    if policy == "buckets":
        from .buckets import BucketsRmap
        return BucketsRmap(nframes, **kw)
    if policy == "index":
        from .index import IndexRmap
        return IndexRmap(nframes, **kw)
    raise ValueError(f"unknown rmap policy {policy!r} (choose from {', '.join(RMAP_POLICIES)})")


__all__ = ["Rmap", "make_rmap"]
