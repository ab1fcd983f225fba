"""gTop-k allreduce of one PyTorch tensor: the functional form of one gTop-k S-SGD step.

One call on every rank (ALGORITHM.md, "One step on worker p"):

1. compensate: acc = tensor + residual, flat float32 (:func:`compensate`), and one finiteness
   check of acc;
2. select and communicate: the framework-free driver of gtopk_hvd.common.collective with
   :class:`~gtopk_hvd.torch.ops.TorchOps` (hypercube gTop-k, or Top-k by allgather); the
   headers carry this rank's finiteness flag and plan digest, so every rank ends the exchange
   with the same verdict (:func:`check_verdict`);
3. decompress: scatter the global set into a dense tensor, divided by P for Average
   (:func:`decompress`); bit-identical on every rank;
4. update the residual: eps = acc, eps[local[alive]] = 0 (:func:`update_residual`).

A non-finite step (NaN or Inf in any rank's acc) gives every rank an all-NaN output and
leaves every residual as it was.  ``gtopk_allreduce_`` computes acc in the tensor's own memory
and reuses it for the output, so a step allocates no gradient-sized buffer: on a 25M-element
gradient a fresh 100 MB buffer costs as much as a pass over it.

Reference: S. Shi et al., "A Distributed Synchronous SGD Algorithm with Global Top-k
Sparsification for Low Bandwidth Networks", ICDCS 2019.
"""
import logging
import time

import horovod.torch as hvd
import torch

from gtopk_hvd.common.collective import (MISMATCH, NONFINITE, GTopkResult,
                                         dense_allreduce_bytes, gtopk_exchange,
                                         gtopk_exchange_grouped, reduce_op_name,
                                         topk_allgather_exchange)
from gtopk_hvd.common.cost import measure_link as _measure_link
from gtopk_hvd.common.density import check_density, k_for
from gtopk_hvd.common.plan import make_plan, mismatch_error, plan_digest
from gtopk_hvd.common.process_sets import exchange_sets, process_set_for_stage
from gtopk_hvd.common.validation import (check_algorithm, check_buffer_numel,
                                         check_global_process_set, check_op)
from gtopk_hvd.torch.ops import TorchOps, all_finite, select_topk

__all__ = ["GTopkResult", "gtopk_allreduce", "gtopk_allreduce_", "compensate", "exchange",
           "exchange_grouped", "exchange_each",
           "check_verdict", "decompress", "update_residual", "op_name", "dense_allreduce_bytes",
           "measure_link"]

logger = logging.getLogger(__name__)


def op_name(op):
    """The name of a Horovod reduce op ('Average', 'Sum', ...), or its repr if unknown."""
    return reduce_op_name(hvd, op)


def compensate(tensor, residual=None, scale=1.0, out=None):
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


def measure_link(name="gtopk.link", device="cpu"):
    """This job's :class:`~gtopk_hvd.common.cost.Link` (alpha, beta, and the cost of gTop-k's
    local work), measured now in tens of milliseconds and the same on every rank (the
    slowest rank's figures); call it on every rank at the same point (Horovod operations
    ``{name}.*``).  ``algorithm="auto"`` calls it once; pass the result as ``link=`` to skip
    the measurement (Horovod Elastic needs that)."""
    def allreduce(numel):
        hvd.allreduce(torch.zeros(numel, dtype=torch.float32, device=device),
                      name=f"{name}.{numel}", op=hvd.Sum)

    def select(numel):
        acc = compensate(torch.randn(numel, device=device),
                         torch.zeros(numel, device=device))
        acc[select_topk(acc, k_for(numel, 0.001)).long()] = 0

    def agree(values):
        return hvd.allreduce(torch.tensor(values, dtype=torch.float64), name=f"{name}.max",
                             op=hvd.Max).tolist()

    return _measure_link(allreduce, select, agree, hvd.size())


def check_verdict(verdict, plan, name="gtopk.plan"):
    """Raise :class:`~gtopk_hvd.common.plan.PlanMismatchError` on every rank when the
    exchange found set-ups that disagree (one allgather of the plans, to name the difference);
    return whether the step is finite."""
    if verdict & MISMATCH:
        raise mismatch_error(hvd.allgather_object(plan, name=name), hvd.rank())
    return not verdict & NONFINITE


def decompress(result, numel, algorithm="gtopk", average_over=1, out=None, postscale=1.0):
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


def _check_tensor(tensor, residual):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"gTop-k reduces floating-point gradients, got dtype {tensor.dtype}; "
                         f"use hvd.allreduce for integer tensors")
    if tensor.is_sparse:
        raise ValueError("tensor is sparse; densify it first (tensor.to_dense())")
    if residual is not None and (not isinstance(residual, torch.Tensor)
                                 or residual.dtype != torch.float32
                                 or residual.numel() != tensor.numel()):
        raise ValueError(
            f"residual must be a float32 tensor of {tensor.numel()} elements (the residual "
            f"returned by the previous call, or None for zeros), got "
            f"{getattr(residual, 'dtype', type(residual).__name__)} with "
            f"{getattr(residual, 'shape', '?')}")


def gtopk_allreduce(tensor, density=0.001, name=None, op=hvd.Average, algorithm="gtopk",
                    residual=None, process_set=hvd.global_process_set, *, profile=False):
    """Sparse allreduce of ``tensor`` by gTop-k with error feedback; call it on every rank.

    1. acc = tensor + residual (float32);
    2. local top-k of |acc|, k = max(1, ceil(density * numel)), ties by lower index;
    3. log2(P) hypercube stages of pairwise merge-and-truncate to k (``algorithm="gtopk"``),
       or an allgather of every rank's top-k (``algorithm="topk"``, O(kP));
    4. output = the global set scattered into a dense tensor, divided by P for Average;
    5. new residual = acc with this rank's entries that reached the result cleared.

    Args:
        tensor: the gradient (any shape, floating point).
        density: fraction of entries kept, in (0, 1].  1.0 gives the dense sum exactly.
        name: prefix of the Horovod op names (the same on every rank).
        op: ``hvd.Average`` or ``hvd.Sum``.
        algorithm: ``"gtopk"`` or ``"topk"``.
        residual: this rank's residual from the previous call (flat float32), or None.  It is
            updated in place and returned as ``result.residual``.
        process_set: only the global process set is supported.
        profile: record per-phase wall times in ``result.timings``.

    Returns:
        :class:`GTopkResult`; ``result.output`` is the dense tensor, ``result.residual`` the
        residual to pass to the next call (the same tensor as ``residual`` if one was given).

    Example::

        res = gtopk_allreduce(grad, density=0.01, name="w", residual=eps)
        grad, eps = res.output, res.residual
    """
    return _gtopk_allreduce(tensor, density, name, op, algorithm, residual, process_set,
                            profile, in_place=False)


def gtopk_allreduce_(tensor, density=0.001, name=None, op=hvd.Average, algorithm="gtopk",
                     residual=None, process_set=hvd.global_process_set, *, profile=False):
    """In-place :func:`gtopk_allreduce` (as ``hvd.allreduce_`` is to ``hvd.allreduce``): the
    result is written into ``tensor`` and ``result.output`` is ``tensor``.  Same arguments,
    same bits; it saves allocating a tensor-sized output on every call.
    """
    return _gtopk_allreduce(tensor, density, name, op, algorithm, residual, process_set,
                            profile, in_place=True)


def _gtopk_allreduce(tensor, density, name, op, algorithm, residual, process_set, profile,
                     in_place):
    _check_tensor(tensor, residual)
    density = check_density(density)
    check_op(op_name(op))
    check_algorithm(algorithm, where="gtopk_allreduce")
    check_global_process_set(process_set)
    numel = check_buffer_numel(tensor.numel(), name or "tensor")
    k = k_for(numel, density)
    size = hvd.size()
    plan = make_plan(algorithm, op_name(op), "tensor", 0, [(name or "tensor", numel, k)])

    # acc in a buffer of its own: the residual stays as it was until the step is known finite
    direct = in_place and tensor.dtype == torch.float32 and tensor.is_contiguous()
    acc = compensate(tensor, residual, out=tensor.view(-1) if direct else None)
    flags = 0 if all_finite([acc]) else NONFINITE
    exchanged = exchange(acc, k, algorithm, name or "gtopk", profile, plan_digest(plan), flags)
    finite = check_verdict(exchanged.verdict, plan)
    start = time.perf_counter()
    if finite:
        new_residual = update_residual(acc.clone() if residual is None else residual.copy_(acc),
                                       exchanged)
        average_over = size if op_name(op) == "Average" else 1
        dense = decompress(exchanged, numel, algorithm, average_over, out=acc)
    else:  # every rank: the same non-finite result, the residual as it was
        new_residual = (torch.zeros(numel, dtype=torch.float32, device=tensor.device)
                        if residual is None else residual)
        dense = acc.fill_(float("nan"))
    if direct:
        output = tensor
    elif in_place:
        output = tensor.copy_(dense.view(tensor.shape))
    else:
        output = dense.view(tensor.shape).to(tensor.dtype)
    mid = time.perf_counter()
    result = GTopkResult(output, new_residual, exchanged, k)
    result.finite = finite
    if profile:
        result.timings["decompress"] = mid - start
        result.timings["residual"] = time.perf_counter() - mid
    return result
