"""TensorFlow tensor operations for the framework-free gTop-k driver (gtopk_hvd.common.collective).

:class:`TFOps` implements the :class:`~gtopk_hvd.common.collective.TensorOps` protocol with
int32 indices and float32 values, eagerly and inside ``tf.function``.  Two operations carry the
algorithm's exactness:

- :func:`select_topk`: the exact top-k of |acc|, ties broken by lower index, as
  :func:`gtopk_hvd.common.reference.select_topk`.  On large buffers a full ``top_k`` costs many
  passes over the data, so the selection first narrows the search with a threshold estimated
  from a deterministic strided sample, then selects exactly among the (about 2k) candidates;
- :func:`merge_truncate`: the union of two sparse sets with values added low + high in float32,
  then the k largest magnitudes (ties by lower index), the same arithmetic as the reference's
  ``truncate(merge(low, high), k)``, so partners and the reference agree bit for bit.

Both rely on ``tf.math.top_k`` returning the lower index first among equal values (documented,
and what ``tf.argsort(stable=True)`` is built on).

Graph mode: Horovod's ops are not marked stateful, so in a ``tf.function`` an exchange whose
output nobody reads would be pruned, and two exchanges with equal inputs could be merged.
Every message holds data of its own buffer (a header-only message slices its values from
it), and :meth:`TFOps.finalize` ties the result to every exchange issued.  Nor may a message
be a constant: TensorFlow's optimiser folds an operation whose inputs are all constants, so it
would run a Horovod collective once, while optimising the function, and never at run time
(horovod/horovod#3229); the zeros gtopk_hvd sends itself come from :func:`zeros`.

Reference: S. Shi et al., "A Distributed Synchronous SGD Algorithm with Global Top-k
Sparsification for Low Bandwidth Networks", ICDCS 2019.
"""
import logging
import re

import numpy as np
import tensorflow as tf

from gtopk_hvd.common.collective import (ALL_FLAGS, DIGEST_BITS, FLAG_BITS, JOINED, MISMATCH,
                                         NONFINITE)

__all__ = ["TFOps", "zeros", "select_topk", "select_topk_many", "merge_truncate",
           "merge_truncate_many", "isin", "isin_many", "compress", "op_name_safe", "all_finite"]

logger = logging.getLogger(__name__)

_SAMPLE_SIZE = 1 << 16   # strided sample that estimates the selection threshold
_OVERSAMPLE = 2.0        # aim for about 2k candidates, so the estimate rarely falls short
_INT32_MAX = 2 ** 31 - 1


def op_name_safe(name):
    """``name`` with the characters TensorFlow refuses in op names replaced by '_'."""
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", str(name))
    return name if re.match(r"[A-Za-z0-9.]", name) else "g" + name


def zeros(shape, dtype=tf.float32):
    """``tf.zeros(shape, dtype)`` that a ``tf.function``'s constant folding leaves alone.

    TensorFlow's optimiser evaluates an operation whose inputs are all constants when it
    optimises the function, and Horovod's operations are not marked stateful: a collective fed
    only by zeros (a joined rank's step, a variable without a gradient, the compressor's
    placeholder) would run once, on the calling thread while the function is optimised, and
    never at run time: that rank would issue fewer operations than the others, or wait at
    optimisation time for a partner that is running its step (horovod/horovod#3229).  In a graph
    the zeros are filled from a value the optimiser cannot know (a comparison with the clock,
    always false); eagerly, plain zeros."""
    if tf.executing_eagerly():
        return tf.zeros(shape, dtype)
    return tf.fill([int(d) for d in shape], tf.cast(tf.timestamp() < 0.0, dtype))


def _magnitude(x):
    """|x| as the ranking key: NaN ranks below every number, as in the NumPy reference."""
    a = tf.abs(x)
    return tf.where(tf.math.is_nan(a), tf.constant(-1.0, a.dtype), a)


def _key(high, low):
    """int64 keys ``high << 32 | low`` (``low`` non-negative, below 2**32): they order by
    ``high``, then by ``low``."""
    return tf.bitwise.bitwise_or(tf.bitwise.left_shift(tf.cast(high, tf.int64), 32),
                                 tf.cast(low, tf.int64))


def _bound(sorted_sequence, values, upper):
    """tf.searchsorted(sorted_sequence, values, side="right" if upper else "left") of 1-D
    int tensors, int32, in the few operations that 1-D inputs need."""
    op = tf.raw_ops.UpperBound if upper else tf.raw_ops.LowerBound
    found = op(sorted_inputs=tf.reshape(sorted_sequence, [1, -1]),
               values=tf.reshape(values, [1, -1]), out_type=tf.int32)
    return tf.reshape(found, [-1])


def _segment_of(sizes):
    """``tf.repeat(tf.range(len(sizes)), sizes)`` (int32 sizes, some may be 0): the segment
    of every entry of the concatenated segments, in a dozen graph operations instead of
    tf.repeat's sixty."""
    ends = tf.cumsum(sizes)
    return _bound(ends, tf.range(tf.reduce_sum(sizes)), upper=True)


def _next(x, pad):
    """Every entry's successor in 1-D ``x``, ``pad`` after the last (as long as x)."""
    return tf.concat([x, tf.constant([pad], x.dtype)], 0)[1:]


def _previous(x, pad):
    """Every entry's predecessor in 1-D ``x``, ``pad`` before the first (as long as x)."""
    return tf.concat([tf.constant([pad], x.dtype), x], 0)[:-1]


def compress(x, mask):
    """The entries of 1-D ``x`` where ``mask`` holds, in order: tf.boolean_mask in the few
    operations a 1-D mask needs (a traced step holds many of them)."""
    return tf.gather(x, tf.reshape(tf.where(mask), [-1]))


def _topk_positions(key, k):
    """Ascending int32 positions of the k largest ``key``, ties by lower position."""
    positions = tf.math.top_k(key, k=k, sorted=True).indices
    return tf.sort(positions)


def _static_int(k):
    """k as a Python int when it is one (or a constant tensor), else None."""
    if isinstance(k, int):
        return k
    value = tf.get_static_value(k)
    return None if value is None else int(value)


def select_topk(acc, k):
    """Ascending int32 indices of the k largest |acc| of a 1-D float tensor, ties by lower index.

    ``k`` is a Python int or an int32 scalar tensor (a density that changes between steps).

    1. thr = an estimate of the magnitude about 2k entries reach (strided sample);
    2. candidates C = {i : |acc[i]| > thr};
    3. if |C| >= k, the answer lies in C: exact selection among C;
    4. else the answer is C plus the lowest-index entries with |acc| == thr (ties at the
       threshold: integer-valued or all-zero gradients);
    5. if even that is short of k (the sample overestimated), an exact full selection.
    """
    n = acc.shape[0]
    k_static = _static_int(k)
    if n is not None and k_static is not None:
        if not 0 <= k_static <= n:
            raise ValueError(f"k must be in [0, {n}], got {k_static}")
        if k_static == n:
            return tf.range(n, dtype=tf.int32)
        if k_static == 0:
            return tf.zeros([0], tf.int32)
    if n is None or n <= 4 * _SAMPLE_SIZE:  # small buffers: top_k is already cheap
        return _topk_positions(_magnitude(acc), k)

    k = tf.convert_to_tensor(k, tf.int32)
    stride = max(1, n // _SAMPLE_SIZE) | 1  # odd: less likely to alias with tensor shapes
    sample = tf.abs(acc[::stride])
    sample = tf.where(tf.math.is_nan(sample), tf.zeros_like(sample), sample)
    wanted = tf.cast(tf.math.ceil(_OVERSAMPLE * tf.cast(k, tf.float64) / stride), tf.int32) + 8
    j = tf.minimum(tf.size(sample), wanted)
    thr = tf.reduce_min(tf.math.top_k(sample, k=j, sorted=False).values)

    magnitude = tf.abs(acc)
    cand = tf.cast(tf.reshape(tf.where(magnitude > thr), [-1]), tf.int32)
    n_cand = tf.size(cand)

    def among_candidates():
        keep = _topk_positions(tf.gather(magnitude, cand), k)
        return tf.gather(cand, keep)

    def with_ties():
        ties = tf.cast(tf.reshape(tf.where(tf.equal(magnitude, thr)), [-1]), tf.int32)
        ties = ties[:k - n_cand]

        def complete():
            return tf.sort(tf.concat([cand, ties], 0))

        def full():
            return _topk_positions(_magnitude(acc), k)

        return tf.cond(n_cand + tf.size(ties) >= k, complete, full)

    chosen = tf.cond(n_cand >= k, among_candidates, with_ties)
    if k_static is not None:
        chosen.set_shape([k_static])
    return chosen


def merge_truncate(low, high, k):
    """Union of the sparse sets ``low`` and ``high`` ((values, indices), each sorted by index
    and unique), values added low + high where an index is in both, then the k entries of
    largest |value| (ties by lower index), sorted by index.  Returns (values, indices).

    The arithmetic is the reference's: a value only in ``low`` is kept as is, one only in
    ``high`` is 0 + high (so -0.0 becomes +0.0), one in both is low + high.
    """
    low_values, low_indices = low
    high_values, high_indices = high
    n_low = tf.size(low_indices)
    indices = tf.concat([low_indices, high_indices], 0)
    values = tf.concat([low_values, high_values], 0)
    from_high = tf.range(tf.size(indices)) >= n_low
    # a stable sort puts low's entry right before high's one of the same index
    order = tf.argsort(indices, stable=True)
    indices, values, from_high = (tf.gather(t, order) for t in (indices, values, from_high))
    # indices are never negative: -1 beyond the ends matches nothing
    same_as_next = tf.equal(indices, _next(indices, -1))
    first = tf.not_equal(indices, _previous(indices, -1))
    summed = tf.where(from_high,
                      tf.where(tf.equal(values, 0.0), tf.zeros_like(values), values),
                      tf.where(same_as_next, values + _next(values, 0), values))
    values, indices = compress(summed, first), compress(indices, first)
    keep = _topk_positions(_magnitude(values), tf.minimum(k, tf.size(values)))
    return tf.gather(values, keep), tf.gather(indices, keep)


_SMALL_SELECT = 4096  # select_topk_many: buffers up to this size are selected together


def select_topk_many(accs, ks):
    """[select_topk(acc, k) for each buffer], the same indices: the buffers of at most
    ``_SMALL_SELECT`` entries (static sizes: a layer's biases and norms) ranked together by
    one segmented ranking (:func:`_largest_per_segment`), the others one by one.  As
    gtopk_hvd.torch.ops.select_topk_many; in a graph the segmented form keeps the traced
    step's size independent of the number of small buffers."""
    out = [None] * len(accs)
    small = [b for b, acc in enumerate(accs)
             if acc.shape[0] is not None and acc.shape[0] <= _SMALL_SELECT]
    if len(small) > 1:
        sizes = [int(accs[b].shape[0]) for b in small]
        for b, n in zip(small, sizes):
            k = _static_int(ks[b])
            if k is not None and not 0 <= k <= n:
                raise ValueError(f"k must be in [0, {n}], got {k}")
        segment = tf.constant(np.repeat(np.arange(len(small), dtype=np.int32), sizes))
        starts = tf.constant(np.cumsum([0] + sizes[:-1], dtype=np.int32))
        keep = _largest_per_segment(tf.concat([accs[b] for b in small], 0), segment,
                                    [ks[b] for b in small])
        positions = keep - tf.gather(starts, tf.gather(segment, keep))
        pieces = tf.split(positions, tf.stack([tf.cast(ks[b], tf.int32) for b in small]),
                          num=len(small))
        for b, chosen in zip(small, pieces):
            out[b] = chosen
    return [select_topk(acc, k) if chosen is None else chosen
            for acc, k, chosen in zip(accs, ks, out)]


def _largest_per_segment(values, segment, ks):
    """The ascending positions of the ks[b] largest |values| of each segment b (NaN below
    every number, ties by lower position, as :func:`_topk_positions`).  ``segment`` (int32):
    the segment of each entry, non-decreasing.  One stable sort by the int64 key
    ``segment << 32 | (2**31 - 1 - bits(|value|))`` (the bits of a non-negative float32
    order as the float does; NaN's stand for -1, below 0.0) ranks every segment's entries
    by magnitude; the first ks[b] of segment b are kept, marked in place so that they come
    out in position order without a second sort.  The torch adapter's
    ``_largest_per_segment`` does the same with two stable sorts."""
    n = len(ks)
    magnitude = tf.abs(tf.cast(values, tf.float32))
    bits = tf.where(tf.math.is_nan(magnitude), -1, tf.bitcast(magnitude, tf.int32))
    order = tf.argsort(_key(segment, _INT32_MAX - tf.cast(bits, tf.int64)), stable=True)
    counts = tf.math.bincount(segment, minlength=n, maxlength=n, dtype=tf.int32)
    by_segment = tf.gather(segment, order)
    rank = tf.range(tf.size(values)) - tf.gather(tf.cumsum(counts, exclusive=True), by_segment)
    limit = tf.stack([tf.cast(k, tf.int32) for k in ks])
    kept = compress(order, rank < tf.gather(limit, by_segment))
    marks = tf.scatter_nd(tf.expand_dims(kept, 1), tf.ones_like(kept), tf.shape(values))
    return tf.cast(tf.reshape(tf.where(marks > 0), [-1]), tf.int32)


def merge_truncate_many(lows, highs, ks):
    """:func:`merge_truncate` of every pair ``(lows[b], highs[b])`` with ``ks[b]``, the same
    results bit for bit, in one set of operations for all of them (as
    gtopk_hvd.torch.ops.merge_truncate_many): every entry carries its buffer b; one stable
    sort by (buffer, index) puts low's entry right before high's one of the same (buffer,
    index); the union adds them as :func:`merge_truncate` does; then
    :func:`_largest_per_segment` keeps the first ks[b] of each buffer, in index order.  A
    traced step of many buffers (``granularity="layer"``) holds a few dozen operations per
    merge instead of a few dozen per buffer.  Returns a list of (values, indices)."""
    n = len(ks)
    if n == 1:
        return [merge_truncate(lows[0], highs[0], ks[0])]
    sets = list(lows) + list(highs)
    indices = tf.concat([i for _, i in sets], 0)
    values = tf.concat([v for v, _ in sets], 0)
    sets_of = _segment_of(tf.stack([tf.size(i) for _, i in sets]))  # lows 0..n-1, highs n..
    buffer = tf.math.floormod(sets_of, n)
    from_high = sets_of >= n
    # one stable sort by (buffer, index): low's entry right before high's one of the same
    keys = _key(buffer, indices)
    order = tf.argsort(keys, stable=True)
    keys, indices, values, buffer, from_high = (
        tf.gather(t, order) for t in (keys, indices, values, buffer, from_high))
    # keys are never negative: -1 beyond the ends matches nothing
    same_as_next = tf.equal(keys, _next(keys, -1))
    first = tf.not_equal(keys, _previous(keys, -1))
    summed = tf.where(from_high,
                      tf.where(tf.equal(values, 0.0), tf.zeros_like(values), values),
                      tf.where(same_as_next, values + _next(values, 0), values))
    values, indices, buffer = (compress(t, first) for t in (summed, indices, buffer))
    keep = _largest_per_segment(values, buffer, ks)
    values, indices, buffer = (tf.gather(t, keep) for t in (values, indices, buffer))
    kept = tf.math.bincount(buffer, minlength=n, maxlength=n, dtype=tf.int32)
    return list(zip(tf.split(values, kept, num=n), tf.split(indices, kept, num=n)))


def all_finite(tensors):
    """Whether every entry of every tensor is finite (a bool tensor): one sum per tensor; on
    the rare non-finite sum, max / min tell an overflow of finite entries apart."""
    tensors = [tf.reshape(t, [-1]) for t in tensors]
    if not tensors:
        return tf.constant(True)
    sums = tf.stack([tf.reduce_sum(tf.cast(t, tf.float32)) for t in tensors])

    def exact():
        return tf.reduce_all([tf.reduce_all(tf.math.is_finite(tf.cast(t, tf.float32)))
                              for t in tensors])

    return tf.cond(tf.reduce_all(tf.math.is_finite(sums)), lambda: tf.constant(True), exact)


def isin(a, b):
    """Bool mask over ``a`` (int32, non-negative): True where the element is also in ``b``."""
    return _found(a, tf.sort(b))


def _found(a, sorted_b):
    """Bool mask over ``a``: True where the element is in ``sorted_b`` (ascending, every
    element below its dtype's largest value, which then serves as a sentinel that keeps
    searchsorted's answer inside the sequence)."""
    sorted_b = tf.concat([sorted_b, [sorted_b.dtype.max]], 0)
    return tf.equal(tf.gather(sorted_b, _bound(sorted_b, a, upper=False)), a)


def isin_many(as_, bs):
    """[isin(a, b) for each buffer], each b sorted ascending (a merge's indices), so no
    sort: one search for all buffers, by the keys ``buffer << 32 | index``, which are then
    sorted already."""
    if len(as_) == 1:
        return [_found(as_[0], bs[0])]

    def keyed(sets):
        sizes = tf.stack([tf.size(x) for x in sets])
        return _key(_segment_of(sizes), tf.concat(sets, 0)), sizes

    keys, sizes = keyed(as_)
    return tf.split(_found(keys, keyed(bs)[0]), sizes, num=len(as_))


class TFOps:
    """The :class:`~gtopk_hvd.common.collective.TensorOps` of TensorFlow, for one buffer.

    Args:
        hvd: the Horovod module whose ``allgather`` the exchange uses (``horovod.tensorflow``).
    """

    def __init__(self, hvd):
        self.hvd = hvd
        self.issued = []

    def select_topk(self, acc, k):
        return select_topk(acc, k)

    def select_topk_many(self, accs, ks):
        return select_topk_many(accs, ks)

    def take(self, x, indices):
        return tf.gather(x, indices)

    def take_none(self, values, indices):
        return values[:0], indices[:0]

    def meta(self, digest, flags):
        """make_meta for a digest that may be an int32 tensor (computed in the graph)."""
        digest = tf.bitwise.bitwise_and(tf.cast(digest, tf.int32), (1 << DIGEST_BITS) - 1)
        return tf.bitwise.bitwise_or(tf.bitwise.left_shift(digest, FLAG_BITS),
                                     tf.cast(flags, tf.int32))

    def or_nonfinite(self, flags, values):
        finite = tf.reduce_all(tf.math.is_finite(values))
        return tf.bitwise.bitwise_or(tf.cast(flags, tf.int32), tf.where(finite, 0, NONFINITE))

    def round_to_wire(self, values, wire):
        if wire == "float16":
            return tf.cast(tf.cast(values, tf.float16), tf.float32)
        return values

    def pack(self, values, indices, meta, wire="float32"):
        if wire == "float16":  # (n, meta), the n indices, the float16 values two to an int32
            n = tf.size(values, out_type=tf.int32)
            halves = tf.concat([tf.cast(values, tf.float16),
                                tf.zeros([tf.math.floormod(n, 2)], tf.float16)], 0)
            words = tf.bitcast(tf.reshape(halves, [-1, 2]), tf.int32)
            return tf.concat([tf.stack([n, meta]), tf.cast(indices, tf.int32),
                              tf.reshape(words, [-1])], 0)
        # one message per stage: a header row (n, meta), then float32 values bit-cast to
        # int32 next to the int32 indices
        header = tf.reshape(tf.stack([tf.size(values, out_type=tf.int32), meta]), [1, 2])
        body = tf.stack([tf.bitcast(tf.cast(values, tf.float32), tf.int32),
                         tf.cast(indices, tf.int32)], axis=1)
        return tf.concat([header, body], 0)

    def allgather(self, message, process_set, name):
        gathered = self.hvd.allgather(message, name=op_name_safe(name), process_set=process_set)
        self.issued.append(gathered)
        return gathered

    def unpack(self, gathered, members, wire="float32"):
        blocks, pos = [], tf.constant(0, tf.int32)
        if wire == "float16":
            for _ in range(members):
                count, meta = gathered[pos], gathered[pos + 1]
                words = (count + 1) // 2
                indices = gathered[pos + 2:pos + 2 + count]
                halves = tf.reshape(tf.bitcast(gathered[pos + 2 + count:pos + 2 + count + words],
                                               tf.float16), [-1])
                blocks.append((tf.cast(halves[:count], tf.float32), indices, meta))
                pos = pos + 2 + count + words
            return blocks
        for _ in range(members):
            count, meta = tf.unstack(gathered[pos], num=2)
            bits, indices = tf.unstack(gathered[pos + 1:pos + 1 + count], num=2, axis=1)
            blocks.append((tf.bitcast(bits, tf.float32), indices, meta))
            pos = pos + 1 + count
        return blocks

    def merge_meta(self, mine, theirs):  # gtopk_hvd.common.collective.merge_meta
        mine_joined = tf.bitwise.bitwise_and(mine, JOINED)
        theirs_joined = tf.bitwise.bitwise_and(theirs, JOINED)
        flags = tf.bitwise.bitwise_and(tf.bitwise.bitwise_or(mine, theirs), NONFINITE | MISMATCH)
        digests_differ = tf.logical_and(
            tf.not_equal(tf.bitwise.right_shift(mine, FLAG_BITS),
                         tf.bitwise.right_shift(theirs, FLAG_BITS)),
            tf.equal(tf.bitwise.bitwise_or(mine_joined, theirs_joined), 0))
        flags = tf.where(digests_differ, tf.bitwise.bitwise_or(flags, MISMATCH), flags)
        flags = tf.bitwise.bitwise_or(flags, tf.bitwise.bitwise_and(mine_joined, theirs_joined))
        base = tf.where(tf.logical_and(tf.not_equal(mine_joined, 0), tf.equal(theirs_joined, 0)),
                        theirs, mine)
        return tf.bitwise.bitwise_or(tf.bitwise.bitwise_and(base, ~ALL_FLAGS), flags)

    def flags_of(self, meta):
        return tf.bitwise.bitwise_and(meta, ALL_FLAGS)

    def concat_sets(self, sets):
        return tf.concat([v for v, _ in sets], 0), tf.concat([i for _, i in sets], 0)

    def holds(self, values, n):
        return tf.equal(tf.size(values, out_type=tf.int32), tf.cast(n, tf.int32))

    def choose(self, ok, theirs, mine):
        if tf.executing_eagerly():
            return theirs if bool(ok) else mine
        return tuple(tf.cond(ok, lambda: theirs, lambda: mine))

    def split_set(self, values, indices, ks):
        sizes = tf.stack([tf.cast(k, tf.int32) for k in ks])
        return list(zip(tf.split(values, sizes, num=len(ks)),
                        tf.split(indices, sizes, num=len(ks))))

    def merge_truncate(self, low, high, k):
        return merge_truncate(low, high, k)

    def merge_truncate_many(self, lows, highs, ks):
        return merge_truncate_many(lows, highs, ks)

    def isin_many(self, as_, bs):
        return isin_many(as_, bs)

    def logical_and(self, a, b):
        return tf.logical_and(a, b)

    def full_mask(self, k):
        return tf.ones(tf.reshape(k, [1]), tf.bool)

    def add_flag(self, flags, flag):
        return tf.bitwise.bitwise_or(tf.cast(flags, tf.int32), flag)

    def length(self, values):
        n = values.shape[0]
        return int(n) if n is not None else tf.size(values, out_type=tf.int32)

    def with_length(self, x, n):
        return x if tf.executing_eagerly() else tf.reshape(x, [n])

    def finalize(self, *tensors):
        """``tensors``, made to depend on every exchange issued, so that none is pruned.

        A control dependency alone is not enough: Grappler drops the identity that carries it
        and then prunes the unread exchange.  An assertion on each gathered tensor's size (a
        stateful op, so ``tf.function`` always runs it, on a value only known at run time)
        keeps every exchange alive.
        """
        if tf.executing_eagerly() or not self.issued:
            return tensors
        checks = [tf.debugging.assert_non_negative(tf.size(g), message="gtopk exchange")
                  for g in self.issued]
        with tf.control_dependencies(checks):
            return tuple(tf.identity(t) for t in tensors)
