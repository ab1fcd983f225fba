"""``gtopk_allreduce``: the functional form of one gTop-k S-SGD step on one PyTorch tensor.

One call on every rank runs gtopk_hvd.common.step on a single buffer, the tensor
(:class:`~gtopk_hvd.torch.step.TensorStep`):

1. compensate: acc = tensor + residual, flat float32, and one finiteness check of acc;
2. select and communicate: hypercube gTop-k (or Top-k by allgather); the headers carry this
   rank's finiteness flag and plan digest, so every rank ends with the same verdict;
3. the new residual: acc with this rank's entries that reached the result cleared;
4. decompress: the global set scattered into a dense tensor, divided by P for Average;
   bit-identical on every rank.

A non-finite step (NaN or Inf in any rank's acc) gives every rank an all-NaN output and
leaves every residual as it was.  ``gtopk_allreduce_`` computes acc in the tensor's own memory
and reuses it for the output.

Reference: S. Shi et al., "A Distributed Synchronous SGD Algorithm with Global Top-k
Sparsification for Low Bandwidth Networks", ICDCS 2019.
"""
import horovod.torch as hvd
import torch

from gtopk_hvd.common.collective import GTopkResult
from gtopk_hvd.common.hierarchy import prepare_call
from gtopk_hvd.common.process_sets import agree_on_mode, hierarchical_sets
from gtopk_hvd.common.step import Buffer, StepConfig, run_step
from gtopk_hvd.common.validation import check_allreduce_arguments
from gtopk_hvd.torch.collective import op_name
from gtopk_hvd.torch.hierarchical import gather_modes, hierarchical_exchange
from gtopk_hvd.torch.step import TensorStep

__all__ = ["GTopkResult", "gtopk_allreduce", "gtopk_allreduce_"]


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
                    residual=None, process_set=hvd.global_process_set, *, profile=False,
                    hierarchical=False):
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
        hierarchical: hierarchical gTop-k (ALGORITHM.md): a reduce-scatter inside each node,
            gTop-k across nodes along each rail on 1/L of the buffer, an allgather inside the
            node; ``residual`` then covers this rank's shard only (None: zeros).  Needs
            ``init(hierarchical=True)``; unequal hosts or one rank a host run flat gTop-k.

    Returns:
        :class:`GTopkResult`; ``result.output`` is the dense tensor, ``result.residual`` the
        residual to pass to the next call (the same tensor as ``residual`` if one was given).

    Example::

        res = gtopk_allreduce(grad, density=0.01, name="w", residual=eps)
        grad, eps = res.output, res.residual
    """
    if hierarchical:
        return _hierarchical_allreduce(tensor, density, name, op, algorithm, residual,
                                       process_set)
    return _gtopk_allreduce(tensor, density, name, op, algorithm, residual, process_set,
                            profile, in_place=False)


def _hierarchical_allreduce(tensor, density, name, op, algorithm, residual, process_set):
    """gtopk_allreduce(hierarchical=True): the core's hierarchical step driven with Horovod
    (gtopk_hvd.torch.hierarchical); flat gTop-k where the layout falls back."""
    layout, sets = hierarchical_sets(hvd)
    if layout.mode == "flat":
        return _gtopk_allreduce(tensor, density, name, op, algorithm, residual, process_set,
                                False, in_place=False)
    _check_tensor(tensor, None)
    density, numel, _ = check_allreduce_arguments(density, op_name(op), algorithm,
                                                  process_set, tensor.numel(), name)
    if residual is not None and (not isinstance(residual, torch.Tensor)
                                 or residual.dtype != torch.float32):
        raise ValueError(f"residual must be a float32 tensor, got {type(residual).__name__} "
                         f"{getattr(residual, 'dtype', '')}")
    (lo, hi), k, plan = prepare_call(layout, numel, hvd.rank(), density, op_name(op),
                                     algorithm, None if residual is None else residual.numel())
    agree_on_mode(hvd, name or "gtopk", True, gather_modes)
    flat = tensor.detach().reshape(-1).to(torch.float32)
    eps = torch.zeros(hi - lo, dtype=torch.float32) if residual is None else residual
    res, finite = hierarchical_exchange(flat, eps, k, layout, sets, f"{name or 'gtopk'}.h",
                                        plan)
    if finite:
        dense = torch.zeros(numel, dtype=torch.float32)
        dense[res.indices.long()] = res.values
        if op_name(op) == "Average":
            dense = dense / hvd.size()
        new = res.acc  # this step's own tensor: cleared in place
        new[res.local_indices[res.alive].long()] = 0
        if residual is not None:
            residual.copy_(new)
            new = residual
    else:  # every rank: NaN, the residual as it was
        dense = torch.full((numel,), float("nan"))
        new = eps
    result = GTopkResult(dense.reshape(tensor.shape).to(tensor.dtype), new,
                         res.as_exchange_result(), k)
    result.finite = bool(finite)
    return result


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
    density, numel, k = check_allreduce_arguments(density, op_name(op), algorithm,
                                                  process_set, tensor.numel(), name)
    config = StepConfig(algorithm, op_name(op), "tensor", 0, name=name or "gtopk")
    agree_on_mode(hvd, name or "gtopk", False, gather_modes)
    backend = TensorStep(config, tensor, residual, in_place, profile)
    run_step(backend, config, [Buffer(name or "tensor", [tensor], numel, algorithm)], [], [k],
             density)
    return backend.gtopk_result(k)
