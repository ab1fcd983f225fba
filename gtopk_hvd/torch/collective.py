"""The collective pieces of the PyTorch backend, used by every entry point's step.

:func:`exchange` / :func:`exchange_grouped` run the framework-free stage loop of
gtopk_hvd.common.collective with :class:`~gtopk_hvd.torch.ops.TorchOps` (hypercube gTop-k, or
Top-k by allgather); :func:`check_verdict` turns the verdict the headers carried into an error
on every rank or the step's finiteness; :func:`decompress` scatters the global set into a
dense tensor (bit-identical on every rank); :func:`update_residual` keeps what was not applied.
The step that composes them is gtopk_hvd.common.step (with gtopk_hvd.torch.step); the
functional form of one step on one tensor is gtopk_hvd.torch.functional.

Reference: S. Shi et al., "A Distributed Synchronous SGD Algorithm with Global Top-k
Sparsification for Low Bandwidth Networks", ICDCS 2019.
"""
import logging

import horovod.torch as hvd
import torch

from gtopk_hvd.common.collective import (MISMATCH, NONFINITE, GTopkResult,
                                         dense_allreduce_bytes, gtopk_exchange,
                                         gtopk_exchange_grouped, reduce_op_name,
                                         topk_allgather_exchange)
from gtopk_hvd.common.cost import measure_link as _measure_link
from gtopk_hvd.common.density import k_for
from gtopk_hvd.common.plan import mismatch_error
from gtopk_hvd.common.process_sets import (exchange_sets, first_stage_set,
                                           process_set_for_stage)
from gtopk_hvd.torch.ops import TorchOps, select_topk

__all__ = ["GTopkResult", "compensate", "exchange",
           "exchange_grouped", "exchange_each",
           "check_verdict", "decompress", "update_residual", "op_name", "dense_allreduce_bytes",
           "measure_link"]

logger = logging.getLogger(__name__)


def op_name(op):
    """The name of a Horovod reduce op ('Average', 'Sum', ...), or its repr if unknown."""
    return reduce_op_name(hvd, op)


def compensate(tensor, residual=None, scale=1.0, *, out=None):
    """acc = tensor + scale * residual, flat float32, written into ``out`` (a new tensor if
    None).  ``residual`` is left as it is, so a non-finite step can keep it."""
    flat = tensor.detach().reshape(-1)
    if out is None:
        out = torch.empty(flat.numel(), dtype=torch.float32, device=flat.device)
    if residual is None:
        return out.copy_(flat)
    return torch.add(flat, residual, alpha=scale, out=out)


def exchange(acc, k, algorithm="gtopk", name="gtopk", profile=False, digest=0, flags=0,
             wire="float32"):
    """Select this rank's top-k of ``acc`` and run the collective; an ExchangeResult whose
    ``verdict`` every rank shares (``flags`` and ``digest`` travel in the headers).  ``wire``:
    "float16" sends the values as float16 (Horovod's Compression.fp16)."""
    ops = TorchOps(hvd, device=acc.device)
    rank, size = hvd.rank(), hvd.size()
    sync = (lambda t: torch.cuda.synchronize(t.device)) if acc.is_cuda else None
    if algorithm == "topk":
        return topk_allgather_exchange(ops, acc, k, hvd.global_process_set, size, name=name,
                                       digest=digest, flags=flags, profile=profile, sync=sync,
                                       wire=wire)
    sets = exchange_sets(hvd)
    return gtopk_exchange(ops, acc, k, rank, size,
                          lambda stage: process_set_for_stage(sets, stage),
                          name=name, digest=digest, flags=flags, profile=profile, sync=sync,
                          wire=wire)


def exchange_grouped(accs, ks, name="gtopk.0", profile=False, digest=0, flags=0,
                     wire="float32"):
    """gTop-k :func:`exchange` of several buffers, one ExchangeResult each sharing one
    verdict: all buffers' sets of a stage travel in one allgather (``{name}.s<stage>``), so a
    step costs log2 P rounds whatever the number of buffers."""
    ops = TorchOps(hvd, device=accs[0].device)
    sets = exchange_sets(hvd)
    sync = (lambda t: torch.cuda.synchronize(t.device)) if accs[0].is_cuda else None
    return gtopk_exchange_grouped(ops, accs, ks, hvd.rank(), hvd.size(),
                                  lambda stage: process_set_for_stage(sets, stage), name=name,
                                  digest=digest, flags=flags, profile=profile, sync=sync,
                                  wire=wire)


def exchange_each(accs, ks, algorithm="gtopk", name="gtopk", profile=False, digest=0, flags=0,
                  wire="float32"):
    """One :func:`exchange` per buffer, one after the other (``{name}.{i}``), sharing one
    verdict: L x log2 P rounds for gTop-k (what :func:`exchange_grouped` avoids)."""
    results = [exchange(acc, k, algorithm, f"{name}.{i}", profile, digest, flags, wire)
               for i, (acc, k) in enumerate(zip(accs, ks))]
    verdict = 0
    for result in results:
        verdict |= int(result.verdict)
    for result in results:
        result.verdict = verdict
    return results


def measure_link(name="gtopk.link", *, device="cpu", node_set=None, local_size=1):
    """This job's :class:`~gtopk_hvd.common.cost.Link` (alpha, beta, and the cost of gTop-k's
    local work), measured now in tens of milliseconds and the same on every rank (the
    slowest rank's figures); call it on every rank at the same point (Horovod operations
    ``{name}.*``).  ``algorithm="auto"`` calls it once; pass the result as ``link=`` to skip
    the measurement (Horovod Elastic needs that).  ``node_set``: this rank's node's process
    set, of ``local_size`` ranks (hierarchical gTop-k): the link inside the node too."""
    def allreduce(numel):
        hvd.allreduce(torch.zeros(numel, dtype=torch.float32, device=device),
                      name=f"{name}.{numel}", op=hvd.Sum)

    def select(numel):
        acc = compensate(torch.randn(numel, device=device),
                         torch.zeros(numel, device=device))
        acc[select_topk(acc, k_for(numel, 0.001)).long()] = 0

    stage_set = first_stage_set(hvd) if hvd.size() > 1 else None  # not inside the timing

    def stage():
        hvd.allgather(torch.zeros(2, dtype=torch.int32, device=device), name=f"{name}.stage",
                      process_set=stage_set)

    def agree(values):
        return hvd.allreduce(torch.tensor(values, dtype=torch.float64), name=f"{name}.max",
                             op=hvd.Max).tolist()

    def intra(numel):
        hvd.allreduce(torch.zeros(numel, dtype=torch.float32, device=device),
                      name=f"{name}.node.{numel}", op=hvd.Sum, process_set=node_set)

    return _measure_link(allreduce, select, agree, hvd.size(), stage=stage,
                         intra=intra if node_set is not None else None, local=local_size)


def check_verdict(verdict, plan, name="gtopk.plan"):
    """Raise :class:`~gtopk_hvd.common.plan.PlanMismatchError` on every rank when the
    exchange found set-ups that disagree (one allgather of the plans, to name the difference);
    return whether the step is finite."""
    if verdict & MISMATCH:
        raise mismatch_error(hvd.allgather_object(plan, name=name), hvd.rank())
    return not verdict & NONFINITE


def decompress(result, numel, algorithm="gtopk", average_over=1, postscale=1.0, *, out=None):
    """Dense float32 tensor of ``numel`` entries from the global set, divided by
    ``average_over``, then times ``postscale`` (Horovod's gradient_predivide_factor).  Top-k's
    gathered entries are added in rank order (0 + v_0 + v_1 ...).

    ``out``: a flat float32 tensor of ``numel`` entries to write into (zeroed first) instead of
    a new one.  On a 25M-element gradient a fresh 100 MB tensor costs several times a pass
    over it (the kernel maps and faults in its pages), so reuse one where you can.
    """
    if out is None:
        dense = torch.zeros(numel, dtype=torch.float32, device=result.values.device)
    else:
        dense = out.zero_()
    if algorithm == "topk":
        dense.index_add_(0, result.indices.long(), result.values)
        if average_over != 1:
            dense /= average_over
        if postscale != 1.0:
            dense *= postscale
    else:  # unique indices: scaling the k values first gives the same bits as after
        values = result.values / average_over if average_over != 1 else result.values
        dense[result.indices.long()] = values * postscale if postscale != 1.0 else values
    return dense


def update_residual(acc, result, scale=1.0):
    """eps = acc / scale with the entries that made it into the result cleared (in place on
    ``acc``).  Entries that were sent but dropped at some stage stay: that is the paper's
    gMask.  With a power-of-two loss ``scale`` the division is exact.  With a float16 wire
    an applied entry keeps what the rounding took off (acc - the value sent)."""
    applied = result.local_indices[result.alive].long()
    if result.wire == "float16":
        acc[applied] -= result.local_values[result.alive]
    else:
        acc[applied] = 0
    if scale != 1.0:
        acc.mul_(1.0 / scale)
    return acc
