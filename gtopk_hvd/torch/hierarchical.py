"""Hierarchical gTop-k with PyTorch: Horovod performs the requests of the core's step
(gtopk_hvd.common.hierarchy.hierarchical_exchange_steps) in the node and rail process sets.

Used by ``gtopk_allreduce(..., hierarchical=True)``; the sets come from
``gtopk_hvd.torch.init(hierarchical=True)`` (gtopk_hvd.common.process_sets.hierarchical_sets).
"""
import horovod.torch as hvd
import torch

from gtopk_hvd.common.hierarchy import drive_requests, hierarchical_exchange_steps
from gtopk_hvd.common.plan import plan_digest
from gtopk_hvd.torch.collective import check_verdict
from gtopk_hvd.torch.ops import TorchOps, wait

__all__ = ["hierarchical_exchange", "drive", "gather_modes"]


def drive(steps, sets):
    """Perform the requests of a hierarchical step with Horovod (each group's process set
    from ``sets``); its result."""
    def alltoall(parts, group, name):
        splits = torch.tensor([p.numel() for p in parts], dtype=torch.int32)
        received, counts = hvd.alltoall(torch.cat(parts), splits=splits, name=name,
                                        process_set=sets[group])
        return list(torch.split(received, counts.tolist()))

    def allgather(message, group, name):
        return wait(hvd, hvd.allgather_async(message, name=name, process_set=sets[group]))
    return drive_requests(steps, alltoall, allgather)


def hierarchical_exchange(flat, residual, k, layout, sets, name, plan, wire="float32"):
    """One hierarchical step of this rank's flat float32 buffer ``flat`` with its shard's
    ``residual``; (HierarchicalExchange, finite).  Ranks whose ``plan`` differs raise
    PlanMismatchError on every rank."""
    ops = TorchOps(hvd, device=flat.device)
    res = drive(hierarchical_exchange_steps(ops, flat, residual, k, layout, hvd.rank(), name,
                                             plan_digest(plan), 0, wire), sets)
    return res, check_verdict(int(res.verdict), plan, name=f"{name}.plan")


def gather_modes(mode, name):
    """Every rank's ``mode`` (an int), by one allgather over every rank named ``name``
    (gtopk_hvd.common.process_sets.agree_on_mode)."""
    return hvd.allgather(torch.tensor([mode], dtype=torch.int32), name=name).tolist()
