"""The one chunk-cost model: the least-squares fit and the rate model."""
from __future__ import annotations

from hvshare.hvcore.budget import MIN_CHUNK_ITEMS, ChunkCost


def test_chunk_cost_model_fits_a_fixed_and_a_per_item_cost():
    cost = ChunkCost()
    fixed, item = 3e-4, 4e-6                    # the "true" cost of a chunk
    for i in range(40):
        k = cost.items(5e-4 if i % 3 else 1e-4, 1e-3)
        cost.learn(k, fixed + item * k)
    assert abs(cost.fixed_s - fixed) < 1e-4 and abs(cost.item_s - item) < 2e-6
    assert abs((fixed + item * cost.items(5e-4, 1e-3)) - 5e-4) < 1.5e-4    # fills the budget
    # a budget the fixed part alone nearly fills: a fair chunk, within the limit
    k = cost.items(3e-4, 1e-3)
    assert k >= fixed / (2 * item) * 0.5 and fixed + item * k < 1e-3
    assert cost.items(3e-4, 4e-4) < k
    assert cost.items(0.0, 0.0) >= MIN_CHUNK_ITEMS


def test_a_chunk_never_has_fewer_items_than_the_minimum():
    cost = ChunkCost()
    for _ in range(20):
        cost.learn(64, 2e-3)            # the fixed part alone fills any budget
    assert cost.items(1e-4, 1e-4) == MIN_CHUNK_ITEMS


def test_the_rate_model_starts_small_and_grows_or_shrinks_at_most_fourfold():
    cost = ChunkCost.rate(first=16, growth=4.0)
    assert cost.items(2e-4, 2e-4) == 16
    cost.learn(16, 1e-6)                # far faster than asked: 4x, not 200x
    assert cost.items(2e-4, 2e-4) == 64
    cost.learn(64, 1e-4)                # half the target: twice as many
    assert cost.items(2e-4, 2e-4) == 128
    cost.learn(128, 1.0)                # far slower: a quarter, not 1/5000
    assert cost.items(2e-4, 2e-4) == 32


def test_a_cautious_cost_model_sizes_chunks_for_the_slow_chunks_it_saw():
    plain, cautious = ChunkCost(), ChunkCost(cautious=True)
    for k in (64, 128, 256, 512) * 4:
        for m in (plain, cautious):
            m.learn(k, 1e-4 + 2e-6 * k * (1.8 if k == 512 else 1.0))
    assert cautious.margin > 1.0 == plain.margin
    assert cautious.items(5e-4, 7.5e-4) < plain.items(5e-4, 7.5e-4)
