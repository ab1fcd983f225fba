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
from gtopk_hvd.common.collective import gtopk_exchange, topk_allgather_exchange
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

    def exchange(self, values, indices, group, name):
        rows = np.stack([values.astype(np.float32).view(np.int32), indices.astype(np.int32)], 1)
        out = self.mailbox.allgather(group, self.rank, rows.reshape(-1, 2), name)
        return out[:, 0].copy().view(np.float32), out[:, 1].copy()

    def merge_truncate(self, low, high, k):
        s = truncate(merge(SparseSet(low[1].astype(np.int64), low[0]),
                           SparseSet(high[1].astype(np.int64), high[0])), k)
        return s.values, s.indices.astype(np.int32)

    def isin(self, a, b):
        return np.isin(a, b)

    def logical_and(self, a, b):
        return a & b

    def mask_select(self, x, mask):
        return x[mask]

    def full_mask(self, k):
        return np.ones(k, dtype=bool)

    def encode_flags(self, indices, flags):
        return np.where(flags, -indices - 1, indices).astype(np.int32)

    def decode_flags(self, coded):
        flags = coded < 0
        return np.where(flags, -coded - 1, coded).astype(np.int32), flags

    def empty(self):
        return np.zeros(0, np.float32), np.zeros(0, np.int32)


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


def _group(rank, stage):
    return tuple(sorted((rank, stage.partner)))


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
                              lambda st, r=rank: _group(r, st), name="t")

    for rank, res in enumerate(_run_ranks(size, body)):
        np.testing.assert_array_equal(res.indices, want.indices, err_msg=f"rank {rank}")
        np.testing.assert_array_equal(res.values, want.values, err_msg=f"rank {rank}")
        np.testing.assert_array_equal(res.local_indices, want.local_indices[rank])
        np.testing.assert_array_equal(res.alive, want.alive[rank], err_msg=f"rank {rank}")
        eps = accs[rank].copy()
        eps[res.local_indices[res.alive]] = 0
        np.testing.assert_array_equal(eps, want.residuals[rank])
        assert res.bytes_sent % (8 * k) == 0


@pytest.mark.parametrize("size,bytes_stages", [(1, [0]), (2, [1, 1]), (3, [2, 1, 1]),
                                               (4, [2, 2, 2, 2]), (5, [3, 2, 2, 2, 1])])
def test_driver_bytes_sent_is_8k_per_sending_stage(size, bytes_stages):
    accs = [np.arange(16, dtype=np.float32) * (r + 1) for r in range(size)]

    def body(rank, ops):
        return gtopk_exchange(ops, accs[rank], 4, rank, size, lambda st, r=rank: _group(r, st))

    for rank, res in enumerate(_run_ranks(size, body)):
        assert res.bytes_sent == 8 * 4 * bytes_stages[rank]


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
