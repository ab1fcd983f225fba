"""gTop-k reduction of a model's gradients: what the tape and the Keras optimizer share.

:func:`allreduce_gradients` lays the gradients out into buffers (one flat float32 buffer for
the whole model, ``granularity="model"`` as in the paper, or one per tensor, ``"layer"``;
tensors with fewer than ``dense_threshold`` elements go to a dense float32 allreduce), lets
the state choose each buffer's method, and runs the step of gtopk_hvd.common.step with
:class:`~gtopk_hvd.tensorflow.step.TFStep`, eagerly or in a ``tf.function``.

Plain Python control flow on Python values only: the functions here are excluded from
AutoGraph, which would otherwise spend seconds converting them (and the common driver) at
every trace.

Reference: S. Shi et al., "A Distributed Synchronous SGD Algorithm with Global Top-k
Sparsification for Low Bandwidth Networks", ICDCS 2019.
"""
import logging

import horovod.tensorflow as hvd
import tensorflow as tf

from gtopk_hvd.common.process_sets import hierarchical_sets, is_elastic
from gtopk_hvd.common.step import Buffer, StepConfig, run_step
from gtopk_hvd.common.validation import check_buffer_numel, layout_key
from gtopk_hvd.tensorflow.collective import check_tf2_context, measure_link, op_name
from gtopk_hvd.tensorflow.hierarchical import check_mode
from gtopk_hvd.tensorflow.ops import op_name_safe, zeros
from gtopk_hvd.tensorflow.step import Item, JoinedTFStep, TFStep
from gtopk_hvd.tensorflow.join import remember

__all__ = ["allreduce_gradients"]

logger = logging.getLogger(__name__)


def _dense_gradient(grad, variable, sparse_as_dense):
    if isinstance(grad, tf.IndexedSlices):
        if not sparse_as_dense:
            raise ValueError(
                f"variable {variable.name!r} has a sparse gradient (tf.IndexedSlices, for "
                f"example from an Embedding layer or tf.gather); gTop-k works on dense buffers: "
                f"pass sparse_as_dense=True")
        grad = tf.convert_to_tensor(grad)
    return grad


def _check_variable(variable):
    if not isinstance(variable, tf.Variable) or not variable.shape.is_fully_defined():
        raise ValueError(
            f"gTop-k keeps a residual per variable, so every source must be a tf.Variable of "
            f"static shape; got {type(variable).__name__} {getattr(variable, 'name', '')!r}")


def _loss_scale(loss_scale):
    """(scale, run-time scale): the scale as a Python float when it is known now (eagerly),
    else as a float32 tensor, which is also returned second for the run-time set-up check."""
    if loss_scale is None:
        return 1.0, None
    if isinstance(loss_scale, (int, float)):
        scale = float(loss_scale)
    else:
        scale = tf.cast(tf.convert_to_tensor(loss_scale), tf.float32)
        if tf.executing_eagerly():
            scale = float(scale.numpy())
    if isinstance(scale, float):
        if not scale > 0 or scale == float("inf"):
            raise ValueError(f"the loss scale must be a finite positive number, got {scale}")
        return scale, None
    return scale, scale


@tf.autograph.experimental.do_not_convert
def allreduce_gradients(state, grads, variables, op=hvd.Average, sparse_as_dense=False,
                        name="gtopk", loss_scale=None, gradient_predivide_factor=1.0,
                        wire="float32", optimizer=None, joined=False, hierarchical=False):
    """The gTop-k average (or sum) of ``grads`` over all ranks; call it on every rank.

    Every rank issues the same Horovod operations: one gTop-k exchange for all buffers (one
    allgather a stage, ``{name}.0.s<stage>``; Top-k: one exchange per buffer, ``{name}.<i>``;
    a header-only exchange when every tensor goes dense), then one dense allreduce.  A
    variable without a gradient on this rank counts as zero (another rank may have one).  A
    non-finite step (NaN or Inf in some rank's gradients) gives NaN gradients on every rank
    and keeps every residual; set-ups that differ raise PlanMismatchError on every rank.

    Args:
        state: the :class:`~gtopk_hvd.tensorflow.state.GTopkState` (residuals, density).
        grads: one gradient per variable, None for a variable without one here.
        variables: the tf.Variables the gradients belong to (they key the residuals).
        op: ``hvd.Average`` or ``hvd.Sum``.
        sparse_as_dense: densify tf.IndexedSlices gradients (otherwise they are refused).
        name: prefix of the Horovod op names.
        loss_scale: the loss scale the gradients carry (a float or a scalar tensor, read at
            every call), None for none.  Residuals stay in unscaled units: acc = g + S * eps,
            eps = rest / S, so with power-of-two scales the result is the unscaled one times
            S, bit for bit; the scale is part of what the ranks compare.
        gradient_predivide_factor: f, as in Horovod (with Average): the gradients are
            multiplied by 1/f before the reduction and the average by f after it; the
            residuals stay in the gradients' units.
        wire: "float16" sends the values as float16 (Horovod's Compression.fp16; merges and
            residuals stay float32, the rounding of applied entries stays in the residual).
        optimizer: the Keras optimizer that applies the result, if any: after ``join()`` its
            variables go from the last rank to join to the others, with ``variables``.
        joined: internal (gtopk_hvd.tensorflow.join): take part with zeros, apply nothing;
            returns whether every rank has joined instead of the gradients.
        hierarchical: hierarchical gTop-k (ALGORITHM.md), one hierarchical step a buffer,
            with a residual of this rank's shard of each (``GTopkState.shard_residual``);
            needs ``init(hierarchical=True)``; where the layout falls back, flat gTop-k.

    Returns:
        The reduced gradients, in the order, shapes and dtypes of the variables (times the
        loss scale, as they came).
    """
    check_tf2_context("gTop-k's allreduce_gradients")
    size, rank = hvd.size(), hvd.rank()
    items = []
    for i, (grad, var) in enumerate(zip(grads, variables)):
        _check_variable(var)
        grad = zeros(var.shape, var.dtype) if grad is None else grad
        items.append(Item(i, _dense_gradient(grad, var, sparse_as_dense), var))
    threshold = max(1, state.dense_threshold)
    sparse = [it for it in items if it.numel >= threshold]
    dense = [it for it in items if it.numel < threshold]
    if state.granularity == "model":
        layout = [("model", sparse)] if sparse else []
    else:
        layout = [(state.residual_name(it.variable), [it]) for it in sparse]
    numels = [sum(it.numel for it in members) for _, members in layout]
    hierarchy = None  # (layout, process sets) of hierarchical gTop-k
    if hierarchical:
        hierarchy = hierarchical_sets(hvd)
        hierarchy = None if hierarchy[0].mode == "flat" else hierarchy
    nodes = hierarchy if state.algorithm == "auto" else None  # "auto" picks the mode
    for (buffer_name, _), numel in zip(layout, numels):
        check_buffer_numel(numel, buffer_name)
    # algorithm="auto": the buffers it sends densely join the dense allreduce, whose rounds
    # are paid anyway when tensors below dense_threshold go there; on nodes it also chooses
    # between flat and hierarchical gTop-k (gtopk_hvd.common.cost.hierarchical_choice)
    methods = state.methods_for([b for b, _ in layout], numels, size, rank,
                                dense_paid=bool(dense), nodes=None if nodes is None else
                                (nodes[0].nodes, nodes[0].local_size))
    if nodes is not None and "hierarchical" not in methods:
        hierarchy = None
    methods = ["gtopk" if m == "hierarchical" else m for m in methods]
    key = layout_key(hierarchy)
    check_mode(name, hierarchy is not None, state.is_verified())
    shard_numels = []  # create (and so restore) every residual before the checks
    for (buffer_name, members), numel, method in zip(layout, numels, methods):
        if hierarchy is not None and method != "dense":
            lo, hi = hierarchy[0].shard(numel, rank)
            shard_numels.append(hi - lo)
            state.shard_residual(buffer_name, hi - lo, key)
        else:
            for it in members:
                state.residual(it.variable)
    # "auto" keeps both modes' storage: the layout its shards and carries belong to
    state.check_layout(key if nodes is None else layout_key(nodes))
    state.check_world(size, rank)
    if hierarchical and is_elastic():  # a reset may have moved this rank's part
        state.reshard([(b, [it.variable for it in members], numel)
                        for (b, members), numel in zip(layout, numels)], key,
                       None if hierarchy is None else hierarchy[0], rank)
    if nodes is not None:  # a buffer whose mode changed moves its residual first
        state.settle_modes([(b, [it.variable for it in members], numel,
                             hierarchy is not None and method != "dense")
                            for (b, members), numel, method in zip(layout, numels, methods)],
                           nodes[0], layout_key(nodes), rank)
    # the plan names each variable by its position and size: variable names may differ
    # across ranks (Keras numbers them per process), positions may not
    buffers = [Buffer(b, members, numel, m, [(f"variable {it.index}", it.numel)
                                             for it in members])
               for (b, members), numel, m in zip(layout, numels, methods)]
    sparse_numels = [b.numel for b in buffers if b.method != "dense"]
    density, ks = state.densities(sparse_numels + shard_numels)
    ks, shard_ks = ks[:len(sparse_numels)], ks[len(sparse_numels):]  # the plan's, the shards'
    hierarchy = None if hierarchy is None else (*hierarchy, shard_ks)
    scale, runtime_scale = _loss_scale(loss_scale)
    config = StepConfig(state.algorithm, op_name(op), state.granularity,
                        state.dense_threshold, gradient_predivide_factor, wire, name)
    eager = tf.executing_eagerly()
    if joined:
        backend = JoinedTFStep(state, config, items, op, state.record_step, hierarchy)
    else:  # what a rank that joins repeats with zeros (gtopk_hvd.tensorflow.join)
        remember(state, variables, optimizer, eager, dict(
            op=op, sparse_as_dense=sparse_as_dense, name=name, wire=wire,
            gradient_predivide_factor=gradient_predivide_factor, hierarchical=hierarchical))
        backend = TFStep(state, config, items, op, state.record_step, hierarchy)
    finite = run_step(backend, config, buffers,
                      [(state.residual_name(it.variable), it, it.numel) for it in dense], ks,
                      density, scale, runtime_scale,
                      dense_first=_dense_first(state) and eager)
    if joined:
        return backend.all_joined
    if finite is True and eager:
        state.mark_verified()
    if state.algorithm == "auto" and state.link is None and eager:
        # every rank got here with the same verdict, so with the same plan: measure now
        node_set = None if nodes is None else nodes[1][nodes[0].node(rank)]
        state.link = measure_link(op_name_safe(f"{name}.link"), node_set=node_set,
                                  local_size=hvd.local_size())
    return backend.out


def _dense_first(state):
    """Whether the dense allreduce goes first and carries the verdict, as the PyTorch
    optimizer does: with algorithm='auto', eagerly, once a finite step exchanged with headers
    found every rank with the same plan.  Not in a graph (traced before any step), not under
    Elastic (a joining rank has had no first step while the others have)."""
    return state.algorithm == "auto" and state.is_verified() and not is_elastic()
