"""``gtopk_allreduce``: the functional form of one gTop-k S-SGD step on one TensorFlow tensor.

One call on every rank, eagerly or in ``tf.function``, runs gtopk_hvd.common.step on a single
buffer, the tensor (:class:`~gtopk_hvd.tensorflow.step.TensorStep`):

1. compensate: acc = tensor + residual, flat float32;
2. select and communicate: hypercube gTop-k (or Top-k by allgather); the headers carry this
   rank's finiteness flag and plan digest, so every rank ends with the same verdict;
3. the new residual: acc with this rank's entries that reached the result cleared;
4. decompress: the global set scattered into a dense tensor, divided by P for Average;
   bit-identical on every rank.

Reference: S. Shi et al., "A Distributed Synchronous SGD Algorithm with Global Top-k
Sparsification for Low Bandwidth Networks", ICDCS 2019.
"""
import horovod.tensorflow as hvd
import tensorflow as tf

from gtopk_hvd.common.collective import GTopkResult
from gtopk_hvd.common.hierarchy import prepare_call
from gtopk_hvd.common.process_sets import hierarchical_sets
from gtopk_hvd.common.step import Buffer, StepConfig, run_step
from gtopk_hvd.common.validation import check_allreduce_arguments
from gtopk_hvd.tensorflow.collective import (after_verdict, check_tf2_context, exact_divide,
                                             op_name, update_residual)
from gtopk_hvd.tensorflow.hierarchical import check_call_mode, hierarchical_exchange
from gtopk_hvd.tensorflow.ops import zeros
from gtopk_hvd.tensorflow.step import TensorStep, when

__all__ = ["GTopkResult", "gtopk_allreduce"]


def _check_tensor(tensor, residual):
    if not isinstance(tensor, (tf.Tensor, tf.Variable)) or isinstance(tensor, tf.IndexedSlices):
        raise TypeError(f"tensor must be a tf.Tensor, got {type(tensor).__name__}")
    if not tensor.dtype.is_floating:
        raise ValueError(f"gTop-k reduces floating-point gradients, got dtype {tensor.dtype.name}; "
                         f"use hvd.allreduce for integer tensors")
    if not tensor.shape.is_fully_defined():
        raise ValueError(f"gtopk_allreduce needs a tensor of static shape, got {tensor.shape}")
    if residual is not None and (not isinstance(residual, (tf.Tensor, tf.Variable))
                                 or residual.dtype != tf.float32
                                 or residual.shape.num_elements() != tensor.shape.num_elements()):
        raise ValueError(
            f"residual must be a float32 tensor of {tensor.shape.num_elements()} elements (the "
            f"residual returned by the previous call, or None for zeros), got "
            f"{getattr(residual, 'dtype', type(residual).__name__)} with "
            f"{getattr(residual, 'shape', '?')}")


@tf.autograph.experimental.do_not_convert
def gtopk_allreduce(tensor, density=0.001, name=None, op=hvd.Average, algorithm="gtopk",
                    residual=None, process_set=hvd.global_process_set, *, profile=False,
                    hierarchical=False):
    """Sparse allreduce of ``tensor`` by gTop-k with error feedback; call it on every rank.

    Works eagerly and inside ``tf.function``.

    1. acc = tensor + residual (float32);
    2. local top-k of |acc|, k = max(1, ceil(density * numel)), ties by lower index;
    3. log2(P) hypercube stages of pairwise merge-and-truncate to k (``algorithm="gtopk"``),
       or an allgather of every rank's top-k (``algorithm="topk"``, O(kP));
    4. output = the global set scattered into a dense tensor, divided by P for Average;
    5. new residual = acc with this rank's entries that reached the result cleared.

    Args:
        tensor: the gradient (any static shape, floating point).
        density: fraction of entries kept, in (0, 1].  1.0 gives the dense sum exactly.
        name: prefix of the Horovod op names (the same on every rank).
        op: ``hvd.Average`` or ``hvd.Sum``.
        algorithm: ``"gtopk"`` or ``"topk"``.
        residual: this rank's residual from the previous call (flat float32), or None.
        process_set: only the global process set is supported.
        profile: record per-phase wall times in ``result.timings`` (eager only).
        hierarchical: hierarchical gTop-k (ALGORITHM.md), eagerly or in ``tf.function``,
            as in ``gtopk_hvd.torch.gtopk_allreduce``: ``residual`` covers this rank's shard;
            needs ``init(hierarchical=True)``; unequal hosts or one rank a host run flat.

    Returns:
        :class:`GTopkResult`; ``result.output`` is the dense tensor, ``result.residual`` the
        residual to pass to the next call.

    Example::

        res = gtopk_allreduce(grad, density=0.01, name="w", residual=eps)
        grad, eps = res.output, res.residual
    """
    check_tf2_context("gtopk_allreduce")
    if hierarchical:
        return _hierarchical_allreduce(tensor, density, name, op, algorithm, residual,
                                       process_set, profile)
    _check_tensor(tensor, residual)
    density, numel, k = check_allreduce_arguments(density, op_name(op), algorithm,
                                                  process_set, tensor.shape.num_elements(), name)
    config = StepConfig(algorithm, op_name(op), "tensor", 0, name=name or "gtopk")
    check_call_mode(name or "gtopk", False)
    backend = TensorStep(config, tensor, residual, profile and tf.executing_eagerly())
    run_step(backend, config, [Buffer(name or "tensor", [tensor], numel, algorithm)], [], [k],
             density)
    return backend.gtopk_result(k)


def _hierarchical_allreduce(tensor, density, name, op, algorithm, residual, process_set,
                            profile):
    """gtopk_allreduce(hierarchical=True): the core's hierarchical step driven with Horovod
    (gtopk_hvd.tensorflow.hierarchical); flat gTop-k where the layout falls back."""
    layout, sets = hierarchical_sets(hvd)
    if layout.mode == "flat":
        return gtopk_allreduce(tensor, density, name, op, algorithm, residual, process_set,
                               profile=profile)
    _check_tensor(tensor, None)
    density, numel, _ = check_allreduce_arguments(density, op_name(op), algorithm,
                                                  process_set, tensor.shape.num_elements(),
                                                  name)
    if residual is not None and residual.dtype != tf.float32:
        raise ValueError(f"residual must be a float32 tensor, got {residual.dtype.name}")
    (lo, hi), k, plan = prepare_call(
        layout, numel, hvd.rank(), density, op_name(op), algorithm,
        None if residual is None else residual.shape.num_elements())
    check_call_mode(name or "gtopk", True)
    flat = tf.reshape(tf.cast(tensor, tf.float32), [-1])
    eps = zeros([hi - lo]) if residual is None else tf.convert_to_tensor(residual)
    res, finite = hierarchical_exchange(flat, eps, k, layout, sets, f"{name or 'gtopk'}.h", plan)
    if finite is False:  # eagerly, every rank: NaN, the residual as it was
        dense, new = tf.fill([numel], float("nan")), eps
    else:  # indices of another layout are read only once the verdict is known
        indices = after_verdict(finite, res.indices)
        dense = tf.scatter_nd(tf.expand_dims(indices, 1), res.values, [numel])
        if op_name(op) == "Average":  # x / P exactly, also where a graph would take 1 / P
            dense = exact_divide(dense, hvd.size())
        new = update_residual(res.acc, res)
        if finite is not True:  # in a graph: NaN and the residual as it was where not finite
            dense = tf.where(finite, dense, float("nan"))
            new = when(finite, new, lambda: tf.identity(eps))
    result = GTopkResult(tf.cast(tf.reshape(dense, tensor.shape), tensor.dtype), new,
                         res.as_exchange_result(), k)
    result.finite = finite
    return result
