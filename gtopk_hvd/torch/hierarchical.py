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

__all__ = ["hierarchical_exchange", "drive", "gather_modes", "issue", "answer"]


def issue(kind, payload, process_set, name):
    """Start one request of a hierarchical step with Horovod, asynchronously: ``("alltoall",
    parts)`` (part j to the group's j-th member) or ``("allgather", message)``; its handle."""
    if kind == "alltoall":
        splits = torch.tensor([p.numel() for p in payload], dtype=torch.int32)
        return hvd.alltoall_async(_laid_end_to_end(payload), splits=splits, name=name,
                                  process_set=process_set)
    return hvd.allgather_async(payload, name=name, process_set=process_set)


def _laid_end_to_end(parts):
    """The parts as one tensor: the buffer they are consecutive slices of (the shards of the
    step's gradient buffer), without copying it, or their concatenation."""
    base = parts[0]._base
    if base is not None and base.dim() == 1 and base.is_contiguous() and \
            parts[0].data_ptr() == base.data_ptr() and \
            sum(p.numel() for p in parts) == base.numel():
        offset = 0
        for p in parts:
            if p._base is not base or p.data_ptr() != base.data_ptr() + offset * \
                    base.element_size() or not p.is_contiguous():
                break
            offset += p.numel()
        else:
            return base
    return torch.cat(parts)


def answer(kind, output):
    """What the step expects back from a finished request: the alltoall's parts, one a
    member, or the gathered tensor."""
    if kind == "alltoall":
        received, counts = output
        return list(torch.split(received, counts.tolist()))
    return output


def drive(steps, sets):
    """Perform the requests of a hierarchical step with Horovod, one after the other (each
    group's process set from ``sets``); its result.  The bucket pipeline
    (gtopk_hvd.torch.buckets) issues the same requests with :func:`issue` and
    :func:`answer`, interleaved across buckets."""
    def alltoall(parts, group, name):
        return answer("alltoall", wait(hvd, issue("alltoall", parts, sets[group], name)))

    def allgather(message, group, name):
        return wait(hvd, issue("allgather", message, sets[group], name))
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
