"""Scenarios: gTop-k inside ordinary TensorFlow training programs, at world sizes 3 and 5.

Run under ``horovodrun -np N`` by test_tf_robustness.py.  Unnamed Horovod collectives
between steps, NaN / Inf in one rank's gradients, a variable without a gradient on some ranks,
set-ups that differ across ranks; eagerly and in ``tf.function``.  The linear loss of
training_worker.py makes every rank's gradients known from seeds, so each rank checks itself
against reference_steps.ReferenceModel.  The job ends with Horovod's own shutdown (no
barrier).
"""
import horovod.tensorflow as plain_hvd
import numpy as np
from _common import assert_equal, same_on_every_rank, start
from reference_steps import ReferenceModel, rank_grads
from training_worker import SHAPES, make_variables, tape_step_fn

from gtopk_hvd.common import PlanMismatchError

MODES = ("eager", "graph")


def unnamed_collectives(tf, hvd, rec, rank, size):
    for mode in MODES:
        with rec(f"tape_{mode}_unnamed_collectives_after_every_step"):
            variables = make_variables(tf, prefix=f"u{mode}")
            state = hvd.GTopkState(0.1)
            step = tape_step_fn(tf, hvd, variables, mode, gtopk_state=state)
            ref = ReferenceModel(SHAPES, size, 0.1)
            for t in range(3):
                got = step([tf.constant(g) for g in rank_grads(7, t, rank, SHAPES)])
                want = ref.step([rank_grads(7, t, p, SHAPES) for p in range(size)])
                for j in range(len(SHAPES)):
                    assert_equal(got[j], want[j], f"step {t} variable {j}")
                # what users write between steps: no name= anywhere
                total = hvd.allreduce(tf.constant([float(rank)]), op=hvd.Sum)
                assert float(total[0]) == size * (size - 1) / 2, total
                ranks = hvd.allgather(tf.constant([rank]))
                assert ranks.numpy().tolist() == list(range(size)), ranks
                root = hvd.broadcast(tf.constant([rank * 10.0]), root_rank=size - 1)
                assert float(root[0]) == (size - 1) * 10.0


def nonfinite(tf, hvd, rec, rank, size):
    bad = size - 1
    for mode in MODES:
        for granularity in ("model", "layer"):
            with rec(f"tape_{mode}_{granularity}_nan_on_one_rank_gives_nan_everywhere_"
                     f"residuals_kept"):
                variables = make_variables(tf, prefix=f"n{mode}{granularity}")
                state = hvd.GTopkState(0.1, granularity=granularity)
                step = tape_step_fn(tf, hvd, variables, mode, gtopk_state=state)
                ref = ReferenceModel(SHAPES, size, 0.1, granularity)
                for t in range(4):
                    grads = rank_grads(9, t, rank, SHAPES)
                    if t == 1:
                        before = {n: e.numpy().copy() for n, e in state.residuals.items()}
                        if rank == bad:
                            grads[0][2, 3] = np.nan if granularity == "model" else np.inf
                    got = step([tf.constant(g) for g in grads])
                    if t == 1:
                        assert all(np.isnan(g.numpy()).all() for g in got), "not NaN everywhere"
                        for n, e in state.residuals.items():
                            assert_equal(e, before[n], f"residual {n}")
                        stats = state.gtopk_stats()
                        assert stats["nonfinite_steps"] == 1 and not stats["finite"], stats
                        continue  # the reference never sees the bad step
                    want = ref.step([rank_grads(9, t, p, SHAPES) for p in range(size)])
                    for j in range(len(SHAPES)):
                        assert_equal(got[j], want[j], f"step {t} variable {j}")
                assert state.gtopk_stats()["step"] == 3


def missing_gradient(tf, hvd, rec, rank, size):
    for mode in MODES:
        with rec(f"tape_{mode}_variable_without_gradient_on_some_ranks_counts_as_zero"):
            variables = make_variables(tf, prefix=f"m{mode}")
            state = hvd.GTopkState(0.2, granularity="layer")

            def step(grads, use_last):
                with tf.GradientTape() as tape:
                    used = variables if use_last else variables[:-1]
                    loss = tf.add_n([tf.reduce_sum(v * g) for v, g in zip(used, grads)])
                tape = hvd.DistributedGradientTape(tape, gtopk_state=state)
                return tape.gradient(loss, variables)
            fn = tf.function(step) if mode == "graph" else step
            ref = ReferenceModel(SHAPES, size, 0.2, "layer")
            for t in range(2):
                grads = rank_grads(13, t, rank, SHAPES)
                got = fn([tf.constant(g) for g in grads], rank == 0)
                all_grads = [rank_grads(13, t, p, SHAPES) for p in range(size)]
                for p in range(1, size):  # only rank 0 reaches the last variable
                    all_grads[p][-1] = np.zeros(SHAPES[-1], np.float32)
                want = ref.step(all_grads)
                for j in range(len(SHAPES)):
                    assert_equal(got[j], want[j], f"step {t} variable {j}")


def mismatches(tf, hvd, rec, rank, size):
    odd = rank == size - 1
    for mode in MODES:
        with rec(f"tape_{mode}_mismatched_density_raises_on_every_rank"):
            variables = make_variables(tf, prefix=f"x{mode}")
            state = hvd.GTopkState(0.2 if odd else 0.1)
            step = tape_step_fn(tf, hvd, variables, mode, gtopk_state=state)
            try:
                step([tf.constant(g) for g in rank_grads(3, 0, rank, SHAPES)])
            except (PlanMismatchError, tf.errors.OpError) as exc:
                assert "gTop-k set-ups differ" in str(exc) and f"rank {size - 1}" in str(exc), exc
            else:
                raise AssertionError("a density that differs across ranks was not refused")
        with rec(f"tape_{mode}_mismatched_granularity_raises_on_every_rank"):
            variables = make_variables(tf, prefix=f"y{mode}")
            state = hvd.GTopkState(0.1, granularity="layer" if odd else "model")
            step = tape_step_fn(tf, hvd, variables, mode, gtopk_state=state)
            try:
                step([tf.constant(g) for g in rank_grads(4, 0, rank, SHAPES)])
            except (PlanMismatchError, tf.errors.OpError) as exc:
                assert "granularity" in str(exc), exc
            else:
                raise AssertionError("a granularity that differs across ranks was not refused")
    with rec("training_goes_on_after_a_refused_step"):
        variables = make_variables(tf, prefix="z")
        step = tape_step_fn(tf, hvd, variables, "eager", gtopk_state=hvd.GTopkState(0.1))
        got = step([tf.constant(g) for g in rank_grads(5, 0, rank, SHAPES)])
        assert same_on_every_rank(tf, hvd, got, "after.mismatch")


def main():
    tf, hvd, rec = start()
    rank, size = hvd.rank(), hvd.size()
    for scenario in (unnamed_collectives, nonfinite, missing_gradient, mismatches):
        scenario(tf, hvd, rec, rank, size)
    rec.save()
    plain_hvd.shutdown()  # Horovod's own, no barrier


if __name__ == "__main__":
    main()
