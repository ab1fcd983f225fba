"""``Compression.gtopk``: gTop-k as a Horovod Compressor, for ``horovod.torch``'s own optimizer.

``horovod.torch.DistributedOptimizer(opt, named_parameters=..., compression=
gtopk_hvd.torch.Compression.gtopk(density=0.01))`` runs per-tensor gTop-k (the
``granularity="layer"`` of gtopk_hvd's own optimizer) inside Horovod's unmodified optimizer:

- ``compress(tensor)``: acc = grad + residual (this rank's residual for that parameter, kept
  by the compressor) is put aside, and a one-element placeholder goes through Horovod's
  allreduce instead of the gradient;
- ``decompress(placeholder, ctx)``: the first call of a synchronisation runs the exchange of
  every tensor compressed since the last one (Horovod compresses all of them before it
  decompresses the first), in the order of their names, all tensors' sets of a stage in one
  allgather with an explicit name (``gtopk.compressor.0.s<stage>``), so every rank issues the
  same operations in the same order whatever order its hooks fired in (parameters without a
  gradient are compressed in set order, which differs across ranks), and a step costs log2 P
  latency rounds whatever the number of tensors.  It returns the dense result of its tensor (the
  global set, divided by P for Average); the residual keeps what was not applied.

The first exchange of a flush carries the digest of the whole flush (names, sizes, k): ranks
that disagree raise :class:`~gtopk_hvd.common.plan.PlanMismatchError` together.  When some
rank's acc is not finite, every tensor of the step comes back as NaN on every rank (one
verdict per step, as gtopk_hvd's optimizer) with every residual kept; ``torch.cuda.amp`` / ``GradScaler`` then skips
the step.  Horovod's ``gradient_predivide_factor`` scales only the placeholder: the result is
the plain average.
"""
import logging

import horovod.torch as hvd
import torch
from horovod.torch.compression import Compression as _HorovodCompression
from horovod.torch.compression import Compressor

from gtopk_hvd.common.compression import (COMPRESSOR_PREFIX, check_compressor_process_set,
                                          horovod_call, op_from_call,
                                          require_name)
from gtopk_hvd.common.density import check_density, k_for
from gtopk_hvd.common.process_sets import agree_on_mode, hierarchical_sets, is_elastic
from gtopk_hvd.common.step import Buffer, StepConfig, run_step
from gtopk_hvd.common.validation import (check_algorithm, check_buffer_numel,
                                         check_hierarchical, layout_key)
from gtopk_hvd.torch.collective import compensate, decompress, op_name
from gtopk_hvd.torch.hierarchical import gather_modes
from gtopk_hvd.torch.state import GTopkState
from gtopk_hvd.torch.step import TorchStep

__all__ = ["Compression", "GTopkCompressor"]

logger = logging.getLogger(__name__)


class _Pending:
    """One compressed tensor waiting for its exchange."""

    def __init__(self, name, acc, shape, dtype, op):
        self.name, self.acc, self.shape, self.dtype, self.op = name, acc, shape, dtype, op
        self.output = None


class GTopkCompressor(Compressor):
    """gTop-k (or Top-k) with error feedback, per tensor, as a Horovod ``Compressor``.

    Args:
        density: fraction of each tensor's entries kept, in (0, 1].
        algorithm: ``"gtopk"`` (hypercube stages, O(k log P)) or ``"topk"`` (allgather).
        hierarchical: hierarchical gTop-k per tensor (docs/pytorch.md): a reduce-scatter
            inside each node, gTop-k across nodes on this rank's shard, whose residual it
            keeps; needs ``gtopk_hvd.torch.init(hierarchical=True)`` before the compressor is
            made.  Unequal hosts or one rank a host run flat gTop-k.

    Attributes:
        gtopk_state: a :class:`~gtopk_hvd.torch.GTopkState` (``residuals`` by parameter name,
            ``step``, statistics); ``state_dict()`` / ``load_state_dict()`` checkpoint it.
    """

    def __init__(self, density=0.001, algorithm="gtopk", hierarchical=False):
        self.gtopk_state = GTopkState(check_density(density),
                                      check_algorithm(algorithm, where="Compression.gtopk"),
                                      granularity="layer")
        self._pending = {}
        self._hierarchy = None  # (layout, process sets) of hierarchical gTop-k
        if check_hierarchical(hierarchical, self.gtopk_state.algorithm, "layer", is_elastic()):
            layout, sets = hierarchical_sets(hvd)
            self._hierarchy = None if layout.mode == "flat" else (layout, sets)

    def compress(self, tensor):
        """Put acc = tensor + residual aside; return a one-element placeholder and the ctx."""
        name, op, process_set = horovod_call(self)
        check_compressor_process_set(process_set)
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise ValueError(f"the gTop-k compressor reduces floating-point gradients, got "
                             f"{getattr(tensor, 'dtype', type(tensor).__name__)}")
        if tensor.is_sparse:
            raise ValueError("the gTop-k compressor needs dense gradients: pass "
                             "sparse_as_dense=True to hvd.DistributedOptimizer")
        name = require_name(name)  # Horovod's optimizer always names its tensors
        op = op_from_call(op, "Average", op_name)
        numel = check_buffer_numel(tensor.numel(), name)
        state = self.gtopk_state
        if name in self._pending:
            logger.warning("gtopk_hvd: tensor %r compressed twice without a decompress in "
                           "between; the first one is dropped", name)
        if self._hierarchy is not None:  # the shard's residual joins after the node's sum
            acc = state.spare(name, numel, tensor.device)
            acc.copy_(tensor.detach().reshape(-1))
        else:
            eps = state.residual(name, numel, tensor.device)
            acc = compensate(tensor, eps, out=state.spare(name, numel, tensor.device))
        entry = self._pending[name] = _Pending(name, acc, tensor.shape, tensor.dtype, op)
        return tensor.new_zeros(1), entry

    def decompress(self, tensor, ctx):
        """The dense gTop-k result of the tensor ``ctx`` belongs to (its flush runs first)."""
        if not isinstance(ctx, _Pending):
            return tensor
        if ctx.output is None:
            self._flush()
        output, ctx.output = ctx.output, None
        return output

    def _flush(self):
        """Exchange every pending tensor, in name order, on every rank: the step of
        gtopk_hvd.common.step with one buffer per tensor."""
        pending = [self._pending[name] for name in sorted(self._pending)]
        self._pending = {}
        state = self.gtopk_state
        density = state.density()
        buffers = [Buffer(e.name, [e], e.acc.numel(), state.algorithm) for e in pending]
        config = StepConfig(state.algorithm, ",".join(e.op for e in pending), "compressor", 0,
                            name=COMPRESSOR_PREFIX)
        agree_on_mode(hvd, COMPRESSOR_PREFIX, self._hierarchy is not None, gather_modes)
        run_step(_CompressorStep(state, config, pending, self._hierarchy), config, buffers, [],
                 [k_for(b.numel, density) for b in buffers], density)

    def gtopk_stats(self):
        """Statistics of the last synchronisation on this rank (see GTopkState.gtopk_stats)."""
        return self.gtopk_state.gtopk_stats()

    def state_dict(self):
        """The residuals (per rank) and the step, for ``torch.save``."""
        return self.gtopk_state.state_dict(hvd.size(), hvd.rank(), layout_key(self._hierarchy))

    def load_state_dict(self, state):
        """Restore :meth:`state_dict` (residuals kept only by the same rank of a world of the
        same size and layout, as for gtopk_hvd's own optimizer)."""
        self.gtopk_state.load_state_dict(state, hvd.size(), hvd.rank(),
                                         layout_key(self._hierarchy))

    def __repr__(self):
        return f"Compression.gtopk({self.gtopk_state!r})"


class _CompressorStep(TorchStep):
    """The step backend of a compressor flush: a buffer per pending tensor, whose acc was
    computed at ``compress``; the result goes to the tensor's ``output``."""

    def __init__(self, state, config, pending, hierarchy=None):
        super().__init__(state, config, [], None, None, self._record, hierarchy)
        self.pending = pending

    def compensate(self, buffer, scale, predivide):
        acc = buffer.members[0].acc
        if self.hierarchy is not None:  # acc is the gradient; the shard's residual joins later
            self.add_shard_residual(buffer, scale, predivide, acc.device)
        return acc

    def write_sparse(self, buffer, result, finite):
        entry = buffer.members[0]
        average_over = self.size if entry.op == "Average" else 1
        dense = decompress(result, buffer.numel, self.config.sparse_algorithm, average_over)
        entry.output = dense.view(entry.shape).to(entry.dtype)

    def nonfinite(self, finite):
        if not finite:  # NaN on every rank (as a dense allreduce would give), residuals kept
            for entry in self.pending:
                entry.output = torch.full(entry.shape, float("nan"), dtype=entry.dtype,
                                          device=entry.acc.device)

    def _record(self, finite, stats):
        state = self.state
        if finite:
            state.step += 1
        else:
            state.nonfinite_steps += 1
        state.last = dict(stats, finite=finite)


class Compression(_HorovodCompression):
    """Horovod's ``Compression`` (``none``, ``fp16``) plus ``gtopk``.

    ``Compression.gtopk(density=0.01)`` is a new compressor: use one per optimizer (it keeps
    that optimizer's residuals).
    """

    gtopk = GTopkCompressor
