"""``DistributedOptimizer``: horovod.torch.DistributedOptimizer with gTop-k sparsification.

The wrapped optimizer sees, on every rank, the same sparse average of the gradients instead
of the dense one.  As Horovod does, :func:`DistributedOptimizer` builds a subclass of the
user's optimizer class; the subclass carries only Horovod's method names (``step``,
``synchronize``, ``skip_synchronize``, ``zero_grad``, ``set_backward_passes_per_step``,
``state_dict`` / ``load_state_dict``) and ``gtopk_state`` / ``gtopk_stats``.  Everything else
lives in the :class:`~gtopk_hvd.torch.synchronizer.Synchronizer` it holds as
``_gtopk_sync``, so the user's own attributes are left alone.  One synchronisation is
gtopk_hvd.common.step: compensate, plan and verdict, exchange, scatter and residual,
statistics; the wrapped optimizer's ``step()`` then applies the result (momentum, weight
decay etc. stay its business, as with Horovod).

Reference: S. Shi et al., "A Distributed Synchronous SGD Algorithm with Global Top-k
Sparsification for Low Bandwidth Networks", ICDCS 2019.
"""
import logging
import warnings
from contextlib import contextmanager

import horovod.torch as hvd
import torch

from gtopk_hvd.common.buckets import DEFAULT_BUCKET_CAP_MB, check_bucket_arguments
from gtopk_hvd.common.errors import GTopkError
from gtopk_hvd.common.process_sets import is_elastic
from gtopk_hvd.common.validation import (check_auto_link, check_compression,
                                         check_global_process_set,
                                         check_gradient_predivide_factor, check_hierarchical,
                                         check_no_groups, check_op, check_parameter_names,
                                         check_positive_int, layout_key)
from gtopk_hvd.torch.collective import op_name
from gtopk_hvd.torch.horovod_compat import (called_by_horovod_state_init,
                                           calling_grad_scaler, state_init_step)
from gtopk_hvd.torch.state import GTopkState
from gtopk_hvd.torch.synchronizer import Synchronizer

__all__ = ["DistributedOptimizer"]

logger = logging.getLogger(__name__)

# attributes the wrapper itself sets on the optimizer: everything else belongs to the user
_OWN = ("_gtopk_sync", "backward_passes_per_step")


class _DistributedOptimizer(torch.optim.Optimizer):
    """Methods copied into a subclass of the user's optimizer class, as Horovod does."""

    def __init__(self, optimizer, named_parameters, backward_passes_per_step, op,
                 sparse_as_dense, gtopk_state, grad_scaler=None, gradient_predivide_factor=1.0,
                 compression=hvd.Compression.none, bucket_cap_mb=DEFAULT_BUCKET_CAP_MB,
                 hierarchical=False):
        super(self.__class__, self).__init__(optimizer.param_groups)
        self.defaults = dict(optimizer.defaults)
        for key, value in vars(optimizer).items():  # what the user's class set on its own
            if key not in _OWN:
                self.__dict__.setdefault(key, value)
        self.backward_passes_per_step = backward_passes_per_step
        self._gtopk_sync = Synchronizer(
            self, {p: name for name, p in named_parameters}, op, op_name(op), sparse_as_dense,
            gtopk_state, grad_scaler, gradient_predivide_factor, compression,
            check_compression(compression, hvd.Compression), bucket_cap_mb, hierarchical)
        self._gtopk_sync.register_hooks()

    def set_backward_passes_per_step(self, passes):
        self.backward_passes_per_step = check_positive_int(passes, "backward_passes_per_step")

    def synchronize(self):
        """Run gTop-k on every rank's gradients and write the result to p.grad.

        Every rank issues the same Horovod operations: one gTop-k exchange for all buffers
        (one allgather per stage, ``gtopk.0.s<stage>``, whatever the number of buffers; Top-k:
        one allgather per buffer; a layout without sparse buffers sends a header-only one),
        then one dense allreduce when tensors go dense.  The first exchange tells every rank
        whether some rank's gradients were not finite (then every gradient is NaN on every
        rank, the residuals stay as they were) and whether the set-ups differ (then every
        rank raises PlanMismatchError).  With ``algorithm="auto"``, from the second step on
        the dense allreduce goes first and carries that verdict instead.  With
        ``granularity="bucket"``: one exchange per bucket (``gtopk.<bucket>.s<stage>``),
        started during the backward pass from the second step on and finished here.
        """
        self._gtopk_sync.synchronize()

    @contextmanager
    def skip_synchronize(self):
        """``step()`` inside this context does not synchronise (after ``synchronize()``)."""
        self._gtopk_sync.should_synchronize = False
        try:
            yield
        finally:
            self._gtopk_sync.should_synchronize = True

    def step(self, closure=None):
        base = super(self.__class__, self)
        # Horovod calls it so only while the state is empty: no frame walk once it exists
        if not self.state and called_by_horovod_state_init():
            return state_init_step(self, base.step)
        sync = self._gtopk_sync
        if sync.grad_scaler is None and calling_grad_scaler() is not None:
            raise GTopkError(
                "scaler.step(optimizer) runs a gTop-k DistributedOptimizer built without "
                "grad_scaler=: its residuals hold scaled gradients, which a change of the loss "
                "scale would corrupt. Pass grad_scaler=scaler to DistributedOptimizer (the "
                "residuals are then kept in unscaled units)")
        if sync.should_synchronize:
            if closure is not None:  # every evaluation (LBFGS: several) is synchronised
                closure = _synchronized_closure(self, closure)
            elif sync.synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() "
                              "context after optimizer.synchronize(). This can cause training "
                              "slowdown. You may want to consider using "
                              "optimizer.skip_synchronize() context if you use "
                              "optimizer.synchronize() in your code. (gtopk_hvd: the "
                              "gradients are already synchronised and are not sent again.)")
            else:
                self.synchronize()
        sync.synchronized = False
        return base.step(closure)

    def zero_grad(self, set_to_none=True):
        self._gtopk_sync.reset(pipeline_running_ok=False)
        return super(self.__class__, self).zero_grad(set_to_none=set_to_none)

    @property
    def gtopk_state(self):
        """The :class:`~gtopk_hvd.torch.state.GTopkState`: schedule, residuals, step."""
        return self._gtopk_sync.state

    def gtopk_stats(self):
        """Statistics of the last synchronisation on this rank (see GTopkState.gtopk_stats)."""
        self._gtopk_sync.publish_step()
        return self._gtopk_sync.state.gtopk_stats()

    def state_dict(self):
        self._gtopk_sync.publish_step()
        state = super(self.__class__, self).state_dict()
        state["gtopk"] = self._gtopk_sync.state.state_dict(
            hvd.size(), hvd.rank(), layout_key(self._gtopk_sync.hierarchy))
        return state

    def load_state_dict(self, state_dict):
        """Load the wrapped optimizer's state and the gTop-k state (residuals, schedule step).

        Residuals written by another rank, world size or layout (flat / hierarchical N x L)
        are dropped with a warning.
        """
        state_dict = dict(state_dict)
        gtopk_state = state_dict.pop("gtopk", None)
        super(self.__class__, self).load_state_dict(state_dict)
        sync = self._gtopk_sync
        if gtopk_state is not None:
            sync.state.load_state_dict(gtopk_state, hvd.size(), hvd.rank(),
                                       layout_key(sync.hierarchy))
            sync.forget_published_step()  # the gTop-k state's own step wins
        sync.publish_step()
        sync.reset()  # an Elastic reset restores here: the old operations are gone
        sync.synchronized = False
        sync.should_synchronize = True


def _synchronized_closure(optimizer, closure):
    """``closure`` whose every evaluation synchronises the gradients it computed and returns
    the loss averaged over the ranks, so that an optimizer that decides on the loss (LBFGS's
    line search and stopping tests) decides the same on every rank."""
    def evaluate():
        loss = closure()
        optimizer.synchronize()
        if loss is None:
            return None
        value = torch.as_tensor(loss, dtype=torch.float64).detach().reshape(())
        return hvd.allreduce(value, name="gtopk.closure.loss", op=hvd.Average)
    return evaluate


def _named_parameters(optimizer, named_parameters):
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if named_parameters is None:
        return [(f"gtopk.noname.{i}.{j}", p) for i, group in enumerate(optimizer.param_groups)
                for j, p in enumerate(group["params"])]
    named_parameters = list(named_parameters)
    if any(not isinstance(np_, tuple) or len(np_) != 2 for np_ in named_parameters):
        raise ValueError("named_parameters should be a sequence of (name, parameter) tuples, "
                         "usually model.named_parameters()")
    check_parameter_names([n for n, _ in named_parameters], None)
    named_ids = {id(p) for _, p in named_parameters}
    unnamed = [i for i, p in enumerate(params) if id(p) not in named_ids]
    if unnamed:
        raise ValueError(
            f"named_parameters misses {len(unnamed)} of the optimizer's {len(params)} "
            f"parameters (positions {unnamed[:5]} in its param_groups); pass "
            f"named_parameters=model.named_parameters() for the model the optimizer updates")
    return named_parameters


def DistributedOptimizer(optimizer, named_parameters=None,
                         compression=hvd.Compression.none,
                         backward_passes_per_step=1,
                         op=hvd.Average,
                         gradient_predivide_factor=1.0,
                         num_groups=0, groups=None,
                         sparse_as_dense=False,
                         process_set=hvd.global_process_set,
                         *, density=0.001, algorithm="gtopk", granularity="model",
                         dense_threshold=0, grad_scaler=None, link=None, bucket_cap_mb=None,
                         gtopk_state=None, hierarchical=False):
    """Wrap ``optimizer`` so that ``step()`` applies the gTop-k sparse average of the gradients.

    Arguments as ``horovod.torch.DistributedOptimizer``, plus (keyword-only):

    Args:
        density: fraction of gradient entries kept per buffer, a float in (0, 1], a
            :class:`~gtopk_hvd.common.density.DensitySchedule` or ``callable(step)``;
            k = max(1, ceil(density * buffer size)).  1.0 gives the dense average.
        algorithm: ``"gtopk"`` (hypercube merge, O(k log P)), ``"topk"`` (allgather of
            every rank's top-k, O(kP)) or ``"auto"``: per buffer the cheapest of a dense
            allreduce and gTop-k by the alpha-beta model of gtopk_hvd.common.cost, with the
            link measured on every rank after the first step (tens of milliseconds; the first
            step sends every buffer by gTop-k) or given as ``link``; the choice is the same on
            every rank, logged once by rank 0 and in ``gtopk_stats()["methods"]``.  A buffer
            sent densely applies its residual in full.
        granularity: ``"model"`` (one top-k over all gradients flattened together, as in the
            paper), ``"layer"`` (one per tensor) or ``"bucket"``: one per bucket of
            ``bucket_cap_mb`` (tensors in reverse registration order, as Horovod's fusion
            buffer and DDP's buckets), each bucket's exchange started as soon as its
            gradients are complete, so communication overlaps the rest of the backward pass
            (from the second step on; gTop-k only).
        gtopk_state: a :class:`~gtopk_hvd.torch.GTopkState` to keep the residuals, the
            schedule step and the statistics in (as in TensorFlow); then ``density``,
            ``algorithm``, ``granularity``, ``dense_threshold`` and ``link`` come from it.
            By default the optimizer builds its own.
        bucket_cap_mb: MiB of float32 per bucket with ``granularity="bucket"`` (default 25;
            the first bucket holds at most 1 MiB so that the exchanges start early).
        link: for ``algorithm="auto"``: a :class:`~gtopk_hvd.common.cost.Link` or a tuple
            (alpha s per message, beta s per byte[, select s per entry[, overhead s]]), for
            example from ``gtopk_hvd.torch.measure_link()``; needed under Horovod Elastic.
        dense_threshold: tensors with fewer elements are allreduced densely in float32.  The
            default 0 sparsifies every tensor, as the paper does; 1024 or so sends biases and
            norm weights densely (worth it with ``granularity="layer"``).
        grad_scaler: the ``torch.amp.GradScaler`` that scales the loss, if any.  The residuals
            are then kept in unscaled units (acc = grad + scale * residual), so a change of
            scale does not change what they mean; use Horovod's pattern (``synchronize()``,
            ``scaler.unscale_``, ``skip_synchronize()``, ``scaler.step``, README).
        hierarchical: hierarchical gTop-k across nodes (docs/pytorch.md; needs
            ``init(hierarchical=True)``; gTop-k at the model or layer granularity).

    ``compression`` is ``Compression.none`` or ``Compression.fp16`` (values travel as float16,
    merges and residuals stay float32), ``op`` is Average or Sum, ``process_set`` the global
    set and ``num_groups`` / ``groups`` unset (use ``granularity``).
    ``gradient_predivide_factor`` f (with Average) works as in Horovod: the gradients are
    multiplied by 1/f before the reduction and the average by f after it; the residuals stay
    in the gradients' units (with a power-of-two f the result is bit for bit that of f = 1).
    The residuals (float32, per rank) are part of ``state_dict()``.

    Example::

        import gtopk_hvd.torch as hvd
        hvd.init()
        opt = torch.optim.SGD(model.parameters(), lr=0.1 * hvd.size())
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                       density=0.01)
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}; "
            f"pass for example torch.optim.SGD(model.parameters(), lr=0.1)")
    if hasattr(optimizer, "gtopk_stats") or hasattr(optimizer, "_allreduce_delay"):
        raise ValueError(f"optimizer is already a distributed optimizer "
                         f"({type(optimizer).__name__}); wrap the plain torch optimizer once")
    check_compression(compression, hvd.Compression)
    backward_passes_per_step = check_positive_int(backward_passes_per_step,
                                                  "backward_passes_per_step")
    check_op(op_name(op))
    gradient_predivide_factor = check_gradient_predivide_factor(gradient_predivide_factor,
                                                                op_name(op))
    check_no_groups(num_groups, groups)
    check_global_process_set(process_set)
    if gtopk_state is None:
        state = GTopkState(density, algorithm, granularity, dense_threshold, link)
    elif isinstance(gtopk_state, GTopkState):
        state = gtopk_state
    else:
        raise TypeError(f"gtopk_state must be a gtopk_hvd.torch.GTopkState, got "
                        f"{type(gtopk_state).__name__}")
    bucket_cap_mb = check_bucket_arguments(state.algorithm, state.granularity, bucket_cap_mb)
    check_auto_link(state.algorithm, state.link, is_elastic(), "gtopk_hvd.torch.measure_link")
    check_hierarchical(hierarchical, state.algorithm, state.granularity, auto=True)  # Elastic too
    named = _named_parameters(optimizer, named_parameters)
    if not hvd.is_initialized():
        raise GTopkError("Horovod is not initialised: call gtopk_hvd.torch.init() on every "
                         "rank before building a gTop-k DistributedOptimizer")
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,),
               dict(_DistributedOptimizer.__dict__))
    if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got "
                        f"{type(grad_scaler).__name__}")
    return cls(optimizer, named, backward_passes_per_step, op, sparse_as_dense, state,
               grad_scaler, gradient_predivide_factor, compression, bucket_cap_mb, hierarchical)
