"""Scenarios: Horovod's own ``horovod.tensorflow.DistributedGradientTape`` and
``horovod.tensorflow.keras.DistributedOptimizer`` with
``compression=gtopk_hvd.tensorflow.Compression.gtopk(...)``, against the NumPy reference at
layer granularity.  Run from training_worker.py (test_tf_training.py, P = 2, 3, 4).
"""
import numpy as np
from _common import assert_equal, rank_array, same_on_every_rank
from reference_steps import ReferenceModel, rank_grads

SHAPES = [(40, 12), (12,), (12, 3), (3,)]


def _linear_loss(tf, variables, grads):
    return tf.add_n([tf.reduce_sum(v * g) for v, g in zip(variables, grads)])


def _variables(tf, prefix):
    return [tf.Variable(tf.zeros(s), name=f"{prefix}{j}") for j, s in enumerate(SHAPES)]


def horovod_tape(tf, hvd, rec, rank, size):
    import horovod.tensorflow as horovod_tf
    for mode, algorithm in (("eager", "gtopk"), ("graph", "gtopk"), ("graph", "topk")):
        with rec(f"horovod_tape_{mode}_{algorithm}_compressor_equals_layer_reference"):
            variables = _variables(tf, f"cmp{mode}{algorithm}")
            compressor = hvd.Compression.gtopk(density=0.05, algorithm=algorithm)

            def step(grads):
                with tf.GradientTape() as tape:
                    loss = _linear_loss(tf, variables, grads)
                tape = horovod_tf.DistributedGradientTape(tape, compression=compressor)
                return tape.gradient(loss, variables)
            step = tf.function(step) if mode == "graph" else step
            seed = 400 + len(mode) + len(algorithm)
            outputs = [[g.numpy() for g in step([tf.constant(g) for g in
                                                 rank_grads(seed, t, rank, SHAPES)])]
                       for t in range(3)]
            ref = ReferenceModel(SHAPES, size, 0.05, "layer", algorithm=algorithm)
            for t, got in enumerate(outputs):
                want = ref.step([rank_grads(seed, t, p, SHAPES) for p in range(size)])
                for j in range(len(SHAPES)):
                    assert_equal(got[j], want[j], f"step {t} variable {j}")
            residuals = compressor.residuals
            assert sorted(residuals) == ["0", "1", "2", "3"], sorted(residuals)
            for j, eps in enumerate(ref.residuals(rank)):
                assert_equal(residuals[str(j)], eps, f"residual {j}")


def horovod_keras(tf, hvd, rec, rank, size):
    import horovod.tensorflow.keras as horovod_keras
    for legacy in (False, True):
        with rec(f"horovod_keras_{'legacy_' if legacy else ''}optimizer_compressor_equals_"
                 f"layer_reference"):
            variables = _variables(tf, f"cmpk{legacy}")
            sgd = tf.keras.optimizers.legacy.SGD if legacy else tf.keras.optimizers.SGD
            compressor = hvd.Compression.gtopk(density=0.05)
            opt = horovod_keras.DistributedOptimizer(sgd(0.5), compression=compressor)

            @tf.function
            def train_step(grads):
                opt.minimize(lambda: _linear_loss(tf, variables, grads), variables)
            for t in range(3):
                train_step([tf.constant(g) for g in rank_grads(410, t, rank, SHAPES)])
            ref = ReferenceModel(SHAPES, size, 0.05, "layer")
            w = [np.zeros(s, np.float32) for s in SHAPES]
            for t in range(3):
                update = ref.step([rank_grads(410, t, p, SHAPES) for p in range(size)])
                w = [wj + (-uj * np.float32(0.5)) for wj, uj in zip(w, update)]
            for j in range(len(SHAPES)):
                assert_equal(variables[j], w[j], f"variable {j}")


def horovod_keras_fit(tf, hvd, rec, rank, size):
    import horovod.tensorflow.keras as horovod_keras
    with rec("horovod_keras_fit_with_compressor_trains_identically_on_every_rank"):
        tf.keras.utils.set_random_seed(5)
        model = tf.keras.Sequential([tf.keras.layers.Dense(16, activation="tanh",
                                                           input_shape=(8,)),
                                     tf.keras.layers.Dense(1)])
        compressor = hvd.Compression.gtopk(density=0.1)
        model.compile(optimizer=horovod_keras.DistributedOptimizer(
            tf.keras.optimizers.SGD(0.05), compression=compressor), loss="mse")
        rng = np.random.default_rng([7, rank])
        x = rng.standard_normal((64, 8)).astype(np.float32)
        y = x[:, :1] * 2.0
        cbs = [horovod_keras.callbacks.BroadcastGlobalVariablesCallback(0)]
        history = model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=cbs)
        same = same_on_every_rank(tf, hvd, model.trainable_variables, "cmp.fit.same")
        assert same, "ranks differ"
        losses = history.history["loss"]
        assert losses[-1] < losses[0], losses
        assert len(compressor.residuals) == 4, compressor.residuals


def nonfinite(tf, hvd, rec, rank, size):
    import horovod.tensorflow as horovod_tf
    with rec("horovod_tape_compressor_nan_on_one_rank_gives_nan_everywhere_residuals_kept"):
        variables = _variables(tf, "cmpnan")
        compressor = hvd.Compression.gtopk(density=0.05)

        @tf.function
        def step(grads):
            with tf.GradientTape() as tape:
                loss = _linear_loss(tf, variables, grads)
            tape = horovod_tf.DistributedGradientTape(tape, compression=compressor)
            return tape.gradient(loss, variables)
        step([tf.constant(g) for g in rank_grads(420, 0, rank, SHAPES)])
        before = {k: v.numpy().copy() for k, v in compressor.residuals.items()}
        grads = rank_grads(420, 1, rank, SHAPES)
        if rank == size - 1:
            grads[0][0, 0] = np.nan
        out = [g.numpy() for g in step([tf.constant(g) for g in grads])]
        assert np.isnan(out[0]).all(), "the poisoned tensor is not NaN"
        assert all(np.isfinite(o).all() for o in out[1:])
        assert_equal(compressor.residuals["0"], before["0"], "residual of the NaN tensor")
        assert all(np.isfinite(v.numpy()).all() for v in compressor.residuals.values())


def direct_allreduce(tf, hvd, rec, rank, size):
    import horovod.tensorflow as horovod_tf
    with rec("tf_hvd_allreduce_with_gtopk_compression_equals_gtopk_allreduce"):
        x = tf.constant(rank_array(430, rank, 500))
        compressor = hvd.Compression.gtopk(density=0.05)
        got = [horovod_tf.allreduce(x, name="cmp.direct", compression=compressor)
               for _ in range(3)]
        residual, want = None, []
        for _ in range(3):
            res = hvd.gtopk_allreduce(x, density=0.05, name="cmp.functional", residual=residual)
            residual = res.residual
            want.append(res.output)
        error = None
        try:
            horovod_tf.allreduce(x, compression=compressor)
        except ValueError as exc:
            error = str(exc)
        for t, (g, w) in enumerate(zip(got, want)):
            assert_equal(g, w.numpy(), f"call {t}")
        assert_equal(compressor.residuals["cmp.direct"], residual.numpy(), "residual")
        assert error is not None and "name=" in error, error


SCENARIOS = [horovod_tape, horovod_keras, horovod_keras_fit, nonfinite, direct_allreduce]
