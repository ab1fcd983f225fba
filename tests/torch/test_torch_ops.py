"""TorchOps, single process: exact selection and merge against the NumPy reference."""

import numpy as np
import pytest
import torch

from gtopk_hvd.common.reference import merge, truncate
from gtopk_hvd.common.reference import select_topk as ref_select_topk
from gtopk_hvd.common.collective import NONFINITE, make_meta
from gtopk_hvd.torch.ops import (TorchOps, all_finite, merge_truncate, merge_truncate_many,
                                 select_topk, select_topk_many)
from tests.sparse_cases import (assert_bitwise_equal_sets, merge_cases, random_set,
                                selection_cases)

LARGE = 600_000  # above 4 * 2^16: the threshold-estimate path


def _data(kind, n, seed):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "ties":
        return rng.integers(-3, 4, n).astype(np.float32)
    if kind == "zeros":
        return np.zeros(n, np.float32)
    if kind == "sparse":  # mostly zeros, a few values: ties at zero right after them
        x = np.zeros(n, np.float32)
        m = min(50, n // 2)
        x[rng.choice(n, m, replace=False)] = rng.standard_normal(m)
        return x
    if kind == "heavy_tail":
        return (rng.standard_cauchy(n) * 1e-3).astype(np.float32)
    raise ValueError(kind)


@pytest.mark.parametrize("n", [1, 7, 1000, LARGE])
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "sparse", "heavy_tail"])
def test_select_topk_equals_reference(kind, n):
    x = _data(kind, n, seed=n)
    for k in sorted({1, max(1, n // 1000), max(1, n // 100), n // 2, n}):
        got = select_topk(torch.from_numpy(x), k)
        assert got.dtype == torch.int32
        np.testing.assert_array_equal(got.numpy(), ref_select_topk(x, k), err_msg=f"k={k}")


def test_select_topk_k_zero_is_empty():
    assert select_topk(torch.ones(5), 0).numel() == 0


def test_select_topk_rejects_k_out_of_range():
    with pytest.raises(ValueError, match="k must be in"):
        select_topk(torch.ones(5), 6)


def test_select_topk_falls_back_when_the_sample_overestimates():
    # every sampled position holds 1.0, the rest 0.5: the estimate (1.0) leaves too few
    n, stride = LARGE, (LARGE // 65536) | 1
    x = np.full(n, 0.5, np.float32)
    x[::stride] = 1.0
    k = n // 3
    got = select_topk(torch.from_numpy(x), k)
    np.testing.assert_array_equal(got.numpy(), ref_select_topk(x, k))


def test_select_topk_large_buffer_with_nan_next_to_large_values():
    x = _data("normal", LARGE, seed=5)
    top = np.argsort(-np.abs(x))[:20]
    x[np.minimum(top[::2] + 1, LARGE - 1)] = np.nan  # NaN in the blocks of the largest
    for k in (10, 600, 6000):
        np.testing.assert_array_equal(select_topk(torch.from_numpy(x), k).numpy(),
                                      ref_select_topk(x, k))


def test_select_topk_nan_ranks_last_as_in_the_reference():
    x = np.array([1.0, np.nan, -3.0, 2.0, np.nan], np.float32)
    for k in range(6):
        np.testing.assert_array_equal(select_topk(torch.from_numpy(x), k).numpy(),
                                      ref_select_topk(x, k))


@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("n_low,n_high,k", [(20, 20, 10), (20, 5, 30), (0, 8, 4), (8, 0, 8),
                                            (0, 0, 3), (100, 100, 100)])
def test_merge_truncate_equals_reference(integer, n_low, n_high, k):
    rng = np.random.default_rng(n_low * 1000 + n_high + integer)
    d = 60 if max(n_low, n_high) <= 60 else 300  # small d: many shared indices
    low, high = random_set(rng, d, n_low, integer), random_set(rng, d, n_high, integer)
    want = truncate(merge(low, high), k)
    values, indices = merge_truncate(
        (torch.from_numpy(low.values), torch.from_numpy(low.indices).int()),
        (torch.from_numpy(high.values), torch.from_numpy(high.indices).int()), k)
    assert indices.dtype == torch.int32 and values.dtype == torch.float32
    np.testing.assert_array_equal(indices.numpy(), want.indices)
    np.testing.assert_array_equal(values.numpy(), want.values)


def test_merge_truncate_adds_low_then_high_where_indices_meet():
    low = (torch.tensor([1.0, 2.0]), torch.tensor([3, 5], dtype=torch.int32))
    high = (torch.tensor([-2.0, 4.0]), torch.tensor([5, 9], dtype=torch.int32))
    values, indices = merge_truncate(low, high, 2)
    assert indices.tolist() == [3, 9] and values.tolist() == [1.0, 4.0]  # 5 summed to 0


def _torch_set(s):
    return torch.from_numpy(s.values), torch.from_numpy(s.indices).int()


@pytest.mark.parametrize("seed", range(6))
def test_merge_truncate_many_equals_one_merge_per_buffer_bit_for_bit(seed):
    """Many buffers of all sizes (empty sets, k above and below the union, ties, NaN, Inf,
    -0.0, indices up to 2**31 - 2): the segmented merge keeps what merge_truncate keeps."""
    cases = merge_cases(seed, 40)
    lows = [_torch_set(low) for low, _, _ in cases]
    highs = [_torch_set(high) for _, high, _ in cases]
    ks = [k for _, _, k in cases]
    got = merge_truncate_many(lows, highs, ks)
    want = [merge_truncate(low, high, k) for low, high, k in zip(lows, highs, ks)]
    assert_bitwise_equal_sets([(v.numpy(), i.numpy()) for v, i in got],
                              [(v.numpy(), i.numpy()) for v, i in want])


def test_merge_truncate_many_of_one_buffer_or_many_entries_is_the_plain_merge():
    rng = np.random.default_rng(7)
    low, high = random_set(rng, 60, 20, False), random_set(rng, 60, 20, False)
    (got,) = merge_truncate_many([_torch_set(low)], [_torch_set(high)], [7])
    want = truncate(merge(low, high), 7)
    np.testing.assert_array_equal(got[1].numpy(), want.indices)
    np.testing.assert_array_equal(got[0].numpy(), want.values)


@pytest.mark.parametrize("seed", range(6))
def test_select_topk_many_equals_one_selection_per_buffer(seed):
    """Small and large buffers, k = 0, 1, n and in between, ties (integers, zeros), NaN, Inf."""
    cases = selection_cases(seed, 30)
    accs, ks = [torch.from_numpy(acc) for acc, _ in cases], [k for _, k in cases]
    got = select_topk_many(accs, ks)
    for b, (acc, k) in enumerate(zip(accs, ks)):
        want = select_topk(acc, k)
        assert got[b].dtype == torch.int32, b
        np.testing.assert_array_equal(got[b].numpy(), want.numpy(), f"buffer {b}, k={k}")
    with pytest.raises(ValueError, match="k must be in"):
        select_topk_many([torch.ones(3), torch.ones(2)], [1, 3])


def test_messages_round_trip_through_pack_and_unpack():
    ops = TorchOps(hvd=None)
    values = torch.tensor([1.5, -0.0, float("inf")])
    indices = torch.tensor([0, 4, 2**31 - 2], dtype=torch.int32)
    meta = make_meta((1 << 29) - 1, NONFINITE)
    first = ops.pack(values, indices, meta)
    empty = ops.pack(*ops.take_none(values, indices), make_meta(5))
    assert first.shape == (4, 2) and empty.shape == (1, 2) and first.dtype == torch.int32
    blocks = ops.unpack(torch.cat([first, empty, first]), 3)
    for (v, i, m), (want_v, want_i, want_m) in zip(blocks, [(values, indices, meta),
                                                            (values[:0], indices[:0], make_meta(5)),
                                                            (values, indices, meta)]):
        assert torch.equal(v.view(torch.int32), want_v.view(torch.int32))
        assert i.tolist() == want_i.tolist() and m == want_m


def test_all_finite_finds_nan_and_inf_and_tells_overflow_apart():
    big = torch.full((10,), 3e38)
    assert all_finite([torch.ones(5), big])  # the sum overflows, the entries are finite
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.zeros(1000)
        x[777] = bad
        assert not all_finite([torch.ones(3), x])
        assert not all_finite([x.half()])
    assert all_finite([]) and all_finite([torch.zeros(0)])


class _FakeHorovod:
    """poll() is False ``pending`` times, then True; synchronize() returns the handle."""

    def __init__(self, pending, local_size):
        self.pending, self.polls, self.synced, self._local = pending, 0, [], local_size

    def local_size(self):
        return self._local

    def poll(self, handle):
        self.polls += 1
        return self.polls > self.pending

    def synchronize(self, handle):
        self.synced.append(handle)
        return handle


@pytest.mark.parametrize("how", ["sleep", "spin"])
def test_wait_polls_with_growing_sleeps_or_leaves_it_to_horovod(monkeypatch, how):
    import gtopk_hvd.torch.ops as ops
    slept = []
    monkeypatch.setattr(ops.time, "sleep", slept.append)
    monkeypatch.setenv("GTOPK_HVD_WAIT", how)
    monkeypatch.setattr(ops, "_polite", {})
    fake = _FakeHorovod(pending=7, local_size=1)
    assert ops.wait(fake, "h") == "h" and fake.synced == ["h"]
    if how == "sleep":
        assert slept == [2e-5, 4e-5, 8e-5, 1.6e-4, 3.2e-4, 5e-4, 5e-4] and fake.polls == 8
    else:  # Horovod's own synchronize waits
        assert slept == [] and fake.polls == 0
