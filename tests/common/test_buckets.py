"""Buckets and the pipelined exchange order (gtopk_hvd.common.buckets), without Horovod.

The order is checked on its own (every advance once, stages in order, bucket 0 first) and by
running it: P threads play the ranks, each driving one exchange generator per bucket
(gtopk_exchange_steps) through an asynchronous in-memory allgather, with buckets that become
ready at random moments on each rank and non-blocking advances in between, as the PyTorch
hooks do.  Every bucket's result must equal the reference on that bucket, with no deadlock;
ranks whose bucket counts differ must all stop after bucket 0 with the MISMATCH flag.
"""
import random

import numpy as np
import pytest

from gtopk_hvd.common import k_for
from gtopk_hvd.common.buckets import make_buckets, pipeline_order
from gtopk_hvd.common.collective import MISMATCH, drive, gtopk_exchange_steps
from gtopk_hvd.common.reference import gtopk_step
from gtopk_hvd.common.schedule import world_split
from tests.common.test_collective import NumpyOps, _group, _Mailbox, _run_ranks

MIB = 1 << 20


def test_buckets_take_tensors_from_the_last_with_a_small_first_bucket():
    # float32 MiB: 262144 entries; the first bucket closes at 1 MiB, the others at the cap
    numels = [100, 300_000, 50, 200_000, 200_000, 70_000, 10]
    assert make_buckets(numels, bucket_cap_mb=1.5) == [[4, 5, 6], [1, 2, 3], [0]]
    assert make_buckets(numels, bucket_cap_mb=0.5) == [[4, 5, 6], [3], [1, 2], [0]]
    assert make_buckets(numels, bucket_cap_mb=100) == [[4, 5, 6], [0, 1, 2, 3]]
    assert make_buckets([], 25) == []


@pytest.mark.parametrize("cap", [1e-5, 0.01, 1, 25])
def test_every_tensor_in_exactly_one_bucket(cap):
    rng = np.random.default_rng(3)
    numels = [int(n) for n in rng.integers(1, 400_000, 40)]
    buckets = make_buckets(numels, cap)
    assert sorted(i for b in buckets for i in b) == list(range(len(numels)))
    assert all(b == sorted(b) for b in buckets)
    # reverse registration order: every bucket's tensors come before the previous bucket's
    assert all(max(later) < min(earlier) for earlier, later in zip(buckets, buckets[1:]))
    for b, bucket in enumerate(buckets[:-1]):  # closed once full, not before
        limit = min(cap, 1.0) if b == 0 else cap
        assert 4 * sum(numels[i] for i in bucket) >= limit * MIB
        assert 4 * sum(numels[i] for i in bucket[1:]) < limit * MIB


@pytest.mark.parametrize("cap", [0, -1, float("nan"), float("inf"), "25", True, None])
def test_bad_cap_is_refused_with_the_fix(cap):
    with pytest.raises(ValueError, match="bucket_cap_mb must be a positive number.*pass"):
        make_buckets([10], cap)


def test_pipeline_order_is_bucket_zero_first_then_stage_by_stage():
    assert pipeline_order(3, 2) == [(0, 0), (0, 1), (0, 2),
                                    (1, 0), (2, 0), (1, 1), (2, 1), (1, 2), (2, 2)]
    assert pipeline_order(3, 0) == [(0, 0), (1, 0), (2, 0)]
    assert pipeline_order(1, 3) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert pipeline_order(0, 2) == []


@pytest.mark.parametrize("buckets", [1, 2, 5, 9])
@pytest.mark.parametrize("stages", [0, 1, 2, 3])
def test_pipeline_order_holds_every_advance_once_in_stage_order(buckets, stages):
    order = pipeline_order(buckets, stages)
    assert sorted(order) == [(b, s) for b in range(buckets) for s in range(stages + 1)]
    pos = {item: i for i, item in enumerate(order)}
    for b in range(buckets):
        assert all(pos[(b, s)] < pos[(b, s + 1)] for s in range(stages))
        if b:  # nothing of another bucket before bucket 0 is done; selections in bucket order
            assert pos[(b, 0)] > pos[(0, stages)] and pos[(b, 0)] > pos[(b - 1, 0)]
        # every other bucket's stage 0 starts before any of them waits
        assert all(pos[(b, 0)] < pos[(c, 1)] for c in range(1, buckets) if stages)


class _AsyncMailbox(_Mailbox):
    """Horovod's allgather_async / poll / synchronize among threads."""

    def submit(self, group, rank, rows, name):
        with self.cond:
            self.slots.setdefault((group, name), {})[rank] = rows
            self.cond.notify_all()
        return group, name

    def poll(self, handle):
        with self.cond:
            return len(self.slots[handle]) == len(handle[0])

    def wait(self, handle):
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.slots[handle]) == len(handle[0]), 10), \
                f"deadlock: {handle} never completed"
            return np.concatenate([self.slots[handle][r] for r in handle[0]], axis=0)


def _pipelined(rank, size, ops, accs, ks, seed):
    """One rank of a bucketed step: buckets become ready in a random interleaving with
    non-blocking advances (the hooks), then every advance blocks (synchronize())."""
    mailbox, stages = ops.mailbox, world_split(size)[0]
    order, pos = pipeline_order(len(accs), stages), [0]
    steps, handles, results, verdict = {}, {}, {}, [0]
    ready = set()

    def resume(b, gathered):
        try:
            message, group, name = next(steps[b]) if gathered is None else \
                steps[b].send(gathered)
            handles[b] = mailbox.submit(group, rank, message, name)
        except StopIteration as done:
            results[b] = done.value[0]
            verdict[0] |= done.value[0].verdict

    def advance(block):
        while pos[0] < len(order):
            b, s = order[pos[0]]
            if s == 0:
                if not (block or b in ready):
                    return
                steps[b] = gtopk_exchange_steps(ops, [accs[b]], [ks[b]], rank, size, _group,
                                                name=f"p.{b}", digest=len(accs))
                resume(b, None)
            else:
                if not (block or mailbox.poll(handles[b])):
                    return
                resume(b, mailbox.wait(handles[b]))
            pos[0] += 1
            if b == 0 and s == stages and verdict[0] & MISMATCH:
                pos[0] = len(order)  # as BucketPipeline: nothing more is issued

    rng = random.Random(seed * 100 + rank)
    for b in rng.sample(range(len(accs)), len(accs)):  # gradients arrive in any order
        ready.add(b)
        advance(block=False)
    advance(block=True)
    return results, verdict[0]


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_pipelined_buckets_equal_the_reference_bucket_by_bucket(size, seed):
    rng = np.random.default_rng(seed * 31 + size)
    numels = [37, 300, 5, 128, 64]
    accs = [[rng.standard_normal(d).astype(np.float32) for _ in range(size)] for d in numels]
    ks = [k_for(d, 0.1) for d in numels]
    mailbox = _AsyncMailbox()

    def body(rank, ops):
        ops.mailbox = mailbox
        return _pipelined(rank, size, ops, [a[rank] for a in accs], ks, seed)

    for rank, (results, verdict) in enumerate(_run_ranks(size, body)):
        assert verdict == 0
        for b, d in enumerate(numels):
            want = gtopk_step(accs[b], ks[b])
            np.testing.assert_array_equal(results[b].indices, want.indices)
            np.testing.assert_array_equal(results[b].values, want.values)
            np.testing.assert_array_equal(results[b].alive, want.alive[rank])


@pytest.mark.parametrize("size", [2, 3, 4, 5, 8])
def test_ranks_with_other_bucket_counts_all_stop_after_bucket_zero(size):
    rng = np.random.default_rng(size)
    mailbox = _AsyncMailbox()

    def body(rank, ops):
        ops.mailbox = mailbox
        buckets = 4 if rank == size - 1 else 2  # the digest counts the buckets
        accs = [rng.standard_normal(50).astype(np.float32) for _ in range(buckets)]
        return _pipelined(rank, size, ops, accs, [5] * buckets, seed=7)

    for results, verdict in _run_ranks(size, body):
        assert verdict & MISMATCH and list(results) == [0]


@pytest.mark.parametrize("size", [1, 3, 4, 8])
def test_the_generator_requests_one_allgather_per_stage_named_by_stage(size):
    rng = np.random.default_rng(size)
    accs = [rng.standard_normal(90).astype(np.float32) for _ in range(size)]
    names = {}

    def body(rank, ops):
        def allgather(message, group, name):
            names.setdefault(rank, []).append(name)
            return ops.allgather(message, group, name)
        steps = gtopk_exchange_steps(ops, [accs[rank]], [9], rank, size, _group, name="a")
        return drive(steps, allgather)[0]

    want = gtopk_step(accs, 9)
    for rank, result in enumerate(_run_ranks(size, body)):
        np.testing.assert_array_equal(result.values, want.values)
        assert names.get(rank, []) == [f"a.s{s}" for s in range(world_split(size)[0])]
