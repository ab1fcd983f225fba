"""Scenarios: hierarchical gTop-k with TensorFlow (``gtopk_allreduce(..., hierarchical=True)``,
eagerly) on two nodes of two ranks emulated by horovodrun's ``-H localhost:2,127.0.0.1:2``;
every rank against the NumPy reference (the same checks as the PyTorch worker,
tests/torch/workers/hierarchical_worker.py, whose inputs these are).
"""
import numpy as np
from _common import assert_equal, finish, start

from gtopk_hvd.common.hierarchy import shard_bounds
from gtopk_hvd.common.plan import PlanMismatchError
from gtopk_hvd.common.process_sets import job_layout
from gtopk_hvd.common.reference import hierarchical_step

D = 103


def grads_for(step, rank):
    return np.random.default_rng([77, step, rank]).standard_normal(D).astype(np.float32)


def main():
    tf, hvd, rec = start(hierarchical=True)
    rank, size = hvd.rank(), hvd.size()
    layout = job_layout(hvd)
    local = layout.local_size
    shards = shard_bounds(D, local)
    with rec("hierarchical_allreduce_equals_the_reference_every_step"):
        assert layout.mode == "hierarchical", layout
        eps = None
        ref_eps = [np.zeros(shards[p % local][1] - shards[p % local][0], np.float32)
                   for p in range(size)]
        for t in range(3):
            grads = [grads_for(t, p) for p in range(size)]
            want = hierarchical_step(grads, ref_eps, local, 0.05)
            res = hvd.gtopk_allreduce(tf.constant(grads[rank]), density=0.05, residual=eps,
                                      name="h", hierarchical=True)
            eps = res.residual
            assert_equal(res.output, want.dense(D) / size, f"output at step {t}")
            assert_equal(eps, want.residuals[rank], f"residual at step {t}")
            ref_eps = want.residuals
            total = hvd.allreduce(tf.constant([float(rank)]), op=hvd.Sum)  # unnamed
            assert float(total[0]) == size * (size - 1) / 2, total
    with rec("hierarchical_nan_on_one_rank_gives_nan_everywhere_residuals_kept"):
        grad = grads_for(9, rank)
        if rank == size - 1:
            grad[5] = np.nan
        res = hvd.gtopk_allreduce(tf.constant(grad), density=0.05, residual=eps, name="h",
                                  hierarchical=True)
        assert not res.finite and np.isnan(res.output.numpy()).all()
        assert_equal(res.residual, eps, "residual kept")
    with rec("hierarchical_on_some_ranks_only_is_refused_on_every_rank"):
        grad = tf.constant(grads_for(11, rank))
        for attempt, hierarchical in enumerate((rank != 0, True)):  # the same name twice
            try:
                res = hvd.gtopk_allreduce(grad, density=0.05, name="hm",
                                          hierarchical=hierarchical)
            except PlanMismatchError as exc:
                assert attempt == 0 and "hierarchical=True" in str(exc), exc
            else:
                assert attempt == 1, "one flat rank among hierarchical ones was accepted"
                assert np.isfinite(res.output.numpy()).all()
            total = hvd.allreduce(tf.constant([float(rank)]), op=hvd.Sum)  # unnamed
            assert float(total[0]) == size * (size - 1) / 2, total
    finish(tf, hvd, rec)


if __name__ == "__main__":
    main()
