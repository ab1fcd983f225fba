"""Hierarchical gTop-k with PyTorch: Horovod performs the requests of the core's step
(gtopk_hvd.common.hierarchy.hierarchical_exchange_steps) in the node and rail process sets.

Used by ``gtopk_allreduce(..., hierarchical=True)``; the sets come from
``gtopk_hvd.torch.init(hierarchical=True)`` (gtopk_hvd.common.process_sets.hierarchical_sets).
"""
import horovod.torch as hvd
import torch

from gtopk_hvd.common.collective import ExchangeResult
from gtopk_hvd.common.hierarchy import hierarchical_exchange_steps, shard_bounds
from gtopk_hvd.common.plan import plan_digest
from gtopk_hvd.torch.collective import check_verdict
from gtopk_hvd.torch.ops import TorchOps, wait

__all__ = ["hierarchical_exchange", "shard_of"]


def shard_of(layout, numel, rank):
    """(lo, hi) of ``rank``'s shard of a buffer of ``numel`` entries."""
    return shard_bounds(numel, layout.local_size)[rank % layout.local_size]


def _drive(steps, sets):
    answer = None
    try:
        while True:
            kind, payload, group, name = steps.send(answer)
            process_set = sets[group]
            if kind == "alltoall":
                splits = torch.tensor([p.numel() for p in payload], dtype=torch.int32)
                received, counts = hvd.alltoall(torch.cat(payload), splits=splits, name=name,
                                                process_set=process_set)
                answer = list(torch.split(received, counts.tolist()))
            else:
                answer = wait(hvd, hvd.allgather_async(payload, name=name,
                                                       process_set=process_set))
    except StopIteration as done:
        return done.value


def hierarchical_exchange(flat, residual, k, layout, sets, name, plan, wire="float32"):
    """One hierarchical step of this rank's flat float32 buffer ``flat`` with its shard's
    ``residual``; (HierarchicalExchange, finite).  Ranks whose ``plan`` differs raise
    PlanMismatchError on every rank."""
    ops = TorchOps(hvd, device=flat.device)
    res = _drive(hierarchical_exchange_steps(ops, flat, residual, k, layout, hvd.rank(), name,
                                             plan_digest(plan), 0, wire), sets)
    return res, check_verdict(int(res.verdict), plan, name=f"{name}.plan")


def as_exchange_result(res, bytes_sent=0):
    """The :class:`ExchangeResult` view of a hierarchical step (for GTopkResult)."""
    return ExchangeResult(res.values, res.indices, res.local_indices, res.alive, res.verdict,
                          bytes_sent, {})
