"""Scenarios: gTop-k inside ordinary TensorFlow training programs.

The WORLD_SIZE scenarios run at P = 3 and the OWN_ARITHMETIC ones at P = 2 in tf_worker.py's
jobs, the WORLD_SIZE ones at P = 5 too under ``make test-stress`` (``--world-size-only``;
test_tf_robustness.py).  Unnamed Horovod collectives
between steps, NaN / Inf in one rank's gradients, a variable without a gradient on some ranks,
set-ups that differ across ranks; eagerly and in ``tf.function``.  The linear loss of
training_worker.py makes every rank's gradients known from seeds, so each rank checks itself
against reference_steps.ReferenceModel.  The job ends with Horovod's own shutdown (no
barrier).
"""
import sys

import horovod.tensorflow as plain_hvd
import numpy as np
from _common import assert_equal, same_on_every_rank, start
from reference_steps import ReferenceModel, rank_grads
from training_worker import (SHAPES, SPLIT_LINK, assert_split_equal, linear_loss,
                             make_variables, tape_step_fn)

from gtopk_hvd.common import PlanMismatchError

MODES = ("eager", "graph")


def unnamed_collectives(tf, hvd, rec, rank, size):
    for mode, auto in [(m, a) for a in (False, True) for m in MODES]:
        # auto: algorithm="auto" with the link that sends the two small tensors densely at
        # density 0.05 (training_worker.SPLIT_LINK; from the second eager step the dense
        # allreduce goes first, carrying the verdict)
        with rec(f"tape_{mode}_{'auto_' if auto else ''}unnamed_collectives_after_every_step"):
            variables = make_variables(tf, prefix=f"u{mode}{auto}")
            state = hvd.GTopkState(0.05, algorithm="auto", granularity="layer",
                                   link=SPLIT_LINK) if auto else hvd.GTopkState(0.1)
            step = tape_step_fn(tf, hvd, variables, mode, gtopk_state=state)
            ref = ReferenceModel(SHAPES, size, 0.05, "layer", dense_threshold=20) if auto \
                else ReferenceModel(SHAPES, size, 0.1)
            for t in range(3):
                got = step([tf.constant(g) for g in rank_grads(7, t, rank, SHAPES)])
                want = ref.step([rank_grads(7, t, p, SHAPES) for p in range(size)])
                for j in range(len(SHAPES)):
                    if auto:
                        assert_split_equal(got[j], want[j], j, f"step {t} variable {j}")
                    else:
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


def _scaled_loss_fn(tf):
    """sum(sin(w * G)) with a backward pass that multiplies the gradient by ``factor`` (inf to
    overflow one rank without making its loss non-finite)."""
    @tf.custom_gradient
    def poison(x, factor):
        return tf.identity(x), lambda dy: (dy * factor, tf.zeros_like(factor))

    def loss(variables, grads, factor):
        terms = [tf.reduce_sum(tf.sin(v * g)) for v, g in zip(variables, grads)]
        return poison(tf.add_n(terms), factor)
    return loss


def _loss_scale_run(tf, hvd, rank, size, how, steps, lso=None, overflow_at=None, prefix="",
                    hierarchical=False):
    """``steps`` steps of SGD(0.5) on the sine loss with gTop-k (density 0.1, graph mode) wired
    as ``how``; ``lso``: the LossScaleOptimizer's (initial_scale, growth_steps) or None;
    ``hierarchical``: hierarchical gTop-k (workers/hierarchical_worker.py).
    Returns [(variables, loss scale, loss)] after every step, and the gTop-k state."""
    import gtopk_hvd.tensorflow.keras as hvd_keras
    legacy = how.endswith("legacy")
    sgd = (tf.keras.optimizers.legacy.SGD if legacy else tf.keras.optimizers.SGD)(0.5)
    lso_cls = tf.keras.mixed_precision.LossScaleOptimizer

    def wrap(opt):
        if lso is None:
            return opt
        return lso_cls(opt, initial_scale=lso[0], dynamic_growth_steps=lso[1])
    variables = make_variables(tf, prefix=f"ls{prefix}{how}{lso is not None}")
    loss_fn = _scaled_loss_fn(tf)
    state = hvd.GTopkState(0.1)
    if how.startswith("tape"):
        opt = wrap(sgd)

        def step(grads, factor):
            with tf.GradientTape() as tape:
                loss = loss_fn(variables, grads, factor)
                target = opt.get_scaled_loss(loss) if lso else loss
            tape = hvd.DistributedGradientTape(tape, gtopk_state=state,
                                               loss_scale_optimizer=opt if lso else None,
                                               hierarchical=hierarchical)
            got = tape.gradient(target, variables)
            opt.apply_gradients(zip(opt.get_unscaled_gradients(got) if lso else got,
                                    variables))
            return loss
    else:
        if how.startswith("keras_outside"):  # DistributedOptimizer(LossScaleOptimizer(SGD))
            opt = hvd_keras.DistributedOptimizer(wrap(sgd), gtopk_state=state,
                                                 hierarchical=hierarchical)
        else:  # LossScaleOptimizer(DistributedOptimizer(SGD)), as mixed_float16 compile does
            opt = wrap(hvd_keras.DistributedOptimizer(sgd, gtopk_state=state,
                                                      hierarchical=hierarchical))

        def step(grads, factor):
            holder = []

            def compute():
                holder.append(loss_fn(variables, grads, factor))
                return holder[-1]
            opt.minimize(compute, variables)
            return holder[-1]
    fn = tf.function(step)
    history = []
    for t in range(steps):
        factor = float("inf") if t == overflow_at and rank == size - 1 else 1.0
        loss = fn([tf.constant(g) for g in rank_grads(21, t, rank, SHAPES)], tf.constant(factor))
        history.append(([v.numpy().copy() for v in variables],
                        float(opt.loss_scale) if lso else 1.0, float(loss)))
    return history, state


LOSS_SCALE_WIRINGS = ("tape", "keras_outside", "keras_inside", "keras_inside_legacy")


def loss_scaling(tf, hvd, rec, rank, size):
    plains = {}  # without a LossScaleOptimizer keras_outside and keras_inside are one wiring
    for how in LOSS_SCALE_WIRINGS:
        with rec(f"{how}_loss_scale_bit_identical_to_the_unscaled_run_across_scale_growth"):
            wiring = how.replace("_outside", "_inside")
            if wiring not in plains:
                plains[wiring], _ = _loss_scale_run(tf, hvd, rank, size, how, 6)
            plain = plains[wiring]
            scaled, state = _loss_scale_run(tf, hvd, rank, size, how, 6, lso=(16.0, 2))
            scales = [s for _, s, _ in scaled]
            assert scales[-1] > scales[0], f"the scale never grew: {scales}"
            for t, ((a, _, _), (b, _, _)) in enumerate(zip(plain, scaled)):
                for j in range(len(SHAPES)):
                    assert_equal(b[j], a[j], f"variable {j} after step {t + 1} (scales {scales})")
            stats = state.gtopk_stats()
            assert stats["step"] == 6 and stats["nonfinite_steps"] == 0, stats
            # the tape reduces scaled gradients (the scale of the last step: before its update),
            # the optimizer the unscaled ones
            assert stats["loss_scale"] == (scales[-2] if how == "tape" else 1.0), stats
    for how in LOSS_SCALE_WIRINGS:
        with rec(f"{how}_overflow_on_one_rank_skips_one_step_everywhere"):
            history, state = _loss_scale_run(tf, hvd, rank, size, how, 5, lso=(2.0 ** 8, 1000),
                                             overflow_at=2, prefix="o")
            scales = [s for _, s, _ in history]
            assert scales == [2.0 ** 8] * 2 + [2.0 ** 7] * 3, scales
            for j in range(len(SHAPES)):
                assert_equal(history[2][0][j], history[1][0][j], f"variable {j} at the skip")
            assert any(not np.array_equal(a, b) for a, b in zip(history[3][0], history[2][0]))
            assert all(np.isfinite(loss) for _, _, loss in history), history
            stats = state.gtopk_stats()
            assert stats["nonfinite_steps"] == 1 and stats["step"] == 4, stats
            assert all(np.isfinite(e.numpy()).all() for e in state.residuals.values())
            assert same_on_every_rank(tf, hvd, [tf.constant(w) for w in history[-1][0]],
                                      f"overflow.{how}")


def mixed_float16_fit(tf, hvd, rec, rank, size):
    import gtopk_hvd.tensorflow.keras as hvd_keras
    with rec("keras_fit_mixed_float16_policy_wraps_the_gtopk_optimizer_and_trains"):
        tf.keras.mixed_precision.set_global_policy("mixed_float16")
        try:
            tf.keras.utils.set_random_seed(rank)
            rng = np.random.default_rng([23, rank])
            x = rng.standard_normal((64, 10)).astype(np.float32)
            y = (x[:, 0] - x[:, 2] > 0).astype(np.int64)
            model = tf.keras.Sequential([
                tf.keras.layers.Dense(16, activation="relu", input_shape=(10,)),
                tf.keras.layers.Dense(2), tf.keras.layers.Activation("linear", dtype="float32")])
            opt = hvd_keras.DistributedOptimizer(tf.keras.optimizers.SGD(0.1), density=0.1)
            model.compile(optimizer=opt,
                          loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False,
                                callbacks=[hvd_keras.callbacks.BroadcastGlobalVariablesCallback(0)])
        finally:
            tf.keras.mixed_precision.set_global_policy("float32")
        wrapper = model.optimizer
        assert type(wrapper).__name__.startswith("LossScaleOptimizer"), type(wrapper)
        assert wrapper.inner_optimizer is opt
        assert all(np.isfinite(history.history["loss"])), history.history
        stats = opt.gtopk_stats()
        assert stats["step"] == 8 and stats["loss_scale"] == 1.0, stats
        assert same_on_every_rank(tf, hvd, model.variables, "mixed.same")


# what depends on the world size (the operations every rank issues, the verdict reaching
def uneven_data_join(tf, hvd, rec, rank, size):
    """Rank r has 2 + r batches, then calls hvd.join(): the tape's gradients equal the
    reference in which the ranks that joined contribute zeros and keep their residuals (eager
    and tf.function), join() returns the last rank on every rank, every rank leaves with the
    same variables (and a Keras optimizer's momentum), and unnamed collectives go on."""
    import gtopk_hvd.tensorflow.keras as hvd_keras
    batches = [2 + r for r in range(size)]
    for mode in MODES:
        with rec(f"tape_{mode}_join_with_uneven_data"):
            variables = make_variables(tf, prefix=f"j{mode}")
            state = hvd.GTopkState(0.1)
            step = tape_step_fn(tf, hvd, variables, mode, gtopk_state=state)
            ref = ReferenceModel(SHAPES, size, 0.1)
            for t in range(max(batches)):
                joined = {q for q in range(size) if t >= batches[q]}
                want = ref.step([rank_grads(31, t, p, SHAPES) for p in range(size)], joined)
                if t < batches[rank]:
                    got = step([tf.constant(g) for g in rank_grads(31, t, rank, SHAPES)])
                    for j, (v, g) in enumerate(zip(variables, got)):
                        assert_equal(g, want[j], f"step {t} variable {j}")
                        v.assign_sub(0.5 * g)
                if t + 1 == batches[rank]:
                    kept = {n: e.numpy().copy() for n, e in state.residuals.items()}
            assert hvd.join() == size - 1
            assert same_on_every_rank(tf, hvd, variables, f"join.{mode}")
            for n, e in state.residuals.items():
                assert_equal(e, kept[n], f"residual {n}")
            assert_equal(np.concatenate([e.numpy() for e in state.residuals.values()]),
                         np.concatenate([e.reshape(-1) for e in ref.residuals(rank)]),
                         "residuals against the reference")
            assert state.step == max(batches), state.step
            total = hvd.allreduce(tf.constant([float(rank)]), op=hvd.Sum)
            assert float(total[0]) == size * (size - 1) / 2, total
    with rec("keras_join_with_uneven_data_hands_over_momentum"):
        variables = make_variables(tf, prefix="jk")
        opt = hvd_keras.DistributedOptimizer(tf.keras.optimizers.SGD(0.5, momentum=0.9),
                                             density=0.1)

        @tf.function
        def train_step(grads):
            opt.minimize(lambda: linear_loss(tf, variables, grads), variables)
        for t in range(batches[rank]):
            train_step([tf.constant(g) for g in rank_grads(32, t, rank, SHAPES)])
        assert hvd.join() == size - 1
        assert same_on_every_rank(tf, hvd, variables, "join.keras")
        train_step([tf.constant(g) for g in rank_grads(32, max(batches), rank, SHAPES)])
        assert same_on_every_rank(tf, hvd, variables, "join.keras.next")


# every rank); ``--world-size-only`` runs just these (test_tf_robustness.py at P = 5 under
# make test-stress; at P = 3 in tf_worker.py's ``world`` job); the loss-scaling arithmetic,
# which is each rank's own, runs at P = 2 (tf_worker.py's ``own`` job)
WORLD_SIZE = (unnamed_collectives, nonfinite, missing_gradient, mismatches, uneven_data_join)
OWN_ARITHMETIC = (loss_scaling, mixed_float16_fit)


def main():
    tf, hvd, rec = start()
    rank, size = hvd.rank(), hvd.size()
    only = "--world-size-only" in sys.argv[1:]
    for scenario in WORLD_SIZE + (() if only else OWN_ARITHMETIC):
        scenario(tf, hvd, rec, rank, size)
    rec.save()
    plain_hvd.shutdown()  # Horovod's own, no barrier


if __name__ == "__main__":
    main()
