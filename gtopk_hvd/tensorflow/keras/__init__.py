"""gTop-k S-SGD for tf.keras, as a drop-in for ``horovod.tensorflow.keras``.

``import gtopk_hvd.tensorflow.keras as hvd`` reads like ``import horovod.tensorflow.keras as
hvd``: ``DistributedOptimizer`` wraps a tf.keras optimizer so that ``model.fit`` applies the
gTop-k sparse average of the gradients; ``hvd.callbacks`` holds Horovod's callbacks and
gTop-k's (density schedule, statistics in the logs).

tf.keras means the tf-keras package, selected with ``TF_USE_LEGACY_KERAS=1`` before TensorFlow
is imported.  Under TensorFlow 2.16+ without it, ``tf.keras`` is Keras 3, where Horovod's Keras
wrapper silently skips communication: ``DistributedOptimizer`` refuses Keras 3 optimizers
with an error that says so.

Reference: S. Shi et al., "A Distributed Synchronous SGD Algorithm with Global Top-k
Sparsification for Low Bandwidth Networks", ICDCS 2019.
"""
import logging

from horovod.tensorflow import (Average, ProcessSet, Sum, add_process_set,
                                ccl_built, cross_rank, cross_size, cuda_built, ddl_built,
                                gloo_built, gloo_enabled, global_process_set, is_initialized,
                                local_rank, local_size, mpi_built, mpi_enabled,
                                mpi_threads_supported, nccl_built, rank, remove_process_set,
                                rocm_built, size, start_timeline, stop_timeline)
import horovod.tensorflow.keras as _horovod_keras
from horovod.tensorflow.keras import allgather, allreduce, broadcast, reducescatter

from gtopk_hvd._keras import (check_tf_keras_optimizer, create_distributed_optimizer,
                              load_model_with)
from gtopk_hvd.common.compat import forward_horovod
from gtopk_hvd.common.validation import check_positive_int
from gtopk_hvd.tensorflow import Compression, GTopkState, Link, init, measure_link, shutdown
from gtopk_hvd.tensorflow.gradient_tape import check_horovod_arguments, prepare_state
from gtopk_hvd.tensorflow.keras import callbacks, elastic

__all__ = [
    "init", "DistributedOptimizer", "load_model", "GTopkState", "callbacks", "elastic",
    "Link", "measure_link",
    "Average", "Compression", "ProcessSet", "Sum", "add_process_set", "allgather", "allreduce",
    "broadcast", "reducescatter", "ccl_built", "cross_rank", "cross_size", "cuda_built",
    "ddl_built", "gloo_built", "gloo_enabled", "global_process_set", "is_initialized",
    "local_rank", "local_size", "mpi_built", "mpi_enabled", "mpi_threads_supported",
    "nccl_built", "rank", "remove_process_set", "rocm_built", "shutdown", "size",
    "start_timeline", "stop_timeline",
]

logger = logging.getLogger(__name__)


def DistributedOptimizer(optimizer, name=None,
                         device_dense='', device_sparse='',
                         compression=Compression.none,
                         sparse_as_dense=False,
                         gradient_predivide_factor=1.0,
                         op=Average,
                         backward_passes_per_step=1,
                         average_aggregated_gradients=False,
                         num_groups=0,
                         groups=None,
                         process_set=global_process_set,
                         scale_local_gradients=True,
                         *, density=0.001, algorithm="gtopk", granularity="model",
                         dense_threshold=0, gtopk_state=None, link=None, hierarchical=False):
    """Wrap a tf.keras optimizer so that it applies the gTop-k sparse average of the gradients.

    Arguments as ``horovod.tensorflow.keras.DistributedOptimizer``, plus (keyword-only):

    Args:
        density: fraction of gradient entries kept per buffer, a float in (0, 1], a
            :class:`~gtopk_hvd.common.density.DensitySchedule` or ``callable(step)``;
            k = max(1, ceil(density * buffer size)).  1.0 gives the dense average.  Change it
            during training with ``callbacks.DensityScheduleCallback``.
        algorithm: ``"gtopk"`` (hypercube merge, O(k log P)), ``"topk"`` (allgather of
            every rank's top-k, O(kP)) or ``"auto"``: per buffer the cheapest of a dense
            allreduce and gTop-k by the cost model (gtopk_hvd.common.cost).
        granularity: ``"model"`` (one top-k over all gradients flattened together, as in the
            paper) or ``"layer"`` (one per tensor).
        dense_threshold: tensors with fewer elements are allreduced densely in float32 (0:
            sparsify everything, as the paper does).
        gtopk_state: a :class:`~gtopk_hvd.tensorflow.GTopkState` to use instead of a new one
            (then density and friends come from it).
        link: for ``algorithm="auto"``: a :class:`~gtopk_hvd.common.cost.Link` or a tuple
            (alpha, beta[, select[, overhead]]).  Keras traces the training step, and the
            choice is made then: pass ``link=hvd.measure_link()`` (called eagerly on every
            rank) and a constant density, or compile with ``run_eagerly=True`` (then the
            link is measured after the first step).
        hierarchical: hierarchical gTop-k across nodes (docs/tensorflow.md, "Hierarchical
            gTop-k"): a reduce-scatter inside each node, gTop-k across nodes on each rank's
            1/L shard, an allgather inside the node; residuals cover this rank's shard.  Needs
            ``init(hierarchical=True)`` and ``algorithm="gtopk"`` or ``"auto"`` (which then
            also chooses between flat and hierarchical gTop-k by the cost on these nodes);
            unequal hosts or one rank a host run flat gTop-k (logged once).

    The residuals (float32, one per trainable variable, per rank) are created at the first
    step as variables of ``optimizer.gtopk_state``: ``tf.train.Checkpoint`` and Keras' TF-format
    checkpoints (``model.save_weights``, ``ModelCheckpoint``) save and restore them; residuals
    from another world size are dropped with a warning.  They are not ``optimizer.variables``,
    so Horovod's BroadcastGlobalVariablesCallback leaves them alone.  ``optimizer.gtopk_stats()``
    returns this rank's statistics of the last step.

    ``compression`` is ``Compression.none`` or ``Compression.fp16`` (values travel as float16,
    merges and residuals stay float32), ``op`` is Average or Sum, ``process_set`` the global
    set and ``num_groups`` / ``groups`` unset (use ``granularity``);
    ``gradient_predivide_factor`` works as in Horovod (with Average).  ``device_dense`` / ``device_sparse`` are accepted and unused.

    Example::

        import gtopk_hvd.tensorflow.keras as hvd
        hvd.init()
        opt = hvd.DistributedOptimizer(tf.keras.optimizers.SGD(0.01 * hvd.size()),
                                       density=0.01)
        model.compile(optimizer=opt, loss=...)
        model.fit(..., callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                                  hvd.callbacks.GTopkStatsCallback()])
    """
    if hasattr(optimizer, "gtopk_state") or hasattr(optimizer, "_allreduce_grads"):
        raise ValueError(f"optimizer is already a distributed optimizer "
                         f"({type(optimizer).__name__}); wrap the plain tf.keras optimizer once")
    check_tf_keras_optimizer(optimizer)
    reduction = check_horovod_arguments(compression, op, gradient_predivide_factor, num_groups,
                                        groups, process_set)
    backward_passes_per_step = check_positive_int(backward_passes_per_step,
                                                  "backward_passes_per_step")
    gtopk_state = prepare_state(
        gtopk_state, lambda: GTopkState(density, algorithm, granularity, dense_threshold, link),
        "gtopk_hvd.tensorflow.keras.init()", "DistributedOptimizer", hierarchical)
    reduction["hierarchical"] = hierarchical
    return create_distributed_optimizer(
        optimizer=optimizer, name=name, sparse_as_dense=sparse_as_dense, op=op,
        backward_passes_per_step=backward_passes_per_step,
        average_aggregated_gradients=average_aggregated_gradients,
        scale_local_gradients=scale_local_gradients, gtopk_state=gtopk_state,
        reduction=reduction)


def load_model(filepath, custom_optimizers=None, custom_objects=None,
               compression=Compression.none, legacy_opts=False, *, density=0.001,
               algorithm="gtopk", granularity="model", dense_threshold=0, gtopk_state=None,
               link=None):
    """Load a saved tf.keras model (``.keras``, ``.h5`` or SavedModel) with its optimizer
    wrapped again by the gTop-k :func:`DistributedOptimizer`, as ``hvd.load_model`` does with
    Horovod's; the optimizer's own state (slots, iterations) is restored.

    Arguments as ``horovod.tensorflow.keras.load_model`` plus the gTop-k keyword arguments of
    :func:`DistributedOptimizer`.  Every tf.keras optimizer class (also the ``legacy`` ones)
    is found without ``custom_optimizers``.  The residuals are not part of these formats: they
    start from zero (``model.save_weights`` / ``tf.train.Checkpoint`` keep them).
    """
    check_horovod_arguments(compression, Average, 1.0, 0, None, global_process_set)

    def wrap(optimizer):
        return DistributedOptimizer(optimizer, compression=compression, density=density,
                                    algorithm=algorithm,
                                    granularity=granularity, dense_threshold=dense_threshold,
                                    gtopk_state=gtopk_state, link=link)
    return load_model_with(wrap, filepath, custom_optimizers, custom_objects, legacy_opts)


# every other name of horovod.tensorflow.keras, unchanged (gtopk_hvd.common.compat)
_forwarded = forward_horovod(globals(), _horovod_keras)
