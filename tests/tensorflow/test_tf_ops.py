"""TFOps and GTopkState, single process (no Horovod): exact selection and merge against the
NumPy reference, eagerly and inside tf.function, and the state's bookkeeping."""
import os

import numpy as np
import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
tf = pytest.importorskip("tensorflow")

from gtopk_hvd.common.reference import merge, truncate  # noqa: E402
from gtopk_hvd.common.reference import select_topk as ref_select_topk  # noqa: E402
from gtopk_hvd.tensorflow.collective import exact_divide  # noqa: E402
from gtopk_hvd.tensorflow.ops import (isin, isin_many, merge_truncate,  # noqa: E402
                                      merge_truncate_many,
                                      select_topk, select_topk_many)
from gtopk_hvd.tensorflow.state import GTopkState  # noqa: E402
from tests.sparse_cases import (assert_bitwise_equal_sets, merge_cases,  # noqa: E402
                                random_set, selection_cases)

LARGE = 600_000  # above 4 * 2^16: the threshold-estimate path
select_topk_graph = tf.function(select_topk)
merge_truncate_graph = tf.function(merge_truncate)


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
    if kind == "nan":
        x = rng.standard_normal(n).astype(np.float32)
        x[rng.choice(n, max(1, n // 10), replace=False)] = np.nan
        return x
    raise ValueError(kind)


@pytest.mark.parametrize("n", [1, 7, 1000, LARGE])
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "sparse", "nan"])
def test_select_topk_equals_reference_eager_and_in_tf_function(kind, n):
    x = _data(kind, n, seed=n)
    for k in sorted({1, max(1, n // 1000), max(1, n // 100), n // 2, n}):
        want = ref_select_topk(x, k)
        got = select_topk(tf.constant(x), k)
        assert got.dtype == tf.int32
        np.testing.assert_array_equal(got.numpy(), want, err_msg=f"eager k={k}")
        # a tensor k: the density may change between steps inside one traced function
        got = select_topk_graph(tf.constant(x), tf.constant(k))
        np.testing.assert_array_equal(got.numpy(), want, err_msg=f"graph k={k}")


def test_select_topk_rejects_k_out_of_range():
    with pytest.raises(ValueError, match="k must be in"):
        select_topk(tf.ones([5]), 6)


def test_select_topk_large_buffer_equals_a_full_top_k():
    # speed is measured side by side in benchmarks/, never asserted in a unit test
    x = tf.constant(_data("normal", 4_000_000, 3))
    k = 4000
    full = tf.function(lambda x: tf.sort(tf.math.top_k(tf.abs(x), k).indices))
    fast = tf.function(lambda x: select_topk(x, k))
    np.testing.assert_array_equal(fast(x).numpy(), full(x).numpy())


@pytest.mark.parametrize("integer", [False, True])
def test_merge_truncate_equals_reference_bit_for_bit(integer):
    rng = np.random.default_rng(7 + integer)
    for trial in range(60):
        k = int(rng.integers(1, 15))
        low, high = random_set(rng, 40, k, integer, 0.2), random_set(rng, 40, k, integer, 0.2)
        want = truncate(merge(low, high), k)
        for f in (merge_truncate, merge_truncate_graph):
            values, indices = f((tf.constant(low.values), tf.constant(low.indices, tf.int32)),
                                (tf.constant(high.values), tf.constant(high.indices, tf.int32)),
                                k)
            np.testing.assert_array_equal(indices.numpy(), want.indices)
            # bits: -0.0 only where the reference keeps it
            np.testing.assert_array_equal(values.numpy().view(np.int32),
                                          want.values.view(np.int32))


def _tf_set(values, indices):
    return tf.constant(values, tf.float32), tf.constant(indices, tf.int32)


@pytest.mark.parametrize("seed", range(4))
def test_merge_truncate_many_equals_one_merge_per_buffer_bit_for_bit(seed):
    """Many buffers (empty sets, k above and below the union, ties, NaN, Inf, -0.0, indices
    up to 2**31 - 2), eagerly and in a tf.function with tensor ks: the one segmented merge
    keeps what merge_truncate keeps, bit for bit."""
    cases = merge_cases(seed, 25, negative_zeros=0.2)
    lows = [_tf_set(low.values, low.indices) for low, _, _ in cases]
    highs = [_tf_set(high.values, high.indices) for _, high, _ in cases]
    ks = [k for _, _, k in cases]
    graph = tf.function(lambda lows, highs, ks: merge_truncate_many(lows, highs, ks))
    for got in (merge_truncate_many(lows, highs, ks),
                graph(lows, highs, [tf.constant(k) for k in ks])):
        want = [merge_truncate(low, high, k) for low, high, k in zip(lows, highs, ks)]
        assert_bitwise_equal_sets([(v.numpy(), i.numpy()) for v, i in got],
                                  [(v.numpy(), i.numpy()) for v, i in want])


def test_merge_truncate_many_of_empty_sets_gives_empty_sets():
    empty = _tf_set(np.zeros(0), np.zeros(0))
    got = merge_truncate_many([empty, empty], [empty, empty], [1, 2])
    assert [(v.shape[0], i.shape[0]) for v, i in got] == [(0, 0), (0, 0)]


@pytest.mark.parametrize("seed", range(4))
def test_select_topk_many_equals_one_selection_per_buffer(seed):
    """Small and large buffers, k = 0, 1, n and in between, ties, NaN, Inf; eagerly and in a
    tf.function with tensor ks."""
    cases = selection_cases(seed, 20)
    accs, ks = [tf.constant(acc) for acc, _ in cases], [k for _, k in cases]
    graph = tf.function(lambda accs, ks: select_topk_many(accs, ks))
    for got in (select_topk_many(accs, ks), graph(accs, [tf.constant(k) for k in ks])):
        for b, (acc, k) in enumerate(zip(accs, ks)):
            assert got[b].dtype == tf.int32, b
            np.testing.assert_array_equal(got[b].numpy(), ref_select_topk(acc.numpy(), k),
                                          f"buffer {b}, k={k}")
    with pytest.raises(ValueError, match="k must be in"):
        select_topk_many([tf.ones([3]), tf.ones([2])], [1, 3])


def test_isin_with_empty_and_unsorted_sets():
    a = tf.constant([0, 3, 5, 7], tf.int32)
    assert isin(a, tf.constant([7, 3], tf.int32)).numpy().tolist() == [False, True, False, True]
    assert not isin(a, tf.zeros([0], tf.int32)).numpy().any()


@pytest.mark.parametrize("buffers", [1, 2, 9])
def test_isin_many_equals_numpy_per_buffer(buffers):
    """Sorted sets (a merge's indices), empty ones, indices up to 2**31 - 2; eagerly and in a
    tf.function."""
    rng = np.random.default_rng(buffers)
    as_, bs = [], []
    for _ in range(buffers):
        d = int(rng.choice([1, 50, 2 ** 31 - 1]))
        a = np.sort(rng.choice(min(d, 60), int(rng.integers(0, min(d, 60) + 1)), replace=False))
        b = np.sort(rng.choice(min(d, 60), int(rng.integers(0, min(d, 60) + 1)), replace=False))
        if d > 60:
            a, b = a + (d - 61), b + (d - 61)
        as_.append(tf.constant(a, tf.int32))
        bs.append(tf.constant(b, tf.int32))
    graph = tf.function(lambda as_, bs: isin_many(as_, bs))
    for got in (isin_many(as_, bs), graph(as_, bs)):
        for a, b, found in zip(as_, bs, got):
            np.testing.assert_array_equal(found.numpy(), np.isin(a.numpy(), b.numpy()))


def test_division_by_the_world_size_is_exact_in_a_graph():
    # Grappler would turn x / 3 into x * (1/3), which differs for a third of all floats
    x = _data("normal", 100_000, 5)
    got = tf.function(lambda x: exact_divide(x, 3))(tf.constant(x)).numpy()
    np.testing.assert_array_equal(got, x / 3)


def test_state_validates_its_hyperparameters():
    for kwargs, text in [({"density": 0.0}, "density"), ({"density": 0.1, "algorithm": "x"},
                                                          "algorithm"),
                         ({"density": 0.1, "granularity": "x"}, "granularity"),
                         ({"density": 0.1, "dense_threshold": -1}, "dense_threshold")]:
        with pytest.raises(ValueError, match=text):
            GTopkState(**kwargs)


def test_state_dict_round_trip_and_pending_residuals():
    a, b = tf.Variable(tf.zeros([2, 3]), name="a"), tf.Variable(tf.zeros([4]), name="b")
    state = GTopkState(0.5)
    state.residual(a).assign(tf.range(6, dtype=tf.float32))
    state.residual(b).assign(tf.ones([4]))
    saved = state.state_dict(4, 1)
    assert list(saved["residuals"]) == ["a", "b"] and saved["world_size"] == 4
    fresh = GTopkState(0.5)
    fresh.load_state_dict(saved, 4, 1)  # before any variable was seen: applied on creation
    c, d = tf.Variable(tf.zeros([2, 3]), name="c"), tf.Variable(tf.zeros([4]), name="d")
    np.testing.assert_array_equal(fresh.residual(c).numpy(), np.arange(6))
    np.testing.assert_array_equal(fresh.residual(d).numpy(), np.ones(4))
    other = GTopkState(0.5)
    other.load_state_dict(saved, 2, 1)  # another world size: dropped
    np.testing.assert_array_equal(other.residual(c).numpy(), np.zeros(6))


def test_state_is_tracked_by_tf_train_checkpoint(tmp_path):
    v = tf.Variable(tf.zeros([5]), name="v")
    state = GTopkState(0.5)
    state.residual(v).assign(tf.fill([5], 2.0))
    state._step.assign(7)
    path = tf.train.Checkpoint(gtopk=state).write(str(tmp_path / "ckpt"))
    restored = GTopkState(0.5)
    tf.train.Checkpoint(gtopk=restored).read(path)
    assert restored.step == 7
    # the residual does not exist yet: the restore is deferred until it is created
    np.testing.assert_array_equal(restored.residual(v).numpy(), np.full(5, 2.0))


def test_set_density_changes_the_schedule():
    state = GTopkState(0.5)
    assert state.density() == 0.5
    state.set_density(lambda step: 0.25)
    assert state.density() == 0.25
    with pytest.raises(ValueError, match="density"):
        state.set_density(2.0)
