"""The one model of how long a chunk of work takes.

A preemptible operation does its work in chunks and checks between two
chunks whether its step is spent or other work waits. The chunk size
decides both how often it checks and how far a step can overrun its
budget, so every chunked operation sizes its chunks with a
:class:`ChunkCost` fitted to the chunks it has done. Its users:

- the hypervisor process's budgeted batches (``nominate_many``,
  ``share_many``): a fixed part per chunk plus a part per item, fitted by
  least squares (the default);
- the dedup scanner, which sizes its requests with the same model fitted to
  what the hypervisor answered (items done, work time);
- the preemptible teardown, whose cost per item ranges over four orders of
  magnitude with the rmap policy: a model of the last chunk's rate only,
  growing or shrinking at most fourfold per chunk (:meth:`ChunkCost.rate`).

docs/design.md, "Steps", says how the budget and these chunks fit together.
"""
from __future__ import annotations

#: a chunk does at least this many items, so every step makes progress
MIN_CHUNK_ITEMS = 16
#: when the fixed cost of a chunk nearly fills the budget, a budgeted
#: batch step may take up to this many times the budget rather than do
#: MIN_CHUNK_ITEMS items for the price of many more
BATCH_OVERRUN = 1.5


class ChunkCost:
    """How long a chunk of ``k`` items of one batch op takes: a fixed part
    (a core batch call's numpy calls, which grow with the load) plus a part
    per item, fitted by least squares over the recent
    chunks (exponentially weighted), starting from a prior that keeps the
    fit sane while the chunk sizes seen barely differ. A fit is a mean:
    chunks sized by it alone overrun their time half of the time. So a
    ``cautious`` model (the hypervisor's, whose chunks are steps) also
    keeps a *margin*, the recent ratio of a chunk's time to its
    fit's prediction where that was above 1 (decaying towards 1, at most
    :attr:`MARGIN_MOST`), and sizes a chunk to take its time even at that
    ratio.

    A chunk fills the time left, but is not so small that its fixed part
    is more than twice its items' work unless that would take longer than
    ``most`` seconds: when the fixed part alone nearly
    fills the budget (a loaded machine), a step runs a little over rather
    than doing 16 items for the price of 200.
    """

    DECAY = 0.9                       # weight of the older chunks per new one
    PRIOR = (2e-4, 3e-6, 64.0, 4.0)   # fixed s, per item s, at k, weight (chunks)
    #: the margin never exceeds this: a chunk that took far longer than
    #: its fit says met something no item costs (another process, the
    #: kernel), and shrinking every later chunk for it would only cost
    #: steps
    MARGIN_MOST = 2.0

    @classmethod
    def rate(cls, first: int, growth: float = 4.0) -> "ChunkCost":
        """A model with no fixed part that knows only the last chunk's rate:
        the next chunk is sized from it, but at most ``growth`` times larger
        or smaller than the last; the first chunk is ``first`` items."""
        c = cls()
        c._rate = (first, growth, None)       # (first, growth, last (k, seconds))
        return c

    def __init__(self, cautious: bool = False):
        self._rate = None
        self.cautious = cautious
        self.margin = 1.0
        f, b, k, w = self.PRIOR
        # weighted sums: w, w*k, w*k*k, w*t, w*k*t over the prior's two
        # points (k/2, 3k/2) and the chunks seen
        self._s = [0.0] * 5
        for kk in (k / 2, 3 * k / 2):
            self._add(kk, f + b * kk, w / 2)
        self.fixed_s, self.item_s = f, b

    def _add(self, k: float, t: float, w: float) -> None:
        s = self._s
        for i, v in enumerate((1.0, k, k * k, t, k * t)):
            s[i] += w * v

    def items(self, seconds: float, most: float) -> int:
        """Items for a chunk to take about ``seconds``, or longer when that
        is too few for the fixed part (see the class), but not ``most``."""
        if self._rate is not None:
            first, growth, last = self._rate
            if last is None:
                return first
            k, took = last
            return int(k * min(growth, max(1 / growth, seconds / max(took, 1e-6))))
        f, b = self.fixed_s * self.margin, self.item_s * self.margin
        fair = min(f / (2 * b), (most - f) / b)
        return int(max(MIN_CHUNK_ITEMS, (seconds - f) / b, fair))

    def learn(self, k: int, seconds: float) -> None:
        """A chunk of ``k`` items took ``seconds``."""
        if self._rate is not None:
            self._rate = (self._rate[0], self._rate[1], (k, seconds))
            return
        if self.cautious:
            ratio = seconds / max(self.fixed_s + self.item_s * k, 1e-9)
            self.margin = max(min(ratio, self.MARGIN_MOST), 1.0 + (self.margin - 1.0) * self.DECAY)
        self._s = [v * self.DECAY for v in self._s]
        self._add(float(k), seconds, 1.0)
        f, b, kk, w = self.PRIOR
        for kk_ in (kk / 2, 3 * kk / 2):        # the prior never fades entirely
            self._add(kk_, f + b * kk_, 0.05 * w)
        s0, sk, skk, st, skt = self._s
        det = s0 * skk - sk * sk
        b = (s0 * skt - sk * st) / det if det > 0 else self.item_s
        self.item_s = min(max(b, 1e-7), 1e-4)
        self.fixed_s = min(max((st - self.item_s * sk) / s0, 0.0), 2e-3)
