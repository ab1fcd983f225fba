"""gTop-k S-SGD for TensorFlow 2, as a drop-in for ``horovod.tensorflow``.

``import gtopk_hvd.tensorflow as hvd`` reads like ``import horovod.tensorflow as hvd``:
Horovod's names are re-exported, ``init`` and ``DistributedGradientTape`` are replaced by their
gTop-k versions, ``gtopk_allreduce`` is the functional form of one step and
:class:`GTopkState` holds what gTop-k keeps between steps (residuals, density schedule,
statistics).  Everything works eagerly and inside ``tf.function``.  For Keras use
``gtopk_hvd.tensorflow.keras`` (tf.keras, i.e. tf-keras with ``TF_USE_LEGACY_KERAS=1``).

Reference: S. Shi et al., "A Distributed Synchronous SGD Algorithm with Global Top-k
Sparsification for Low Bandwidth Networks", ICDCS 2019.
"""
import logging

import horovod.tensorflow as _hvd
import tensorflow as _tf
from horovod.tensorflow import (Adasum, Average, Max, Min, ProcessSet, Product,
                                Sum, SyncBatchNormalization, add_process_set, allgather,
                                allgather_object, allreduce, alltoall, broadcast, broadcast_,
                                broadcast_object, broadcast_object_fn, broadcast_variables,
                                ccl_built, cross_rank, cross_size, cuda_built, ddl_built,
                                gloo_built, gloo_enabled, global_process_set, grouped_allgather,
                                grouped_allreduce, grouped_reducescatter, is_homogeneous,
                                is_initialized, local_rank, local_rank_op, local_size,
                                local_size_op, mpi_built, mpi_enabled, mpi_threads_supported,
                                nccl_built, process_set_included_op, rank, rank_op,
                                reducescatter, remove_process_set, rocm_built, size,
                                size_op, start_timeline, stop_timeline)

from gtopk_hvd.common.compat import forward_horovod
from gtopk_hvd.common.cost import Link
from gtopk_hvd.common.density import (ConstantDensity, DensitySchedule,
                                      ExponentialWarmupDensity, StepwiseDensity)
from gtopk_hvd.common.errors import GTopkError, ProcessSetError
from gtopk_hvd.common.process_sets import init_with_exchange_sets
from gtopk_hvd.common.threads import host_cores, share_threads
from gtopk_hvd.tensorflow.compression import Compression, GTopkCompressor
from gtopk_hvd.tensorflow.collective import measure_link
from gtopk_hvd.tensorflow.functional import GTopkResult, gtopk_allreduce
from gtopk_hvd.tensorflow import elastic
from gtopk_hvd.tensorflow.gradient_tape import (DistributedGradientTape,
                                                PartialDistributedGradientTape)
from gtopk_hvd.tensorflow.gradients import allreduce_gradients
from gtopk_hvd.tensorflow.join import join
from gtopk_hvd.tensorflow.ops import TFOps
from gtopk_hvd.tensorflow.state import GTopkState

__all__ = [
    # gTop-k
    "init", "shutdown", "DistributedGradientTape", "PartialDistributedGradientTape",
    "DistributedOptimizer", "elastic", "gtopk_allreduce", "GTopkResult", "GTopkState",
    "allreduce_gradients", "TFOps", "GTopkError", "Compression", "GTopkCompressor", "ProcessSetError",
    "Link", "measure_link",
    "ConstantDensity", "DensitySchedule", "ExponentialWarmupDensity", "StepwiseDensity",
    # re-exported from horovod.tensorflow
    "Adasum", "Average", "Max", "Min", "ProcessSet", "Product", "Sum",
    "SyncBatchNormalization", "add_process_set", "allgather", "allgather_object", "allreduce",
    "alltoall", "broadcast", "broadcast_", "broadcast_object", "broadcast_object_fn",
    "broadcast_variables", "ccl_built", "cross_rank", "cross_size", "cuda_built", "ddl_built",
    "gloo_built", "gloo_enabled", "global_process_set", "grouped_allgather",
    "grouped_allreduce", "grouped_reducescatter", "is_homogeneous", "is_initialized", "join",
    "local_rank", "local_rank_op", "local_size", "local_size_op", "mpi_built", "mpi_enabled",
    "mpi_threads_supported", "nccl_built", "process_set_included_op", "rank", "rank_op",
    "reducescatter", "remove_process_set", "rocm_built", "size", "size_op",
    "start_timeline", "stop_timeline",
]

logger = logging.getLogger(__name__)


def init(comm=None, process_sets=None, hierarchical=False):
    """Initialise Horovod and register gTop-k's pair process sets; call it on every rank
    instead of ``hvd.init()``.  Arguments as ``horovod.tensorflow.init``.

    When the ranks on this host would together run more intra-op threads than it has cores,
    each rank gets its share (``tf.config.threading``; gtopk_hvd.common.threads), if TensorFlow
    has not started its runtime yet: not with one rank per host, nor when ``OMP_NUM_THREADS``
    or ``GTOPK_HVD_THREADS`` is set (``GTOPK_HVD_THREADS=keep`` turns this off).

    ``hierarchical=True`` also registers the node and rail process sets of hierarchical
    gTop-k (with dynamic process sets, once Horovod knows the hosts).
    """
    init_with_exchange_sets(_hvd, comm=comm, process_sets=process_sets,
                            hierarchical=hierarchical)
    share_threads(_tf.config.threading.get_intra_op_parallelism_threads() or host_cores(),
                  _set_threads, _hvd.local_size(), _hvd.rank())


def _set_threads(threads):
    try:
        _tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:  # the runtime already started: too late to change
        return False
    return True


def shutdown():
    """``hvd.shutdown()`` once every rank got here (a barrier first: Horovod's TensorFlow API
    has none, so an allreduce of a scalar).

    Horovod's own ``hvd.shutdown()`` is safe too: every rank issues the same gTop-k
    operations, so none is left inside an exchange.  The barrier only makes every rank leave
    together.
    """
    if _hvd.is_initialized() and _hvd.size() > 1:
        with _tf.init_scope():
            _hvd.allreduce(_tf.zeros([]), name="gtopk.shutdown.barrier", op=_hvd.Sum)
    _hvd.shutdown()


def DistributedOptimizer(optimizer, name=None, use_locking=False, device_dense='',
                         device_sparse='', compression=_hvd.Compression.none,
                         sparse_as_dense=False, backward_passes_per_step=1, op=Average,
                         gradient_predivide_factor=1.0, average_aggregated_gradients=False,
                         num_groups=0, groups=None, process_set=global_process_set,
                         scale_local_gradients=True, **gtopk):
    """``horovod.tensorflow.DistributedOptimizer`` with gTop-k.  As in Horovod, a Keras
    optimizer is wrapped by the Keras ``DistributedOptimizer``
    (gtopk_hvd.tensorflow.keras; the gTop-k arguments keyword-only).  TensorFlow 1
    optimizers (``tf.compat.v1.train.Optimizer``) are refused: use
    :func:`DistributedGradientTape`, a Keras optimizer, or Horovod's own optimizer with
    ``compression=gtopk_hvd.tensorflow.Compression.gtopk(...)``."""
    if isinstance(optimizer, _tf.compat.v1.train.Optimizer):
        raise TypeError(
            f"gtopk_hvd.tensorflow.DistributedOptimizer wraps Keras optimizers; got the "
            f"TensorFlow 1 optimizer {type(optimizer).__name__}: use "
            f"gtopk_hvd.tensorflow.DistributedGradientTape, a tf.keras optimizer, or "
            f"horovod.tensorflow.DistributedOptimizer(opt, compression="
            f"gtopk_hvd.tensorflow.Compression.gtopk(density=...))")
    if use_locking:
        raise ValueError("use_locking applies to TensorFlow 1 optimizers only; drop it")
    from gtopk_hvd.tensorflow import keras as _keras  # as Horovod: Keras on demand
    return _keras.DistributedOptimizer(
        optimizer, name=name, device_dense=device_dense, device_sparse=device_sparse,
        compression=compression, sparse_as_dense=sparse_as_dense,
        gradient_predivide_factor=gradient_predivide_factor, op=op,
        backward_passes_per_step=backward_passes_per_step,
        average_aggregated_gradients=average_aggregated_gradients, num_groups=num_groups,
        groups=groups, process_set=process_set, scale_local_gradients=scale_local_gradients,
        **gtopk)


# every other name of horovod.tensorflow, unchanged (gtopk_hvd.common.compat)
_forwarded = forward_horovod(globals(), _hvd)
