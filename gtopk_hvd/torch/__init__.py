"""gTop-k S-SGD for PyTorch, as a drop-in for ``horovod.torch``.

``import gtopk_hvd.torch as hvd`` reads like ``import horovod.torch as hvd``: Horovod's names
are re-exported, and ``init``, ``shutdown``, ``DistributedOptimizer``,
``broadcast_optimizer_state`` and ``join`` are replaced by their gTop-k versions.
``gtopk_allreduce`` is the functional form of one step, :class:`GTopkState` what the
optimizer keeps between steps.

Reference: S. Shi et al., "A Distributed Synchronous SGD Algorithm with Global Top-k
Sparsification for Low Bandwidth Networks", ICDCS 2019.
"""
import logging

import horovod.torch as _horovod_torch

from horovod.torch import (Adasum, Average, HorovodInternalError, Max, Min,
                           ProcessSet, Product, Sum, add_process_set, allgather,
                           allgather_object, allreduce, allreduce_, allreduce_async,
                           allreduce_async_, barrier, broadcast, broadcast_, broadcast_async,
                           broadcast_async_, broadcast_object, broadcast_parameters,
                           cross_rank, cross_size, global_process_set, gloo_built,
                           gloo_enabled, grouped_allreduce, is_initialized,
                           local_rank, local_size, mpi_built, mpi_enabled, poll, rank,
                           remove_process_set, size, synchronize)

from gtopk_hvd.common.compat import forward_horovod
from gtopk_hvd.common.cost import Link
from gtopk_hvd.common.density import (ConstantDensity, DensitySchedule,
                                      ExponentialWarmupDensity, StepwiseDensity)
from gtopk_hvd.common.errors import GTopkError, ProcessSetError
from gtopk_hvd.torch import elastic
from gtopk_hvd.torch.compression import Compression, GTopkCompressor
from gtopk_hvd.torch.collective import measure_link
from gtopk_hvd.torch.functional import GTopkResult, gtopk_allreduce, gtopk_allreduce_
from gtopk_hvd.torch.functions import broadcast_optimizer_state, init, join, shutdown
from gtopk_hvd.torch.ops import TorchOps
from gtopk_hvd.torch.optimizer import DistributedOptimizer
from gtopk_hvd.torch.state import GTopkState

__all__ = [
    # gTop-k
    "init", "DistributedOptimizer", "gtopk_allreduce", "gtopk_allreduce_", "GTopkResult",
    "GTopkState", "TorchOps", "elastic", "Compression", "GTopkCompressor", "Link",
    "measure_link",
    "broadcast_optimizer_state", "shutdown", "join", "GTopkError", "ProcessSetError",
    "ConstantDensity", "DensitySchedule", "ExponentialWarmupDensity", "StepwiseDensity",
    # re-exported from horovod.torch
    "Adasum", "Average", "HorovodInternalError", "Max", "Min", "ProcessSet",
    "Product", "Sum", "add_process_set", "allgather", "allgather_object", "allreduce",
    "allreduce_", "allreduce_async", "allreduce_async_", "barrier", "broadcast", "broadcast_",
    "broadcast_async", "broadcast_async_", "broadcast_object", "broadcast_parameters",
    "cross_rank", "cross_size", "global_process_set", "gloo_built", "gloo_enabled",
    "grouped_allreduce", "is_initialized", "local_rank", "local_size", "mpi_built",
    "mpi_enabled", "poll", "rank", "remove_process_set", "size", "synchronize",
]

logger = logging.getLogger(__name__)

# every other name of horovod.torch, unchanged (gtopk_hvd.common.compat)
_forwarded = forward_horovod(globals(), _horovod_torch)
