"""Random sparse sets for the adapters' merge tests (tests/torch/test_torch_ops.py,
tests/tensorflow/test_tf_ops.py), so that both frameworks meet the same kinds of case."""
import numpy as np

from gtopk_hvd.common.reference import SparseSet


def random_set(rng, d, n, integer, negative_zeros=0.0):
    """``n`` distinct sorted indices below ``d`` (int64) with float32 values: standard normal,
    or small integers (many ties) when ``integer``; a share ``negative_zeros`` of them -0.0."""
    indices = np.sort(rng.choice(d, n, replace=False)).astype(np.int64)
    values = (rng.integers(-3, 4, n) if integer else rng.standard_normal(n)).astype(np.float32)
    if negative_zeros:
        values[rng.random(n) < negative_zeros] = -0.0
    return SparseSet(indices, values)


def merge_cases(seed, max_buffers, negative_zeros=0.0):
    """[(low, high, k)] for 2 to ``max_buffers`` - 1 buffers of every size: empty sets, k above
    and below the union, ties (even seeds: integer values), NaN, Inf, -0.0, indices up to
    2**31 - 2."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(int(rng.integers(2, max_buffers))):
        d = int(rng.choice([1, 5, 60, 300, 2 ** 31 - 1]))
        n_low, n_high = (int(rng.integers(0, min(d, 40) + 1)) for _ in range(2))
        low, high = (random_set(rng, min(d, 300), n, seed % 2 == 0, negative_zeros)
                     for n in (n_low, n_high))
        if d > 300:  # far indices: every bit of the index survives
            low.indices, high.indices = low.indices + (d - 301), high.indices + (d - 301)
        for sset in (low, high):
            if sset.values.size and rng.random() < 0.3:
                sset.values[rng.integers(sset.values.size)] = rng.choice(
                    [np.nan, np.inf, -np.inf, -0.0, 0.0])
        cases.append((low, high, int(rng.integers(1, 50))))
    return cases


def assert_bitwise_equal_sets(got, want):
    """``got`` and ``want``: lists of (values, indices) as NumPy arrays (float32, int32), one
    per buffer; equal bit for bit (NaN, -0.0), buffer by buffer."""
    assert len(got) == len(want), (len(got), len(want))
    for b, ((values, indices), (want_values, want_indices)) in enumerate(zip(got, want)):
        assert indices.dtype == np.int32 and values.dtype == np.float32, (b, indices.dtype,
                                                                           values.dtype)
        np.testing.assert_array_equal(indices, want_indices, f"buffer {b}")
        np.testing.assert_array_equal(values.view(np.int32), want_values.view(np.int32),
                                      f"buffer {b}")


def selection_cases(seed, max_buffers):
    """[(acc, k)] for 2 to ``max_buffers`` - 1 float32 buffers, small and large (1 to 5000
    entries), k = 0, 1, n and in between; odd seeds: small integers (ties, zeros); a few NaN,
    Inf, 0.0 and -0.0 in some."""
    rng = np.random.default_rng(100 + seed)
    cases = []
    for _ in range(int(rng.integers(2, max_buffers))):
        n = int(rng.choice([1, 3, 64, 700, 4096, 5000]))
        acc = (rng.integers(-2, 3, n) if seed % 2 else rng.standard_normal(n)).astype(np.float32)
        for _ in range(int(rng.integers(0, 3))):
            acc[rng.integers(n)] = rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0])
        cases.append((acc, int(rng.choice([0, 1, n, max(0, n // 3), min(n, 7)]))))
    return cases
