"""Scenarios: hierarchical gTop-k (``gtopk_allreduce(..., hierarchical=True)``) on emulated
nodes: horovodrun's ``-H localhost:2,127.0.0.1:2`` is two nodes of two ranks.  Every rank
checks its output and its shard's residual against the NumPy reference of the hierarchical
algorithm (gtopk_hvd.common.reference.hierarchical_step), bit for bit, every step.
"""
import numpy as np
import torch
from _common import Recorder, assert_equal

import gtopk_hvd.torch as hvd
from gtopk_hvd.common.hierarchy import shard_bounds
from gtopk_hvd.common.process_sets import job_layout
from gtopk_hvd.common.reference import hierarchical_step

D = 103


def grads_for(step, rank, integer=False):
    rng = np.random.default_rng([77, step, rank])
    if integer:
        return rng.integers(-5, 6, D).astype(np.float32)
    return rng.standard_normal(D).astype(np.float32)


def main():
    torch.set_num_threads(1)
    hvd.init(hierarchical=True)
    rank, size = hvd.rank(), hvd.size()
    layout = job_layout(hvd)
    local = layout.local_size  # 1 where the layout falls back to flat gTop-k
    rec = Recorder(rank)
    shards = shard_bounds(D, local)
    lo, hi = shards[rank % local]
    with rec("layout") as data:
        data["layout"] = (layout.nodes, layout.local_size, layout.mode)
    with rec("hierarchical_allreduce_equals_the_reference_every_step"):
        eps = torch.zeros(hi - lo)
        ref_eps = [np.zeros(shards[p % local][1] - shards[p % local][0], np.float32)
                   for p in range(size)]
        for t in range(3):
            grads = [grads_for(t, p) for p in range(size)]
            want = hierarchical_step(grads, ref_eps, local, 0.05)
            res = hvd.gtopk_allreduce(torch.from_numpy(grads[rank]), density=0.05,
                                      residual=eps, name="h", hierarchical=True)
            assert res.residual is eps
            assert_equal(res.output, want.dense(D) / size, f"output at step {t}")
            assert_equal(eps, want.residuals[rank], f"residual at step {t}")
            ref_eps = want.residuals
            total = hvd.allreduce(torch.tensor([float(rank)]), op=hvd.Sum)  # unnamed
            assert total.item() == size * (size - 1) / 2, total
    with rec("hierarchical_nan_on_one_rank_gives_nan_everywhere_residuals_kept"):
        grad = torch.from_numpy(grads_for(9, rank))
        if rank == size - 1:
            grad[5] = float("nan")
        before = eps.clone()
        res = hvd.gtopk_allreduce(grad, density=0.05, residual=eps, name="h",
                                  hierarchical=True)
        assert not res.finite and torch.isnan(res.output).all(), res.output
        assert torch.equal(eps, before)
    with rec("hierarchical_density_1_is_the_dense_sum"):
        grads = [grads_for(10, p, integer=True) for p in range(size)]
        res = hvd.gtopk_allreduce(torch.from_numpy(grads[rank]), density=1.0, op=hvd.Sum,
                                  name="h1", hierarchical=True)
        assert_equal(res.output, np.sum(grads, axis=0), "density 1")
    with rec("hierarchical_bad_residual_is_refused_before_communicating"):
        try:
            hvd.gtopk_allreduce(torch.zeros(D), residual=torch.zeros(D + 1), name="h2",
                                hierarchical=True)
        except ValueError as exc:
            assert "residual" in str(exc), exc
        else:
            raise AssertionError("a residual of the wrong size was accepted")
    rec.save()
    hvd.shutdown()


if __name__ == "__main__":
    main()
