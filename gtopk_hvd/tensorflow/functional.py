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
from gtopk_hvd.common.step import Buffer, StepConfig, run_step
from gtopk_hvd.common.validation import check_allreduce_arguments
from gtopk_hvd.tensorflow.collective import check_tf2_context, op_name
from gtopk_hvd.tensorflow.step import TensorStep

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
                    residual=None, process_set=hvd.global_process_set, *, profile=False):
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

    Returns:
        :class:`GTopkResult`; ``result.output`` is the dense tensor, ``result.residual`` the
        residual to pass to the next call.

    Example::

        res = gtopk_allreduce(grad, density=0.01, name="w", residual=eps)
        grad, eps = res.output, res.residual
    """
    check_tf2_context("gtopk_allreduce")
    _check_tensor(tensor, residual)
    density, numel, k = check_allreduce_arguments(density, op_name(op), algorithm,
                                                  process_set, tensor.shape.num_elements(), name)
    config = StepConfig(algorithm, op_name(op), "tensor", 0, name=name or "gtopk")
    backend = TensorStep(config, tensor, residual, profile and tf.executing_eagerly())
    run_step(backend, config, [Buffer(name or "tensor", [tensor], numel, algorithm)], [], [k],
             density)
    return backend.gtopk_result(k)
