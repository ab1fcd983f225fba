"""Horovod's own TensorFlow tape and Keras tests, re-written for gTop-k at density 1.

Horovod v0.28.1's ``test/parallel/test_tensorflow2_keras.py`` and the tape tests of
``test_tensorflow.py`` check the Keras ``DistributedOptimizer``, its callbacks, Elastic's
``KerasState`` and ``PartialDistributedGradientTape`` through the behaviours below (each
scenario names the test it follows; docs/compatibility.md has the table).  Every behaviour
runs three ways in one process, as in tests/torch/workers/horovod_parity_worker.py:

- ``horovod``: Horovod's own optimizer or tape (the oracle);
- ``drop_in``: gtopk_hvd's (``density=1.0``);
- ``compressor``: Horovod's with ``compression=Compression.gtopk(density=1.0)``.

Every variable is read through :func:`exact`, whose gradient is rounded to a multiple of
1/16 in [-1024, 1024], so every sum over ranks is exact in any order and the drop-in and the
Compressor must give the oracle's variables bit for bit.  The op is Average where P is a power
of two and Sum elsewhere (gTop-k divides by P, Horovod multiplies by float32(1 / P): see the
torch worker).  Keras models compile with ``run_eagerly=True`` (no tracing: a TF start is the
expensive part of these jobs).  Run by tf_worker.py in the P = 2 and P = 3 jobs.
"""
import numpy as np
import horovod.tensorflow as horovod_tf
import horovod.tensorflow.keras as horovod_keras
import tensorflow as tf
from _common import assert_equal

import gtopk_hvd.tensorflow.keras as gtopk_keras
from gtopk_hvd.tensorflow import Compression
from tests.parity_cases import CLIP, GRID, MODES, averages
from tests.parity_cases import agree_with_horovod as agree



def op_for(size):
    return horovod_tf.Average if averages(size) else horovod_tf.Sum


@tf.custom_gradient
def _rounded_identity(x):
    return tf.identity(x), lambda dy: tf.round(tf.clip_by_value(dy, -CLIP, CLIP) * GRID) / GRID


def exact(variable):
    """``variable``'s value; its gradient rounded to a multiple of 1/16 in [-1024, 1024]."""
    return _rounded_identity(variable)


class ExactDense(tf.keras.layers.Dense):
    """Dense whose kernel and bias gradients are rounded (sums over ranks exact)."""

    def call(self, inputs):
        out = tf.matmul(inputs, exact(self.kernel))
        return out + exact(self.bias) if self.use_bias else out


def keras_optimizer(mode, optimizer, size, **kwargs):
    kwargs.setdefault("op", op_for(size))
    if mode == "horovod":
        return horovod_keras.DistributedOptimizer(optimizer, **kwargs)
    if mode == "drop_in":
        return gtopk_keras.DistributedOptimizer(optimizer, density=1.0, **kwargs)
    return horovod_keras.DistributedOptimizer(
        optimizer, compression=Compression.gtopk(density=1.0), **kwargs)


def weights(model):
    return [w.copy() for w in model.get_weights()]


def agree_with_horovod(results, what):
    """Every mode in ``results`` equals the oracle's, bit for bit."""
    agree(results, what, assert_equal)


def constant_model(rank, layers=(2, 3), width=3):
    """Horovod's partial-tape model shape (Dense layers, Constant(rank) initialisers), with
    exact gradients."""
    init = tf.keras.initializers.Constant(float(rank))
    model = tf.keras.Sequential([ExactDense(n, kernel_initializer=init, bias_initializer=init)
                                 for n in layers])
    model.build((None, width))
    return model


def partial_tape(tf_, hvd, rec, rank, size):
    """test_partial_distributed_gradient_tape: one local layer of two (Horovod: 0, 1, 2; no
    local layer is the plain tape, tested in training_worker.py); a local layer's
    gradient is this rank's own (scaled by 1 / P, Horovod's scale_local_gradients), the
    others are reduced."""
    results = {}
    x = tf.constant(np.arange(3, dtype=np.float32).reshape(1, 3) + rank)
    y = tf.constant(np.ones((1, 3), np.float32) * (rank + 1))
    for mode in MODES:
        with rec(f"horovod_test_partial_distributed_gradient_tape_{mode}"):
            out = []
            model = constant_model(rank)
            for local in (1,):
                with tf.GradientTape(persistent=True) as tape:
                    loss = tf.reduce_sum((model(x) - y) ** 2)
                own = tape.gradient(loss, model.trainable_weights)
                kwargs = dict(local_layers=model.layers[:local], op=op_for(size))
                if mode == "horovod":
                    tape = horovod_tf.PartialDistributedGradientTape(tape, **kwargs)
                elif mode == "drop_in":
                    tape = hvd.PartialDistributedGradientTape(tape, density=1.0, **kwargs)
                else:
                    tape = horovod_tf.PartialDistributedGradientTape(
                        tape, compression=Compression.gtopk(density=1.0), **kwargs)
                grads = tape.gradient(loss, model.trainable_weights)
                local_vars = {v.ref() for layer in model.layers[:local]
                              for v in layer.trainable_weights}
                for v, g, o in zip(model.trainable_weights, grads, own):
                    if v.ref() in local_vars:
                        assert_equal(g, o.numpy() / size, f"{local} local layers: {v.name}")
                out.extend(g.numpy() for g in grads)
            results[mode] = out
    with rec("horovod_test_partial_distributed_gradient_tape_agrees_with_horovod"):
        agree_with_horovod(results, "partial tape")


def _lr(optimizer):
    lr = getattr(optimizer, "lr", None)
    lr = optimizer.learning_rate if lr is None else lr
    return float(tf.keras.backend.get_value(lr))


def fit_with_callbacks(tf_, hvd, rec, rank, size):
    """test_train_model_lr_schedule and test_legacy_optimizer: compile / fit with
    BroadcastGlobalVariablesCallback, MetricAverageCallback and the learning-rate warm-up and
    schedule callbacks, with a ``keras.optimizers.legacy`` Adam: the learning rate of every
    epoch, the averaged loss and the weights are Horovod's.  (The other scenarios use the
    current optimizers.)"""
    initial_lr = 0.125 * size
    results, rates = {}, {}
    x = np.random.RandomState(rank).randint(-2, 3, (8, 3)).astype(np.float32)
    y = np.random.RandomState(10 + rank).randint(-2, 3, (8, 2)).astype(np.float32)
    for mode in MODES:
        with rec(f"horovod_test_train_model_lr_schedule_{mode}") as data:
            tf.keras.utils.set_random_seed(1000 + rank)  # ranks differ until the broadcast
            model = tf.keras.Sequential([ExactDense(2)])
            model.build((None, 3))
            opt = keras_optimizer(mode, tf.keras.optimizers.legacy.Adam(), size)
            model.compile(loss="mse", optimizer=opt, run_eagerly=True)
            cb = gtopk_keras.callbacks if mode == "drop_in" else horovod_keras.callbacks
            seen = []
            record = tf.keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: seen.append(_lr(model.optimizer)))
            history = model.fit(x, y, batch_size=4, epochs=8, verbose=0, shuffle=False,
                                callbacks=[
                                    cb.BroadcastGlobalVariablesCallback(0),
                                    cb.MetricAverageCallback(),
                                    cb.LearningRateWarmupCallback(initial_lr=initial_lr,
                                                                  warmup_epochs=2),
                                    cb.LearningRateScheduleCallback(
                                        initial_lr=initial_lr, multiplier=1e-1, start_epoch=2,
                                        end_epoch=4),
                                    cb.LearningRateScheduleCallback(
                                        initial_lr=initial_lr, multiplier=1e-2, start_epoch=4,
                                        end_epoch=6),
                                    cb.LearningRateScheduleCallback(
                                        initial_lr=initial_lr, multiplier=lambda e: e,
                                        start_epoch=6, end_epoch=8),
                                    record])
            losses = np.array(history.history["loss"], np.float32)
            from_root = horovod_tf.broadcast(tf.constant(losses), root_rank=0,
                                             name=f"fit.losses.{mode}").numpy()
            data["rates"] = seen
            rates[mode] = seen
            assert_equal(losses, from_root, "the averaged loss, every rank")
            assert all(np.isclose(r, initial_lr * e) for e, r in enumerate(seen) if e >= 6), seen
            results[mode] = weights(model)
    with rec("horovod_test_train_model_lr_schedule_agrees_with_horovod"):
        agree_with_horovod(results, "fit with Horovod's callbacks")
        assert rates["drop_in"] == rates["horovod"] == rates["compressor"], rates


def sparse_as_dense(tf_, hvd, rec, rank, size):
    """test_sparse_as_dense and test_sparse_as_dense_with_grad_aggregation: an Embedding
    (IndexedSlices gradients) with RMSprop, sparse_as_dense=True, with and without
    backward_passes_per_step=2 (three batches: one update).  The Compressor refuses: Horovod
    densifies inside a tf.function, where the gradient has no static shape for a residual
    (the error names the drop-in, which takes the shape from the variable)."""
    results = {}
    x = np.random.RandomState(20 + rank).randint(50, size=(8, 4))
    y = np.random.RandomState(30 + rank).randint(-2, 3, (8, 4, 6)).astype(np.float32)
    for mode in MODES:
        with rec(f"horovod_test_sparse_as_dense_{mode}"):
            out, refusal = [], None
            for passes in (1, 2):
                tf.keras.utils.set_random_seed(2000)
                model = tf.keras.Sequential([tf.keras.layers.Embedding(50, 6)])
                model.build((None, 4))
                opt = keras_optimizer(mode, tf.keras.optimizers.RMSprop(0.0625), size,
                                      sparse_as_dense=True, backward_passes_per_step=passes)
                model.compile(loss=lambda t, p: tf.reduce_sum(t * p, axis=-1),
                              optimizer=opt, run_eagerly=True)
                before = weights(model)
                try:
                    for _ in range(3 if passes == 2 else 1):
                        model.train_on_batch(x, y)
                except ValueError as err:  # raised before any communication
                    refusal = str(err)
                    break
                after = weights(model)
                if passes == 2:  # a third pass only accumulates: the weights moved once
                    moved = [not np.array_equal(a, b) for a, b in zip(after, before)]
                    assert all(moved), moved
                out.extend(after)
            if mode == "compressor":
                assert refusal is not None and "static shape" in refusal, refusal
                assert "gtopk_hvd.tensorflow.keras.DistributedOptimizer" in refusal, refusal
            else:
                assert refusal is None, refusal
                results[mode] = out
    with rec("horovod_test_sparse_as_dense_agrees_with_horovod"):
        agree_with_horovod(results, "sparse_as_dense")  # the drop-in (the Compressor refuses)


def from_config(tf_, hvd, rec, rank, size):
    """test_from_config: get_config / from_config round trip, on the instance and the class."""
    for mode in MODES:
        with rec(f"horovod_test_from_config_{mode}"):
            hopt = keras_optimizer(mode, tf.keras.optimizers.Adam(), size)
            cfg = hopt.get_config()
            assert hopt.from_config(cfg).get_config() == cfg
            assert hopt.__class__.from_config(cfg).get_config() == cfg


def elastic_state(tf_, hvd, rec, rank, size):
    """test_elastic_state: KerasState.sync takes rank 0's weights, batch and epoch; restore
    goes back to the last commit; commit keeps the new values."""
    for mode in MODES:
        with rec(f"horovod_test_elastic_state_{mode}"):
            v = 1.0 if rank == 0 else 2.0
            model1 = tf.keras.Sequential([tf.keras.layers.Dense(2, activation="softmax")])
            model1.build((2, 2))
            model1.set_weights([np.full((2, 2), v, np.float32), np.full(2, v, np.float32)])
            model2 = tf.keras.Sequential([tf.keras.layers.Dense(2, activation="softmax")])
            model2.build((2, 2))
            model2.set_weights([np.array([[1.0, 2.0], [3.0, 4.0]], np.float32),
                                np.zeros(2, np.float32)])
            opt = keras_optimizer(mode, tf.keras.optimizers.Adam(0.001 * size), size)
            elastic = gtopk_keras.elastic if mode == "drop_in" else horovod_keras.elastic
            state = elastic.KerasState(model1, opt, batch=20 + rank, epoch=10 + rank)
            state.sync()
            synced = model1.get_weights()
            for w in synced:
                assert_equal(w, np.ones_like(w), "weights after sync")
            assert (state.batch, state.epoch) == (20, 10), (state.batch, state.epoch)
            model1.set_weights(model2.get_weights())
            state.batch, state.epoch = 21, 11
            state.restore()
            for w1, w2 in zip(model1.get_weights(), synced):
                assert_equal(w1, w2, "weights after restore")
            assert (state.batch, state.epoch) == (20, 10)
            model1.set_weights(model2.get_weights())
            state.batch, state.epoch = 21, 11
            state.commit()
            state.restore()
            for w1, w2 in zip(model1.get_weights(), model2.get_weights()):
                assert_equal(w1, w2, "weights after commit and restore")
            assert (state.batch, state.epoch) == (21, 11)


class _AssignAdd(tf.keras.optimizers.legacy.Optimizer):
    """Horovod's TestingOptimizer: var += grad."""

    def __init__(self, name="test", **kwargs):
        super().__init__(name=name, **kwargs)

    def get_config(self):
        return super().get_config()

    def _create_slots(self, var_list):
        pass

    def _resource_apply_dense(self, grad, var, apply_state=None):
        return var.assign_add(grad)


def gradient_aggregation(tf_, hvd, rec, rank, size):
    """test_gradient_aggregation and test_gradient_aggregation_with_local_vars: four backward
    passes a step, averaged or summed, inside a tf.function through ``_compute_gradients``;
    one x and one y registered local (Horovod: four of each, four local).  Expected values
    computed in closed form (Horovod's) and equal to Horovod's optimizer's."""
    passes, steps = 4, 10
    results = {}
    for mode in MODES:
        # the Compressor sees the aggregated tensors only (Horovod's helper aggregates)
        for average in (True,) if mode == "compressor" else (True, False):
            with rec(f"horovod_test_gradient_aggregation_{'average' if average else 'sum'}"
                     f"_{mode}"):
                opt = keras_optimizer(mode, _AssignAdd(), size, op=horovod_tf.Average,
                                      backward_passes_per_step=passes,
                                      average_aggregated_gradients=average,
                                      sparse_as_dense=True)
                _ = opt.iterations
                xs = [tf.Variable([0.0]) for _ in range(2)]
                ys = [tf.Variable([1.0, 2.0]) for _ in range(2)]
                for v in (xs[0], ys[0]):
                    opt.register_local_var(v)

                def loss():
                    gathered = tf.gather(tf.stack(ys), [0], axis=1)
                    return tf.stack(xs) - float(rank + 1) * gathered

                @tf.function
                def step():
                    grads_and_vars = opt._compute_gradients(loss, var_list=xs + ys)
                    opt.apply_gradients(grads_and_vars, experimental_aggregate_gradients=False)

                history = []
                for idx in range(steps):
                    step()
                    n = (idx + 1) // passes * (1 if average else passes)
                    # local: this rank's gradient / P; global: the average over ranks
                    want_x = [n / size, float(n)]
                    want_y0 = [1.0 - n * (rank + 1) / size, 1.0 - n * (size + 1) / 2]
                    got = [v.numpy() for v in xs + ys]
                    for i in range(2):
                        assert np.isclose(got[i][0], want_x[i]), (idx, i, got[i], want_x[i])
                        assert np.isclose(got[2 + i][0], want_y0[i]), (idx, i, got[2 + i])
                        assert got[2 + i][1] == 2.0, got[2 + i]
                    assert opt.iterations.numpy() == idx + 1
                    history.extend(got)
                assert int(opt._agg_helper.counter.numpy()) == steps % passes
                results.setdefault(average, {})[mode] = history
    with rec("horovod_test_gradient_aggregation_agrees_with_horovod"):
        for average, by_mode in results.items():
            agree_with_horovod(by_mode, f"gradient aggregation, average={average}")


def broadcast_callback_local_vars(tf_, hvd, rec, rank, size):
    """test_broadcast_global_variables_callback_with_local_vars: the callback with
    ``local_variables`` from the last rank: those keep this rank's values, the others take the
    root's.  Horovod's test compiles a plain optimizer (nothing trainable): only the callbacks
    module differs, so it runs for the drop-in (Horovod's callback is the oracle's own)."""
    root = size - 1
    with rec("horovod_test_broadcast_callback_with_local_vars_drop_in"):
        init = tf.keras.initializers.Constant(float(rank))
        model = tf.keras.Sequential([tf.keras.layers.Dense(
            3, kernel_initializer=init, bias_initializer=init, trainable=False)
            for _ in range(3)])
        model.build((None, 3))
        model.compile(loss="mse", run_eagerly=True)
        local = list(model.layers[0].variables)
        model.fit(np.ones((1, 3), np.float32), np.ones((1, 3), np.float32), verbose=0,
                  callbacks=[gtopk_keras.callbacks.BroadcastGlobalVariablesCallback(
                      root_rank=root, local_variables=local)])
        local_refs = {v.ref() for v in local}
        for v in model.variables:
            want = float(rank) if v.ref() in local_refs else float(root)
            assert_equal(v.numpy(), np.full(v.shape, want, np.float32), v.name)


SCENARIOS = (partial_tape, fit_with_callbacks, sparse_as_dense, from_config,
             elastic_state, gradient_aggregation, broadcast_callback_local_vars)
