"""Scenarios: hierarchical gTop-k with TensorFlow on nodes emulated by horovodrun's host list
(``-H localhost:2,127.0.0.1:2`` is two nodes of two ranks); every rank against the NumPy reference of the
hierarchical algorithm, bit for bit: ``gtopk_allreduce(..., hierarchical=True)`` (eagerly,
the inputs of the PyTorch worker, tests/torch/workers/hierarchical_worker.py), the
``DistributedGradientTape`` (eagerly and in ``tf.function``, model and layer buffers) and the
Keras ``DistributedOptimizer`` (``minimize`` in ``tf.function``), with the linear loss of
the training worker (sum(w * G): its gradient is G, known on every rank from seeds).
"""
import tempfile

import numpy as np
from _common import assert_equal, finish, start
from reference_steps import ReferenceModel, rank_grads
from training_worker import SHAPES, linear_loss, tape_step_fn
from training_worker import make_variables as _make_variables

from tests.auto_reference import MIXED_NUMELS, AutoHierarchicalReference, mixed_case

from gtopk_hvd.common.collective import gtopk_wire_bytes
from gtopk_hvd.common.cost import Link, buffer_methods
from gtopk_hvd.common.density import k_for
from gtopk_hvd.common.hierarchy import shard_bounds
from gtopk_hvd.common.plan import PlanMismatchError
from gtopk_hvd.common.process_sets import job_layout
from gtopk_hvd.common.reference import hierarchical_step

D = 103


def make_variables(tf, prefix):
    return _make_variables(tf, SHAPES, prefix)


class HierarchicalReference:
    """P ranks' shard residuals, one reference synchronisation at a time: one hierarchical
    step a buffer (the whole model, or each variable)."""

    def __init__(self, size, local, density, granularity, shapes=SHAPES):
        self.size, self.local, self.density, self.shapes = size, local, density, shapes
        self.numels = [int(np.prod(s)) for s in shapes]
        self.buffers = [list(range(len(shapes)))] if granularity == "model" else \
            [[j] for j in range(len(shapes))]
        self.eps = []
        for members in self.buffers:
            bounds = shard_bounds(sum(self.numels[j] for j in members), local)
            self.eps.append([np.zeros(bounds[p % local][1] - bounds[p % local][0], np.float32)
                             for p in range(size)])

    def step(self, grads, joined=()):
        """grads[p][j]: rank p's gradient of variable j; the averaged gradients."""
        out = [None] * len(self.shapes)
        for b, members in enumerate(self.buffers):
            numel = sum(self.numels[j] for j in members)
            flats = [np.zeros(numel, np.float32) if p in joined else
                     np.concatenate([grads[p][j].reshape(-1) for j in members])
                     for p in range(self.size)]
            res = hierarchical_step(flats, self.eps[b], self.local, self.density,
                                    joined=joined)
            self.eps[b] = res.residuals
            total, offset = res.dense(numel, average_over=self.size), 0
            for j in members:
                out[j] = total[offset:offset + self.numels[j]].reshape(self.shapes[j])
                offset += self.numels[j]
        return out


def unnamed_allreduce(tf, hvd, rank, size):
    total = hvd.allreduce(tf.constant([float(rank)]), op=hvd.Sum)  # the user's own, unnamed
    assert float(total[0]) == size * (size - 1) / 2, total


def tape_scenarios(tf, hvd, rec, rank, size, local):
    for mode in ("eager", "graph"):
        for granularity in ("model", "layer"):
            name = f"hierarchical_tape_{mode}_{granularity}_equals_the_reference_every_step"
            with rec(name):
                variables = make_variables(tf, f"{mode}{granularity}")
                state = hvd.GTopkState(0.05, granularity=granularity)
                step = tape_step_fn(tf, hvd, variables, mode, gtopk_state=state,
                                    hierarchical=True)
                ref = HierarchicalReference(size, local, 0.05, granularity)
                seed = 300 + len(name)
                for t in range(3):
                    got = step([tf.constant(g) for g in rank_grads(seed, t, rank, SHAPES)])
                    want = ref.step([rank_grads(seed, t, p, SHAPES) for p in range(size)])
                    for j in range(len(SHAPES)):
                        assert_equal(got[j], want[j], f"step {t} variable {j}")
                    unnamed_allreduce(tf, hvd, rank, size)
                saved = state.state_dict(size, rank)
                assert saved["layout"] == ["hierarchical", size // local, local], saved
                assert saved["residuals"] == {}, sorted(saved["residuals"])
                shards = list(saved["shard_residuals"].values())
                assert len(shards) == len(ref.eps)
                for b, eps in enumerate(shards):
                    assert_equal(eps, ref.eps[b][rank], f"shard residual {b}")
                stats = state.gtopk_stats()
                cross = sum(gtopk_wire_bytes(k_for(len(e[rank]), 0.05), rank // local,
                                             size // local) for e in ref.eps)
                assert stats["bytes_sent_cross"] == cross, (stats, cross)
                assert stats["bytes_sent"] == cross + stats["bytes_sent_node"], stats
                assert stats["step"] == 3


def keras_scenario(tf, hvd, rec, rank, size, local):
    import gtopk_hvd.tensorflow.keras as hvd_keras
    with rec("hierarchical_keras_minimize_in_a_graph_equals_the_reference_every_step"):
        variables = make_variables(tf, "keras")
        opt = hvd_keras.DistributedOptimizer(tf.keras.optimizers.SGD(0.5), density=0.05,
                                             hierarchical=True)

        @tf.function
        def train_step(grads):
            opt.minimize(lambda: linear_loss(tf, variables, grads), variables)
        ref = HierarchicalReference(size, local, 0.05, "model")
        w = [np.zeros(s, np.float32) for s in SHAPES]
        for t in range(3):
            train_step([tf.constant(g) for g in rank_grads(17, t, rank, SHAPES)])
            update = ref.step([rank_grads(17, t, p, SHAPES) for p in range(size)])
            w = [wj + (-uj * np.float32(0.5)) for wj, uj in zip(w, update)]
            for j in range(len(SHAPES)):
                assert_equal(variables[j], w[j], f"step {t} variable {j}")
            unnamed_allreduce(tf, hvd, rank, size)
        assert opt.gtopk_stats()["step"] == 3


def compressor_scenario(tf, hvd, rec, rank, size, local):
    import horovod.tensorflow as horovod_tf
    for mode in ("eager", "graph"):
        with rec(f"hierarchical_compressor_in_horovods_tape_{mode}_equals_the_reference"):
            # Horovod's own tape, Compression.gtopk(hierarchical=True): one hierarchical step
            # per tensor (the reference's layer granularity), residuals of the shards
            variables = make_variables(tf, f"cmp{mode}")
            compressor = hvd.Compression.gtopk(density=0.05, hierarchical=True)

            def step(grads):
                with tf.GradientTape() as tape:
                    loss = linear_loss(tf, variables, grads)
                tape = horovod_tf.DistributedGradientTape(tape, compression=compressor)
                return tape.gradient(loss, variables)
            step = tf.function(step) if mode == "graph" else step
            ref = HierarchicalReference(size, local, 0.05, "layer")
            for t in range(3):
                got = step([tf.constant(g) for g in rank_grads(27, t, rank, SHAPES)])
                want = ref.step([rank_grads(27, t, p, SHAPES) for p in range(size)])
                for j in range(len(SHAPES)):
                    assert_equal(got[j], want[j], f"step {t} variable {j}")
                unnamed_allreduce(tf, hvd, rank, size)
            residuals = compressor.residuals
            assert sorted(residuals) == ["0", "1", "2", "3"], sorted(residuals)
            for j in range(len(SHAPES)):
                assert_equal(residuals[str(j)], ref.eps[j][rank], f"shard residual {j}")


def join_scenario(tf, hvd, rec, rank, size, local, modes=("eager", "graph")):
    for mode in modes:
        with rec(f"hierarchical_tape_join_with_uneven_data_{mode}_equals_the_reference"):
            # odd ranks run out one batch early and join(): they repeat the tape's step with
            # zeros, and what their shard of the node's sum did not apply joins their residual
            batches = [2 + (r + 1) % 2 for r in range(size)]
            variables = make_variables(tf, f"join{mode}")
            state = hvd.GTopkState(0.1)
            step = tape_step_fn(tf, hvd, variables, mode, gtopk_state=state, hierarchical=True)
            ref = HierarchicalReference(size, local, 0.1, "model")
            for t in range(max(batches)):
                joined = {q for q in range(size) if t >= batches[q]}
                want = ref.step([rank_grads(33, t, p, SHAPES) for p in range(size)], joined)
                if t < batches[rank]:
                    got = step([tf.constant(g) for g in rank_grads(33, t, rank, SHAPES)])
                    for j in range(len(SHAPES)):
                        assert_equal(got[j], want[j], f"step {t} variable {j}")
            last = hvd.join()
            assert batches[last] == max(batches), (last, batches)
            shards = list(state.state_dict(size, rank)["shard_residuals"].values())
            assert_equal(shards[0], ref.eps[0][rank], "shard residual after join")
            assert state.step == max(batches), state.step
            unnamed_allreduce(tf, hvd, rank, size)


LINKS = {  # a slow network card with a fast node, and a node slower than the network
    "fast_node": Link(0.0, 1.0, intra_alpha=0.0, intra_beta=1e-9),
    "slow_node": Link(0.0, 1e-3, intra_alpha=0.0, intra_beta=1.0)}


def auto_scenarios(tf, hvd, rec, rank, size, local):
    """algorithm="auto" with hierarchical=True: per buffer dense or gTop-k, and for the
    sparsified ones flat or hierarchical gTop-k by the cost on these nodes; each link's
    choice against its reference; then a job whose choice changes from step to step,
    residuals moved between the modes' storage, bit for bit, eagerly and in a graph."""
    nodes, numel = (size // local, local), sum(int(np.prod(s)) for s in SHAPES)
    for mode in ("eager", "graph"):
        # in a graph both choices run in the switching scenario below, each in its trace
        for what, link in LINKS.items() if mode == "eager" else ():
            with rec(f"hierarchical_tape_auto_{mode}_{what}_runs_the_mode_the_cost_model_"
                     f"chooses"):
                want = buffer_methods("auto", [numel], 0.05, size, link, dense_paid=False,
                                      nodes=nodes)
                assert want == (("hierarchical",) if what == "fast_node" else ("gtopk",)), want
                variables = make_variables(tf, f"auto{mode}{what}")
                state = hvd.GTopkState(0.05, algorithm="auto", link=link)
                step = tape_step_fn(tf, hvd, variables, mode, gtopk_state=state,
                                    hierarchical=True)
                hierarchical = want == ("hierarchical",)
                ref = HierarchicalReference(size, local, 0.05, "model") if hierarchical \
                    else ReferenceModel(SHAPES, size, 0.05, "model")
                for t in range(3):
                    got = step([tf.constant(g) for g in rank_grads(41, t, rank, SHAPES)])
                    expected = ref.step([rank_grads(41, t, p, SHAPES) for p in range(size)])
                    for j in range(len(SHAPES)):
                        assert_equal(got[j], expected[j], f"step {t} variable {j}")
                    unnamed_allreduce(tf, hvd, rank, size)
                assert state.gtopk_stats()["methods"] == {want[0]: 1}, state.gtopk_stats()
                saved = state.state_dict(size, rank)
                if hierarchical:
                    assert_equal(list(saved["shard_residuals"].values())[0], ref.eps[0][rank],
                                 "shard residual")
                else:
                    for j, eps in enumerate(ref.residuals(rank)):
                        assert_equal(list(saved["residuals"].values())[j], eps,
                                     f"residual {j}")
        with rec(f"hierarchical_tape_auto_{mode}_switching_modes_moves_the_residuals_"
                 f"bit_for_bit"):
            # the link changes between steps, so the choice does: a switch to hierarchical
            # keeps this rank's shard of its whole-buffer residual and carries the rest into
            # the next step's gradients; a switch back returns shard and carry to the
            # whole-buffer residual (in a graph at run time: each trace has its mode)
            variables = make_variables(tf, f"autoswitch{mode}")
            state = hvd.GTopkState(0.05, algorithm="auto", link=LINKS["slow_node"])
            steps = {}
            flat = ReferenceModel(SHAPES, size, 0.05, "model")
            hier = HierarchicalReference(size, local, 0.05, "model")
            carry = [np.zeros(numel, np.float32) for _ in range(size)]
            cuts = np.cumsum([0] + [int(np.prod(s)) for s in SHAPES])
            for t, what in enumerate(["slow_node", "fast_node", "fast_node", "slow_node",
                                      "fast_node", "slow_node"]):
                state.link = LINKS[what]
                traced = what not in steps or mode == "eager"  # state.methods: the last trace
                if traced:
                    steps[what] = tape_step_fn(tf, hvd, variables, mode, gtopk_state=state,
                                               hierarchical=True)
                to_hier = what == "fast_node"
                for p in range(size):  # the move, as GTopkState.settle_modes makes it
                    lo, hi = shard_bounds(numel, local)[p % local]
                    whole = np.concatenate(flat.eps[p]) + carry[p]
                    if to_hier:
                        hier.eps[0][p] = hier.eps[0][p] + whole[lo:hi]
                        carry[p] = whole.copy()
                        carry[p][lo:hi] = 0
                        whole = np.zeros(numel, np.float32)
                    else:
                        whole = whole + np.pad(hier.eps[0][p], (lo, numel - hi))
                        hier.eps[0][p] = np.zeros(hi - lo, np.float32)
                        carry[p] = np.zeros(numel, np.float32)
                    flat.eps[p] = [whole[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
                grads = [rank_grads(43, t, p, SHAPES) for p in range(size)]
                if to_hier:
                    expected = hier.step([[g + carry[p][a:b].reshape(g.shape)
                                           for g, a, b in zip(grads[p], cuts[:-1], cuts[1:])]
                                          for p in range(size)])
                    carry = [np.zeros(numel, np.float32) for _ in range(size)]
                else:
                    expected = flat.step(grads)
                got = steps[what]([tf.constant(g) for g in grads[rank]])
                for j in range(len(SHAPES)):
                    assert_equal(got[j], expected[j], f"step {t} ({what}) variable {j}")
                if traced:
                    assert state.methods == {"model": "hierarchical" if to_hier else "gtopk"}
                saved = state.state_dict(size, rank)
                assert_equal(np.concatenate(list(saved["residuals"].values())),
                             np.concatenate(flat.eps[rank]), f"residuals after step {t}")
                assert_equal(list(saved["shard_residuals"].values())[0], hier.eps[0][rank],
                             f"shard residual after step {t}")
                assert_equal(list(saved["carry"].values())[0], carry[rank],
                             f"carry after step {t}")
                unnamed_allreduce(tf, hvd, rank, size)


def auto_mixed_scenario(tf, hvd, rec, rank, size, local):
    """algorithm="auto" with hierarchical=True, one buffer a variable, under a density
    schedule that makes the small variable dense at the high density while the large one stays
    hierarchical (a step runs both): what the small one held back as a shard residual goes
    back to its whole-buffer residual and is applied in full by the dense allreduce, nothing
    lost; integer gradients make the dense sums exact in any order."""
    with rec("hierarchical_tape_auto_dense_for_one_buffer_hierarchical_for_another_bit_for_bit"):
        numels = MIXED_NUMELS
        shapes = [(n,) for n in numels]
        densities, link, mixes = mixed_case(size, (size // local, local), dense_paid=False)
        assert mixes or size == 8, "no case mixes dense and hierarchical on this layout"
        state = hvd.GTopkState(lambda step: densities[min(step, 3)], algorithm="auto",
                               granularity="layer", link=link)
        variables = _make_variables(tf, shapes, "automixed")
        step = tape_step_fn(tf, hvd, variables, "eager", gtopk_state=state, hierarchical=True)
        ref = AutoHierarchicalReference(numels, size, local)
        for t, density in enumerate(densities):
            methods = buffer_methods("auto", numels, density, size, link, dense_paid=False,
                                     nodes=(size // local, local))
            assert not mixes or methods == ("hierarchical", "hierarchical" if t % 2 == 0
                                            else "dense"), methods
            grads = [rank_grads(47, t, p, shapes, integer=True) for p in range(size)]
            expected = ref.step(grads, methods, density)
            got = step([tf.constant(g) for g in grads[rank]])
            for j in range(len(numels)):
                assert_equal(got[j], expected[j], f"step {t} variable {j} ({methods[j]})")
            saved = state.state_dict(size, rank)
            for j in range(len(numels)):
                assert_equal(list(saved["residuals"].values())[j], ref.flat[rank][j],
                             f"residual {j} after step {t}")
                assert_equal(list(saved["shard_residuals"].values())[j], ref.shard[rank][j],
                             f"shard residual {j} after step {t}")
            unnamed_allreduce(tf, hvd, rank, size)


def loss_scale_scenarios(tf, hvd, rec, rank, size):
    """With a LossScaleOptimizer whose scale grows, bit-identical to the unscaled hierarchical
    run (the shard residuals stay in unscaled units), and an overflow on one rank skipping
    the step on every rank with every shard residual finite; the tape, which reduces the
    scaled gradients, and the Keras optimizer inside the LossScaleOptimizer."""
    from robustness_worker import _loss_scale_run
    for how in ("tape", "keras_inside"):
        with rec(f"hierarchical_{how}_loss_scale_bit_identical_and_an_overflow_skipped"):
            plain, _ = _loss_scale_run(tf, hvd, rank, size, how, 5, prefix="h",
                                       hierarchical=True)
            scaled, state = _loss_scale_run(tf, hvd, rank, size, how, 5, lso=(16.0, 2),
                                            prefix="h", hierarchical=True)
            scales = [s for _, s, _ in scaled]
            assert scales[-1] > scales[0], f"the scale never grew: {scales}"
            for t, ((a, _, _), (b, _, _)) in enumerate(zip(plain, scaled)):
                for j in range(len(SHAPES)):
                    assert_equal(b[j], a[j], f"variable {j} after step {t + 1} ({scales})")
            history, state = _loss_scale_run(tf, hvd, rank, size, how, 4,
                                              lso=(2.0 ** 8, 1000), overflow_at=2,
                                              prefix="ho", hierarchical=True)
            assert [s for _, s, _ in history] == [2.0 ** 8] * 2 + [2.0 ** 7] * 2, history
            for j in range(len(SHAPES)):
                assert_equal(history[2][0][j], history[1][0][j], f"variable {j} at the skip")
            stats = state.gtopk_stats()
            assert stats["nonfinite_steps"] == 1 and stats["step"] == 3, stats
            shards = state.state_dict(size, rank)["shard_residuals"]
            assert shards and all(np.isfinite(e).all() for e in shards.values()), shards


def robustness_scenarios(tf, hvd, rec, rank, size, local):
    with rec("hierarchical_tape_nan_on_one_rank_in_a_graph_gives_nan_everywhere_residuals_kept"):
        variables = make_variables(tf, "nan")
        state = hvd.GTopkState(0.05)
        step = tape_step_fn(tf, hvd, variables, "graph", gtopk_state=state, hierarchical=True)
        ref = HierarchicalReference(size, local, 0.05, "model")
        grads = [rank_grads(21, 0, p, SHAPES) for p in range(size)]
        step([tf.constant(g) for g in grads[rank]])
        ref.step(grads)
        bad = rank_grads(21, 1, rank, SHAPES)
        if rank == size - 1:
            bad[0][3, 4] = np.nan
        got = step([tf.constant(g) for g in bad])
        assert all(np.isnan(g.numpy()).all() for g in got), "not NaN everywhere"
        eps = list(state.state_dict(size, rank)["shard_residuals"].values())[0]
        assert_equal(eps, ref.eps[0][rank], "shard residual kept")
        stats = state.gtopk_stats()
        assert stats["step"] == 1 and stats["nonfinite_steps"] == 1 and not stats["finite"]
        unnamed_allreduce(tf, hvd, rank, size)
    with rec("hierarchical_tape_of_another_model_on_one_rank_is_refused_in_a_graph"):
        # rank 0's last variable has one entry more: the node's reduce-scatter hands its
        # neighbours parts of another length; nothing of them is read, every rank refuses
        shapes = SHAPES[:-1] + [(4,) if rank == 0 else (3,)]
        variables = [tf.Variable(tf.zeros(s)) for s in shapes]
        step = tape_step_fn(tf, hvd, variables, "graph", density=0.05, hierarchical=True)
        try:
            step([tf.ones(s) for s in shapes])
        except (PlanMismatchError, tf.errors.OpError) as exc:  # the graph's check raises
            assert "gTop-k set-ups differ" in str(exc) and "rank 0" in str(exc), exc
        else:
            raise AssertionError("a rank with another model was accepted")
        unnamed_allreduce(tf, hvd, rank, size)
    with rec("hierarchical_tape_on_some_ranks_only_is_refused_on_every_rank"):
        variables = make_variables(tf, "mixed")
        for attempt in range(2):  # refused again: nothing was verified
            step = tape_step_fn(tf, hvd, variables, "eager", density=0.05,
                                hierarchical=rank != 0)
            try:
                step([tf.constant(g) for g in rank_grads(23, attempt, rank, SHAPES)])
            except PlanMismatchError as exc:
                assert "hierarchical=True" in str(exc), exc
            else:
                raise AssertionError("one flat rank among hierarchical ones was accepted")
            unnamed_allreduce(tf, hvd, rank, size)
    with rec("hierarchical_checkpoint_resumes_the_shard_residuals_bit_for_bit"):
        variables = make_variables(tf, "ckpt")
        state = hvd.GTopkState(0.05)
        step = tape_step_fn(tf, hvd, variables, "graph", gtopk_state=state, hierarchical=True)
        ref = HierarchicalReference(size, local, 0.05, "model")
        for t in range(2):
            step([tf.constant(g) for g in rank_grads(25, t, rank, SHAPES)])
            ref.step([rank_grads(25, t, p, SHAPES) for p in range(size)])
        path = tf.train.Checkpoint(gtopk=state).write(
            f"{tempfile.mkdtemp(prefix='gtopk_hier_')}/rank{rank}")
        again = hvd.GTopkState(0.05)
        tf.train.Checkpoint(gtopk=again).read(path).assert_existing_objects_matched()
        step = tape_step_fn(tf, hvd, variables, "graph", gtopk_state=again, hierarchical=True)
        got = step([tf.constant(g) for g in rank_grads(25, 2, rank, SHAPES)])
        want = ref.step([rank_grads(25, 2, p, SHAPES) for p in range(size)])
        for j in range(len(SHAPES)):
            assert_equal(got[j], want[j], f"after the restore, variable {j}")
        assert again.gtopk_stats()["step"] == 3
    with rec("hierarchical_tape_refuses_what_it_cannot_run"):
        for kwargs in ({"algorithm": "topk"}, {"hierarchical": "yes"}):
            try:
                with tf.GradientTape() as tape:
                    pass
                hvd.DistributedGradientTape(tape, **{"hierarchical": True, **kwargs})
            except ValueError as exc:
                assert "hierarchical" in str(exc), exc
            else:
                raise AssertionError(f"{kwargs} was accepted")


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
    with rec("hierarchical_allreduce_in_a_graph_equals_the_reference_every_step"):
        @tf.function
        def step(g, e):
            res = hvd.gtopk_allreduce(g, density=0.05, residual=e, name="hg",
                                      hierarchical=True)
            return res.output, res.residual, res.finite
        geps = tf.zeros([shards[rank % local][1] - shards[rank % local][0]], tf.float32)
        ref_eps = [np.zeros(shards[p % local][1] - shards[p % local][0], np.float32)
                   for p in range(size)]
        for t in range(3):
            grads = [grads_for(20 + t, p) for p in range(size)]
            want = hierarchical_step(grads, ref_eps, local, 0.05)
            output, geps, finite = step(tf.constant(grads[rank]), geps)
            assert bool(finite)
            assert_equal(output, want.dense(D) / size, f"output at step {t}")
            assert_equal(geps, want.residuals[rank], f"residual at step {t}")
            ref_eps = want.residuals
            total = hvd.allreduce(tf.constant([float(rank)]), op=hvd.Sum)  # unnamed
            assert float(total[0]) == size * (size - 1) / 2, total
        grad = grads_for(29, rank)
        if rank == 0:
            grad[7] = np.inf
        output, kept, finite = step(tf.constant(grad), geps)
        assert not bool(finite) and np.isnan(output.numpy()).all()
        assert_equal(kept, geps, "residual kept")
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
    tape_scenarios(tf, hvd, rec, rank, size, local)
    keras_scenario(tf, hvd, rec, rank, size, local)
    compressor_scenario(tf, hvd, rec, rank, size, local)
    loss_scale_scenarios(tf, hvd, rec, rank, size)
    join_scenario(tf, hvd, rec, rank, size, local)
    auto_scenarios(tf, hvd, rec, rank, size, local)
    auto_mixed_scenario(tf, hvd, rec, rank, size, local)
    robustness_scenarios(tf, hvd, rec, rank, size, local)
    finish(tf, hvd, rec)


if __name__ == "__main__":
    main()
