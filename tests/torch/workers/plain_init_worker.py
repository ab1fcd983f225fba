"""Scenarios run while Horovod is initialised by a plain ``hvd.init()`` (no dynamic sets).

Run first by torch_worker.py.  gTop-k's pair process sets cannot be registered then: for
P >= 3 the optimizer and gtopk_allreduce must raise ProcessSetError on every rank, naming the
fix, before communicating; for P = 2 the only pair is the global set, so both work.  Top-k by
allgather uses the global set only and works for every P.
"""
import numpy as np
import torch
from _common import assert_equal, rank_array

from gtopk_hvd.common import ProcessSetError, k_for
from gtopk_hvd.common.reference import gtopk_step, topk_allgather_step


def expect_process_set_error(size, fn, text):
    """P >= 4: ``fn`` raises ProcessSetError mentioning ``text``; P = 2 and 3 exchange in the
    global set only (one group of every rank): it returns."""
    try:
        out = fn()
    except ProcessSetError as exc:
        assert size >= 4, f"P={size} needs no extra process set, yet: {exc}"
        assert text in str(exc), exc
        return None
    assert size <= 3, f"P={size} without dynamic process sets did not raise ProcessSetError"
    return out


def optimizer(hvd, rec, rank, size):
    with rec("plain_init_optimizer_raises_process_set_error_unless_p2_or_3"):
        model = torch.nn.Linear(4, 2)
        expect_process_set_error(size, lambda: hvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            named_parameters=model.named_parameters()), "gtopk_hvd.torch.init()")


def collective(hvd, rec, rank, size):
    with rec("plain_init_gtopk_allreduce_raises_process_set_error_unless_p2_or_3"):
        d = 64
        accs = [rank_array(6, p, d) for p in range(size)]
        res = expect_process_set_error(size, lambda: hvd.gtopk_allreduce(
            torch.from_numpy(accs[rank]), density=0.1, name="plain"),
            "HOROVOD_DYNAMIC_PROCESS_SETS")
        if res is not None:
            assert_equal(res.output, gtopk_step(accs, k_for(d, 0.1)).dense(d, size), "P=2, 3")
    with rec("plain_init_topk_algorithm_needs_no_exchange_sets"):
        d = 300
        accs = [rank_array(5, p, d) for p in range(size)]
        res = hvd.gtopk_allreduce(torch.from_numpy(accs[rank]), density=0.02, algorithm="topk",
                                  name="plain.topk")
        want = topk_allgather_step(accs, k_for(d, 0.02))
        assert_equal(res.output, want.dense(d, average_over=size), "topk output")
        assert np.any(res.output.numpy() != 0)


SCENARIOS = (optimizer, collective)
