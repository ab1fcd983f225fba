"""Start-up, state and end-of-data helpers of the PyTorch backend: ``init``, ``shutdown``,
``broadcast_optimizer_state`` and ``join``.

``init`` is ``hvd.init`` with dynamic process sets plus the registration of the two-rank
pair sets the gTop-k stages exchange in (gtopk_hvd.common.process_sets).
"""
import logging

import horovod.torch as hvd
import torch

from gtopk_hvd.common.join import last_to_join, rounds_until_all_joined
from gtopk_hvd.common.process_sets import init_with_exchange_sets
from gtopk_hvd.common.threads import share_threads
from gtopk_hvd.torch.synchronizer import live_synchronizers

__all__ = ["init", "shutdown", "broadcast_optimizer_state", "join"]

logger = logging.getLogger(__name__)


def init(comm=None, process_sets=None, hierarchical=False):
    """Initialise Horovod and register gTop-k's pair process sets; call it on every rank
    instead of ``hvd.init()``.  Arguments as ``horovod.torch.init``.

    When the ranks on this host would together run more intra-op threads than it has cores,
    each rank gets its share (``torch.set_num_threads``; gtopk_hvd.common.threads): not with
    one rank per host, nor when ``OMP_NUM_THREADS`` or ``GTOPK_HVD_THREADS`` is set
    (``GTOPK_HVD_THREADS=keep`` turns this off).

    ``hierarchical=True`` also registers the node and rail process sets of hierarchical
    gTop-k (with dynamic process sets, once Horovod knows the hosts).
    """
    init_with_exchange_sets(hvd, comm=comm, process_sets=process_sets,
                            hierarchical=hierarchical)
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


def join(device=-1):
    """``hvd.join()`` for gTop-k: call it on a rank that ran out of data; it returns once
    every rank has called it, with the rank that joined last, as Horovod's does.

    Until then this rank takes part in every step of the others' gTop-k optimizers (each
    ``DistributedOptimizer`` of this process, in the order they last stepped) with zero
    gradients: the others' steps give exactly what they would give if this rank had
    contributed zeros, and this rank's residuals are kept for later.  When every rank has
    joined, the ranks that joined early take the parameters, the optimizer state (and the
    ``grad_scaler``'s state) of the rank that joined last, so that every rank leaves with
    bit-identical parameters.  Between a rank's ``join()`` and the last one, the ranks still
    training may run their optimizers' steps but no Horovod operation of their own (average
    metrics after ``join()``); with no gTop-k optimizer in this process this is Horovod's
    ``join`` (``device`` as there).
    """
    syncs = live_synchronizers()
    if not syncs:
        return hvd.join(device)
    rounds = rounds_until_all_joined([sync.synchronize_joined for sync in syncs])
    last, catch_up = last_to_join(hvd.allgather(torch.tensor([rounds]),
                                                name="gtopk.join.rounds").tolist())
    if catch_up:  # some ranks skipped steps: they take the last rank's parameters and state
        for sync in syncs:
            sync.adopt_from(last)
    return last
