"""Worker: training with gtopk_hvd.tensorflow's DistributedGradientTape and
gtopk_hvd.tensorflow.keras' DistributedOptimizer, against the NumPy reference.

Run by tests/tensorflow/test_tf_training.py under ``horovodrun -np N``.  Exact scenarios use
a linear loss, sum(w * G), whose gradient is G (known on every rank from seeds), and plain
SGD with a power-of-two learning rate, so every rank can check its variables, gradients and
residuals against reference_steps.ReferenceModel bit for bit.  Scenarios communicate first
and assert afterwards.
"""
import os
import sys
import tempfile

import compressor_worker
import numpy as np
from _common import LogCapture, assert_equal, finish, same_on_every_rank, start
from reference_steps import ReferenceModel, rank_grads

from gtopk_hvd.common.density import StepwiseDensity

SHAPES = [(40, 12), (12,), (12, 3), (3,)]


def linear_loss(tf, variables, grads):
    return tf.add_n([tf.reduce_sum(v * g) for v, g in zip(variables, grads)])


def make_variables(tf, shapes=SHAPES, prefix="w"):
    return [tf.Variable(tf.zeros(s), name=f"{prefix}{j}") for j, s in enumerate(shapes)]


def tape_step_fn(tf, hvd, variables, mode, **kwargs):
    """One tape synchronisation: the reduced gradients of the linear loss."""
    def step(grads):
        with tf.GradientTape() as tape:
            loss = linear_loss(tf, variables, grads)
        tape = hvd.DistributedGradientTape(tape, **kwargs)
        return tape.gradient(loss, variables)
    return tf.function(step) if mode == "graph" else step


def tape_equals_reference(tf, hvd, rec, rank, size):
    for mode, granularity, algorithm in [("eager", "model", "gtopk"), ("graph", "model", "gtopk"),
                                         ("eager", "layer", "gtopk"), ("graph", "layer", "gtopk"),
                                         ("graph", "model", "topk")]:
        name = f"tape_{mode}_{granularity}_{algorithm}_gradients_and_residuals_equal_reference"
        with rec(name):
            variables = make_variables(tf, prefix=f"{mode}{granularity}{algorithm}")
            state = hvd.GTopkState(0.05, algorithm=algorithm, granularity=granularity)
            step = tape_step_fn(tf, hvd, variables, mode, gtopk_state=state)
            seed = 100 + len(name)
            outputs = [[g.numpy() for g in step([tf.constant(g) for g in
                                                 rank_grads(seed, t, rank, SHAPES)])]
                       for t in range(3)]
            ref = ReferenceModel(SHAPES, size, 0.05, granularity, algorithm=algorithm)
            for t, got in enumerate(outputs):
                want = ref.step([rank_grads(seed, t, p, SHAPES) for p in range(size)])
                for j in range(len(SHAPES)):
                    assert_equal(got[j], want[j], f"step {t} variable {j}")
            for j, eps in enumerate(ref.residuals(rank)):
                assert_equal(state.residuals[variables[j].name.split(":")[0]], eps,
                             f"residual {j}")
            stats = state.gtopk_stats()
            assert stats["step"] == 3 and stats["numel"] == sum(np.prod(s) for s in SHAPES)


def tape_layer_one_allgather_per_stage(tf, hvd, rec, rank, size):
    from gtopk_hvd.common.collective import gtopk_wire_bytes
    from gtopk_hvd.common.density import k_for
    from gtopk_hvd.common.schedule import stages_for
    from gtopk_hvd.tensorflow.ops import TFOps
    with rec("tape_layer_granularity_one_allgather_per_stage_for_all_tensors"):
        names, plain = [], TFOps.allgather

        def counting(self, message, process_set, name):
            names.append(name)
            return plain(self, message, process_set, name)
        variables = make_variables(tf, prefix="onestage")
        state = hvd.GTopkState(0.05, granularity="layer")
        step = tape_step_fn(tf, hvd, variables, "eager", gtopk_state=state)
        TFOps.allgather = counting
        try:
            got = step([tf.constant(g) for g in rank_grads(9, 0, rank, SHAPES)])
        finally:
            TFOps.allgather = plain
        want = ReferenceModel(SHAPES, size, 0.05, "layer").step(
            [rank_grads(9, 0, p, SHAPES) for p in range(size)])
        stages = len(stages_for(rank, size))
        ks = [k_for(int(np.prod(s)), 0.05) for s in SHAPES]
        for j in range(len(SHAPES)):
            assert_equal(got[j], want[j], f"variable {j}")
        # 4 tensors, one message a stage (before: one exchange per tensor)
        assert len(names) == stages and len(set(names)) == stages, names
        assert state.gtopk_stats()["bytes_sent"] == gtopk_wire_bytes(sum(ks), rank, size)


def tape_density_one(tf, hvd, rec, rank, size):
    with rec("tape_density_1_equals_hvd_allreduce_on_integer_gradients"):
        variables = make_variables(tf, prefix="dense")
        grads = [tf.constant(g) for g in rank_grads(7, 0, rank, SHAPES, integer=True)]
        got = tape_step_fn(tf, hvd, variables, "graph", density=1.0, op=hvd.Sum)(grads)
        want = [hvd.allreduce(g, op=hvd.Sum, name=f"dense1.{j}") for j, g in enumerate(grads)]
        for j in range(len(SHAPES)):
            assert_equal(got[j], want[j].numpy(), f"variable {j}")


def tape_local_source(tf, hvd, rec, rank, size):
    with rec("tape_registered_local_source_is_not_communicated_and_is_scaled"):
        variables = make_variables(tf, prefix="local")
        local = rank_grads(19, 0, rank, SHAPES, integer=True)
        with tf.GradientTape() as tape:
            loss = linear_loss(tf, variables, [tf.constant(g) for g in local])
        tape = hvd.DistributedGradientTape(tape, density=1.0, op=hvd.Sum)
        tape.register_local_source(variables[1])
        got = tape.gradient(loss, variables)
        total = [sum(rank_grads(19, 0, p, SHAPES, integer=True)[j] for p in range(size))
                 for j in range(len(SHAPES))]
        for j in (0, 2, 3):
            assert_equal(got[j], total[j], f"variable {j}")
        assert_equal(got[1], local[1] * np.float32(1.0 / size), "local variable")


def tape_dense_threshold(tf, hvd, rec, rank, size):
    with rec("tape_layer_granularity_dense_threshold_sends_small_tensors_dense"):
        variables = make_variables(tf, prefix="thr")
        state = hvd.GTopkState(0.05, granularity="layer", dense_threshold=20)
        step = tape_step_fn(tf, hvd, variables, "graph", gtopk_state=state)
        got = step([tf.constant(g) for g in rank_grads(8, 0, rank, SHAPES)])
        want = ReferenceModel(SHAPES, size, 0.05, "layer", dense_threshold=20).step(
            [rank_grads(8, 0, p, SHAPES) for p in range(size)])
        for j, shape in enumerate(SHAPES):
            if np.prod(shape) >= 20:
                assert_equal(got[j], want[j], f"sparse variable {j}")
            else:  # Horovod's Average multiplies by 1/P
                np.testing.assert_allclose(got[j].numpy(), want[j], rtol=1e-5, atol=1e-6)
        stats = state.gtopk_stats()
        assert stats["dense_numel"] == 15 and stats["numel"] == 516, stats


def tape_schedule_in_graph(tf, hvd, rec, rank, size):
    with rec("tape_density_schedule_advances_inside_one_tf_function"):
        variables = make_variables(tf, prefix="sched")
        schedule = StepwiseDensity([0.1, 0.02], steps_per_epoch=2)
        state = hvd.GTopkState(schedule)
        step = tape_step_fn(tf, hvd, variables, "graph", gtopk_state=state)
        ks, outputs = [], []
        for t in range(4):
            outputs.append(step([tf.constant(g) for g in rank_grads(9, t, rank, SHAPES)]))
            ks.append(state.gtopk_stats()["k"])
        ref = ReferenceModel(SHAPES, size, schedule)
        for t, got in enumerate(outputs):
            want = ref.step([rank_grads(9, t, p, SHAPES) for p in range(size)])
            for j in range(len(SHAPES)):
                assert_equal(got[j], want[j], f"step {t} variable {j}")
        assert ks == [54, 54, 11, 11], ks  # 531 entries
        state.set_density(0.5)
        step([tf.constant(g) for g in rank_grads(9, 4, rank, SHAPES)])
        assert state.gtopk_stats()["k"] == 266


def tape_mlp_identical_across_ranks(tf, hvd, rec, rank, size):
    with rec("tape_mlp_adam_variables_bitwise_identical_across_ranks"):
        tf.keras.utils.set_random_seed(1234)  # the same initial weights everywhere
        model = tf.keras.Sequential([tf.keras.layers.Dense(32, activation="relu",
                                                           input_shape=(20,)),
                                     tf.keras.layers.Dense(5)])
        opt = tf.keras.optimizers.Adam(1e-2)
        rng = np.random.default_rng([11, rank])
        x = rng.standard_normal((64, 20)).astype(np.float32)
        y = rng.integers(0, 5, 64)
        loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        @tf.function
        def train_step(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            tape = hvd.DistributedGradientTape(tape, density=0.02)
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        losses = [float(train_step(x[i:i + 16], y[i:i + 16])) for i in range(0, 64, 16)]
        same = same_on_every_rank(tf, hvd, model.variables, "mlp.same")
        assert all(np.isfinite(losses)), losses
        assert same, "the variables differ between ranks"


def tape_checkpoint_restore(tf, hvd, rec, rank, size):
    with rec("tape_checkpoint_restore_continues_the_uninterrupted_trajectory"):
        def build(prefix):
            variables = make_variables(tf, prefix=prefix)
            opt = tf.keras.optimizers.SGD(0.5, momentum=0.5)
            state = hvd.GTopkState(0.05)
            ckpt = tf.train.Checkpoint(variables=variables, optimizer=opt, gtopk=state)

            @tf.function
            def train_step(grads):
                with tf.GradientTape() as tape:
                    loss = linear_loss(tf, variables, grads)
                tape = hvd.DistributedGradientTape(tape, gtopk_state=state)
                opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return variables, state, ckpt, train_step

        def grads(t):
            return [tf.constant(g) for g in rank_grads(12, t, rank, SHAPES)]

        with tempfile.TemporaryDirectory() as tmp:
            variables, state, ckpt, train_step = build("ck")
            for t in range(3):
                train_step(grads(t))
            path = ckpt.write(os.path.join(tmp, f"rank{rank}"))
            for t in range(3, 6):
                train_step(grads(t))
            variables2, state2, ckpt2, train_step2 = build("ck")
            ckpt2.read(path)
            for t in range(3, 6):
                train_step2(grads(t))
        for a, b in zip(variables, variables2):
            assert_equal(b, a.numpy(), f"variable {a.name}")
        for name, eps in state.residuals.items():
            assert_equal(state2.residuals[name], eps.numpy(), f"residual {name}")
        assert state2.step == 6


def tape_world_size_change(tf, hvd, rec, rank, size):
    with rec("tape_checkpoint_from_other_world_size_drops_residuals_with_warning"):
        variables = make_variables(tf, prefix="world")
        state = hvd.GTopkState(0.05)
        step = tape_step_fn(tf, hvd, variables, "graph", gtopk_state=state)
        step([tf.constant(g) for g in rank_grads(13, 0, rank, SHAPES)])
        saved = state.state_dict(size + 1, rank)  # as if written by a larger world
        state2 = hvd.GTopkState(0.05)
        with LogCapture() as logs:
            state2.load_state_dict(saved, size, rank)
        assert any("world size" in m for m in logs.messages), logs.messages
        assert state2.step == 1 and all(float(tf.reduce_max(tf.abs(e))) == 0
                                        for e in state2.residuals.values())
        # the same through tf.train.Checkpoint: the check runs at the first step after restore
        with tempfile.TemporaryDirectory() as tmp:
            state._world.assign([size + 1, rank])
            path = tf.train.Checkpoint(gtopk=state).write(os.path.join(tmp, f"r{rank}"))
            variables3 = make_variables(tf, prefix="world")
            state3 = hvd.GTopkState(0.05)
            tf.train.Checkpoint(gtopk=state3).read(path)
            step3 = tape_step_fn(tf, hvd, variables3, "graph", gtopk_state=state3)
            with LogCapture() as logs3:
                got = step3([tf.constant(g) for g in rank_grads(13, 1, rank, SHAPES)])
        want = ReferenceModel(SHAPES, size, 0.05).step(
            [rank_grads(13, 1, p, SHAPES) for p in range(size)])
        assert any("world size" in m for m in logs3.messages), logs3.messages
        for j in range(len(SHAPES)):
            assert_equal(got[j], want[j], f"variable {j} (residuals started from zero)")


def tape_excluded_variables(tf, hvd, rec, rank, size):
    """A step whose tape asks for some variables only (the others frozen for a step, as in
    fine-tuning): their residuals stay aside untouched, the buffer of the step is the chosen
    variables' with their own residuals, and the next full step takes every residual up again;
    each step against the reference."""
    chosen = [0, 2]  # without the two biases
    for mode, granularity in (("eager", "model"), ("graph", "layer")):
        with rec(f"tape_{mode}_{granularity}_excluded_variables_keep_their_residuals"):
            variables = make_variables(tf, prefix=f"ex{mode}{granularity}")
            state = hvd.GTopkState(0.05, granularity=granularity)
            every = tape_step_fn(tf, hvd, variables, mode, gtopk_state=state)

            def some(grads):
                with tf.GradientTape() as tape:
                    loss = linear_loss(tf, variables, grads)
                tape = hvd.DistributedGradientTape(tape, gtopk_state=state)
                return tape.gradient(loss, [variables[j] for j in chosen])
            some = tf.function(some) if mode == "graph" else some
            ref = ReferenceModel(SHAPES, size, 0.05, granularity)
            sub = ReferenceModel([SHAPES[j] for j in chosen], size, 0.05, granularity)

            def residual(j):
                return state.residuals[variables[j].name.split(":")[0]]
            for t, step in enumerate([every, every, some, every]):
                grads = [rank_grads(37, t, p, SHAPES) for p in range(size)]
                got = step([tf.constant(g) for g in grads[rank]])
                if step is some:  # the reference of the chosen variables' buffer; the
                    # others' residuals stay as they were in ``ref``
                    sub.eps = [[ref.eps[p][j] for j in chosen] for p in range(size)]
                    want = sub.step([[g[j] for j in chosen] for g in grads])
                    for p in range(size):
                        for n, j in enumerate(chosen):
                            ref.eps[p][j] = sub.eps[p][n]
                else:
                    want = ref.step(grads)
                assert len(got) == len(want), (t, len(got))
                for n, (g, w) in enumerate(zip(got, want)):
                    assert_equal(g, w, f"step {t} gradient {n}")
                for j in range(len(SHAPES)):
                    assert_equal(residual(j), ref.eps[rank][j], f"step {t} residual {j}")


def tape_sparse_gradients(tf, hvd, rec, rank, size):
    with rec("tape_indexed_slices_need_sparse_as_dense_then_equal_reference"):
        table = tf.Variable(tf.zeros([50, 4]), name="table")
        rows = tf.constant(np.random.default_rng([14, rank]).integers(0, 50, 8))
        weights = tf.constant(rank_grads(14, 0, rank, [(8, 4)])[0])

        def grads_of(**kwargs):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.gather(table, rows) * weights)
            return hvd.DistributedGradientTape(tape, density=0.1, **kwargs).gradient(
                loss, [table])
        try:
            grads_of()
        except ValueError as exc:
            assert "sparse_as_dense" in str(exc), exc
        else:
            raise AssertionError("IndexedSlices without sparse_as_dense did not raise")
        got = grads_of(sparse_as_dense=True, gtopk_state=hvd.GTopkState(0.1))[0]

        def dense_grad(p):
            g = np.zeros((50, 4), np.float32)
            r = np.random.default_rng([14, p]).integers(0, 50, 8)
            np.add.at(g, r, rank_grads(14, 0, p, [(8, 4)])[0])
            return [g]
        want = ReferenceModel([(50, 4)], size, 0.1).step([dense_grad(p) for p in range(size)])
        assert_equal(got, want[0], "embedding gradient")


def keras_minimize_equals_reference(tf, hvd, rec, rank, size):
    import gtopk_hvd.tensorflow.keras as hvd_keras
    for legacy in (False, True):
        name = f"keras_{'legacy_' if legacy else ''}sgd_minimize_equals_reference_every_step"
        with rec(name):
            variables = make_variables(tf, prefix=f"min{legacy}")
            sgd = tf.keras.optimizers.legacy.SGD if legacy else tf.keras.optimizers.SGD
            # the legacy one runs algorithm="auto" (layer buffers, a link that sends the two
            # small tensors densely): the reference of dense_threshold=20
            auto = dict(algorithm="auto", granularity="layer", link=SPLIT_LINK) if legacy \
                else {}
            opt = hvd_keras.DistributedOptimizer(sgd(0.5), density=0.05, **auto)

            @tf.function
            def train_step(grads):
                opt.minimize(lambda: linear_loss(tf, variables, grads), variables)
            for t in range(3):
                train_step([tf.constant(g) for g in rank_grads(15, t, rank, SHAPES)])
            ref = ReferenceModel(SHAPES, size, 0.05, "layer", dense_threshold=20) if legacy \
                else ReferenceModel(SHAPES, size, 0.05)
            w = [np.zeros(s, np.float32) for s in SHAPES]
            for t in range(3):
                update = ref.step([rank_grads(15, t, p, SHAPES) for p in range(size)])
                w = [wj + (-uj * np.float32(0.5)) for wj, uj in zip(w, update)]
            for j in range(len(SHAPES)):
                if legacy:
                    assert_split_equal(variables[j].numpy(), w[j], j, f"variable {j}")
                else:
                    assert_equal(variables[j], w[j], f"variable {j}")
            assert opt.gtopk_stats()["step"] == 3
            if legacy:
                assert opt.gtopk_stats()["methods"] == {"gtopk": 2, "dense": 2}


def keras_backward_passes(tf, hvd, rec, rank, size):
    import gtopk_hvd.tensorflow.keras as hvd_keras
    with rec("keras_backward_passes_per_step_2_accumulates_locally_then_equals_reference"):
        variables = make_variables(tf, prefix="bpps")
        opt = hvd_keras.DistributedOptimizer(tf.keras.optimizers.SGD(0.5), density=0.05,
                                             backward_passes_per_step=2)

        @tf.function
        def train_step(grads):
            opt.minimize(lambda: linear_loss(tf, variables, grads), variables)
        for t in range(4):
            train_step([tf.constant(g) for g in rank_grads(16, t, rank, SHAPES, integer=True)])
        ref = ReferenceModel(SHAPES, size, 0.05)
        w = [np.zeros(s, np.float32) for s in SHAPES]
        for t in (0, 2):
            summed = [[a + b for a, b in zip(rank_grads(16, t, p, SHAPES, integer=True),
                                             rank_grads(16, t + 1, p, SHAPES, integer=True))]
                      for p in range(size)]
            w = [wj + (-uj * np.float32(0.5)) for wj, uj in zip(w, ref.step(summed))]
        for j in range(len(SHAPES)):
            assert_equal(variables[j], w[j], f"variable {j}")
        assert opt.gtopk_stats()["step"] == 2


def keras_fit_with_callbacks(tf, hvd, rec, rank, size):
    import gtopk_hvd.tensorflow.keras as hvd_keras
    cbs = hvd_keras.callbacks
    with rec("keras_fit_broadcast_metric_average_stats_and_schedule_callbacks") as data:
        tf.keras.utils.set_random_seed(rank)  # different initial weights: broadcast fixes them
        rng = np.random.default_rng([17, rank])
        x = rng.standard_normal((96, 10)).astype(np.float32)
        y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
        model = tf.keras.Sequential([tf.keras.layers.Dense(16, activation="relu",
                                                           input_shape=(10,)),
                                     tf.keras.layers.Dense(2)])
        opt = hvd_keras.DistributedOptimizer(tf.keras.optimizers.SGD(0.1, momentum=0.9),
                                             density=0.1)
        model.compile(optimizer=opt, metrics=["accuracy"],
                      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(
            x, y, batch_size=16, epochs=3, verbose=0, shuffle=False,
            callbacks=[cbs.BroadcastGlobalVariablesCallback(0),
                       cbs.DensityScheduleCallback(StepwiseDensity([0.1, 0.05])),
                       cbs.MetricAverageCallback(),
                       cbs.GTopkStatsCallback()])
        same = same_on_every_rank(tf, hvd, model.variables, "fit.same")
        logs = history.history
        data["history"] = {key: [float(v) for v in values] for key, values in logs.items()}
        assert same, "the variables differ between ranks after model.fit"
        for key in ("density", "bytes_sent", "residual_norm", "loss", "accuracy"):
            assert len(logs[key]) == 3, (key, logs)
        assert logs["density"] == [0.1, 0.05, 0.05], logs["density"]
        stats = opt.gtopk_stats()
        assert logs["bytes_sent"][-1] == stats["bytes_sent"] > 0
        assert logs["residual_norm"][-1] == stats["residual_norm"] > 0
        assert stats["step"] == 18 and stats["k"] == 11, stats  # 210 weights, k = ceil(10.5)


def keras_checkpoint_restore(tf, hvd, rec, rank, size):
    import gtopk_hvd.tensorflow.keras as hvd_keras
    with rec("keras_save_weights_load_weights_continues_the_uninterrupted_trajectory"):
        rng = np.random.default_rng([18, rank])
        x = rng.standard_normal((64, 6)).astype(np.float32)
        y = rng.standard_normal((64, 2)).astype(np.float32)

        def build():
            tf.keras.utils.set_random_seed(7)
            model = tf.keras.Sequential([tf.keras.layers.Dense(8, activation="tanh",
                                                               input_shape=(6,)),
                                         tf.keras.layers.Dense(2)])
            opt = hvd_keras.DistributedOptimizer(tf.keras.optimizers.SGD(0.05, momentum=0.9),
                                                 density=0.1)
            model.compile(optimizer=opt, loss="mse")
            return model

        fit = dict(batch_size=16, verbose=0, shuffle=False)
        with tempfile.TemporaryDirectory() as tmp:
            model = build()
            model.fit(x, y, epochs=1, **fit)
            path = os.path.join(tmp, f"rank{rank}", "weights")
            model.save_weights(path)
            model.fit(x, y, epochs=1, **fit)
            restored = build()
            restored.load_weights(path)
            restored.fit(x, y, epochs=1, **fit)
        for a, b in zip(model.variables, restored.variables):
            assert_equal(b, a.numpy(), f"variable {a.name}")
        state, state2 = model.optimizer.gtopk_state, restored.optimizer.gtopk_state
        # matched by position: Keras named the second model's layers differently
        residuals, residuals2 = list(state.residuals.values()), list(state2.residuals.values())
        assert len(residuals) == len(residuals2) == len(model.trainable_variables)
        for j, (eps, eps2) in enumerate(zip(residuals, residuals2)):
            assert_equal(eps2, eps.numpy(), f"residual {j}")
        assert state2.step == 8 and float(state.residual_norm()) > 0


def keras_load_model(tf, hvd, rec, rank, size):
    import gtopk_hvd.tensorflow.keras as hvd_keras
    with rec("keras_load_model_rewraps_gtopk_in_keras_h5_and_savedmodel_formats") as data:
        rng = np.random.default_rng([33, rank])
        x = rng.standard_normal((32, 6)).astype(np.float32)
        y = rng.standard_normal((32, 2)).astype(np.float32)
        tf.keras.utils.set_random_seed(9)
        model = tf.keras.Sequential([tf.keras.layers.Dense(8, activation="tanh",
                                                           input_shape=(6,)),
                                     tf.keras.layers.Dense(2)])
        model.compile(optimizer=hvd_keras.DistributedOptimizer(
            tf.keras.optimizers.SGD(0.05, momentum=0.9), density=0.1), loss="mse")
        fit = dict(batch_size=16, verbose=0, shuffle=False)
        model.fit(x, y, epochs=1, **fit)
        found = {}
        with tempfile.TemporaryDirectory() as tmp:
            for fmt in ("model.keras", "model.h5", "savedmodel"):
                path = os.path.join(tmp, fmt)
                model.save(path)
                loaded = hvd_keras.load_model(path, density=0.2)
                opt = loaded.optimizer
                iterations = int(opt.iterations)
                loaded.fit(x, y, epochs=1, **fit)
                found[fmt] = (hasattr(opt, "gtopk_state") and opt.gtopk_state.density(),
                              iterations, opt.gtopk_stats()["step"],
                              same_on_every_rank(tf, hvd, loaded.variables, f"load.{fmt}"))
        data["found"] = {k: list(map(str, v)) for k, v in found.items()}
        for fmt, (density, iterations, steps, same) in found.items():
            assert density == 0.2, (fmt, density)  # a gTop-k optimizer, with the new density
            assert steps == 2 and same, (fmt, steps, same)  # it synchronised: ranks agree
        # the optimizer's own state came with the file (the .keras and SavedModel formats)
        assert found["model.keras"][1] == 2, found


def fp16_compression(tf, hvd, rec, rank, size):
    for mode, granularity, algorithm in [("eager", "model", "gtopk"), ("graph", "layer", "gtopk"),
                                         ("graph", "model", "topk")]:
        with rec(f"tape_{mode}_{granularity}_{algorithm}_fp16_compression_equals_reference"):
            variables = make_variables(tf, prefix=f"fp16{mode}{granularity}{algorithm}")
            state = hvd.GTopkState(0.05, algorithm=algorithm, granularity=granularity)
            step = tape_step_fn(tf, hvd, variables, mode, gtopk_state=state,
                                compression=hvd.Compression.fp16)
            outputs = [[g.numpy() for g in step([tf.constant(g * 3.1) for g in
                                                 rank_grads(29, t, rank, SHAPES)])]
                       for t in range(3)]
            ref = ReferenceModel(SHAPES, size, 0.05, granularity, algorithm=algorithm,
                                 wire="float16")
            exact = ReferenceModel(SHAPES, size, 0.05, granularity, algorithm=algorithm)
            for t, got in enumerate(outputs):
                grads = [[g * np.float32(3.1) for g in rank_grads(29, t, p, SHAPES)]
                         for p in range(size)]
                want, plain = ref.step(grads), exact.step(grads)
                for j in range(len(SHAPES)):
                    assert_equal(got[j], want[j], f"step {t} variable {j}")
            assert any(not np.array_equal(a, b) for a, b in zip(want, plain))
            for j, eps in enumerate(ref.residuals(rank)):
                assert_equal(state.residuals[variables[j].name.split(":")[0]], eps,
                             f"residual {j}")


def predivide(tf, hvd, rec, rank, size):
    import gtopk_hvd.tensorflow.keras as hvd_keras
    with rec("gradient_predivide_factor_4_bit_identical_to_1_and_3_close"):
        def tape_run(factor, mode, **gtopk):
            variables = make_variables(tf, prefix=f"pd{factor}{mode}{len(gtopk)}")
            step = tape_step_fn(tf, hvd, variables, mode, gtopk_state=hvd.GTopkState(0.1, **gtopk),
                                gradient_predivide_factor=factor)
            return [[g.numpy() for g in step([tf.constant(g) for g in
                                              rank_grads(27, t, rank, SHAPES)])]
                    for t in range(3)]

        def keras_run(factor):
            variables = make_variables(tf, prefix=f"pdk{factor}")
            opt = hvd_keras.DistributedOptimizer(tf.keras.optimizers.SGD(0.5), density=0.1,
                                                 gradient_predivide_factor=factor)

            @tf.function
            def train_step(grads):
                opt.minimize(lambda: linear_loss(tf, variables, grads), variables)
            for t in range(3):
                train_step([tf.constant(g) for g in rank_grads(28, t, rank, SHAPES)])
            return [[v.numpy() for v in variables]]
        runs = [lambda f: tape_run(f, "eager"), lambda f: tape_run(f, "graph"),
                lambda f: tape_run(f, "graph", granularity="layer", dense_threshold=20),
                keras_run]
        results = [[run(f) for f in (1.0, 4.0)] for run in runs]
        results[0].append(runs[0](3.0))  # a factor that is not a power of two: close
        for i, (plain, by4, *by3) in enumerate(results):
            for t, (a, b) in enumerate(zip(plain, by4)):
                for j in range(len(a)):
                    assert_equal(b[j], a[j], f"run {i} step {t} tensor {j}, f = 4")
                    if by3:
                        assert np.allclose(by3[0][t][j], a[j], rtol=1e-4, atol=1e-6), (i, t, j)


def bad_arguments(tf, hvd, rec, rank, size):
    import gtopk_hvd.tensorflow.keras as hvd_keras
    with rec("bad_arguments_raise_on_every_rank_then_training_works"):
        variables = make_variables(tf, prefix="bad")
        cases = [({"density": 0.0}, ValueError, "density"),
                 ({"density": "0.1"}, ValueError, "density"),
                 ({"algorithm": "ring"}, ValueError, "algorithm"),
                 ({"granularity": "bucket"}, ValueError, "granularity"),
                 ({"dense_threshold": -1}, ValueError, "dense_threshold"),
                 ({"op": hvd.Adasum}, ValueError, "Adasum"),
                 ({"compression": "fp16"}, ValueError, "compression"),
                 ({"gradient_predivide_factor": 2.0, "op": hvd.Sum}, ValueError,
                  "only supported with op=Average"),
                 ({"gradient_predivide_factor": -1.0}, ValueError, "gradient_predivide_factor"),
                 ({"groups": 2}, ValueError, "groups"),
                 ({"process_set": hvd.ProcessSet([0])}, ValueError, "process_set"),
                 ({"gtopk_state": object()}, TypeError, "GTopkState")]
        for kwargs, error, text in cases:
            for make in (lambda kw: hvd.DistributedGradientTape(tf.GradientTape(), **kw),
                         lambda kw: hvd_keras.DistributedOptimizer(
                             tf.keras.optimizers.SGD(0.1), **kw)):
                try:
                    make(kwargs)
                except error as exc:
                    assert text in str(exc), (kwargs, exc)
                else:
                    raise AssertionError(f"{kwargs} did not raise")
        for bad_opt, error in [(object(), TypeError),
                               (hvd_keras.DistributedOptimizer(tf.keras.optimizers.SGD(0.1)),
                                ValueError)]:
            try:
                hvd_keras.DistributedOptimizer(bad_opt)
            except error:
                pass
            else:
                raise AssertionError(f"{type(bad_opt).__name__} did not raise")
        try:
            hvd.DistributedGradientTape(tf.GradientTape(), loss_scale_optimizer=1024.0)
        except TypeError as exc:
            assert "LossScaleOptimizer" in str(exc), exc
        else:
            raise AssertionError("a loss_scale_optimizer that is not one did not raise")
        try:
            source = tf.ones([3])
            with tf.GradientTape() as tape:
                tape.watch(source)
                loss = tf.reduce_sum(source * 2.0)
            hvd.DistributedGradientTape(tape).gradient(loss, [source])
        except ValueError as exc:
            assert "tf.Variable" in str(exc), exc
        else:
            raise AssertionError("a tensor source did not raise")
        got = tape_step_fn(tf, hvd, variables, "eager", density=1.0, op=hvd.Sum)(
            [tf.ones(s) for s in SHAPES])
        assert_equal(got[0], np.full(SHAPES[0], size, np.float32), "training after errors")


# algorithm="auto" at density 0.05, layer granularity, P = 2..8: 'gtopk' for the 480- and
# 36-entry tensors, 'dense' for the 12- and 3-entry ones (no latency, 1 ns a byte, 50 ns of
# fixed work per sparse buffer and stage), i.e. the split of dense_threshold=20
SPLIT_LINK = (0.0, 1e-9, 0.0, 5e-8)
DENSE_LINK = (0.0, 1e-9, 0.0, 1e-3)  # 1 ms of fixed work a sparse buffer: all dense


def assert_split_equal(got, want, j, what):
    """Variable j of the dense_threshold=20 split against the reference: bit for bit where
    gTop-k sent it, close where a dense allreduce did (Horovod's Average multiplies by 1/P)."""
    if np.prod(SHAPES[j]) >= 20:
        assert_equal(got, want, what)
    else:
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6, err_msg=what)


def auto_algorithm(tf, hvd, rec, rank, size):
    from gtopk_hvd.common import PlanMismatchError
    from gtopk_hvd.common.errors import GTopkError

    def grads_at(seed, t):
        return [tf.constant(g) for g in rank_grads(seed, t, rank, SHAPES)]

    for mode in ("eager", "graph"):
        with rec(f"tape_{mode}_auto_with_a_given_link_equals_reference_of_the_split_it_chose"):
            prefix = f"auto{mode}"
            variables = make_variables(tf, prefix=prefix)
            state = hvd.GTopkState(0.05, algorithm="auto", granularity="layer", link=SPLIT_LINK)
            step = tape_step_fn(tf, hvd, variables, mode, gtopk_state=state)
            outputs = [[g.numpy() for g in step(grads_at(700, t))] for t in range(3)]
            split = tape_step_fn(tf, hvd, make_variables(tf, prefix=f"split{mode}"), mode,
                                 gtopk_state=hvd.GTopkState(0.05, granularity="layer",
                                                            dense_threshold=20))
            split_outputs = [[g.numpy() for g in split(grads_at(700, t))] for t in range(3)]
            ref = ReferenceModel(SHAPES, size, 0.05, "layer", dense_threshold=20)
            for t, (got, same) in enumerate(zip(outputs, split_outputs)):
                want = ref.step([rank_grads(700, t, p, SHAPES) for p in range(size)])
                for j in range(len(SHAPES)):
                    assert_split_equal(got[j], want[j], j, f"step {t} variable {j}")
                    if np.prod(SHAPES[j]) >= 20 or t == 0:  # the dense allreduce of later
                        # eager steps also carries the verdict: Horovod's ring then sums
                        # some entries in another order
                        assert_equal(got[j], same[j], f"step {t} var {j} vs dense_threshold")
            for j, eps in enumerate(ref.residuals(rank)):
                assert_equal(state.residuals[f"{prefix}{j}"], eps, f"residual {j}")
            assert state.methods == {f"{prefix}0": "gtopk", f"{prefix}1": "dense",
                                     f"{prefix}2": "gtopk", f"{prefix}3": "dense"}, state.methods
            stats = state.gtopk_stats()
            assert stats["methods"] == {"gtopk": 2, "dense": 2}, stats
            assert stats["link"]["overhead"] == SPLIT_LINK[3] and stats["step"] == 3, stats
            assert stats["numel"] == 480 + 36 and stats["dense_numel"] == 12 + 3, stats
    with rec("tape_auto_measures_the_link_after_the_first_eager_step_the_same_on_every_rank"):
        variables = make_variables(tf, prefix="automeasure")
        state = hvd.GTopkState(0.05, algorithm="auto", granularity="layer")
        step = tape_step_fn(tf, hvd, variables, "eager", gtopk_state=state)
        first = [g.numpy() for g in step(grads_at(710, 0))]
        link, methods = state.link, state.methods
        later = step(grads_at(710, 1))
        links = hvd.allgather_object(link, name="auto.links")
        chosen = hvd.allgather_object(state.methods, name="auto.methods")
        same = same_on_every_rank(tf, hvd, later, "auto.same")
        want = ReferenceModel(SHAPES, size, 0.05, "layer").step(
            [rank_grads(710, 0, p, SHAPES) for p in range(size)])
        for j in range(len(SHAPES)):
            assert_equal(first[j], want[j], f"first step variable {j}")
        assert set(methods.values()) == {"gtopk"}, methods  # before the link is known
        assert link is not None and link.alpha >= 0 and link.beta >= 0, link
        assert all(other == link for other in links), links
        assert all(c == chosen[0] for c in chosen) and same, chosen
    with rec("tape_auto_buffer_that_turns_dense_applies_its_residual_in_full"):
        # the same gradients twice: step 1 (density 0.05) keeps a residual, step 2 (density 1,
        # all dense) applies it, so the two steps together apply twice the mean gradient
        variables = make_variables(tf, prefix="autoturn")
        state = hvd.GTopkState(StepwiseDensity([0.05, 1.0], steps_per_epoch=1),
                               algorithm="auto", granularity="layer", link=SPLIT_LINK)
        step = tape_step_fn(tf, hvd, variables, "eager", gtopk_state=state)
        out1 = [g.numpy() for g in step(grads_at(720, 0))]
        norms_1 = {n: float(tf.norm(e)) for n, e in state.residuals.items()}
        methods_1 = state.methods
        out2 = [g.numpy() for g in step(grads_at(720, 0))]
        mean = [np.mean([rank_grads(720, 0, p, SHAPES)[j] for p in range(size)], axis=0)
                for j in range(len(SHAPES))]
        assert methods_1["autoturn0"] == "gtopk" and norms_1["autoturn0"] > 0, norms_1
        assert set(state.methods.values()) == {"dense"}, state.methods
        for name, eps in state.residuals.items():
            assert not np.any(eps.numpy()), f"residual {name} not cleared"
        for j in range(len(SHAPES)):
            np.testing.assert_allclose(out1[j] + out2[j], 2 * mean[j], rtol=1e-5, atol=1e-6)
    with rec("tape_auto_nan_on_one_rank_gives_nan_everywhere_and_keeps_the_residuals"):
        for i, link in enumerate((SPLIT_LINK, DENSE_LINK)):  # sparse exchange / header-only
            variables = make_variables(tf, prefix=f"autonan{i}x")
            state = hvd.GTopkState(0.05, algorithm="auto", granularity="layer", link=link)
            step = tape_step_fn(tf, hvd, variables, "eager", gtopk_state=state)
            step(grads_at(730, 0))
            kept = {n: e.numpy().copy() for n, e in state.residuals.items()}
            grads = grads_at(730, 1)
            if rank == size - 1:  # a tensor sent densely, on one rank
                grads[1] = tf.tensor_scatter_nd_update(grads[1], [[3]], [float("nan")])
            bad = step(grads)
            stats = state.gtopk_stats()
            residuals = {n: e.numpy().copy() for n, e in state.residuals.items()}
            after = step(grads_at(730, 2))
            same = same_on_every_rank(tf, hvd, after, "auto.nan.same")
            assert all(np.isnan(g.numpy()).all() for g in bad), "not NaN everywhere"
            assert not stats["finite"] and stats["nonfinite_steps"] == 1, stats
            assert stats["step"] == 1, stats
            assert set(residuals) == set(kept), (set(residuals), set(kept))
            for name, eps in kept.items():  # as the non-finite step found them
                assert_equal(residuals[name], eps, f"residual {name}")
            if link == SPLIT_LINK:
                assert np.any(kept["autonan0x0"]), "no residual to keep"
            assert same and all(np.isfinite(g.numpy()).all() for g in after)
    with rec("tape_auto_after_a_first_eager_step_the_dense_allreduce_carries_the_verdict"):
        from gtopk_hvd.common.collective import (VERDICT_TAIL, dense_allreduce_bytes,
                                                 gtopk_wire_bytes)
        from gtopk_hvd.tensorflow.ops import TFOps
        names, plain = [], TFOps.allgather

        def counting(self, message, process_set, name):
            names.append(name)
            return plain(self, message, process_set, name)
        stats, counts, outputs = [], [], []
        TFOps.allgather = counting
        try:
            for i, link in enumerate((DENSE_LINK, SPLIT_LINK)):
                variables = make_variables(tf, prefix=f"autofirst{i}x")
                state = hvd.GTopkState(0.05, algorithm="auto", granularity="layer", link=link)
                step = tape_step_fn(tf, hvd, variables, "eager", gtopk_state=state)
                for t in range(2):
                    names.clear()
                    outputs.append([g.numpy() for g in step(grads_at(760 + i, t))])
                    stats.append(state.gtopk_stats())
                    counts.append(len(names))
        finally:
            TFOps.allgather = plain
        ref = ReferenceModel(SHAPES, size, 0.05, "layer", dense_threshold=20)
        ref_dense = ReferenceModel(SHAPES, size, 1.0, "layer", dense_threshold=10 ** 6)
        for t in range(2):
            want = ref_dense.step([rank_grads(760, t, p, SHAPES) for p in range(size)])
            for j in range(len(SHAPES)):  # all dense: Horovod's average of the gradients
                np.testing.assert_allclose(outputs[t][j], want[j], rtol=1e-5, atol=1e-6)
            want = ref.step([rank_grads(761, t, p, SHAPES) for p in range(size)])
            for j in range(len(SHAPES)):
                assert_split_equal(outputs[2 + t][j], want[j], j, f"split step {t} var {j}")
        from gtopk_hvd.common.schedule import stages_for
        stages = len(stages_for(rank, size))  # the exchange's allgathers
        # all dense: the first step sends a header-only exchange, the second none at all
        assert counts[:2] == [stages, 0], counts
        assert stats[1]["bytes_sent"] == dense_allreduce_bytes(531 + VERDICT_TAIL, size), stats
        # two tensors by gTop-k: the same exchange both steps, plus the tail from the second
        assert counts[2:] == [stages, stages], counts
        assert stats[3]["bytes_sent"] == (gtopk_wire_bytes(stats[3]["k"], rank, size)
                                          + dense_allreduce_bytes(15 + VERDICT_TAIL, size)), \
            stats[3]
    with rec("tape_auto_set_ups_that_differ_after_the_first_step_raise_plan_mismatch"):
        outcomes = []
        for i, how in enumerate(("loss_scale_all_dense", "shape")):
            # after a first step alike, rank 0 reads another loss scale with every tensor
            # dense (only the dense allreduce's tail sees it), or sends one more tensor
            # densely (Horovod refuses the shapes)
            variables = make_variables(tf, prefix=f"autodiffer{i}x")
            state = hvd.GTopkState(0.05, algorithm="auto", granularity="layer",
                                   link=DENSE_LINK if how == "loss_scale_all_dense" else SPLIT_LINK)
            reduce = hvd.allreduce_gradients
            reduce(state, grads_at(770, 0), variables)
            if rank == 0 and how == "shape":
                state.link = hvd.Link(*DENSE_LINK)
            scale = 2.0 if rank == 0 and how == "loss_scale_all_dense" else None
            try:
                reduce(state, grads_at(770, 1), variables, loss_scale=scale)
                outcomes.append(f"{how}: no error")
            except PlanMismatchError as exc:
                outcomes.append(f"{how}: {exc}")
        got = tape_step_fn(tf, hvd, variables, "eager", density=0.05)(grads_at(770, 2))
        assert same_on_every_rank(tf, hvd, got, "auto.after.differ")
        assert len(outcomes) == 2 and all("set-ups differ" in o for o in outcomes), outcomes
    with rec("tape_auto_set_ups_that_differ_raise_plan_mismatch_on_every_rank"):
        # rank 0 sends everything densely (another link), the others two tensors by gTop-k
        variables = make_variables(tf, prefix="automismatch")
        state = hvd.GTopkState(0.05, algorithm="auto", granularity="layer",
                               link=DENSE_LINK if rank == 0 else SPLIT_LINK)
        step = tape_step_fn(tf, hvd, variables, "eager", gtopk_state=state)
        try:
            step(grads_at(740, 0))
        except PlanMismatchError as exc:
            assert "gTop-k set-ups differ" in str(exc), exc
        else:
            raise AssertionError("methods that differ across ranks were not refused")
        got = tape_step_fn(tf, hvd, variables, "eager", density=0.05)(grads_at(740, 1))
        assert same_on_every_rank(tf, hvd, got, "auto.after.mismatch")
    with rec("tape_auto_bad_input_is_refused_before_communicating"):
        import gtopk_hvd.tensorflow.keras as hvd_keras
        variables = make_variables(tf, prefix="autobad")
        cases = [
            (lambda: hvd.GTopkState(0.05, algorithm="auto", link=(1e-4, -1e-9)),
             ValueError, "link beta"),
            (lambda: hvd.DistributedGradientTape(tf.GradientTape(), algorithm="auto",
                                                 link="fast"), ValueError, "link must be"),
            (lambda: hvd_keras.DistributedOptimizer(tf.keras.optimizers.SGD(0.1),
                                                    algorithm="auto", link=(1.0,)),
             ValueError, "link must be"),
            (lambda: hvd.gtopk_allreduce(tf.ones([4]), algorithm="auto"), ValueError,
             "not available in gtopk_allreduce"),
            (lambda: hvd.Compression.gtopk(algorithm="auto"), ValueError,
             "not available in Compression.gtopk"),
            # inside tf.function the choice is made at trace time: it needs the link and a
            # constant density
            # constant density (AutoGraph re-raises a GTopkError of a traced step as its
            # StagingError, with the GTopkError and its message in the text)
            (lambda: tape_step_fn(tf, hvd, variables, "graph", gtopk_state=hvd.GTopkState(
                0.05, algorithm="auto"))(grads_at(750, 0)), Exception, "needs the link"),
            (lambda: tape_step_fn(tf, hvd, variables, "graph", gtopk_state=hvd.GTopkState(
                StepwiseDensity([0.05, 0.01], steps_per_epoch=1), algorithm="auto",
                link=SPLIT_LINK))(grads_at(750, 0)), Exception, "constant density"),
            (lambda: tf.function(hvd.measure_link)(), Exception, "runs eagerly")]
        for make, error, text in cases:
            try:
                make()
            except error as exc:
                assert text in str(exc), (text, exc)
                assert isinstance(exc, (ValueError, GTopkError)) or "GTopkError" in str(exc), exc
            else:
                raise AssertionError(f"{text}: did not raise")
        got = tape_step_fn(tf, hvd, variables, "eager", density=0.05, algorithm="auto",
                           link=SPLIT_LINK)(grads_at(750, 1))
        assert same_on_every_rank(tf, hvd, got, "auto.after.bad")


# The scenarios whose subject is the exchange's shape inside the tape (the reference
# comparisons, eagerly and in a graph, one allgather a stage), run at P = 3 (a fold and a
# stage) and under make test-stress at P = 4 (two pure hypercube stages); the OTHERS, each
# rank's own arithmetic around the same core step driver and exchange, run at P = 2.
# tf_worker.py runs them in make test's two TensorFlow jobs (tests/jobs.py).
EXCHANGE_SHAPE = (tape_equals_reference, tape_layer_one_allgather_per_stage)


SCENARIOS = (tape_equals_reference, tape_layer_one_allgather_per_stage,
             tape_density_one, tape_local_source, tape_dense_threshold,
             tape_schedule_in_graph, tape_mlp_identical_across_ranks,
             tape_checkpoint_restore, tape_world_size_change, tape_excluded_variables,
             tape_sparse_gradients,
             keras_minimize_equals_reference, keras_backward_passes,
             keras_fit_with_callbacks, keras_checkpoint_restore, keras_load_model,
             predivide, fp16_compression, bad_arguments, auto_algorithm,
             *compressor_worker.SCENARIOS)
OTHERS = tuple(s for s in SCENARIOS if s not in EXCHANGE_SHAPE)


def main():
    """``--exchange-only``: the EXCHANGE_SHAPE scenarios (P = 4 under make test-stress);
    without it, the OTHERS."""
    tf, hvd, rec = start()
    rank, size = hvd.rank(), hvd.size()
    for scenario in EXCHANGE_SHAPE if "--exchange-only" in sys.argv[1:] else OTHERS:
        scenario(tf, hvd, rec, rank, size)
    finish(tf, hvd, rec)


if __name__ == "__main__":
    main()
