"""gTop-k allreduce of one PyTorch tensor: the functional form of one gTop-k S-SGD step.

One call on every rank (ALGORITHM.md, "One step on worker p"):

1. compensate: acc = tensor + residual, flat float32, in the residual's memory
   (:func:`compensate`);
2. select and communicate: the framework-free driver of gtopk_hvd.common.collective with
   :class:`~gtopk_hvd.torch.ops.TorchOps` (hypercube gTop-k, or Top-k by allgather);
3. decompress: scatter the global set into a dense tensor, divided by P for Average
   (:func:`decompress`); bit-identical on every rank;
4. update the residual: eps = acc, eps[local[alive]] = 0, in place (:func:`update_residual`).

The residual is updated in place, so a step allocates no gradient-sized buffer besides the
dense output: on a 25M-element gradient a fresh 100 MB buffer costs as much as a pass over it.

Reference: S. Shi et al., "A Distributed Synchronous SGD Algorithm with Global Top-k
Sparsification for Low Bandwidth Networks", ICDCS 2019.
"""
import logging
import time

import horovod.torch as hvd
import torch

from gtopk_hvd.common.collective import (GTopkResult, dense_allreduce_bytes,
                                         gtopk_exchange, reduce_op_name,
                                         topk_allgather_exchange)
from gtopk_hvd.common.density import check_density, k_for
from gtopk_hvd.common.process_sets import pair_sets, process_set_for_stage
from gtopk_hvd.common.validation import (check_algorithm, check_buffer_numel,
                                         check_global_process_set, check_op)
from gtopk_hvd.torch.ops import TorchOps

__all__ = ["GTopkResult", "gtopk_allreduce", "gtopk_allreduce_", "compensate", "exchange",
           "decompress", "update_residual", "op_name", "dense_allreduce_bytes"]

logger = logging.getLogger(__name__)


def op_name(op):
    """The name of a Horovod reduce op ('Average', 'Sum', ...), or its repr if unknown."""
    return reduce_op_name(hvd, op)


def compensate(tensor, residual=None):
    """acc = tensor + residual, flat float32, written into ``residual`` (a new tensor if None)."""
    flat = tensor.detach().reshape(-1)
    if residual is None:
        return flat.to(torch.float32, copy=True)
    return residual.add_(flat)


def exchange(acc, k, algorithm="gtopk", name="gtopk", profile=False):
    """Select this rank's top-k of ``acc`` and run the collective; an ExchangeResult."""
    ops = TorchOps(hvd, device=acc.device)
    rank, size = hvd.rank(), hvd.size()
    sync = (lambda t: torch.cuda.synchronize(t.device)) if acc.is_cuda else None
    if algorithm == "topk":
        return topk_allgather_exchange(ops, acc, k, hvd.global_process_set, size, name=name,
                                       profile=profile, sync=sync)
    sets = pair_sets(hvd)
    return gtopk_exchange(ops, acc, k, rank, size,
                          lambda stage: process_set_for_stage(sets, rank, stage),
                          name=name, profile=profile, sync=sync)


def decompress(result, numel, algorithm="gtopk", average_over=1, out=None):
    """Dense float32 tensor of ``numel`` entries from the global set, divided by
    ``average_over``.  Top-k's gathered entries are added in rank order (0 + v_0 + v_1 ...).

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
    else:  # unique indices: dividing the k values first gives the same bits as after
        values = result.values / average_over if average_over != 1 else result.values
        dense[result.indices.long()] = values
    return dense


def update_residual(acc, result):
    """eps = acc with the entries that made it into the result cleared (in place on ``acc``).

    Entries that were sent but dropped at some stage stay: that is the paper's gMask.
    """
    acc[result.local_indices[result.alive].long()] = 0
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
    check_algorithm(algorithm)
    check_global_process_set(process_set)
    numel = check_buffer_numel(tensor.numel(), name or "tensor")
    k = k_for(numel, density)
    size = hvd.size()

    acc = compensate(tensor, residual)  # from here on ``tensor`` is free to hold the output
    exchanged = exchange(acc, k, algorithm, name or "gtopk", profile)
    start = time.perf_counter()
    average_over = size if op_name(op) == "Average" else 1
    direct = in_place and tensor.dtype == torch.float32 and tensor.is_contiguous()
    dense = decompress(exchanged, numel, algorithm, average_over,
                       out=tensor.view(-1) if direct else None)
    if direct:
        output = tensor
    elif in_place:
        output = tensor.copy_(dense.view(tensor.shape))
    else:
        output = dense.view(tensor.shape).to(tensor.dtype)
    mid = time.perf_counter()
    new_residual = update_residual(acc, exchanged)
    result = GTopkResult(output, new_residual, exchanged, k)
    if profile:
        result.timings["decompress"] = mid - start
        result.timings["residual"] = time.perf_counter() - mid
    return result
