"""Start-up and state helpers of the PyTorch backend: ``init`` and ``broadcast_optimizer_state``.

``init`` is ``hvd.init`` with dynamic process sets plus the registration of the two-rank
pair sets the gTop-k stages exchange in (gtopk_hvd.common.process_sets).
"""
import logging

import horovod.torch as hvd
import torch

from gtopk_hvd.common.process_sets import init_with_exchange_sets
from gtopk_hvd.common.threads import share_threads

__all__ = ["init", "shutdown", "broadcast_optimizer_state"]

logger = logging.getLogger(__name__)


def init(comm=None, process_sets=None):
    """Initialise Horovod and register gTop-k's pair process sets; call it on every rank
    instead of ``hvd.init()``.  Arguments as ``horovod.torch.init``.

    When the ranks on this host would together run more intra-op threads than it has cores,
    each rank gets its share (``torch.set_num_threads``; gtopk_hvd.common.threads): not with
    one rank per host, nor when ``OMP_NUM_THREADS`` or ``GTOPK_HVD_THREADS`` is set
    (``GTOPK_HVD_THREADS=keep`` turns this off).
    """
    init_with_exchange_sets(hvd, comm=comm, process_sets=process_sets)
    share_threads(torch.get_num_threads(), _set_threads, hvd.local_size(), hvd.rank())


def _set_threads(threads):
    torch.set_num_threads(threads)
    return True


def shutdown():
    """``hvd.shutdown()`` once every rank got here (a barrier first).

    Horovod's own ``hvd.shutdown()`` is safe too: every rank issues the same gTop-k
    operations, so none is left inside an exchange.  The barrier only makes every rank leave
    together.
    """
    if hvd.is_initialized() and hvd.size() > 1:
        hvd.barrier()
    hvd.shutdown()


def broadcast_optimizer_state(optimizer, root_rank, model=None):
    """``hvd.broadcast_optimizer_state``, for any optimizer, gTop-k or not (Horovod's own
    function is just as safe on a gTop-k DistributedOptimizer).

    Ranks whose optimizer has no state yet (the resume idiom: only rank 0 loaded a checkpoint)
    initialise it with a local step of the wrapped optimizer on zero gradients, which never
    communicates; the gTop-k schedule step travels from ``root_rank`` with the options of
    ``param_groups[0]`` (``"gtopk_step"``).  The residuals are not broadcast: they belong to
    each rank.
    """
    return hvd.broadcast_optimizer_state(optimizer, root_rank, model=model)
