"""The framework-free collective driver (gtopk_hvd.common.collective) with NumPy operations.

P threads play the P ranks; the exchange is an in-memory allgather between the two threads
of a pair, in rank order, as Horovod's allgather in a two-rank process set returns it.  Each
rank's outcome is compared with the reference, so the fold / unfold encoding, the alive
flags and the canonical merge order are checked without Horovod.
"""
import threading

import numpy as np
import pytest

from gtopk_hvd.common import k_for
from gtopk_hvd.common.collective import (ALL_FLAGS, JOINED, MISMATCH, NONFINITE, gtopk_exchange,
                                         gtopk_exchange_grouped,
                                         gtopk_wire_bytes, make_meta, merge_meta,
                                         message_bytes, ring_bytes, topk_allgather_exchange,
                                         topk_wire_bytes)
from gtopk_hvd.common.schedule import stages_for
from gtopk_hvd.common.reference import (SparseSet, gtopk_step, merge, select_topk,
                                        topk_allgather_step, truncate)


class _Mailbox:
    """An allgather among the members of a group, in rank order."""

    def __init__(self):
        self.lock = threading.Lock()
        self.slots = {}
        self.cond = threading.Condition(self.lock)

    def allgather(self, group, rank, rows, name):
        key = (group, name)
        with self.cond:
            self.slots.setdefault(key, {})[rank] = rows
            self.cond.notify_all()
            self.cond.wait_for(lambda: len(self.slots[key]) == len(group), timeout=10)
            parts = [self.slots[key][r] for r in group]
        return np.concatenate(parts, axis=0)


class NumpyOps:
    def __init__(self, rank, mailbox):
        self.rank, self.mailbox = rank, mailbox

    def select_topk(self, acc, k):
        return select_topk(acc, k).astype(np.int32)

    def take(self, x, idx):
        return x[idx]

    def take_none(self, values, indices):
        return values[:0], indices[:0]

    def meta(self, digest, flags):
        return make_meta(digest, flags)

    def or_nonfinite(self, flags, values):
        return flags | (0 if np.isfinite(values).all() else NONFINITE)

    def round_to_wire(self, values, wire):
        if wire != "float16":
            return values
        with np.errstate(over="ignore"):  # beyond float16's range: Inf, as on the wire
            return values.astype(np.float16).astype(np.float32)

    def pack(self, values, indices, meta, wire="float32"):
        if wire == "float16":
            halves = np.zeros(len(values) + len(values) % 2, np.float16)
            halves[:len(values)] = values
            return np.concatenate([np.array([len(values), meta], np.int32),
                                   indices.astype(np.int32), halves.view(np.int32)])
        body = np.stack([values.astype(np.float32).view(np.int32), indices.astype(np.int32)], 1)
        return np.concatenate([np.array([[len(values), meta]], np.int32), body.reshape(-1, 2)])

    def allgather(self, message, group, name):
        return self.mailbox.allgather(group, self.rank, message, name)

    def unpack(self, gathered, members, wire="float32"):
        blocks, pos = [], 0
        if wire == "float16":
            for _ in range(members):
                count, meta = (int(x) for x in gathered[pos:pos + 2])
                indices = gathered[pos + 2:pos + 2 + count].copy()
                words = (count + 1) // 2
                halves = gathered[pos + 2 + count:pos + 2 + count + words].copy().view(np.float16)
                blocks.append((halves[:count].astype(np.float32), indices, meta))
                pos += 2 + count + words
            assert pos == len(gathered)
            return blocks
        for _ in range(members):
            count, meta = (int(x) for x in gathered[pos])
            body = gathered[pos + 1:pos + 1 + count]
            blocks.append((body[:, 0].copy().view(np.float32), body[:, 1].copy(), meta))
            pos += 1 + count
        assert pos == len(gathered)
        return blocks

    def merge_meta(self, mine, theirs):
        return merge_meta(mine, theirs)

    def flags_of(self, meta):
        return meta & ALL_FLAGS

    def holds(self, values, n):
        return len(values) == n

    def choose(self, ok, theirs, mine):
        return theirs if ok else mine

    def split_set(self, values, indices, ks):
        cuts = np.cumsum(ks)[:-1]
        return list(zip(np.split(values, cuts), np.split(indices, cuts)))

    def concat_sets(self, sets):
        return np.concatenate([v for v, _ in sets]), np.concatenate([i for _, i in sets])

    def merge_truncate(self, low, high, k):
        s = truncate(merge(SparseSet(low[1].astype(np.int64), low[0]),
                           SparseSet(high[1].astype(np.int64), high[0])), k)
        return s.values, s.indices.astype(np.int32)

    def select_topk_many(self, accs, ks):
        return [self.select_topk(acc, k) for acc, k in zip(accs, ks)]

    def merge_truncate_many(self, lows, highs, ks):
        return [self.merge_truncate(low, high, k) for low, high, k in zip(lows, highs, ks)]

    def isin_many(self, as_, bs):
        return [np.isin(a, b) for a, b in zip(as_, bs)]

    def logical_and(self, a, b):
        return a & b

    def full_mask(self, k):
        return np.ones(k, dtype=bool)

    def add_flag(self, flags, flag):
        return flags | flag

    def length(self, values):
        return len(values)

    def with_length(self, x, n):
        return x


def _run_ranks(size, body):
    mailbox, results, errors = _Mailbox(), [None] * size, []

    def target(rank):
        try:
            results[rank] = body(rank, NumpyOps(rank, mailbox))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append((rank, exc))

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    return results


def _group(stage):
    return stage.group


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 7, 8, 11])
@pytest.mark.parametrize("integer", [False, True])
def test_driver_on_every_rank_equals_the_reference(size, integer):
    rng = np.random.default_rng(size + 50 * integer)
    d = 257
    k = k_for(d, 0.05)
    accs = [(rng.integers(-3, 4, d) if integer else rng.standard_normal(d)).astype(np.float32)
            for _ in range(size)]
    want = gtopk_step(accs, k)

    def body(rank, ops):
        return gtopk_exchange(ops, accs[rank], k, rank, size,
                              _group, name="t")

    for rank, res in enumerate(_run_ranks(size, body)):
        np.testing.assert_array_equal(res.indices, want.indices, err_msg=f"rank {rank}")
        np.testing.assert_array_equal(res.values, want.values, err_msg=f"rank {rank}")
        np.testing.assert_array_equal(res.local_indices, want.local_indices[rank])
        np.testing.assert_array_equal(res.alive, want.alive[rank], err_msg=f"rank {rank}")
        eps = accs[rank].copy()
        eps[res.local_indices[res.alive]] = 0
        np.testing.assert_array_equal(eps, want.residuals[rank])
        assert res.verdict == 0


def _grouped_run(size, numels, ks_of, flags_of, wire="float32", seed=900):
    rng = np.random.default_rng(seed + size)
    accs = [[rng.standard_normal(d).astype(np.float32) for _ in range(size)] for d in numels]
    names = {}

    def body(rank, ops):
        calls = names.setdefault(rank, [])
        original = ops.allgather

        def counting(message, group, name):
            calls.append(name)
            return original(message, group, name)
        ops.allgather = counting
        return gtopk_exchange_grouped(ops, [a[rank] for a in accs], ks_of(rank), rank, size,
                                      _group, name="g", flags=flags_of(rank), wire=wire)
    return accs, _run_ranks(size, body), names


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 7, 8, 11])
@pytest.mark.parametrize("wire", ["float32", "float16"])
def test_grouped_driver_equals_the_reference_buffer_by_buffer_with_one_allgather_a_stage(
        size, wire):
    numels = [257, 3, 40, 1]
    ks = [k_for(d, 0.05) for d in numels]
    accs, results, names = _grouped_run(size, numels, lambda r: ks, lambda r: 0, wire)
    stages = len(stages_for(0, size))
    assert all(len(c) == stages for c in names.values()), names  # one allgather a stage
    for b, k in enumerate(ks):
        want = gtopk_step(accs[b], k, wire=wire)
        for rank, res in enumerate(results):
            got = res[b]
            np.testing.assert_array_equal(got.indices, want.indices, err_msg=f"{b} {rank}")
            np.testing.assert_array_equal(got.values, want.values, err_msg=f"{b} {rank}")
            np.testing.assert_array_equal(got.alive, want.alive[rank], err_msg=f"{b} {rank}")
            assert got.verdict == 0
    for rank, res in enumerate(results):  # the same bytes as one exchange of sum(ks) entries
        assert sum(r.bytes_sent for r in res) == gtopk_wire_bytes(sum(ks), rank, size, wire)


@pytest.mark.parametrize("size", [2, 3, 5, 8])
def test_grouped_driver_nonfinite_and_mismatch_reach_every_rank_without_extra_ops(size):
    numels = [257, 40, 9]
    ks = [k_for(d, 0.05) for d in numels]
    _, results, names = _grouped_run(size, numels, lambda r: ks,
                                     lambda r: NONFINITE if r == size - 1 else 0)
    assert all(res[b].verdict == NONFINITE for res in results for b in range(3))
    other = [ks[0] + 1] + ks[1:]  # one rank keeps another k: its messages do not fit
    _, results, names = _grouped_run(size, numels, lambda r: other if r == 1 else ks,
                                     lambda r: 0)
    assert all(res[b].verdict & MISMATCH for res in results for b in range(3))
    assert len({len(c) for c in names.values()}) == 1, names


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 7, 8, 11])
@pytest.mark.parametrize("algorithm", ["gtopk", "topk"])
def test_float16_wire_on_every_rank_equals_the_reference(size, algorithm):
    rng = np.random.default_rng(size + 7)
    d = 257
    k = k_for(d, 0.05)
    # values with more mantissa than float16 holds, so the rounding shows
    accs = [(rng.standard_normal(d) * 3 + 1e-3).astype(np.float32) for _ in range(size)]
    step = gtopk_step if algorithm == "gtopk" else topk_allgather_step
    want, exact = step(accs, k, wire="float16"), step(accs, k)

    def body(rank, ops):
        if algorithm == "topk":
            return topk_allgather_exchange(ops, accs[rank], k, tuple(range(size)), size,
                                           name="t", wire="float16")
        return gtopk_exchange(ops, accs[rank], k, rank, size, _group, name="t", wire="float16")

    kept_rounding = []
    for rank, res in enumerate(_run_ranks(size, body)):
        if algorithm == "gtopk":
            np.testing.assert_array_equal(res.indices, want.indices, err_msg=f"rank {rank}")
            np.testing.assert_array_equal(res.values, want.values, err_msg=f"rank {rank}")
            assert res.bytes_sent == gtopk_wire_bytes(k, rank, size, "float16")
        eps = accs[rank].copy()
        applied = res.local_indices[res.alive]
        eps[applied] = accs[rank][applied] - res.local_values[res.alive]
        np.testing.assert_array_equal(eps, want.residuals[rank])
        kept_rounding.append(np.any(eps != exact.residuals[rank]))
    assert any(kept_rounding)  # what the rounding took off stays in the residuals
    if algorithm == "gtopk" and size > 1:
        assert not np.array_equal(want.values, exact.values)
        np.testing.assert_allclose(want.values, exact.values, rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("size", [2, 3, 5])
def test_float16_overflow_on_one_rank_is_a_nonfinite_step_for_every_rank(size):
    accs = [np.arange(16, dtype=np.float32) * (70000.0 if r == size - 1 else 1.0)
            for r in range(size)]

    def body(rank, ops):
        return gtopk_exchange(ops, accs[rank], 4, rank, size, _group, wire="float16")

    assert [res.verdict for res in _run_ranks(size, body)] == [NONFINITE] * size


def test_float16_wire_messages_take_6_bytes_an_entry():
    assert message_bytes(10, "float16") == 8 + 60
    assert message_bytes(11, "float16") == 8 + 44 + 24  # padded to an even count
    assert message_bytes(10) == 8 + 80
    assert topk_wire_bytes(10, 4, "float16") == 3 * 68


@pytest.mark.parametrize("size,rows", [
    (1, [0]), (2, [5, 5]), (4, [10, 10, 10, 10]),
    # P = 3: one ring allgather of the three sets (header + 4 rows each): 2 blocks leave each
    (3, [10, 10, 10]),
    # P = 5: stage 0 {0, 1, 4} and {2, 3}, stage 1 {0, 2, 4} (4 sends a header only) and
    # {1, 3}; a rank forwards every block of its group but its right neighbour's
    (5, [10 + 6, 10 + 5, 5 + 10, 5 + 5, 10 + 6]),
])
def test_driver_bytes_sent_follow_the_ring_allgather_of_each_group(size, rows):
    accs = [np.arange(16, dtype=np.float32) * (r + 1) for r in range(size)]

    def body(rank, ops):
        return gtopk_exchange(ops, accs[rank], 4, rank, size, _group)

    for rank, res in enumerate(_run_ranks(size, body)):
        assert res.bytes_sent == 8 * rows[rank], rank


@pytest.mark.parametrize("size", [2, 3, 4, 5, 6, 7, 8, 12])
def test_every_rank_runs_the_same_number_of_exchanges(size):
    counts = {len(stages_for(r, size)) for r in range(size)}
    assert counts == {size.bit_length() - 1}


@pytest.mark.parametrize("size", [2, 3, 5, 6, 7, 8])
@pytest.mark.parametrize("bad_rank", [0, -1])
def test_a_nonfinite_flag_on_one_rank_reaches_every_rank(size, bad_rank):
    bad_rank %= size
    accs = [np.arange(16, dtype=np.float32) for _ in range(size)]

    def body(rank, ops):
        return gtopk_exchange(ops, accs[rank], 4, rank, size, _group, digest=7,
                              flags=NONFINITE if rank == bad_rank else 0)

    assert [res.verdict for res in _run_ranks(size, body)] == [NONFINITE] * size


@pytest.mark.parametrize("size", [2, 3, 5, 6, 7, 8])
def test_a_digest_that_differs_on_one_rank_raises_mismatch_on_every_rank(size):
    accs = [np.arange(16, dtype=np.float32) for _ in range(size)]
    ks = [4] * size
    ks[size - 1] = 3  # a different k too: messages of another length must still parse

    def body(rank, ops):
        return gtopk_exchange(ops, accs[rank], ks[rank], rank, size, _group,
                              digest=99 if rank == size - 1 else 98)

    assert [res.verdict & MISMATCH for res in _run_ranks(size, body)] == [MISMATCH] * size


def test_meta_keeps_digest_and_flags_apart():
    a, b = make_meta(12345), make_meta(12345, NONFINITE)
    assert merge_meta(a, b) & (NONFINITE | MISMATCH) == NONFINITE
    assert merge_meta(a, make_meta(12346)) & MISMATCH == MISMATCH
    assert merge_meta(a, a) == a
    big = make_meta((1 << 29) - 1, MISMATCH)  # the top digest bit makes a negative int32
    assert -(1 << 31) <= big < 0 and big & MISMATCH
    assert ring_bytes((0, 1, 4), 4, {0: 4, 1: 4, 4: 0}) == 8 * 6
    assert ring_bytes((0, 1, 4), 4, {0: 4, 1: 4, 4: 0}, "float16") == 8 + 4 * 4 + 2 * 4 + 8


# --- hvd.join(): a joined rank contributes zeros and has no plan to compare ------------------

def test_joined_meta_is_a_wildcard_and_survives_only_where_both_sides_joined():
    mine, theirs = make_meta(98), make_meta(99, JOINED)
    assert merge_meta(mine, theirs) == mine  # nothing compared, nothing joined
    assert merge_meta(theirs, mine) == mine  # the joined side takes the other side's digest
    assert merge_meta(theirs, make_meta(5, JOINED)) & ALL_FLAGS == JOINED
    assert merge_meta(make_meta(99, JOINED | NONFINITE), mine) & ALL_FLAGS == NONFINITE


@pytest.mark.parametrize("size", [2, 3, 5, 6, 7])
def test_joined_ranks_contribute_zeros_and_the_result_is_the_reference_with_zeros(size):
    rng = np.random.default_rng(70 + size)
    d, k = 64, 5
    joined = {0, size - 1} if size > 2 else {1}
    accs = [np.zeros(d, np.float32) if r in joined else rng.standard_normal(d).astype(np.float32)
            for r in range(size)]
    want = gtopk_step(accs, k)

    def body(rank, ops):  # the joined ranks' digest differs: it is not compared
        return gtopk_exchange(ops, accs[rank], k, rank, size, _group,
                              digest=1234 if rank in joined else 77,
                              flags=JOINED if rank in joined else 0)

    for rank, res in enumerate(_run_ranks(size, body)):
        np.testing.assert_array_equal(res.indices, want.indices, err_msg=f"rank {rank}")
        np.testing.assert_array_equal(res.values, want.values, err_msg=f"rank {rank}")
        assert res.verdict == 0, (rank, res.verdict)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_when_every_rank_joined_every_rank_sees_joined(size):
    def body(rank, ops):
        return gtopk_exchange(ops, np.zeros(8, np.float32), 2, rank, size, _group,
                              digest=rank, flags=JOINED)

    assert [res.verdict for res in _run_ranks(size, body)] == [JOINED] * size


@pytest.mark.parametrize("size", [3, 5, 6, 7])
def test_a_mismatch_between_active_ranks_is_found_across_joined_ones(size):
    def body(rank, ops):  # rank 0 joined; the two last ranks disagree
        return gtopk_exchange(ops, np.ones(8, np.float32), 2, rank, size, _group,
                              digest=5 if rank == size - 1 else 6,
                              flags=JOINED if rank == 0 else 0)

    assert [res.verdict & MISMATCH for res in _run_ranks(size, body)] == [MISMATCH] * size


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_topk_allgather_driver_equals_its_reference(size):
    rng = np.random.default_rng(size)
    accs = [rng.integers(-5, 6, 100).astype(np.float32) for _ in range(size)]
    want = topk_allgather_step(accs, 6)
    group = tuple(range(size))

    def body(rank, ops):
        return topk_allgather_exchange(ops, accs[rank], 6, group, size)

    for res in _run_ranks(size, body):
        total = np.zeros(100, np.float32)
        np.add.at(total, res.indices, res.values)
        np.testing.assert_array_equal(total[want.indices], want.values)
        np.testing.assert_array_equal(np.flatnonzero(total != 0),
                                      want.indices[want.values != 0])


def test_reduce_op_name_reads_the_ops_of_the_horovod_module():
    from gtopk_hvd.common.collective import reduce_op_name

    class FakeHvd:  # horovod.torch / horovod.tensorflow expose the ops as attributes
        Average, Sum, Adasum, Min, Max, Product = range(6)
    assert [reduce_op_name(FakeHvd, op) for op in range(6)] == [
        "Average", "Sum", "Adasum", "Min", "Max", "Product"]
    assert reduce_op_name(FakeHvd, 17) == "17"
    assert reduce_op_name(object(), FakeHvd.Sum) == "1"  # a module without the ops
    assert reduce_op_name(FakeHvd, [1]) == "[1]"


def test_dense_allreduce_bytes_is_the_ring_volume():
    from gtopk_hvd.common.collective import dense_allreduce_bytes
    assert dense_allreduce_bytes(1000, 1) == 0
    assert dense_allreduce_bytes(1000, 2) == 4000
    assert dense_allreduce_bytes(25_000_000, 4) == 150_000_000


# --- the verdict carried by a dense allreduce (algorithm="auto" after its first step) --------

@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16])
@pytest.mark.parametrize("average", [True, False])
def test_dense_tail_carries_the_same_verdict_as_the_headers(size, average):
    import numpy as np
    from gtopk_hvd.common.collective import (MISMATCH, NONFINITE, VERDICT_TAIL, tail_verdict,
                                             verdict_tail)

    def reduce(tails, dtype=np.float32):
        total = np.sum(np.array(tails, dtype=dtype), axis=0, dtype=dtype)
        return (total / dtype(size)).astype(dtype) if average else total

    digest = 0x2bcd1234
    same = [verdict_tail(digest) for _ in range(size)]
    assert len(same[0]) == VERDICT_TAIL
    assert tail_verdict(reduce(same), size, average) == 0
    assert tail_verdict(reduce(same, np.float16), size, average) == 0
    one_nan = [verdict_tail(digest, NONFINITE if r == size - 1 else 0) for r in range(size)]
    assert tail_verdict(reduce(one_nan), size, average) == NONFINITE
    if size > 1:
        for bit in (0, 17, 28):  # one rank's digest differs in one bit
            other = [verdict_tail(digest ^ (1 << bit) if r == 0 else digest)
                     for r in range(size)]
            assert tail_verdict(reduce(other), size, average) == MISMATCH
    if size > 1:  # a joined rank: zeros in the digest bits, not a mismatch
        joined = [verdict_tail(digest ^ 0xff if r == 0 else digest, JOINED if r == 0 else 0)
                  for r in range(size)]
        assert tail_verdict(reduce(joined), size, average) == 0
        assert tail_verdict(reduce(joined, np.float16), size, average) == 0
        if size > 2:
            other = [verdict_tail(digest ^ (1 << 3) if r == 1 else digest,
                                  JOINED if r == 0 else 0) for r in range(size)]
            assert tail_verdict(reduce(other), size, average) == MISMATCH
    every = [verdict_tail(r, JOINED) for r in range(size)]
    assert tail_verdict(reduce(every), size, average) == JOINED
    nan_tail = np.full(VERDICT_TAIL, np.nan, dtype=np.float32)
    assert tail_verdict(nan_tail, size, average) & NONFINITE
    with pytest.raises(ValueError, match="tail entries"):
        tail_verdict([0.0] * 3, size, average)
