"""The NumPy reference of gTop-k (gtopk_hvd.common.reference) against ALGORITHM.md.

Besides the invariants, it is checked against a second, deliberately naive oracle written with
dicts and Python sorting that runs each rank on its own and processes the pairs of a stage in
a random order, so the reference cannot pass by sharing a bug with itself.
"""
import random

import numpy as np
import pytest

from gtopk_hvd.common import k_for, world_split
from gtopk_hvd.common.reference import (SparseSet, gtopk_step, merge, select_topk,
                                        topk_allgather_step, truncate)

P_VALUES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16]


def _random_accs(rng, size, d, dtype=np.float32, integer=False):
    if integer:
        return [rng.integers(-3, 4, size=d).astype(dtype) for _ in range(size)]
    return [(rng.standard_normal(d) * rng.uniform(0.1, 10)).astype(dtype) for _ in range(size)]


def _naive_gtopk(accs, k, seed):
    """Per-rank simulation with dicts; pairs of a stage run in random order."""
    size = len(accs)
    order_rng = random.Random(seed)

    def top(entries):  # entries: {index: value}
        ranked = sorted(entries.items(), key=lambda iv: (-abs(float(iv[1])), iv[0]))
        return dict(ranked[:k])

    local = [top({i: a[i] for i in range(len(a))}) for a in accs]
    state = [dict(s) for s in local]
    alive = [{i: True for i in s} for s in local]
    m, base, extra = world_split(size)

    def merged(lo, hi):
        out = dict(lo)
        for i, v in hi.items():
            out[i] = out[i] + v if i in out else v
        return top(out)

    def survive(r, entries):
        for i in alive[r]:
            alive[r][i] = alive[r][i] and i in entries

    # fold: extra rank e's set goes into rank e - P' (the lower rank's set first)
    for e in order_rng.sample(range(base, size), extra):
        state[e - base] = merged(state[e - base], state[e])
        survive(e - base, state[e - base])
        survive(e, state[e - base])
    # hypercube on the first P' ranks, pairs of a stage in random order
    for s in range(m):
        pairs = [(p, p ^ (1 << s)) for p in range(base) if p < p ^ (1 << s)]
        order_rng.shuffle(pairs)
        for p, q in pairs:
            state[p] = state[q] = merged(state[p], state[q])
            for r in (p, q, p + base, q + base):
                if r < size:  # a rank folded into p or q tracks its entries there
                    survive(r, state[p])
    for e in range(base, size):  # the extra ranks get the final set
        state[e] = dict(state[e - base])
    for r in range(size):
        assert state[r] == state[0], "naive oracle: ranks disagree"
    residuals = []
    for r, a in enumerate(accs):
        eps = a.copy()
        for i, ok in alive[r].items():
            if ok:
                eps[i] = 0
        residuals.append(eps)
    return state[0], residuals


def _check_conservation(accs, result, rtol=1e-5):
    d = accs[0].size
    lhs = np.sum([a.astype(np.float64) for a in accs], axis=0)
    rhs = np.sum([e.astype(np.float64) for e in result.residuals], axis=0) \
        + result.dense(d).astype(np.float64)
    np.testing.assert_allclose(rhs, lhs, rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("size", P_VALUES)
@pytest.mark.parametrize("density", [0.01, 0.1, 0.5])
def test_conservation_nothing_lost_nothing_counted_twice(size, density):
    rng = np.random.default_rng(size * 1000 + int(density * 100))
    accs = _random_accs(rng, size, 300)
    result = gtopk_step(accs, k_for(300, density))
    _check_conservation(accs, result)
    assert len(result.indices) == k_for(300, density)
    assert np.all(np.diff(result.indices) > 0) and result.indices.dtype == np.int64


@pytest.mark.parametrize("size", P_VALUES)
def test_conservation_is_exact_on_integer_inputs(size):
    rng = np.random.default_rng(size)
    accs = _random_accs(rng, size, 200, integer=True)
    result = gtopk_step(accs, 7)
    lhs = np.sum(accs, axis=0)
    rhs = np.sum(result.residuals, axis=0) + result.dense(200)
    np.testing.assert_array_equal(rhs, lhs)


@pytest.mark.parametrize("size", P_VALUES)
def test_density_one_is_the_dense_sum_with_zero_residuals(size):
    rng = np.random.default_rng(7 + size)
    accs = _random_accs(rng, size, 64, integer=True)
    result = gtopk_step(accs, 64)
    np.testing.assert_array_equal(result.dense(64), np.sum(accs, axis=0))
    for eps in result.residuals:
        np.testing.assert_array_equal(eps, 0)
    floats = _random_accs(rng, size, 64)
    np.testing.assert_allclose(gtopk_step(floats, 64).dense(64), np.sum(floats, axis=0), rtol=1e-5,
                               atol=1e-6)


def test_single_rank_is_plain_local_topk():
    rng = np.random.default_rng(1)
    acc = rng.standard_normal(1000).astype(np.float32)
    result = gtopk_step([acc], 10)
    want = np.sort(np.argsort(-np.abs(acc), kind="stable")[:10])
    np.testing.assert_array_equal(result.indices, want)
    np.testing.assert_array_equal(result.values, acc[want])
    rest = acc.copy()
    rest[want] = 0
    np.testing.assert_array_equal(result.residuals[0], rest)


@pytest.mark.parametrize("size", P_VALUES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_oracle_with_heavy_ties_in_any_pair_order(size, seed):
    rng = np.random.default_rng(100 * size + seed)
    accs = _random_accs(rng, size, 40, integer=True)
    result = gtopk_step(accs, 5)
    for order_seed in range(3):
        final, residuals = _naive_gtopk(accs, 5, seed=order_seed)
        assert sorted(final) == result.indices.tolist()
        np.testing.assert_array_equal([final[i] for i in sorted(final)], result.values)
        for mine, theirs in zip(result.residuals, residuals):
            np.testing.assert_array_equal(mine, theirs)


@pytest.mark.parametrize("size", [3, 5, 8])
def test_matches_naive_oracle_on_random_floats(size):
    rng = np.random.default_rng(size)
    accs = _random_accs(rng, size, 50)
    result = gtopk_step(accs, 6)
    final, residuals = _naive_gtopk(accs, 6, seed=0)
    assert sorted(final) == result.indices.tolist()
    np.testing.assert_array_equal([final[i] for i in sorted(final)], result.values)
    for mine, theirs in zip(result.residuals, residuals):
        np.testing.assert_array_equal(mine, theirs)


def test_entry_dropped_then_reentering_through_another_branch_stays_in_residual():
    # stage 0: {0,1} keep rank 1's index 1 (5 > 1), {2,3} keep index 0 (4 + 3 = 7);
    # stage 1: index 0 wins (7 > 5), but its value no longer holds rank 0's 1.
    accs = [np.array(a, dtype=np.float32) for a in
            ([1, 0, 0], [0, 5, 0], [4, 0, 0], [3, 0, 0])]
    result = gtopk_step(accs, 1)
    assert result.indices.tolist() == [0]
    assert result.values.tolist() == [7.0]
    np.testing.assert_array_equal(result.residuals[0], [1, 0, 0])   # dead entry kept
    np.testing.assert_array_equal(result.residuals[1], [0, 5, 0])   # dropped at stage 1
    np.testing.assert_array_equal(result.residuals[2], [0, 0, 0])
    np.testing.assert_array_equal(result.residuals[3], [0, 0, 0])
    assert [a.tolist() for a in result.alive] == [[False], [False], [True], [True]]


def test_fold_tracks_the_extra_ranks_alive_flags():
    # P = 3: rank 2 folds into rank 0; its entry survives the fold but dies at stage 0.
    accs = [np.array(a, dtype=np.float32) for a in ([0, 2, 0], [0, 0, 9], [3, 0, 0])]
    result = gtopk_step(accs, 1)
    assert result.indices.tolist() == [2] and result.values.tolist() == [9.0]
    np.testing.assert_array_equal(result.residuals[2], [3, 0, 0])
    np.testing.assert_array_equal(result.residuals[0], [0, 2, 0])
    np.testing.assert_array_equal(result.residuals[1], [0, 0, 0])


def test_merge_and_truncate_break_ties_by_lower_index_symmetrically():
    a = SparseSet(np.array([1, 4, 6]), np.array([2.0, -3.0, 1.0], dtype=np.float32))
    b = SparseSet(np.array([0, 4, 9]), np.array([-3.0, 1.0, 2.0], dtype=np.float32))
    ab, ba = merge(a, b), merge(b, a)
    np.testing.assert_array_equal(ab.indices, [0, 1, 4, 6, 9])
    np.testing.assert_array_equal(ab.values, [-3, 2, -2, 1, 2])
    np.testing.assert_array_equal(ab.values, ba.values)
    t = truncate(ab, 3)
    np.testing.assert_array_equal(t.indices, [0, 1, 4])   # |2| tie between 1, 4, 9 -> 1 and 4
    assert select_topk(np.array([1, -2, 2, 0, -2], dtype=np.float32), 2).tolist() == [1, 2]


def test_topk_allgather_reference_conserves_and_sums_every_sent_entry():
    rng = np.random.default_rng(3)
    accs = _random_accs(rng, 5, 100, integer=True)
    result = topk_allgather_step(accs, 4)
    lhs = np.sum(accs, axis=0)
    np.testing.assert_array_equal(np.sum(result.residuals, axis=0) + result.dense(100), lhs)
    union = set()
    for a in accs:
        union |= set(select_topk(a, 4).tolist())
    assert result.indices.tolist() == sorted(union)


def test_reference_rejects_bad_inputs():
    with pytest.raises(ValueError, match="k must"):
        gtopk_step([np.zeros(4)], 5)
    with pytest.raises(ValueError, match="accs\\[1\\]"):
        gtopk_step([np.zeros(4), np.zeros(5)], 1)
    with pytest.raises(ValueError, match="empty"):
        gtopk_step([], 1)
